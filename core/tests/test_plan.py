"""``selfflow plan``: its memory estimate against the live-tensor peak of real CPU training steps, and the CLI."""

import re
from pathlib import Path

import pytest
import torch

from selfflow.core.cli import main
from selfflow.core.config import load_config
from selfflow.core.plan import MetaAutocast, live_peak_bytes, make_plan, make_plans
from selfflow.core.precision import cpu_bf16_is_native
from selfflow.core.run_setup import build_run

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs/tiny/image.yaml"
BATCH = 64


def measured_step_transient(config: str | Path, overrides: list[str], batch: int, checkpointing: bool,
                            strategy: str = "none") -> int:
    """Bytes of the live-tensor peak of a training step above what was allocated before it (after a warm-up step
    that makes the gradients and AdamW moments): ``plan.live_peak_bytes``, the quantity a GPU reports as
    ``max_memory_allocated``; the loss under the CPU's bf16 autocast when the config says so. ``strategy``: the
    model and its EMA wrapped as the trainer wraps them (``parallel.wrap_student`` / ``wrap_teacher``; DDP and
    FSDP2 need a process group)."""
    from selfflow.core import parallel
    from selfflow.core.distributed import DistInfo
    from selfflow.core.ema import ema_update, make_ema
    from selfflow.core.tokens import Tokens

    torch.manual_seed(0)
    cfg = load_config(config, overrides)
    run = build_run(cfg)
    (name, modality), obj = next(iter(run.modalities.items())), next(iter(run.objectives.values()))
    model, ema = run.backbone, make_ema(run.backbone)
    model.activation_checkpointing = checkpointing
    bf16 = cfg.train.precision == "bf16"
    student = parallel.wrap_student(model, strategy, DistInfo(), bf16)
    ema = parallel.wrap_teacher(ema, strategy, bf16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = modality.sample_ids(batch, "cpu")
    tokens = Tokens(torch.randn(batch, ids.shape[1], modality.token_channels), ids)
    cond = modality.sample_conditions(batch, "cpu")[0]
    gen = torch.Generator().manual_seed(0)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            losses = obj.loss(student, ema, tokens, cond, null_label=modality.num_classes, modality=name,
                              generator=gen)
        losses["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, model, 0.999)

    for _ in range(2 if strategy == "ddp" else 1):  # DDP rebuilds its buckets in the order of the first step's
        step()  # gradients at the start of the second (once; the profiler would see the new ones, not the old freed)
    return live_peak_bytes(step)


BF16 = pytest.mark.skipif(not cpu_bf16_is_native(), reason="bf16 matrix products are ~100x slower on this CPU")
S2 = ["model.preset=S/2", "model.grid_size=16", "data.options.image_size=64", "train.batch_size=8"]


# The tiny image config (MMDiT) at batch 64, Self-Flow and flow matching, fp32 and bf16, with and without activation
# checkpointing; SiT-S/2 with it, where the gradients outweigh the saved block inputs. Measured: 0.92-1.14x.
@pytest.mark.parametrize("config,overrides,checkpointing", [
    (CONFIG, [f"train.batch_size={BATCH}"], False),
    (CONFIG, [f"train.batch_size={BATCH}", "objective.kind=flow_matching"], False),
    pytest.param(CONFIG, [f"train.batch_size={BATCH}", "train.precision=bf16"], False, marks=BF16),
    pytest.param(CONFIG, [f"train.batch_size={BATCH}", "train.precision=bf16", "objective.kind=flow_matching"],
                 False, marks=BF16),
    (CONFIG, [f"train.batch_size={BATCH}"], True),
    (CONFIG, [f"train.batch_size={BATCH}", "objective.kind=flow_matching"], True),
    pytest.param(CONFIG, [f"train.batch_size={BATCH}", "train.precision=bf16"], True, marks=BF16),
    (ROOT / "configs/tiny/imagenet256_selfflow.yaml", S2, True),
])
def test_plan_within_15_percent_of_the_live_tensor_peak_of_a_cpu_step(config, overrides, checkpointing):
    plan = make_plan(load_config(config, overrides))
    batch = int(next(o for o in overrides if o.startswith("train.batch_size=")).split("=")[1])
    measured = measured_step_transient(config, overrides, batch, checkpointing)
    estimate = plan.step_transient(batch, checkpointing)
    assert abs(estimate - measured) / measured < 0.15, (estimate / 2**20, measured / 2**20)


# Under DDP and FSDP2 (one gloo rank: FSDP2's shards are then whole, so its gradients are too): the gradients are
# not resident but fill as backward frees the activations, as on one device, and DDP's buckets are resident.
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("config,overrides,checkpointing", [
    (CONFIG, [f"train.batch_size={BATCH}"], False),
    pytest.param(CONFIG, [f"train.batch_size={BATCH}", "train.precision=bf16"], True, marks=BF16),
    (ROOT / "configs/tiny/imagenet256_selfflow.yaml", S2, True),  # the gradients set the peak
])
def test_plan_within_15_percent_of_a_wrapped_cpu_step(one_gloo_rank, strategy, config, overrides, checkpointing):
    plan = make_plan(load_config(config, overrides))
    batch = int(next(o for o in overrides if o.startswith("train.batch_size=")).split("=")[1])
    measured = measured_step_transient(config, overrides, batch, checkpointing, strategy)
    estimate = plan.step_transient(batch, checkpointing, strategy, gpus=1)
    assert abs(estimate - measured) / measured < 0.15, (estimate / 2**20, measured / 2**20)


def test_ddp_allocates_its_gradient_buckets_when_it_wraps_the_model(one_gloo_rank):
    from torch.nn.parallel import DistributedDataParallel

    from selfflow.core.plan import RESIDENT_BYTES

    plan = make_plan(load_config(CONFIG))
    model = build_run(load_config(CONFIG)).backbone
    wrapped = []
    buckets = live_peak_bytes(lambda: wrapped.append(DistributedDataParallel(model)))
    assert buckets == pytest.approx((RESIDENT_BYTES["ddp"] - RESIDENT_BYTES["none"]) * plan.params, rel=0.02)


def test_plan_cli(capsys, monkeypatch):
    with monkeypatch.context() as m:  # under torchrun each rank would print the same plan
        m.setenv("WORLD_SIZE", "2")
        assert main(["plan", "--config", str(CONFIG)]) == 2
    assert "selfflow plan runs in one process" in capsys.readouterr().err
    assert main(["plan", "--config", str(CONFIG), "--gpus", "8", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "trainable parameters" in out and "fsdp2" in out and "on 80 GB (90 % usable) the largest micro-batch" in out
    assert "does not fit" not in out and "train.compile" not in out
    assert main(["plan", "--config", str(CONFIG), "--set", "train.compile=true"]) == 0
    assert "train.compile: these are the eager step's" in capsys.readouterr().out  # an upper bound there
    big = ["--set", "train.batch_size=65536"]  # the most a config takes: no GPU here holds it
    assert main(["plan", "--config", str(CONFIG), "--gpu-mem", "80", *big]) == 0
    out = capsys.readouterr().out
    assert "! ddp: micro-batch 65536 does not fit (" in out and "a micro-batch of at most " in out
    # SiT-XL/2 with checkpointing: the first batch past the largest exceeds 67.06 GiB by < 1 MiB ("67.06 > 67.06")
    xl2 = ["--config", str(ROOT / "configs/imagenet256/selfflow_sit_xl2.yaml"), "--gpu-mem", "80", "--set",
           "train.activation_checkpointing=true"]
    assert main(["plan", *xl2]) == 0
    largest = int(re.search(r"ddp .* with activation checkpointing (\d+)\n", capsys.readouterr().out).group(1))
    assert main(["plan", *xl2, "--batch", str(largest + 1)]) == 0
    need, usable = re.search(r"! ddp: .* does not fit \(([\d.]+) GiB > ([\d.]+) GiB usable", capsys.readouterr().out
                             ).groups()
    assert need != usable and float(need) > float(usable)  # at the boundary: enough decimals to see it
    assert main(["plan", "--config", str(CONFIG), "--gpu-mem", "0.0001"]) == 0
    out = capsys.readouterr().out
    assert "largest micro-batch is 0 (none fits)" in out and "not even one sample" in out
    assert main(["plan", "--config", str(CONFIG), "--gpu-mem", "1e9"]) == 0
    assert "largest micro-batch is 65536 (train.batch_size's limit)" in capsys.readouterr().out
    plan = make_plan(load_config(CONFIG))
    assert plan.activations(4, True) < plan.activations(4, False)
    assert plan.resident("fsdp2", 8) < plan.resident("none", 1) < plan.resident("ddp", 8)


def test_largest_batch_leaves_room_for_the_bf16_weight_copies():
    """Under bf16 the step also holds a bf16 copy of every weight: the largest batch must not spend that room."""
    fp32 = make_plan(load_config(CONFIG))
    bf16 = make_plan(load_config(CONFIG, ["train.precision=bf16"]))
    assert fp32.weight_casts == 0 and bf16.weight_casts == 2 * bf16.params
    per_sample = bf16.activations(1, False) + bf16.teacher_bytes
    assert bf16.activations(3, False) > bf16.grad_bytes  # so the memory is linear in the batch from 3 on
    mem = (bf16.resident("ddp", 1) + bf16.weight_casts + 3.5 * per_sample) / 0.9  # room for 3 samples and a half
    assert bf16.largest_batch("ddp", 1, mem, False) == 3
    assert bf16.step_transient(3) - bf16.weight_casts == pytest.approx(
        max(bf16.activations(3, False), bf16.grad_bytes) + 3 * bf16.teacher_bytes)


@pytest.mark.parametrize("strategy,gpus", [("none", 1), ("ddp", 4), ("fsdp2", 4)])
def test_largest_batch_is_the_largest_that_fits_where_the_gradients_set_the_peak_too(strategy, gpus):
    """Below some batch the gradients, not the activations, set the peak: the memory is flat there and then
    linear, so the largest batch is searched, not extrapolated from batches 0 and 1 (which read the flat part)."""
    plan = make_plan(load_config(ROOT / "configs/tiny/imagenet256_selfflow.yaml", S2))
    for checkpointing in (False, True):
        peaks = [plan.gpu_memory(strategy, gpus, b, checkpointing) for b in range(0, 200)]
        assert peaks == sorted(peaks) and peaks[1] - peaks[0] < peaks[199] - peaks[198]  # not one line
        for mem in [peaks[0] / 0.9, peaks[1] / 0.9 - 1, *(peaks[b] / 0.9 for b in (1, 7, 30, 150)),
                    (peaks[40] + peaks[41]) / 2 / 0.9]:
            expected = max((b for b in range(1, 200) if peaks[b] <= 0.9 * mem), default=0)
            assert plan.largest_batch(strategy, gpus, mem, checkpointing) == expected, (mem, checkpointing)


# Every shipped tiny config but those made for the tiny FLUX.2 / RAE folders the tests build (planned without
# them, the published autoencoders' shapes apply: RAE's needs 256 px).
@pytest.mark.parametrize("name", ["image", "digits", "video", "audio", "mixed", "rt1", "image_text",
                                  "imagenet256_selfflow", "imagenet256_fm", "imagenet256_repa", "imagenet256_no_mask"])
def test_plan_every_tiny_config(name, tmp_path, monkeypatch):
    """Text-conditioned runs (audio, mixed, rt1) once failed: their caption encoder ran on meta tensors;
    image_text needed its prepared shards."""
    monkeypatch.chdir(tmp_path)  # no shards, no weights
    plan = make_plan(load_config(ROOT / f"configs/tiny/{name}.yaml", []))
    assert plan.params > 0 and plan.flops_per_sample > 0 and plan.activations(1, False) > 0


# The paper recipes, planned before anything is downloaded: each codec's published latent shape stands in.
@pytest.mark.parametrize("name,channels", [("selfflow_sit_xl2", 4 * 2 * 2), ("fm_sit_xl2", 16), ("repa_sit_xl2", 16),
                                           ("ablation_no_mask", 16), ("ablation_no_rep", 16),
                                           ("flux2_selfflow", 128), ("rae_selfflow", 768)])
def test_plan_every_paper_image_recipe_without_weights_or_shards(name, channels, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / f"configs/imagenet256/{name}.yaml")
    plan = make_plan(cfg)
    assert plan.tokens == 256 and plan.bf16
    backbone_body = 674.8e6 - 16 * 4 - 4  # SiT-XL/2's 675M, less its 16-channel input and output projections
    assert plan.params == pytest.approx(backbone_body + 1152 * channels * 2 + (5.3e6 if "no_rep" not in name and
                                                                               "fm_" not in name else 0), rel=0.01)
    # a real DiT's FLOPs: 2·3·params-ish per token and more for attention (881 GFLOP per Self-Flow sample)
    assert 700e9 < plan.flops_per_sample < 900e9


def _t5_xxl_config(folder: Path) -> None:
    from transformers import T5Config

    T5Config(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, feed_forward_proj="gated-gelu"
             ).save_pretrained(folder)


def test_plan_the_paper_mixed_run_per_modality_from_config_files_alone(tmp_path, monkeypatch, capsys):
    """Its caption encoder's config.json (a few KB) is all it reads: T5-XXL's width sets the context stream.
    Video and audio without their shards: the clip `selfflow prepare` makes by default (the paper's)."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs/mixed_625m.yaml")
    with pytest.raises(FileNotFoundError, match=r"weights/t5-xxl has no config\.json.*reads only that file.*hf download"):
        make_plans(cfg)
    _t5_xxl_config(tmp_path / "weights/t5-xxl")
    plans = make_plans(cfg)
    # image 16×16 SD-VAE latents / patch 2; video 45 frames at 192×320 through Wan2.2 (4, 16, 16) → 12×12×20
    # latents / patch (1, 2, 2); audio 10 s at 48 kHz / hop 1920 = 250 frames
    assert [(p.modality, p.tokens, b) for p, b in plans] == [("image", 256, 38), ("video", 720, 8), ("audio", 250, 16)]
    # the paper's time distribution per modality: FLUX.2 AE images logit-normal with a train shift (√8, the codec
    # default), Wan2.2 video logit-normal, audio uniform at the official samples' train shift 0.75
    from selfflow.core.codec import shapes_only
    from selfflow.core.timesteps import TimestepDistribution

    with shapes_only():
        run = build_run(cfg, device="meta")
    assert run.modalities["image"].token_channels == 128
    assert run.objectives["image"].timesteps == TimestepDistribution(kind="logit_normal", shift=8 ** 0.5)
    assert run.objectives["video"].timesteps.kind == "logit_normal"
    assert run.objectives["audio"].timesteps == TimestepDistribution(kind="uniform", shift=0.75)
    assert len({p.params for p, _ in plans}) == 1 and 600e6 < plans[0][0].params < 660e6
    assert plans[1][0].flops_per_sample > 2 * plans[0][0].flops_per_sample  # 720 + 64 vs 256 + 64 tokens
    assert main(["plan", "--config", str(ROOT / "configs/mixed_625m.yaml"), "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "3 modalities, one per step" in out and "video: 720 tokens per sample, micro-batch 8" in out
    assert "peak per GPU, fsdp2" in out


def test_a_bf16_plan_counts_every_block_alike():
    """MetaAutocast once let the weights' bf16 copies die: later activations reused their storage addresses and
    were skipped as weight copies, so identical blocks read different, too small, sizes from run to run."""
    plan = make_plan(load_config(ROOT / "configs/imagenet256/selfflow_sit_xl2.yaml", ["train.precision=bf16"]))
    assert len(set(plan.profile.blocks[1:])) == 1


def test_fsdp2_in_bf16_gathers_bf16_blocks_and_makes_no_weight_copies():
    """parallel.shard_fsdp2's MixedPrecisionPolicy gathers bf16 parameters: autocast finds nothing to copy."""
    fp32 = make_plan(load_config(CONFIG, []))
    bf16 = make_plan(load_config(CONFIG, ["train.precision=bf16"]))
    blocks = len(bf16.profile.blocks)
    assert bf16.resident("fsdp2", 8) == fp32.resident("fsdp2", 8) == pytest.approx(16 * bf16.params / 8)
    # With no sample the step still holds its gradients (sharded under FSDP2), and FSDP2 two gathered blocks.
    assert bf16.gpu_memory("fsdp2", 8, 0, False) == pytest.approx(20 * bf16.params / 8 + 2 * 2 * bf16.params / blocks)
    assert fp32.gpu_memory("fsdp2", 8, 0, False) == pytest.approx(20 * fp32.params / 8 + 2 * 4 * fp32.params / blocks)
    assert bf16.gpu_memory("ddp", 8, 0, False) == 24 * bf16.params + bf16.weight_casts


def test_live_peak_counts_the_tensors_held_at_once_not_all_allocated():
    def step():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(2_000_000)  # 8 MB, with a: the peak
        del a
        c = torch.empty(500_000)  # 2 MB, after a is freed
        return b.sum() + c.sum()

    assert live_peak_bytes(step) == 12_000_000  # a and b; c and the sums come after a is freed


def test_meta_autocast_casts_the_matrix_products_only():
    linear = torch.nn.Linear(8, 4, device="meta")
    params = {p.untyped_storage()._cdata for p in linear.parameters()}
    x = torch.empty(2, 8, device="meta")
    with MetaAutocast(params) as autocast:
        y = linear(x)
        z = torch.nn.functional.layer_norm(x, (8,))
    assert y.dtype == torch.bfloat16 and z.dtype == torch.float32
    assert len(autocast.weight_copies) == 2  # the weight's and the bias's bf16 copies, counted apart


def test_bf16_activations_are_profiled_not_halved():
    fp32 = make_plan(load_config(CONFIG, []))
    bf16 = make_plan(load_config(CONFIG, ["train.precision=bf16"]))
    ratio = bf16.activations(1, False) / fp32.activations(1, False)
    assert 0.5 < ratio < 0.8  # bf16 copies of matmul and attention inputs; the fp32 residual stream stays


def test_parameter_counts_read_as_people_say_them():
    from selfflow.core.plan import _count

    assert [_count(n) for n in (675_129_632, 40_312, 1_200_000_000, 512)] == ["675.1M", "40.3k", "1.2B", "512"]
