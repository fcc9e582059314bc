"""The CUDA path (``make gpu-check``): bf16 autocast, SDPA kernels, torch.compile, FSDP2 over NCCL, bf16
sampling and GPU→CPU checkpoints. The CUDA tests are marked ``cuda`` and skipped without a GPU (``make gpu-check``
selects them with ``-m cuda``). The bf16 ones also run on the CPU's autocast, in every ``make test``: the same
code path up to the kernels, at sizes that stay quick on CPUs whose bf16 matrix products are slow, and with a
bitwise-equal resume there (CPU kernels are deterministic)."""

import math
import os
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

from selfflow.core.checkpoint import load_checkpoint, save_checkpoint
from selfflow.core.dit import DiT, DiTConfig
from selfflow.core.ema import make_ema
from selfflow.core.objective import ObjectiveConfig
from selfflow.core.sampler import SamplerConfig, sample
from selfflow.core.timesteps import TimestepDistribution
from selfflow.core.tokens import Conditioning, Tokens, grid_ids

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = [pytest.mark.cuda, needs_cuda]
on_cpu_and_cuda = pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
GRID, CH = 8, 16


def small_dit(device: str = "cuda", width: int | None = None) -> DiT:
    """6 blocks of width 256 on the GPU; width 64 on the CPU, where a bf16 matrix product can be ~100× slower
    than fp32 (CPUs without AVX512-BF16 or AMX)."""
    torch.manual_seed(0)
    width = width or (256 if device == "cuda" else 64)
    model = DiT(DiTConfig(hidden_size=width, num_heads=4, depth=6, num_classes=10,
                          grid_size=GRID, modalities={"image": CH}))
    with torch.no_grad():  # non-zero adaLN gates so every block does real work
        for p in model.parameters():
            if p.requires_grad and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model.to(device)


def batch(n: int = 4, device: str = "cuda") -> tuple[Tokens, Conditioning]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, GRID * GRID, CH, generator=g)
    return Tokens(x.to(device), grid_ids(1, GRID, GRID, n, device)), Conditioning(labels=torch.arange(n, device=device))


def step_loss_and_grad(model: DiT, bf16: bool, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    obj = ObjectiveConfig(kind="self_flow").resolve(model.depth, 0.25, TimestepDistribution())
    tokens, cond = batch(device=device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        loss = obj.loss(model, make_ema(model), tokens, cond, null_label=10, modality=None,
                        generator=torch.Generator(device).manual_seed(0))["loss"]  # the noise is drawn on the device
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return loss.detach().float(), grad


@on_cpu_and_cuda
def test_bf16_autocast_step_is_finite_and_close_to_fp32(device):
    model = small_dit(device)
    loss32, grad32 = step_loss_and_grad(model, bf16=False, device=device)
    loss16, grad16 = step_loss_and_grad(model, bf16=True, device=device)
    assert torch.isfinite(loss16) and torch.isfinite(grad16).all()
    assert not torch.equal(grad16, grad32)  # autocast did run the matrix products in bf16
    assert abs(loss16 - loss32) < 0.02 * abs(loss32) + 1e-3
    assert F.cosine_similarity(grad16, grad32, dim=0) > 0.99


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kernel", ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"])
def test_sdpa_kernels_equal_math(kernel):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    with sdpa_kernel(getattr(SDPBackend, kernel)):
        out = F.scaled_dot_product_attention(q, k, v)
    assert (out.float() - ref).abs().max() < 2e-2


@pytest.mark.cuda
@needs_cuda
def test_compiled_blocks_equal_eager():
    model = small_dit().eval()
    tokens, cond = batch()
    t = torch.rand(4, device="cuda")
    with torch.no_grad():
        eager = model(tokens.x, tokens.ids, t, cond)
        for block in model.blocks():
            block.compile()
        compiled = model(tokens.x, tokens.ids, t, cond)
    assert (compiled - eager).abs().max() < 1e-3


