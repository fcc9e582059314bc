"""Benchmarks of the per-token DiT (ImageNet 256 layout: 256 tokens of 16 channels): training step,
distinct-level vs per-token modulation, the teacher's early exit, and sampler throughput."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from unittest import mock

import torch

import selfflow.core.dit as dit_module
from selfflow.core.dit import DiT, DiTConfig, dit_forward_flops
from selfflow.core.ema import ema_update, make_ema
from selfflow.core.linear import onednn_linear
from selfflow.core.loss_terms import alignment_loss
from selfflow.core.modulation import TIME_EMBED_DIM, TokenTimesteps, modulate
from selfflow.core.objective import ObjectiveConfig
from selfflow.core.precision import cpu_bf16_is_native
from selfflow.core.sampler import SamplerConfig, sample
from selfflow.core.timesteps import TimestepDistribution
from selfflow.core.tokens import Conditioning, Tokens, grid_ids

from .timing import Row, interleaved_times, paired_median, round_ratio_range
from .train_step import make_train_step

GRID, CH = 16, 16
L = GRID * GRID


def _model_config(preset: str, projector: bool = True, attention: str = "auto") -> DiTConfig:
    return DiTConfig(preset=preset, num_classes=1000, modalities={"image": CH},
                     projector_mult=2.0 if projector else 0.0, attention=attention)


def _model(preset: str, projector: bool = True, attention: str = "auto", device: str = "cpu") -> DiT:
    torch.manual_seed(0)
    with torch.device(device):
        model = DiT(_model_config(preset, projector, attention))
    with torch.no_grad():  # non-zero gates so every path does real work
        for p in model.parameters():
            if p.requires_grad and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model


def _train_step(kind: str, batch: int, bf16: bool = False):
    model = _model("B/2", projector=kind == "self_flow")
    ema = make_ema(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)  # as the trainer
    obj = ObjectiveConfig(kind=kind, student_layer=4, teacher_layer=8).resolve(12, 0.25, TimestepDistribution())
    tokens = Tokens(torch.randn(batch, L, CH), grid_ids(1, GRID, GRID, batch))
    cond = Conditioning(labels=torch.arange(batch))
    return make_train_step(model, ema, opt, tokens, cond, obj, null_label=1000, bf16=bf16)


def _official_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                       index: torch.Tensor | None) -> torch.Tensor:
    """The official per-token class runs the adaLN Linear on every token's own conditioning and modulates with
    its ``(B, L, D)`` output as is; with levels = tokens our level select would be an identity the official code
    never pays for, so the naive step skips it (and autograd keeps what it keeps for the plain expression)."""
    return modulate(x, shift, scale)


def _official_gate(h: torch.Tensor, gate: torch.Tensor, out: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """The official gated residual on per-token gates ``(B, L, D)`` (see :func:`_official_modulate`)."""
    return h + gate * out


@contextlib.contextmanager
def official_modulation() -> Iterator[None]:
    """Inside the block, the DiT modulates as the official per-token class (levels = tokens, no select)."""
    with (mock.patch.object(dit_module, "modulate_levels", _official_modulate),
          mock.patch.object(dit_module, "gate_levels", _official_gate)):
        yield


def xl2_step_pair(batch: int = 2, preset: str = "XL/2", attention: str = "auto", device: str = "cpu",
                  bf16: bool = False) -> tuple:
    """SiT-XL/2 (or ``preset``) Self-Flow training steps (B, L=256): ours (distinct-level modulation, teacher stopped at block
    20 by the objective) and the naive step of the official per-token class — every token's timestep through
    the timestep MLP and the adaLN Linears (levels = tokens, no gather), the EMA teacher run through all 28
    blocks and the final layer, every Linear as ``nn.Linear`` runs it (``F.linear``: our oneDNN path off) —
    with the same loss terms, backward, clipping, AdamW and EMA. Returns the two step closures (on ``device``,
    under bf16 autocast when ``bf16``: how ``benchmarks/gpu_check.py`` runs them)."""
    model = _model(preset, attention=attention, device=device)
    ema = make_ema(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)  # as the trainer
    obj = ObjectiveConfig(kind="self_flow").resolve(model.depth, 0.25, TimestepDistribution())
    with torch.device(device):
        tokens = Tokens(torch.randn(batch, L, CH), grid_ids(1, GRID, GRID, batch, device))
        cond = Conditioning(labels=torch.arange(batch))
        t, s = torch.rand(batch), torch.rand(batch)
        mask = torch.rand(batch, L) < 0.25
        per_token = TokenTimesteps.from_levels(torch.where(mask, s[:, None], t[:, None]),
                                               torch.arange(L).expand(batch, L))
        teacher_t = TokenTimesteps.from_levels(torch.minimum(t, s)[:, None].expand(batch, L).contiguous(),
                                               torch.arange(L).expand(batch, L))
    ours = make_train_step(model, ema, opt, tokens, cond, obj, null_label=1000, bf16=bf16)
    x = tokens.x

    def naive() -> None:
        with (official_modulation(), onednn_linear(False),
              torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16)):
            pred, feats = model(x, tokens.ids, per_token, cond, capture=(obj.student_layer,), project=True)
            with torch.no_grad():
                _, target = ema(x, tokens.ids, teacher_t, cond, capture=(obj.teacher_layer,))
            loss = pred.float().square().mean() + obj.gamma * alignment_loss(feats[obj.student_layer],
                                                                             target[obj.teacher_layer])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, model, 0.9999)

    return ours, naive


def xl2_step_flops(preset: str = "XL/2") -> tuple[float, float]:
    """Analytic FLOPs of one sample's XL/2 (or ``preset``) training step (forward + 2× backward + the teacher to
    its layer, as the objective resolves it), ours and naive.

    The naive forward adds, on every token but the one our modulation already pays for, the 6d² adaLN of each
    block, the 2d² adaLN of the final layer and the timestep MLP; its teacher runs all blocks and the head.
    """
    cfg = _model_config(preset)
    d, n = cfg.hidden_size, L
    teacher_layer = ObjectiveConfig(kind="self_flow").resolve(cfg.depth, 0.25, TimestepDistribution()).teacher_layer
    full = dit_forward_flops(cfg, n, None, CH)
    ours = 3 * full + dit_forward_flops(cfg, n, teacher_layer, CH)
    per_token = 2 * (n - 1) * (cfg.depth * 6 * d * d + 2 * d * d + TIME_EMBED_DIM * d + d * d)
    return ours, 4 * (full + per_token)


def _xl2_step_times(batch: int, repeats: int) -> list[list[float]]:
    """Seconds of our XL/2 step, the naive one and ours on ``F.linear``, in turn each round, per round (the three
    models live only inside this call)."""
    ours, naive = xl2_step_pair(batch)

    def ours_f_linear() -> None:
        with onednn_linear(False):
            ours()

    return interleaved_times((ours, naive, ours_f_linear), repeats)


def round_ratios(base: list[float], ours: list[float]) -> str:
    """``base / ours`` of each round, as its range (``"1.58–1.65 over 3 rounds"``): the spread inside one run,
    beside the ratio of the medians."""
    low, high = round_ratio_range(base, ours)
    return f"{low:.2f}–{high:.2f} over {len(base)} rounds"


def bench_dit(quick: bool) -> list[Row]:
    reps = 2 if quick else 3
    batch = 2
    rows = []
    self_flow = _train_step("self_flow", batch)
    t_sf, t_fm = paired_median(self_flow, _train_step("flow_matching", batch), reps)
    rows.append(Row(f"DiT-B/2 train step (B={batch}, L={L}): Self-Flow vs FM", t_sf * 1e3, t_fm * 1e3,
                    t_sf / t_fm, None, "ms", "teacher to block 8 of 12; paper-scale estimate ≈ 1.24×"))
    if cpu_bf16_is_native():  # without AVX512-BF16 / AMX a bf16 step is ~100× slower: minutes for one row
        t_bf, t_fp = paired_median(_train_step("self_flow", batch, bf16=True), self_flow, reps)
        rows.append(Row(f"DiT-B/2 Self-Flow train step (B={batch}, L={L}): bf16 autocast vs fp32 on this CPU",
                        t_bf * 1e3, t_fp * 1e3, t_fp / t_bf, None, "ms",
                        "speed-up; measured only on a CPU with native bf16 (core.precision.cpu_bf16_is_native)"))
    del self_flow  # its B/2 model, optimizer and EMA: not held through the XL/2 pair below

    rounds = _xl2_step_times(batch, 1 if quick else 3)
    t_ours, t_naive, t_ours_f = (statistics.median(r) for r in rounds)
    f_ours, f_naive = xl2_step_flops()
    rows.append(Row(f"SiT-XL/2 Self-Flow train step (B={batch}, L={L}): ours vs naive official-class step",
                    t_ours * 1e3, t_naive * 1e3, t_naive / t_ours, ">= 1.6", "ms",
                    "naive: per-token adaLN Linear + 28-block teacher, nn.Linear's F.linear; AdamW (fused, as the "
                    "trainer), EMA and clipping are common to both; the FLOP ratio below bounds it at "
                    f"{f_naive / f_ours:.2f} at equal kernels; per round {round_ratios(rounds[1], rounds[0])}"))
    rows.append(Row(f"SiT-XL/2 Self-Flow train step (B={batch}, L={L}): ours vs naive, both on F.linear",
                    t_ours_f * 1e3, t_naive * 1e3, t_naive / t_ours_f, None, "ms",
                    "the row above at equal kernels: our oneDNN Linear off (core.linear)"))
    rows.append(Row(f"SiT-XL/2 Self-Flow train step (B={batch}, L={L}): our oneDNN Linear vs F.linear",
                    t_ours * 1e3, t_ours_f * 1e3, t_ours_f / t_ours, None, "ms",
                    "speed-up of core.linear inside our step (fp32 CPU products through oneDNN)"))
    rows.append(Row("SiT-XL/2 training-step FLOPs per sample: ours vs naive (the XL/2 rows' bound at equal kernels)",
                    f_ours / 1e9, f_naive / 1e9, f_naive / f_ours, None, "GFLOP",
                    "analytic (core.dit.dit_forward_flops): matmuls and attention, backward = 2× forward"))

    model = _model("B/2")
    x, ids = torch.randn(batch, L, CH), grid_ids(1, GRID, GRID, batch)
    cond = Conditioning(labels=torch.arange(batch))
    t, s = torch.rand(batch), torch.rand(batch)
    mask = torch.rand(batch, L) < 0.25
    distinct = TokenTimesteps.from_levels(torch.stack([t, s], 1), mask.long())
    naive = TokenTimesteps.from_levels(torch.where(mask, s[:, None], t[:, None]), torch.arange(L).expand(batch, L))

    def fwd_bwd(tt):
        def run():
            model(x, ids, tt, cond).square().mean().backward()
            model.zero_grad(set_to_none=True)
        return run

    t_d, t_n = paired_median(fwd_bwd(distinct), fwd_bwd(naive), reps + 1)
    rows.append(Row("DiT-B/2 fwd+bwd: distinct-level vs per-token adaLN Linear", t_d * 1e3, t_n * 1e3, t_n / t_d,
                    ">= 1.35", "ms", "speed-up; the FLOP ratio bounds it near 1.48"))

    with torch.no_grad():
        t_early, t_full = paired_median(lambda: model(x, ids, t, cond, capture=(8,), stop_after=8),
                                        lambda: model(x, ids, t, cond, capture=(8,)), reps + 2)
    rows.append(Row("DiT-B/2 teacher forward to block 8/12 vs full", t_early * 1e3, t_full * 1e3,
                    t_full / t_early, None, "ms", "speed-up of the early exit (ideal 12/8 = 1.5)"))

    small = _model("S/2").eval()
    n, steps = 8, 10
    noise = torch.randn(n, L, CH)
    labels = Conditioning(labels=torch.arange(n))
    null = Conditioning(labels=torch.full((n,), 1000))
    out = {}
    for solver in ("sde", "euler"):
        cfg = SamplerConfig(solver=solver, steps=steps, cfg_scale=1.5, guidance_interval=(0.0, 0.7))
        t0 = time.perf_counter()
        with torch.inference_mode():
            sample(small, noise, grid_ids(1, GRID, GRID, n), labels, cfg, null, generator=torch.Generator())
        out[solver] = (time.perf_counter() - t0) / steps
    per_image_250 = out["sde"] * 250 / n
    rows.append(Row(f"DiT-S/2 SDE sampler with CFG (B={n}): images/s at 250 model calls", 1 / per_image_250,
                    None, None, None, "img/s", f"measured over {steps} calls, scaled to 250"))
    rows.append(Row("DiT-S/2 per-call time: SDE step vs ODE Euler step", out["sde"] * 1e3, out["euler"] * 1e3,
                    out["euler"] / out["sde"], None, "ms", "the SDE's own arithmetic on top of the model"))
    return rows
