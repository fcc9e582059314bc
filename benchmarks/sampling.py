"""Sampling throughput of the MMDiT (Euler ODE with classifier-free guidance): our batched CFG (conditional
and unconditional halves in one forward of 2B) vs the two-forward baseline (one conditional and one
unconditional forward of B per step), in images/s."""

from __future__ import annotations

import torch

from selfflow.core.mmdit import MMDiT, MMDiTConfig
from selfflow.core.sampler import SamplerConfig, sample, solve_ode, time_grid
from selfflow.core.tokens import Conditioning, grid_ids

from .timing import Row, paired_median


def _model(preset: str, channels: int) -> MMDiT:
    torch.manual_seed(0)
    model = MMDiT(MMDiTConfig(preset=preset, num_classes=10, modalities={"image": channels})).eval()
    with torch.no_grad():  # non-zero gates and output layer so every path does real work
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model


def _two_forward_sample(model, noise, ids, cond, cfg: SamplerConfig, null):
    def velocity(x, t):
        v_c = model(x, ids, t, cond, modality="image")
        v_u = model(x, ids, t, null, modality="image")
        return v_u + cfg.cfg_scale * (v_c - v_u)

    return solve_ode(velocity, noise, time_grid(cfg.steps, cfg.shift), "euler")


def bench_sampling(quick: bool) -> list[Row]:
    rows = []
    # (preset, batch, grid, channels, steps measured, steps reported, repeats)
    cases = [("tiny", 16, 8, 48, 25, 25, 3), ("base", 2, 16, 16, 2, 50, 3)]
    for preset, batch, grid, ch, steps, report_steps, reps in cases:
        if quick:
            reps = 2
        model = _model(preset, ch)
        ids = grid_ids(1, grid, grid, batch)
        noise = torch.randn(batch, grid * grid, ch)
        cond = Conditioning(labels=torch.arange(batch) % 10)
        null = Conditioning(labels=torch.full((batch,), 10))
        cfg = SamplerConfig(solver="euler", steps=steps, cfg_scale=2.0)
        with torch.inference_mode():
            one = cfg.model_copy(update={"steps": 1})  # same numbers either way (checked on one step)
            a = sample(model, noise, ids, cond, one, null, modality="image")
            b = _two_forward_sample(model, noise, ids, cond, one, null)
            if not torch.allclose(a, b, atol=1e-4, rtol=1e-4):
                raise AssertionError(f"batched CFG and two forwards disagree ({(a - b).abs().max():.2e})")
            args = (model, noise, ids, cond, cfg, null)
            t_ours, t_base = paired_median(lambda a=args: sample(*a, modality="image"),
                                           lambda a=args: _two_forward_sample(*a), reps, warmup=0)
        scale = report_steps / steps
        params = sum(p.numel() for p in model.parameters()) / 1e6
        note = "" if scale == 1 else f"measured over {steps} steps, scaled to {report_steps}"
        rows.append(Row(f"sampling MMDiT {preset} ({params:.0f}M, L={grid * grid}, B={batch}), Euler {report_steps} "
                        "steps, CFG 2: batched vs two forwards", batch / (t_ours * scale),
                        batch / (t_base * scale), t_base / t_ours, None, "img/s", note))
    return rows
