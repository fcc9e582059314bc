"""``selfflow plan``: its memory estimate against the peak RSS of real CPU training steps, and the CLI."""

import ctypes
import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfflow.core.cli import main
from selfflow.core.config import load_config
from selfflow.core.plan import MetaAutocast, make_plan
from selfflow.core.precision import cpu_bf16_is_native

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs/tiny/image.yaml"
BATCH = 64


def measure_step_transient(config: str, overrides: list[str], batch: int) -> float:
    """Run in a fresh process: bytes of peak − resident RSS of a training step after a warm-up step
    (the method of benchmarks/memory.py: malloc_trim, reset VmHWM via clear_refs, step, read VmHWM); the loss
    under the CPU's bf16 autocast when the config says ``train.precision: bf16``."""
    from selfflow.core.ema import ema_update, make_ema
    from selfflow.core.run_setup import build_run
    from selfflow.core.tokens import Tokens

    torch.set_num_threads(1)
    cfg = load_config(config, overrides)
    run = build_run(cfg)
    (name, modality), obj = next(iter(run.modalities.items())), next(iter(run.objectives.values()))
    model, ema = run.backbone, make_ema(run.backbone)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = modality.sample_ids(batch, "cpu")
    tokens = Tokens(torch.randn(batch, ids.shape[1], modality.token_channels), ids)
    cond = modality.sample_conditions(batch, "cpu")[0]
    gen = torch.Generator().manual_seed(0)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
            losses = obj.loss(model, ema, tokens, cond, null_label=modality.num_classes, modality=name,
                              generator=gen)
        losses["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, model, 0.999)

    def status_kb(key: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
        return int(line.split()[1])

    step()
    libc = ctypes.CDLL("libc.so.6")
    transients = []
    for _ in range(3):
        gc.collect()
        libc.malloc_trim(0)
        before = status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        step()
        transients.append((status_kb("VmHWM") - before) * 1024)
    return sorted(transients)[1]


BF16 = pytest.mark.skipif(not cpu_bf16_is_native(), reason="bf16 matrix products are ~100x slower on this CPU")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux peak-RSS reset")
@pytest.mark.parametrize("overrides", [[], ["objective.kind=flow_matching"],
                                       pytest.param(["train.precision=bf16"], marks=BF16),
                                       pytest.param(["train.precision=bf16", "objective.kind=flow_matching"],
                                                    marks=BF16)])
def test_plan_within_15_percent_of_measured_cpu_step(overrides):
    overrides = [f"train.batch_size={BATCH}", *overrides]
    plan = make_plan(load_config(CONFIG, overrides))
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from test_plan import measure_step_transient; "
            "print(json.dumps(measure_step_transient(sys.argv[2], sys.argv[4:], int(sys.argv[3]))))")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(CONFIG), str(BATCH),
                          *overrides], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": ""})
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    estimate = plan.step_transient(BATCH)
    assert abs(estimate - measured) / measured < 0.15, (estimate / 2**20, measured / 2**20)


def test_plan_cli(capsys):
    assert main(["plan", "--config", str(CONFIG), "--gpus", "8", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "trainable parameters" in out and "fsdp2" in out and "largest micro-batch on 80 GB" in out
    plan = make_plan(load_config(CONFIG))
    assert plan.activations(4, True) < plan.activations(4, False)
    assert plan.state("fsdp2", 8) < plan.state("ddp", 8)


def test_largest_batch_leaves_room_for_the_bf16_weight_copies():
    """Under bf16 the step also holds a bf16 copy of every weight: the largest batch must not spend that room."""
    fp32 = make_plan(load_config(CONFIG))
    bf16 = make_plan(load_config(CONFIG, ["train.precision=bf16"]))
    assert fp32.weight_casts == 0 and bf16.weight_casts == 2 * bf16.params
    per_sample = bf16.activations(1, False) + bf16.teacher_bytes
    mem = (bf16.state("ddp", 1) + bf16.weight_casts + 3.5 * per_sample) / 0.9  # room for 3 samples and a half
    assert bf16.largest_batch("ddp", 1, mem, False) == 3
    assert bf16.step_transient(3) - bf16.weight_casts == pytest.approx(
        max(bf16.activations(3, False), bf16.grad_bytes) + 3 * bf16.teacher_bytes)


# Every shipped tiny config that needs no local files (image_text needs shards, flux2 / rae a VAE folder).
@pytest.mark.parametrize("name", ["image", "digits", "video", "audio", "mixed", "rt1", "imagenet256_selfflow",
                                  "imagenet256_fm", "imagenet256_repa", "imagenet256_no_mask"])
def test_plan_every_tiny_config(name):
    """Text-conditioned runs (audio, mixed, rt1) once failed: their caption encoder ran on meta tensors."""
    plan = make_plan(load_config(ROOT / f"configs/tiny/{name}.yaml", []))
    assert plan.params > 0 and plan.flops_per_sample > 0 and plan.activations(1, False) > 0


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
