"""``make gpu-check``'s speed part: bf16 training-step and sampling throughput on one CUDA GPU.

SiT-XL/2 (DiT XL/2) and the 625M MMDiT at 256 tokens: flow-matching vs Self-Flow step images/s and their
ratio, MFU against a bf16 matrix product measured in the same run, peak memory, eager / compiled /
activation-checkpointed; SiT-XL/2 250-step SDE sampling images/s against the bound of its model calls alone.
Writes a table and bench-gpu.json. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

OUT = Path("bench-gpu.json")


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
    reps: int = 5

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(device="cpu", presets={"dit": "tiny", "mmdit": "tiny"}, batch=2, grid=4, sample_batch=2,
                   sample_steps=3, reps=1)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int = 5, warmup: int = 2, device: str = "cuda") -> float:
    """Median seconds of ``fn`` (synchronised on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bf16_matmul_tflops(n: int = 8192, device: str = "cuda") -> float:
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / timed(lambda: a @ b, reps=10, device=device) / 1e12


def build(arch: str, kind: str, sizes: Sizes):
    """The model, initialised on the device (a 675M-parameter init on the host would take longer than its steps)."""
    from selfflow.core.dit import DiT, DiTConfig
    from selfflow.core.mmdit import MMDiT, MMDiTConfig

    torch.manual_seed(0)
    proj = 2.0 if kind == "self_flow" else 0.0
    preset = sizes.presets[arch]
    with torch.device(sizes.device):
        if arch == "dit":
            return DiT(DiTConfig(preset=preset, num_classes=1000, modalities={"image": 16}, projector_mult=proj,
                                 grid_size=sizes.grid))
        return MMDiT(MMDiTConfig(preset=preset, num_classes=1000, modalities={"image": 16}, projector_mult=proj))


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def train_case(arch: str, kind: str, compile_blocks: bool, checkpointing: bool, sizes: Sizes) -> dict:
    from selfflow.core.ema import ema_update, make_ema
    from selfflow.core.flops import train_step_flops
    from selfflow.core.objective import ObjectiveConfig
    from selfflow.core.timesteps import TimestepDistribution
    from selfflow.core.tokens import Conditioning, Tokens, grid_ids

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
    cond = Conditioning(labels=torch.arange(b, device=dev) % 1000)
    gen = torch.Generator(dev).manual_seed(0)

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = obj.loss(model, ema if obj.uses_teacher else None, tokens, cond, null_label=1000,
                            modality=None, generator=gen)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, model, 0.9999)

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sec = timed(step, reps=sizes.reps, warmup=3 if compile_blocks else 2, device=dev)
    teacher = obj.teacher_layer if obj.uses_teacher else None
    flops = b * train_step_flops(model, g * g, 0, teacher)
    return {"arch": arch, "kind": kind, "compile": compile_blocks, "checkpointing": checkpointing, "batch": b,
            "images_per_s": b / sec, "tflops": flops / sec / 1e12, "peak_gib": peak_gib(dev)}


def sampling_case(sizes: Sizes) -> dict:
    from selfflow.core.sampler import SamplerConfig, sample
    from selfflow.core.tokens import Conditioning, grid_ids

    dev, n, steps, g = sizes.device, sizes.sample_batch, sizes.sample_steps, sizes.grid
    model = build("dit", "flow_matching", sizes).eval()
    noise = torch.randn(n, g * g, 16, device=dev)
    ids = grid_ids(1, g, g, n, dev)
    cond = Conditioning(labels=torch.arange(n, device=dev))
    null = Conditioning(labels=torch.full((n,), 1000, device=dev))
    cfg = SamplerConfig(solver="sde", steps=steps, cfg_scale=1.5, guidance_interval=(0.0, 0.7))
    t = torch.rand(2 * n, device=dev)
    with torch.inference_mode(), torch.autocast(dev, dtype=torch.bfloat16):
        one_call = timed(lambda: model(noise.repeat(2, 1, 1), ids.repeat(2, 1, 1), t,
                                       Conditioning(labels=torch.cat([cond.labels, null.labels]))),
                         reps=sizes.reps, device=dev)
        total = timed(lambda: sample(model, noise, ids, cond, cfg, null), reps=1, warmup=1, device=dev)
    # Guided calls run the doubled batch; outside the guidance interval a single batch (bounded above here).
    return {"images_per_s": n / total, "bound_images_per_s": n / (steps * one_call),
            "ratio_to_bound": (steps * one_call) / total}


def measure(sizes: Sizes, compile_modes: tuple[bool, ...] = (False, True)) -> dict:
    """Every training case and the sampling case at ``sizes``: the rows of bench-gpu.json."""
    rows = []
    for arch in ("dit", "mmdit"):
        for compile_blocks, ckpt in ((False, False), (True, False), (False, True)):
            if compile_blocks not in compile_modes:
                continue
            for kind in ("flow_matching", "self_flow"):
                rows.append(train_case(arch, kind, compile_blocks, ckpt, sizes))
                if sizes.device == "cuda":
                    torch.cuda.empty_cache()
    return {"train": rows, "sampling": sampling_case(sizes)}


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; nothing to measure (the cuda tests are skipped)")
        return 0
    peak = bf16_matmul_tflops()
    result = measure(Sizes())
    rows, sampling = result["train"], result["sampling"]
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  CUDA {torch.version.cuda}  "
          f"bf16 matmul {peak:.0f} TFLOP/s")
    print(f"{'model':6s} {'compile':7s} {'ckpt':5s} {'FM img/s':>9s} {'SF img/s':>9s} {'SF/FM time':>10s} "
          f"{'FM MFU':>7s} {'SF MFU':>7s} {'FM GiB':>7s} {'SF GiB':>7s}")
    for fm, sf in zip(rows[::2], rows[1::2], strict=True):
        print(f"{fm['arch']:6s} {fm['compile']!s:7s} {fm['checkpointing']!s:5s} {fm['images_per_s']:9.1f} "
              f"{sf['images_per_s']:9.1f} {fm['images_per_s'] / sf['images_per_s']:10.2f} "
              f"{100 * fm['tflops'] / peak:6.1f}% {100 * sf['tflops'] / peak:6.1f}% "
              f"{fm['peak_gib']:7.1f} {sf['peak_gib']:7.1f}")
    print(f"SiT-XL/2 SDE 250 steps, CFG 1.5 on [0, 0.7]: {sampling['images_per_s']:.2f} img/s "
          f"({100 * sampling['ratio_to_bound']:.0f}% of the model-call bound)")
    OUT.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "cuda": torch.version.cuda, "bf16_matmul_tflops": peak, "train": rows,
                               "sampling": sampling}, indent=1))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