@pytest.mark.cuda
@needs_cuda
def test_fsdp2_on_one_gpu_equals_unwrapped():
    import torch.distributed as dist

    from selfflow.core.parallel import shard_fsdp2

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1, timeout=timedelta(seconds=60))  # fail, not hang
    try:
        plain, sharded = small_dit(), shard_fsdp2(small_dit(), bf16=False)
        tokens, cond = batch()
        t = torch.rand(4, device="cuda")
        out_plain = plain(tokens.x, tokens.ids, t, cond)
        out_sharded = sharded(tokens.x, tokens.ids, t, cond)
        assert (out_plain - out_sharded).abs().max() < 1e-5
        out_plain.square().mean().backward()
        out_sharded.square().mean().backward()
        g_plain = plain.blocks[0].mlp.fc1.weight.grad
        g_sharded = sharded.blocks[0].mlp.fc1.weight.grad.full_tensor()
        assert (g_plain - g_sharded).abs().max() < 1e-5
    finally:
        dist.destroy_process_group()


@on_cpu_and_cuda
def test_online_evaluation_gathers_its_batches_over_the_backend(device, tmp_path):
    """``gather_to_main`` (the online evaluation's gather of each batch of samples to rank 0) over NCCL on the
    GPU and gloo on the CPU, in a one-rank group."""
    import torch.distributed as dist

    from selfflow.core.distributed import gather_to_main

    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{tmp_path / 'pg'}",
                            rank=0, world_size=1, timeout=timedelta(seconds=60))  # fail, not hang
    try:
        media = torch.randn(3, 3, 8, 8, device=device)
        parts = gather_to_main(media)
        assert len(parts) == 1 and parts[0].device == media.device and torch.equal(parts[0], media)
    finally:
        dist.destroy_process_group()


@on_cpu_and_cuda
@pytest.mark.filterwarnings("ignore:bf16 on this CPU")  # a CPU without native bf16 says it is slow
def test_fsdp2_in_bf16_is_close_to_the_unwrapped_bf16_step(device, tmp_path):
    """The paper's recipe on one rank (NCCL on the GPU, gloo on the CPU): student and EMA teacher sharded with
    bf16 weights and fp32 reduction (``parallel.shard_fsdp2``) against the unwrapped model under bf16 autocast —
    the same Self-Flow loss and gradients up to the bf16 rounding of the weights outside matrix products."""
    import torch.distributed as dist

    from selfflow.core.parallel import shard_fsdp2

    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{tmp_path / 'pg'}",
                            rank=0, world_size=1, timeout=timedelta(seconds=60))  # fail, not hang
    try:
        obj = ObjectiveConfig(kind="self_flow").resolve(6, 0.25, TimestepDistribution())
        tokens, cond = batch(device=device)
        plain, sharded = small_dit(device), small_dit(device)
        teachers = {"plain": make_ema(plain), "sharded": shard_fsdp2(make_ema(sharded), bf16=True)}
        models = {"plain": plain, "sharded": shard_fsdp2(sharded, bf16=True)}
        out = {}
        for name, model in models.items():
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = obj.loss(model, teachers[name], tokens, cond, null_label=10, modality=None,
                                generator=torch.Generator(device).manual_seed(0))["loss"]
            loss.backward()
            grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                     for p in model.parameters() if p.grad is not None]
            out[name] = loss.detach().float(), torch.cat([g.float().flatten() for g in grads])
        (loss_p, grad_p), (loss_s, grad_s) = out["plain"], out["sharded"]
        assert torch.isfinite(loss_s) and torch.isfinite(grad_s).all()
        assert abs(loss_s - loss_p) < 1e-2 * abs(loss_p)
        assert (grad_s - grad_p).norm() < 2e-2 * grad_p.norm()
    finally:
        dist.destroy_process_group()


@on_cpu_and_cuda
@pytest.mark.filterwarnings("ignore:bf16 on this CPU")  # a CPU without native bf16 says it is slow
def test_sde_sampler_bf16_close_to_fp32(device):
    """The sampler's own ``precision: bf16`` (autocast around the model, the state kept in fp32)."""
    model = small_dit(device).eval()
    n = 4
    noise = torch.randn(n, GRID * GRID, CH, device=device, generator=torch.Generator(device).manual_seed(0))
    ids = grid_ids(1, GRID, GRID, n, device)
    cond = Conditioning(labels=torch.arange(n, device=device))
    null = Conditioning(labels=torch.full((n,), 10, device=device))
    out = {}
    for precision in ("fp32", "bf16"):
        cfg = SamplerConfig(solver="sde", steps=50 if device == "cuda" else 20, cfg_scale=1.5, precision=precision)
        with torch.inference_mode():
            out[precision] = sample(model, noise, ids, cond, cfg, null,
                                    generator=torch.Generator(device).manual_seed(1))
    assert torch.isfinite(out["bf16"]).all() and out["bf16"].dtype == torch.float32
    assert not torch.equal(out["bf16"], out["fp32"])
    assert (out["bf16"] - out["fp32"]).abs().mean() < 0.05 * out["fp32"].abs().mean() + 1e-3


