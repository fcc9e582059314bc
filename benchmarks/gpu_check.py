"""``make gpu-check``'s speed part: bf16 training-step and sampling throughput on one CUDA GPU.

SiT-XL/2 (DiT XL/2) and the 625M MMDiT at 256 tokens: flow-matching vs Self-Flow step images/s and their
ratio, MFU against a bf16 matrix product measured in the same run, peak memory against what ``selfflow plan``
predicts for the same model and batch, eager / compiled /
activation-checkpointed; SiT-XL/2 250-step SDE sampling images/s against the bound of its model calls alone;
the SiT-XL/2 Self-Flow step against the naive step of the official per-token class.
Writes a table and bench-gpu.json (after every case, so a run cut short keeps what it measured; a failed case
is recorded and the others run). Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

OUT = Path("bench-gpu.json")
if not __package__:  # run as a script (make gpu-check): the repository root, for `benchmarks.*`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_report import judge, print_table, print_targets, row_line  # noqa: E402 (after the path above)
from benchmarks.timing import median_time, round_ratio_range, steady_time  # noqa: E402
from selfflow.core.faults import error_line  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    """What the check runs at: the paper's models on a GPU; ``smoke()`` runs the same code tiny on the CPU (a test
    of this script, since a GPU is rarely at hand)."""

    device: str = "cuda"
    presets: dict[str, str] = field(default_factory=lambda: {"dit": "XL/2", "mmdit": "paper625m"})
    batch: int = 64
    grid: int = 16
    sample_batch: int = 64
    sample_steps: int = 250
    reps: int = 3  # medians of this many timings (of steps_in_a_row training steps, of a sampler call)
    steps_in_a_row: int = 3
    alternating_rounds: int = 7  # flow matching vs Self-Flow, compiled SiT-XL/2: the ratio target
    loader_samples: int = 2048  # ImageNet-recipe latent shards written for the data-loader case
    loader_workers: tuple[int, ...] = (1, 2, 4)
    # The 625M MMDiT is the paper's text-conditioned model (T5-XXL width 4096): captions of this many tokens
    # (the text encoder's default max_length), with a context mask as label dropout makes it.
    context_tokens: int = 64
    mmdit_options: dict = field(default_factory=dict)

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(device="cpu", presets={"dit": "tiny", "mmdit": "tiny"}, batch=2, grid=4, sample_batch=2,
                   sample_steps=3, reps=1, steps_in_a_row=1, alternating_rounds=2, context_tokens=8,
                   mmdit_options={"context_dim": 32}, loader_samples=32, loader_workers=(1,))


def bf16_matmul_tflops(n: int = 8192, device: str = "cuda") -> float:
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / median_time(lambda: a @ b, 10, warmup=2, device=device) / 1e12


def build(arch: str, kind: str, sizes: Sizes):
    """The model, initialised on the device (a 675M-parameter init on the host would take longer than its steps):
    the class-conditional SiT-XL/2, or the text-conditioned MMDiT."""
    from selfflow.core.dit import DiT, DiTConfig
    from selfflow.core.mmdit import MMDiT, MMDiTConfig

    torch.manual_seed(0)
    proj = 2.0 if kind == "self_flow" else 0.0
    preset = sizes.presets[arch]
    with torch.device(sizes.device):
        if arch == "dit":
            return DiT(DiTConfig(preset=preset, num_classes=1000, modalities={"image": 16}, projector_mult=proj,
                                 grid_size=sizes.grid))
        return MMDiT(MMDiTConfig(preset=preset, modalities={"image": 16}, projector_mult=proj,
                                 **sizes.mmdit_options))


def conditioning(model, batch: int, sizes: Sizes, device: str) -> tuple:
    """``(Conditioning, its null, context tokens)``: class labels for the DiT, a random caption embedding
    ``(B, Lc, context_dim)`` with its mask for a text-conditioned MMDiT."""
    from selfflow.core.tokens import Conditioning

    context_dim = getattr(getattr(model, "cfg", None), "context_dim", 0)
    if not context_dim:
        return (Conditioning(labels=torch.arange(batch, device=device) % 1000),
                Conditioning(labels=torch.full((batch,), 1000, device=device)), 0)
    n = sizes.context_tokens
    mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    return (Conditioning(context=torch.randn(batch, n, context_dim, device=device), context_mask=mask),
            Conditioning(context=torch.zeros(batch, n, context_dim, device=device), context_mask=~mask), n)


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def training_step(arch: str, kind: str, compile_blocks: bool, checkpointing: bool,
                  sizes: Sizes) -> tuple[Callable[[], object], float]:
    """One case's bf16 training step as ``selfflow train`` runs it (host reads of the losses and the gradient
    norm), on a fresh model, EMA and fused AdamW, and its FLOPs."""
    from benchmarks.train_step import make_train_step
    from selfflow.core.ema import make_ema
    from selfflow.core.flops import train_step_flops
    from selfflow.core.objective import ObjectiveConfig
    from selfflow.core.timesteps import TimestepDistribution
    from selfflow.core.tokens import Tokens, grid_ids

    dev = sizes.device
    model = build(arch, kind, sizes)
    model.activation_checkpointing = checkpointing
    if compile_blocks:
        for block in model.blocks():
            block.compile()
    ema = make_ema(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    obj = ObjectiveConfig(kind=kind).resolve(model.depth, 0.25, TimestepDistribution())
    b, g = sizes.batch, sizes.grid
    tokens = Tokens(torch.randn(b, g * g, 16, device=dev), grid_ids(1, g, g, b, dev))
    cond, _, n_context = conditioning(model, b, sizes, dev)
    step = make_train_step(model, ema, opt, tokens, cond, obj, null_label=1000, bf16=True, host_reads=True)
    teacher = obj.teacher_layer if obj.uses_teacher else None
    return step, b * train_step_flops(model, g * g, n_context, teacher)


def train_case(arch: str, kind: str, compile_blocks: bool, checkpointing: bool, sizes: Sizes) -> dict:
    dev, b = sizes.device, sizes.batch
    step, flops = training_step(arch, kind, compile_blocks, checkpointing, sizes)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # As selfflow train runs them: steps back to back, the host waiting only for its reads of the losses and the
    # gradient norm (on the H200 within the run-to-run spread of a step timed alone: docs/BENCHMARKS.md).
    sec = steady_time(step, sizes.reps, sizes.steps_in_a_row, warmup=3 if compile_blocks else 2, device=dev)
    row = {"arch": arch, "kind": kind, "compile": compile_blocks, "checkpointing": checkpointing, "batch": b,
           "images_per_s": b / sec, "tflops": flops / sec / 1e12, "peak_gib": peak_gib(dev)}
    try:  # the planner's view is a bonus: an error in it must not lose the measured row
        row["plan_gib"] = planned_peak(arch, kind, checkpointing, sizes) / 2**30
    except Exception as e:
        row.update(plan_gib=float("nan"), plan_error=error_line(e))
    return row


def alternating_case(sizes: Sizes) -> dict:
    """Issue 18's ratio target, measured so that drift cannot decide it: the compiled SiT-XL/2 flow-matching and
    Self-Flow steps, both models held at once, timed in alternating rounds of ``steps_in_a_row`` steps. Timed one
    case after the other, flow matching's rounds on an H200 drifted by 9 % within a minute (docs/BENCHMARKS.md
    "Third run"), more than the gap to the target. The ratio is that of the two medians."""
    dev = sizes.device
    steps = {kind: training_step("dit", kind, True, False, sizes)[0] for kind in ("flow_matching", "self_flow")}
    for step in steps.values():  # compile and settle both before any round
        for _ in range(3):
            step()
    rounds: dict[str, list[float]] = {kind: [] for kind in steps}
    for _ in range(sizes.alternating_rounds):
        for kind, step in steps.items():
            rounds[kind].append(steady_time(step, 1, sizes.steps_in_a_row, warmup=1, device=dev))
    fm, sf = (statistics.median(rounds[k]) for k in ("flow_matching", "self_flow"))
    return {"arch": "dit", "compile": True, "batch": sizes.batch, "rounds": sizes.alternating_rounds,
            "flow_matching_s": fm, "self_flow_s": sf, "ratio": sf / fm,
            "round_ratios": list(round_ratio_range(rounds["self_flow"], rounds["flow_matching"]))}


_plans: dict[tuple[str, str, str], object] = {}


def case_plan(arch: str, kind: str, sizes: Sizes):
    """``selfflow plan``'s :class:`~selfflow.core.plan.Plan` of a case: the same model built on the meta device,
    profiled by :func:`selfflow.core.plan.plan_model` (bf16). Made once per model and objective (it holds no
    batch; the three compile / checkpointing modes and the batch sizing share it)."""
    key = (arch, kind, repr(replace(sizes, batch=0)))
    if key not in _plans:
        _plans[key] = _profile_case(arch, kind, sizes)
    return _plans[key]


def _profile_case(arch: str, kind: str, sizes: Sizes):
    from selfflow.core.objective import ObjectiveConfig
    from selfflow.core.plan import plan_model
    from selfflow.core.timesteps import TimestepDistribution
    from selfflow.core.tokens import grid_ids

    model = build(arch, kind, replace(sizes, device="meta"))
    obj = ObjectiveConfig(kind=kind).resolve(model.depth, 0.25, TimestepDistribution())
    g = sizes.grid
    with torch.device("meta"):
        x, ids = torch.zeros(1, g * g, 16), grid_ids(1, g, g, 1, "meta")
        cond = conditioning(model, 1, sizes, "meta")[0]
    return plan_model(f"{arch} {kind}", model, x, ids, cond, obj, bf16=True)


def planned_peak(arch: str, kind: str, checkpointing: bool, sizes: Sizes) -> float:
    """What ``selfflow plan`` predicts for this case's peak memory (bytes)."""
    return case_plan(arch, kind, sizes).gpu_memory("none", 1, sizes.batch, checkpointing)


