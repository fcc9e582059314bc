"""``make bench``: speed measurements, ours vs a baseline in the same run, as a table and bench.json.

Usage: python benchmarks/run.py [--quick] [--out bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from benchmarks.data_loading import bench_data_loading
from benchmarks.dit_bench import bench_dit
from benchmarks.memory import bench_memory
from benchmarks.sampling import bench_sampling
from benchmarks.timing import Row, gemm_peak_gflops
from benchmarks.train_step import bench_modulation_and_early_exit, bench_train_steps
from selfflow.core.host_malloc import keep_freed_memory
from selfflow.core.run_setup import cpu_settings_summary


def optional_rows(quick: bool) -> list[Row]:
    """The eval package's metric and extractor benchmarks, when that package is installed."""
    try:
        from benchmarks.eval_extractors import bench_extractors
        from benchmarks.eval_metrics import bench_fd
    except ImportError:
        return []
    keys = ("name", "ours", "baseline", "ratio", "target", "unit")
    return [Row(**{k: r.get(k) for k in keys}) for r in (*bench_fd(), *bench_extractors())]


def machine_info() -> dict:
    """The machine and the versions that the numbers depend on."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    versions = {}
    for pkg in ("numpy", "scipy", "av", "decord", "webdataset", "torch-fidelity"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"machine": platform.machine(), "cpu_model": cpu, "cpus": os.cpu_count(), "os": platform.platform(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "cuda": torch.cuda.is_available(), "cpu_kernels": cpu_settings_summary(),
            "versions": versions}


def print_table(rows: list[Row]) -> None:
    head = f"{'benchmark':90s} {'ours':>11s} {'baseline':>11s} {'ratio':>7s} {'target':>8s} unit"
    print(head)
    print("-" * len(head))
    for r in rows:
        base = f"{r.baseline:11.2f}" if r.baseline is not None else f"{'-':>11s}"
        ratio = f"{r.ratio:7.2f}" if r.ratio is not None else f"{'-':>7s}"
        target = "-" if r.target is None else str(r.target)
        print(f"{r.name[:90]:90s} {r.ours:11.2f} {base} {ratio} {target:>8s} {r.unit}")
    targeted = [r for r in rows if r.target is not None and r.note]
    if targeted:  # how each target row was measured (the XL/2 pair: its bound and per-round spread); all in bench.json
        print("\nnotes on the rows with a target:")
        for r in targeted:
            print(f"  {r.name}: {r.note}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--out", type=Path, default=Path("bench.json"))
    args = ap.parse_args()
    t0, load0 = time.perf_counter(), os.getloadavg()
    keep_freed_memory()  # as a CPU training run does (core.host_malloc): the training-step rows measure that
    torch.manual_seed(0)
    peak = gemm_peak_gflops()
    rows = [Row("fp32 GEMM peak (best of 1024³/2048³ matmul medians)", peak, None, None, None, "GFLOP/s")]
    rows += bench_train_steps(args.quick, peak)
    rows += bench_modulation_and_early_exit(args.quick)
    rows += bench_dit(args.quick)
    rows += bench_sampling(args.quick)
    rows += bench_memory(args.quick)
    rows += bench_data_loading(args.quick)
    rows += optional_rows(args.quick)
    print_table(rows)
    meta = {**machine_info(), "load_average_start": load0, "load_average_end": os.getloadavg(),
            "wall_s": round(time.perf_counter() - t0, 1), "quick": args.quick}
    print(f"\n{meta['cpu_model']}, {meta['cpus']} CPUs, torch {meta['torch']} ({meta['threads']} threads, "
          f"{meta['cpu_kernels']}); "
          f"load average at start {load0[0]:.2f}, at end {meta['load_average_end'][0]:.2f} "
          f"(> ~0.5 means other work shared the CPUs); {meta['wall_s'] / 60:.1f} min")
    # bench.json is the list of rows; the machine and versions go beside it (bench.meta.json).
    args.out.write_text(json.dumps([r.as_dict() for r in rows], indent=2))
    args.out.with_suffix(".meta.json").write_text(json.dumps(meta, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
