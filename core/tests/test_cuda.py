"""The CUDA path (``make gpu-check``): bf16 autocast, SDPA kernels, torch.compile, FSDP2 over NCCL, bf16
sampling and GPU→CPU checkpoints. Every test is marked ``cuda`` and skipped without a GPU."""

import math
import os

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

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GRID, CH = 8, 16


def small_dit(device: str = "cuda") -> DiT:
    torch.manual_seed(0)
    model = DiT(DiTConfig(hidden_size=256, num_heads=4, depth=6, num_classes=10, grid_size=GRID,
                          modalities={"image": CH}))
    with torch.no_grad():  # non-zero adaLN gates so every block does real work
        for p in model.parameters():
            if p.requires_grad and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model.to(device)


def batch(n: int = 4, device: str = "cuda") -> tuple[Tokens, Conditioning]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, GRID * GRID, CH, generator=g)
    return Tokens(x.to(device), grid_ids(1, GRID, GRID, n, device)), Conditioning(labels=torch.arange(n, device=device))


def step_loss_and_grad(model: DiT, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    obj = ObjectiveConfig(kind="self_flow").resolve(model.depth, 0.25, TimestepDistribution())
    tokens, cond = batch()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss = obj.loss(model, make_ema(model), tokens, cond, null_label=10, modality=None,
                        generator=torch.Generator("cuda").manual_seed(0))["loss"]  # the noise is drawn on the GPU
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return loss.detach().float(), grad


def test_bf16_autocast_step_is_finite_and_close_to_fp32():
    model = small_dit()
    loss32, grad32 = step_loss_and_grad(model, bf16=False)
    loss16, grad16 = step_loss_and_grad(model, bf16=True)
    assert torch.isfinite(loss16) and torch.isfinite(grad16).all()
    assert abs(loss16 - loss32) < 0.02 * abs(loss32) + 1e-3
    assert F.cosine_similarity(grad16, grad32, dim=0) > 0.99


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


def test_fsdp2_on_one_gpu_equals_unwrapped():
    import torch.distributed as dist

    from selfflow.core.parallel import shard_fsdp2

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1)
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


def test_sde_sampler_bf16_close_to_fp32():
    model = small_dit().eval()
    n = 4
    noise = torch.randn(n, GRID * GRID, CH, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    ids = grid_ids(1, GRID, GRID, n, "cuda")
    cond = Conditioning(labels=torch.arange(n, device="cuda"))
    null = Conditioning(labels=torch.full((n,), 10, device="cuda"))
    cfg = SamplerConfig(solver="sde", steps=50, cfg_scale=1.5)
    out = {}
    for bf16 in (False, True):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out[bf16] = sample(model, noise, ids, cond, cfg, null, generator=torch.Generator("cuda").manual_seed(1))
    assert torch.isfinite(out[True]).all()
    assert (out[True].float() - out[False]).abs().mean() < 0.05 * out[False].abs().mean() + 1e-3


def test_checkpoint_saved_on_gpu_resumes_on_cpu(tmp_path):
    model = small_dit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens, cond = batch()
    model(tokens.x, tokens.ids, torch.rand(4, device="cuda"), cond).square().mean().backward()
    opt.step()
    path = save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1}, tmp_path, 1)
    state = load_checkpoint(path, map_location="cpu")
    cpu_model = small_dit("cpu")
    cpu_model.load_state_dict(state["model"])
    cpu_opt = torch.optim.AdamW(cpu_model.parameters(), lr=1e-4)
    cpu_opt.load_state_dict(state["optimizer"])
    tokens, cond = batch(device="cpu")
    t = torch.rand(4)
    with torch.no_grad():
        ref = model(tokens.x.cuda(), tokens.ids.cuda(), t.cuda(), Conditioning(labels=cond.labels.cuda())).cpu()
        assert (cpu_model(tokens.x, tokens.ids, t, cond) - ref).abs().max() < 1e-4


def train_split_and_resume(tmp_path, *sets: str) -> tuple[list[dict], list[dict]]:
    """``selfflow train`` for 6 steps in one go, and for 3 then resumed to 6 (checkpoint every 3): both runs'
    metrics records. What a user's first GPU run does: the CLI, the trainer, checkpoints, previews, export."""
    from selfflow.core.cli import main
    from selfflow.core.metrics import read_metrics

    from .test_trainer import TINY

    def train(name: str, steps: int) -> None:
        args = [*TINY, f"output_dir={tmp_path}", f"name={name}", "checkpoint.every=3", f"train.steps={steps}",
                *sets]
        assert main(["train", "--no-progress", *[a for s in args for a in ("--set", s)]]) == 0

    train("full", 6)
    train("split", 3)
    train("split", 6)
    return [[r for r in read_metrics(tmp_path / n / "metrics.jsonl") if "loss" in r] for n in ("full", "split")]


def test_selfflow_train_on_the_gpu_bf16_compiled_resumes(tmp_path):
    """The CLI on CUDA in bf16 with compiled blocks: finite losses, a checkpoint that loads on the CPU, the EMA
    export and sample previews, and a resumed run that continues with the uninterrupted run's losses (within
    bf16 and the non-deterministic atomics of attention backward)."""
    full, split = train_split_and_resume(tmp_path, "train.device=cuda", "train.precision=bf16", "train.compile=true")
    assert [r["step"] for r in full] == [r["step"] for r in split] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) for r in full)
    for a, b in zip(full, split):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2, abs=1e-3), (a["step"], a["loss"], b["loss"])
    run = tmp_path / "full"
    state = load_checkpoint(run / "checkpoints" / "step_00000006.pt", map_location="cpu")
    assert all(v.device.type == "cpu" for v in state["model"].values())
    assert (run / "ema.safetensors").is_file() and any(run.rglob("*.png"))