SMALLEST_BATCH = 8


def sized_to_memory(sizes: Sizes, memory_bytes: float) -> Sizes:
    """``sizes`` with its training batch sized to the GPU: halved from ``sizes.batch`` until ``selfflow plan``
    predicts that the eager Self-Flow step (the heavier objective) of both models fits in the share of
    ``memory_bytes`` a plan may fill (``plan.USABLE_FRACTION``, as ``selfflow plan``'s largest batch), down to 8
    at the least (below that a GPU is not worth timing; a case that then runs out of memory is recorded as
    such). A 40 GB card gets a batch that runs instead of a table of out-of-memory rows."""
    from selfflow.core.plan import USABLE_FRACTION

    plans = [case_plan(arch, "self_flow", sizes) for arch in ("dit", "mmdit")]
    batch = sizes.batch
    peak = lambda b: max(p.gpu_memory("none", 1, b, False) for p in plans)  # noqa: E731
    while batch > SMALLEST_BATCH and peak(batch) > USABLE_FRACTION * memory_bytes:
        batch //= 2
    return replace(sizes, batch=batch)


def gpu_sizes(start: Sizes, memory_bytes: float) -> tuple[Sizes, str]:
    """``start`` sized to the GPU (:func:`sized_to_memory`) and the line that says how its batch was chosen; if
    the planner fails, ``start`` as it is: one lent run measures at the start batch rather than not at all."""
    from selfflow.core.plan import USABLE_FRACTION

    try:
        sizes = sized_to_memory(start, memory_bytes)
    except Exception as e:
        return start, f"training batch {start.batch}: not sized by selfflow plan ({error_line(e)})"
    return sizes, (f"training batch {sizes.batch}: the largest (halving from GPU_CHECK_BATCH, default 64) at which "
                   f"selfflow plan fits both models' Self-Flow step in {100 * USABLE_FRACTION:.0f} % of "
                   f"{memory_bytes / 2**30:.0f} GiB")


