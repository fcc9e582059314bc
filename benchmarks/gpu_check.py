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
from pathlib import Path

import torch

BATCH = {"dit": 64, "mmdit": 64}
OUT = Path("bench-gpu.json")


def timed(fn, reps: int = 5, warmup: int = 2) -> float:
    """Median seconds of ``fn`` on the GPU (synchronised)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bf16_matmul_tflops(n: int = 8192) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / timed(lambda: a @ b, reps=10) / 1e12


def build(arch: str, kind: str):
    from selfflow.core.dit import DiT, DiTConfig
    from selfflow.core.mmdit import MMDiT, MMDiTConfig

    torch.manual_seed(0)
    proj = 2.0 if kind == "self_flow" else 0.0
    if arch == "dit":
        model = DiT(DiTConfig(preset="XL/2", num_classes=1000, modalities={"image": 16}, projector_mult=proj))
    else:
        model = MMDiT(MMDiTConfig(preset="paper625m", num_classes=1000, modalities={"image": 16},
                                  projector_mult=proj))
    return model.cuda()


def train_case(arch: str, kind: str, compile_blocks: bool, checkpointing: bool) -> dict:
    from selfflow.core.ema import ema_update, make_ema
    from selfflow.core.flops import train_step_flops
    from selfflow.core.objective import ObjectiveConfig
    from selfflow.core.timesteps import TimestepDistribution
    from selfflow.core.tokens import Conditioning, Tokens, grid_ids

    model = build(arch, kind)
    model.activation_checkpointing = checkpointing
    if compile_blocks:
        for block in model.blocks():
            block.compile()
    ema = make_ema(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    obj = ObjectiveConfig(kind=kind).resolve(model.depth, 0.25, TimestepDistribution())
    b = BATCH[arch]
    tokens = Tokens(torch.randn(b, 256, 16, device="cuda"), grid_ids(1, 16, 16, b, "cuda"))
    cond = Conditioning(labels=torch.arange(b, device="cuda") % 1000)
    gen = torch.Generator("cuda").manual_seed(0)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = obj.loss(model, ema if obj.uses_teacher else None, tokens, cond, null_label=1000,
                            modality=None, generator=gen)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, model, 0.9999)

    torch.cuda.reset_peak_memory_stats()
    sec = timed(step, reps=5, warmup=3 if compile_blocks else 2)
    teacher = obj.teacher_layer if obj.uses_teacher else None
    flops = b * train_step_flops(model, 256, 0, teacher)
    return {"arch": arch, "kind": kind, "compile": compile_blocks, "checkpointing": checkpointing, "batch": b,
            "images_per_s": b / sec, "tflops": flops / sec / 1e12,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def sampling_case() -> dict:
    from selfflow.core.sampler import SamplerConfig, sample
    from selfflow.core.tokens import Conditioning, grid_ids

    model = build("dit", "flow_matching").eval()
    n, steps = 64, 250
    noise = torch.randn(n, 256, 16, device="cuda")
    ids = grid_ids(1, 16, 16, n, "cuda")
    cond = Conditioning(labels=torch.arange(n, device="cuda"))
    null = Conditioning(labels=torch.full((n,), 1000, device="cuda"))
    cfg = SamplerConfig(solver="sde", steps=steps, cfg_scale=1.5, guidance_interval=(0.0, 0.7))
    t = torch.rand(2 * n, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        one_call = timed(lambda: model(noise.repeat(2, 1, 1), ids.repeat(2, 1, 1), t,
                                       Conditioning(labels=torch.cat([cond.labels, null.labels]))))
        total = timed(lambda: sample(model, noise, ids, cond, cfg, null), reps=1, warmup=1)
    # Guided calls run the doubled batch; outside the guidance interval a single batch (bounded above here).
    return {"images_per_s": n / total, "bound_images_per_s": n / (steps * one_call),
            "ratio_to_bound": (steps * one_call) / total}


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; nothing to measure (the cuda tests are skipped)")
        return 0
    peak = bf16_matmul_tflops()
    rows = []
    for arch in ("dit", "mmdit"):
        for compile_blocks, ckpt in ((False, False), (True, False), (False, True)):
            for kind in ("flow_matching", "self_flow"):
                rows.append(train_case(arch, kind, compile_blocks, ckpt))
                torch.cuda.empty_cache()
    sampling = sampling_case()
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
