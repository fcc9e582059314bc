"""Training-step benchmarks of the MMDiT: Self-Flow vs flow matching, distinct vs naive modulation,
teacher early exit."""

from __future__ import annotations

import torch

from selfflow.core.ema import ema_update, make_ema
from selfflow.core.flops import train_step_flops
from selfflow.core.mmdit import MMDiT, MMDiTConfig
from selfflow.core.modulation import TokenTimesteps
from selfflow.core.objective import ObjectiveConfig
from selfflow.core.timesteps import TimestepDistribution
from selfflow.core.tokens import Conditioning, grid_ids

from .timing import Row, paired_median


def make_train_step(model, ema, opt, tokens, cond, obj, null_label: int, bf16: bool = False,
                    host_reads: bool = False):
    """One full training step (loss, backward, clip, AdamW, EMA) as a closure, for timing any backbone; noise
    is drawn on the tokens' device, the loss under bf16 autocast when ``bf16``. ``host_reads``: read the losses
    after the backward and the gradient norm after clipping on the host, as ``Trainer.train_step`` does (its
    step guard decides on them before the optimizer steps); on a GPU each read waits for the queued work."""
    device = tokens.x.device
    gen = torch.Generator(device).manual_seed(0)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            losses = obj.loss(model, ema if obj.uses_teacher else None, tokens, cond, null_label=null_label,
                              modality=None, generator=gen)
        losses["loss"].backward()
        if host_reads:
            for value in losses.values():
                float(value.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if host_reads:
            float(grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, model, 0.9999)

    return step


def _setup(preset: str, batch: int, grid: int, channels: int, kind: str):
    cfg = MMDiTConfig(preset=preset, num_classes=10, modalities={"image": channels},
                      projector_mult=2.0 if kind == "self_flow" else 0.0)
    torch.manual_seed(0)
    model = MMDiT(cfg)
    ema = make_ema(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the trainer
    obj = ObjectiveConfig(kind=kind).resolve(cfg.depth, 0.25, TimestepDistribution())
    x = torch.randn(batch, grid * grid, channels)
    from selfflow.core.tokens import Tokens

    tokens = Tokens(x, grid_ids(1, grid, grid, batch))
    cond = Conditioning(labels=torch.arange(batch) % 10)
    return make_train_step(model, ema, opt, tokens, cond, obj, null_label=10), model, cfg


def bench_train_steps(quick: bool, peak_gflops: float) -> list[Row]:
    """Per preset: step time Self-Flow vs FM, tokens/s, and MFU against the measured GEMM peak."""
    rows = []
    cases = [("tiny", 64, 8, 48, 10), ("base", 2, 16, 16, 2 if quick else 3)]
    for preset, batch, grid, ch, reps in cases:
        sf, model_sf, cfg = _setup(preset, batch, grid, ch, "self_flow")
        fm, model_fm, _ = _setup(preset, batch, grid, ch, "flow_matching")
        t_sf, t_fm = paired_median(sf, fm, reps)
        length = grid * grid
        params = sum(p.numel() for p in model_fm.parameters()) / 1e6
        tag = f"{preset} ({params:.0f}M, B={batch}, L={length})"
        rows.append(Row(f"train step {tag}: Self-Flow vs FM", t_sf * 1e3, t_fm * 1e3, t_sf / t_fm,
                        "<= 1.35", "ms"))
        rows.append(Row(f"tokens/s {tag}: Self-Flow vs FM", batch * length / t_sf, batch * length / t_fm,
                        t_fm / t_sf, None, "tok/s"))
        teacher = round(0.7 * cfg.depth)
        mfu_sf = train_step_flops(model_sf, length, teacher_layer=teacher) * batch / t_sf / (peak_gflops * 1e9)
        mfu_fm = train_step_flops(model_fm, length) * batch / t_fm / (peak_gflops * 1e9)
        rows.append(Row(f"MFU vs fp32 GEMM peak {tag}: Self-Flow vs FM", 100 * mfu_sf, 100 * mfu_fm,
                        mfu_sf / mfu_fm, ">= 60%" if preset == "base" else None, "%"))
    return rows


def bench_modulation_and_early_exit(quick: bool) -> list[Row]:
    """Forward+backward of the base MMDiT with 2 levels per sample vs a Linear on every token's level,
    and the teacher's forward to its layer vs the full forward."""
    batch, grid = 2, 16
    cfg = MMDiTConfig(preset="base", num_classes=10, modalities={"image": 16})
    torch.manual_seed(0)
    model = MMDiT(cfg)
    length = grid * grid
    x, ids = torch.randn(batch, length, 16), grid_ids(1, grid, grid, batch)
    cond = Conditioning(labels=torch.arange(batch))
    t, s = torch.rand(batch), torch.rand(batch)
    mask = torch.rand(batch, length) < 0.25
    dense = torch.where(mask, s[:, None], t[:, None])
    distinct = TokenTimesteps.from_levels(torch.stack([t, s], 1), mask.long())
    naive = TokenTimesteps.from_levels(dense, torch.arange(length).expand(batch, length))
    reps = 2 if quick else 3

    def fwd_bwd(tt):
        def run():
            model(x, ids, tt, cond).square().mean().backward()
            model.zero_grad(set_to_none=True)
        return run

    t_d, t_n = paired_median(fwd_bwd(distinct), fwd_bwd(naive), reps)
    teacher_layer = round(0.7 * cfg.depth)
    with torch.no_grad():
        t_early, t_full = paired_median(
            lambda: model(x, ids, t, cond, capture=(teacher_layer,), stop_after=teacher_layer),
            lambda: model(x, ids, t, cond, capture=(teacher_layer,)), reps + 2)
    return [
        Row("MMDiT-base fwd+bwd: distinct-level vs per-token modulation", t_d * 1e3, t_n * 1e3, t_n / t_d,
            None, "ms", "speed-up; MMDiT shares modulation across blocks, so the gain is small here"),
        Row(f"teacher forward to block {teacher_layer}/{cfg.depth} vs full", t_early * 1e3, t_full * 1e3,
            t_full / t_early, None, "ms", "speed-up of the early exit"),
    ]