@pytest.mark.cuda
@needs_cuda
def test_checkpoint_saved_on_gpu_resumes_on_cpu(tmp_path):
    model = small_dit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens, cond = batch()
    model(tokens.x, tokens.ids, torch.rand(4, device="cuda"), cond).square().mean().backward()
    opt.step()
    path = save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1}, tmp_path, 1)
    state = load_checkpoint(path, map_location="cpu")
    cpu_model = small_dit("cpu", width=256)  # the GPU's model (the CPU's default is narrower)
    cpu_model.load_state_dict(state["model"])
    cpu_opt = torch.optim.AdamW(cpu_model.parameters(), lr=1e-4)
    cpu_opt.load_state_dict(state["optimizer"])
    tokens, cond = batch(device="cpu")
    t = torch.rand(4)
    with torch.no_grad():
        ref = model(tokens.x.cuda(), tokens.ids.cuda(), t.cuda(), Conditioning(labels=cond.labels.cuda())).cpu()
        assert (cpu_model(tokens.x, tokens.ids, t, cond) - ref).abs().max() < 1e-4


def train_cli(tmp_path, name: str, steps: int, *sets: str) -> list[dict]:
    """``selfflow train`` on the tiny model (checkpoint every 3 steps): the run's metrics records with a loss."""
    from selfflow.core.cli import main
    from selfflow.core.metrics import read_metrics

    from .test_trainer import TINY

    args = [*TINY, f"output_dir={tmp_path}", f"name={name}", "checkpoint.every=3", f"train.steps={steps}", *sets]
    assert main(["train", "--no-progress", *[a for s in args for a in ("--set", s)]]) == 0
    return [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]


def train_split_and_resume(tmp_path, *sets: str) -> tuple[list[dict], list[dict]]:
    """``selfflow train`` for 6 steps in one go, and for 3 then resumed to 6: both runs' metrics records. What a
    user's first GPU run does: the CLI, the trainer, checkpoints, previews, export."""
    full = train_cli(tmp_path, "full", 6, *sets)
    train_cli(tmp_path, "split", 3, *sets)
    return full, train_cli(tmp_path, "split", 6, *sets)


@on_cpu_and_cuda
def test_selfflow_train_bf16_resumes(tmp_path, device):
    """The CLI in bf16: finite losses, a checkpoint that loads on the CPU, the EMA export and sample previews,
    and a resumed run that continues with the uninterrupted run's losses. On CUDA with compiled blocks, within
    bf16 and the non-deterministic atomics of attention backward; on the CPU (eager) bitwise, and not the fp32
    run's losses (the trainer's autocast is on)."""
    sets = [f"train.device={device}", "train.precision=bf16", *(["train.compile=true"] if device == "cuda" else [])]
    full, split = train_split_and_resume(tmp_path, *sets)
    assert [r["step"] for r in full] == [r["step"] for r in split] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) for r in full)
    if device == "cuda":  # each window's training steps' own peak, not a preview's before them
        assert all(0 < r["gpu_mem_gb"] < 40 for r in full)
    tolerance = {"rel": 2e-2, "abs": 1e-3} if device == "cuda" else {"rel": 0, "abs": 0}
    for a, b in zip(full, split):
        assert b["loss"] == pytest.approx(a["loss"], **tolerance), (a["step"], a["loss"], b["loss"])
    if device == "cpu":
        fp32 = train_cli(tmp_path, "fp32", 1, "train.device=cpu", "train.precision=fp32")
        assert fp32[0]["loss"] != full[0]["loss"]
    run = tmp_path / "full"
    state = load_checkpoint(run / "checkpoints" / "step_00000006.pt", map_location="cpu")
    assert all(v.device.type == "cpu" for v in state["model"].values())
    assert (run / "ema.safetensors").is_file() and any(run.rglob("*.png"))
    if device == "cuda":  # and the GPU run continues on the CPU (the CUDA generator's state cannot be a CPU one's)
        on_cpu = train_cli(tmp_path, "split", 8, "train.device=cpu", "train.precision=bf16")
        assert [r["step"] for r in on_cpu][-2:] == [7, 8] and all(math.isfinite(r["loss"]) for r in on_cpu)