def sampling_case(sizes: Sizes) -> dict:
    from selfflow.core.sampler import SamplerConfig, sample
    from selfflow.core.tokens import Conditioning, grid_ids

    dev, n, steps, g = sizes.device, sizes.sample_batch, sizes.sample_steps, sizes.grid
    model = build("dit", "flow_matching", sizes).eval()
    noise = torch.randn(n, g * g, 16, device=dev)
    ids = grid_ids(1, g, g, n, dev)
    cond, null, _ = conditioning(model, n, sizes, dev)
    cfg = SamplerConfig(solver="sde", steps=steps, cfg_scale=1.5, guidance_interval=(0.0, 0.7))
    labels = {1: cond.labels, 2: torch.cat([cond.labels, null.labels])}
    batches: list[int] = []  # the batch of every model call the sampler makes (guided calls run 2n)
    hook = model.register_forward_pre_hook(lambda _module, args: batches.append(args[0].shape[0]))
    with torch.inference_mode(), torch.autocast(dev, dtype=torch.bfloat16):
        total = median_time(lambda: sample(model, noise, ids, cond, cfg, null), 1, device=dev)  # warm-up + 1
        hook.remove()
        one_call = {k: median_time(lambda k=k: model(noise.repeat(k, 1, 1), ids.repeat(k, 1, 1),
                                                     torch.rand(k * n, device=dev), Conditioning(labels=labels[k])),
                                   sizes.reps, warmup=2, device=dev) for k in (1, 2)}
    calls = batches[len(batches) // 2:]  # the timed run's (the warm-up made the same calls)
    # The bound: the model calls alone, each at its own batch (a guided call, inside the interval, costs a
    # forward of 2n; the others one of n).
    bound = sum(one_call[b // n] for b in calls)
    return {"images_per_s": n / total, "bound_images_per_s": n / bound, "ratio_to_bound": bound / total,
            "model_calls": len(calls), "guided_calls": sum(b == 2 * n for b in calls)}


def xl2_vs_naive_case(sizes: Sizes) -> dict:
    """Issue 18's SiT-XL/2 comparison on the GPU: our Self-Flow step vs the naive step of the official
    per-token class (``benchmarks/dit_bench.xl2_step_pair``, here in bf16 at the check's batch), against the
    FLOP ratio of the two steps (``xl2_step_flops``), which bounds it."""
    from benchmarks.dit_bench import xl2_step_flops, xl2_step_pair

    preset, dev = sizes.presets["dit"], sizes.device
    ours, naive = xl2_step_pair(sizes.batch, preset=preset, device=dev, bf16=True)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_ours = median_time(ours, sizes.reps, warmup=2, device=dev)
    t_naive = median_time(naive, sizes.reps, warmup=2, device=dev)
    f_ours, f_naive = xl2_step_flops(preset)
    return {"preset": preset, "batch": sizes.batch, "ours_s": t_ours, "naive_s": t_naive,
            "ratio": t_naive / t_ours, "flop_bound": f_naive / f_ours, "peak_gib": peak_gib(dev)}


def loader_case(sizes: Sizes, train_rows: list[dict]) -> dict:
    """Issue 18's data loader on the GPU node, against what its training step consumes: SiT-XL/2's ImageNet
    latent shards read by the trainer's stream with N DataLoader workers, pinned and copied to the GPU
    (``data_loading.imagenet_read_rate``); steady samples/s, per worker, and the workers the fastest SiT-XL/2
    step measured so far needs (:func:`workers_needed`)."""
    import tempfile

    from benchmarks.data_loading import imagenet_read_rate, write_imagenet_shards
    from selfflow.core.data.pinning import resolve_pin_memory

    with tempfile.TemporaryDirectory() as tmp:
        write_imagenet_shards(Path(tmp), sizes.loader_samples, side=2 * sizes.grid)
        batches = max(8, 2 * sizes.loader_samples // sizes.batch)  # two epochs: every worker reaches its shards
        rates = {w: imagenet_read_rate(Path(tmp), sizes.batch, w, sizes.device, batches)
                 for w in sizes.loader_workers}
    per_worker = max(rate / w for w, rate in rates.items())
    row = {"samples_per_s": {str(w): r for w, r in rates.items()}, "per_worker": per_worker,
           "pinned": resolve_pin_memory("auto", torch.device(sizes.device))}
    return {**row, **workers_needed(per_worker, train_rows)}


def workers_needed(per_worker: float, train_rows: list[dict]) -> dict:
    """The fastest SiT-XL/2 training step among ``train_rows`` (images/s) and the DataLoader workers that keep
    it fed at ``per_worker`` samples/s each; redone once the compiled rows, measured after the loader, are in."""
    consumed = max((r["images_per_s"] for r in train_rows if r.get("arch") == "dit" and "images_per_s" in r),
                   default=None)
    return {"step_images_per_s": consumed,
            "workers_needed": None if consumed is None else math.ceil(consumed / per_worker)}


CASES = ((False, False), (True, False), (False, True))  # (compile, activation checkpointing), most wanted first


def measure(sizes: Sizes, compile_modes: tuple[bool, ...] = (False, True), budget_s: float | None = None,
            on_row: Callable[[str, dict, dict], None] | None = None) -> dict:
    """Every training case and the sampling case at ``sizes``: the rows of bench-gpu.json.

    A GPU is lent for minutes, once: a case that fails (an out-of-memory batch, a compile error of the machine's
    torch) is recorded with its error and the others still run; once ``budget_s`` seconds have passed the
    remaining cases are recorded as skipped. Eager steps, sampling, the XL/2 ours-vs-naive pair and the data
    loader run first, then compiled steps and the compiled SiT-XL/2 pair in alternating rounds, then
    activation-checkpointed steps. ``on_row(section, row, result)`` sees each row as it is done, with the result
    so far."""
    start = time.perf_counter()
    result: dict = {"train": [], "sampling": None, "xl2_vs_naive": None, "loader": None, "alternating": None}

    def run(section: str, fn: Callable[[], dict], **what) -> None:
        if budget_s is not None and time.perf_counter() - start > budget_s:
            row = {**what, "skipped": f"time budget of {budget_s:.0f} s spent"}
        else:
            try:
                row = {**what, **fn()}
            except Exception as e:  # recorded, not raised: the rest of the run is worth more than a traceback
                row = {**what, "error": error_line(e)}
            # A case's model, EMA and optimizer (10.8 GB for SiT-XL/2) must be gone before the next case's peak is
            # measured; reference cycles (compiled modules, a failed case's traceback) outlive the call without this.
            gc.collect()
            if sizes.device == "cuda":
                torch.cuda.empty_cache()
        if section == "train":
            result["train"].append(row)
        else:
            result[section] = row
        if on_row is not None:
            on_row(section, row, result)

    for compile_blocks, ckpt in CASES:
        if compile_blocks not in compile_modes:
            continue
        for arch in ("dit", "mmdit"):
            for kind in ("flow_matching", "self_flow"):
                what = {"arch": arch, "kind": kind, "compile": compile_blocks, "checkpointing": ckpt,
                        "batch": sizes.batch}
                run("train", partial(train_case, arch, kind, compile_blocks, ckpt, sizes), **what)
        if compile_blocks and not ckpt:
            run("alternating", partial(alternating_case, sizes))
        if result["sampling"] is None:
            run("sampling", partial(sampling_case, sizes))
            run("xl2_vs_naive", partial(xl2_vs_naive_case, sizes))
            run("loader", partial(loader_case, sizes, result["train"]))
    if result["loader"] and "per_worker" in result["loader"]:  # against the fastest step of all, compiled too
        result["loader"].update(workers_needed(result["loader"]["per_worker"], result["train"]))
    return result


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; nothing to measure (the cuda tests are skipped)")
        return 0
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S", "330"))
    peak = bf16_matmul_tflops()
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "bf16_matmul_tflops": peak}
    print(f"{info['device']}  torch {info['torch']}  CUDA {info['cuda']}  bf16 matmul {peak:.0f} TFLOP/s  "
          f"(cases stop after {budget:.0f} s: GPU_CHECK_BUDGET_S)", flush=True)

    def on_row(section: str, row: dict, so_far: dict) -> None:  # print and save at once: a cut-off run keeps them
        print(row_line(row, peak) if section == "train" else f"{section}: {row}", flush=True)
        OUT.write_text(json.dumps({**info, **so_far, "complete": False}, indent=1))

    memory = torch.cuda.get_device_properties(0).total_memory
    sizes, how = gpu_sizes(Sizes(batch=int(os.environ.get("GPU_CHECK_BATCH", "64"))), memory)
    print(how, flush=True)
    info.update(gpu_memory_gib=memory / 2**30, batch=sizes.batch)

    result = measure(sizes, budget_s=budget, on_row=on_row)
    print()
    print_table(result, peak)
    targets = judge(result, peak)
    print("issue 18's GPU targets:")
    print_targets(targets)
    OUT.write_text(json.dumps({**info, **result, "targets": targets, "complete": True}, indent=1))
    cases = [*result["train"], *(result[k] for k in ("sampling", "xl2_vs_naive", "loader", "alternating"))]
    failed = [r for r in cases if r and "error" in r]
    print(f"wrote {OUT}" + (f"; {len(failed)} case(s) failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
