"""User-caused errors of issue #16 (items 4, 8, 9): each must be refused with exit status 2 and a short
``error:`` naming the file, key, option or value — no traceback, no hang.

Config files (a 1 KB YAML alias bomb, binary bytes, Latin-1 text, 10 000 levels of nesting), conflicting or
non-finite options, an output folder that cannot be created, a tampered ``ema.safetensors``, resuming with
another model size and out-of-range ``selfflow sample`` arguments. Each case is run through the real CLI in
a child process with a time limit (a hang counts as a crash).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from .common import ROOT, Outcome, Timer, run, train_cmd

CLI = [sys.executable, "-m", "selfflow.core.cli"]
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9))


def _config_files(work: Path) -> dict[str, Path]:
    files = {"alias bomb": ("bomb.yaml", ALIAS_BOMB.encode()),
             "binary config": ("binary.yaml", bytes(range(256)) * 4),
             "non-UTF-8 config": ("latin1.yaml", "name: café\n".encode("latin-1")),
             "deeply nested config": ("deep.yaml", b"a: " + b"[" * 10000 + b"]" * 10000 + b"\n")}
    out = {}
    for label, (name, data) in files.items():
        (work / name).write_bytes(data)
        out[label] = work / name
    return out


def cases(work: Path, trained: str) -> list[tuple[str, str, list[str], list[str]]]:
    """(item, fault, argv after ``selfflow``, strings the error must contain)."""
    files = _config_files(work)
    train = train_cmd(work, "x")[3:]  # ["train", "--no-progress", "--set", …] of the tiny model
    rows = [("8" if label == "alias bomb" else "9", f"{label} (train --config)",
             ["train", "--config", str(path)], [path.name]) for label, path in files.items()]
    rows += [
        ("4", "optim.lr=inf", [*train, "--set", "optim.lr=.inf"], ["optim.lr"]),
        ("9", "image_size not divisible by patch_size", [*train, "--set", "data.options.patch_size=5"],
         ["patch_size"]),
        ("9", "latent_shards without codec", [*train, "--set", "data.options.dataset=latent_shards",
                                              "--set", f"data.options.shards={work}"], ["codec"]),
        ("9", "sd_vae without vae_path", [*train, "--set", "data.options.codec=sd_vae"], ["vae_path"]),
        ("9", "output folder that cannot be created", [*train, "--set", f"output_dir={work / 'file.txt' / 'runs'}"],
         ["file.txt"]),
        ("9", "resume with another model size", [*train_cmd(work, trained, "train.steps=8")[3:],
                                                 "--set", "model.hidden_size=64", "--set", "model.num_heads=4"],
         ["hidden_size"]),
    ]
    run_dir = str(work / trained)
    for option, value in (("--batch-size", "0"), ("--steps", "0"), ("--cfg-scale", "nan"), ("--num", "-5")):
        extra = ["--out-dir", str(work / "many")] if option == "--batch-size" else []
        rows.append(("9", f"sample {option} {value}", ["sample", "--run", run_dir, *extra, option, value], [option]))
    rows.append(("9", "sample --device cuda without CUDA", ["sample", "--run", run_dir, "--device", "cuda"],
                 ["--device"]))
    # last: it spoils the run the sample cases read
    rows.append(("9", "tampered ema.safetensors", ["sample", "--run", run_dir, "--num", "2"], ["ema.safetensors"]))
    return rows


def run_all(work: Path | None = None) -> list[Outcome]:
    import torch

    work = Path(work or ROOT / "runs" / "reliability" / "cli")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "file.txt").write_text("a file where a folder should be\n")
    trained = "trained"
    proc = run(train_cmd(work, trained, "train.steps=4", "checkpoint.every=4", "sample.every=0"))
    if proc.returncode:
        raise RuntimeError(f"the tiny run failed: {proc.stderr[-2000:]}")
    outs: dict[str, Outcome] = {}
    for item, fault, argv, names in cases(work, trained):
        if fault == "sample --device cuda without CUDA" and torch.cuda.is_available():
            continue
        if fault == "tampered ema.safetensors":
            ema = work / trained / "ema.safetensors"
            ema.write_bytes(ema.read_bytes()[:100] + b"\x00" * 64)
        out = outs.setdefault(item, Outcome("cli", f"user error → clear refusal (item {item})",
                                            "exit 2, a short error: naming the file/key/option"))
        with Timer(out):
            try:
                proc = run([*CLI, *argv], timeout=120)
            except subprocess.TimeoutExpired:
                out.record(False, crash=True, why=f"{fault}: no answer within 120 s (hang)")
                continue
        err = proc.stderr.strip()
        # a config error lists its keys one per line under the "error:" line; nothing else may follow
        ok = (proc.returncode == 2 and "Traceback" not in err and "error:" in err
              and all(n in err for n in names) and len(err) < 4000)
        out.record(ok, crash="Traceback" in err,
                   why=f"{fault}: exit {proc.returncode}, expected {names} in: {err[-500:]}")
        out.note = (out.note + "; " if out.note else "") + fault
    return list(outs.values())
