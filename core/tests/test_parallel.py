"""``parallel``: how the trainer wraps the student and its EMA teacher (on one gloo rank)."""

from pathlib import Path

import pytest
import torch

from selfflow.core import parallel
from selfflow.core.config import load_config
from selfflow.core.distributed import DistInfo
from selfflow.core.ema import make_ema
from selfflow.core.run_setup import build_run
from selfflow.core.tokens import Tokens

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_bf16_keeps_the_inputs_timesteps_and_residual_stream_fp32(one_gloo_rank, strategy):
    """Under bf16 FSDP2 gathers bf16 parameters, but what the model is given stays as DDP's autocast leaves it:
    FSDP2's default would round the noisy tokens, every token's timestep and the DiT's residual stream at each
    block to bf16 (its policy's ``cast_forward_inputs``)."""
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/tiny/imagenet256_selfflow.yaml",
                      ["model.preset=S/2", "model.depth=2", "train.precision=bf16"])
    run = build_run(cfg)
    (name, modality), obj = next(iter(run.modalities.items())), next(iter(run.objectives.values()))
    model, ema = run.backbone, make_ema(run.backbone)
    seen = {}

    def model_sees(_module, args) -> None:
        seen.setdefault("model", args)

    def block_sees(block, args) -> None:
        seen.setdefault("block", (args[0].dtype, next(block.parameters()).dtype))

    model.register_forward_pre_hook(model_sees, prepend=True)
    next(iter(model.blocks())).register_forward_pre_hook(block_sees)
    student = parallel.wrap_student(model, strategy, DistInfo(), bf16=True)
    teacher = parallel.wrap_teacher(ema, strategy, bf16=True)
    ids = modality.sample_ids(2, "cpu")
    tokens = Tokens(torch.randn(2, ids.shape[1], modality.token_channels), ids)
    cond = modality.sample_conditions(2, "cpu")[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = obj.loss(student, teacher, tokens, cond, null_label=modality.num_classes, modality=name,
                          generator=torch.Generator().manual_seed(0))
    x, _ids, t = seen["model"][:3]
    assert x.dtype == t.values.dtype == torch.float32
    params = torch.bfloat16 if strategy == "fsdp2" else torch.float32
    assert seen["block"] == (torch.float32, params)  # (the residual stream, the parameters the block computes with)
    assert torch.isfinite(losses["loss"])


@pytest.mark.parametrize("requested", ["ddp", "fsdp2"])
def test_one_plain_process_trains_unwrapped_whatever_the_strategy(requested):
    """A run trained under torchrun with train.parallel set resumes in one plain process with the same command
    (it failed: 'environment variable RANK expected' for fsdp2, 'Default process group has not been
    initialized' for ddp)."""
    with pytest.warns(UserWarning, match=f"train.parallel is '{requested}' but this is one process"):
        assert parallel.resolve_strategy(requested, DistInfo()) == "none"
    assert parallel.resolve_strategy("none", DistInfo()) == "none"


def test_fsdp2_does_not_alarm_about_the_view_its_velocity_is(one_gloo_rank, recwarn):
    """The MMDiT's velocity is a Linear over a slice of the sequence (past its class token), a view: torch warned
    at every forward that an in-place op on it would skip the all-gather, which no loss or sampler here does."""
    import warnings

    torch.manual_seed(0)
    run = build_run(load_config(ROOT / "configs/tiny/video.yaml", ["train.batch_size=2"]))
    (name, modality), obj = next(iter(run.modalities.items())), next(iter(run.objectives.values()))
    ema = make_ema(run.backbone)
    student = parallel.wrap_student(run.backbone, "fsdp2", DistInfo(), bf16=False)
    teacher = parallel.wrap_teacher(ema, "fsdp2", bf16=False)
    ids = modality.sample_ids(2, "cpu")
    tokens = Tokens(torch.randn(2, ids.shape[1], modality.token_channels), ids)
    cond = modality.sample_conditions(2, "cpu")[0]

    def step() -> None:
        obj.loss(student, teacher, tokens, cond, null_label=modality.num_classes, modality=name,
                 generator=torch.Generator().manual_seed(0))["loss"].backward()

    with warnings.catch_warnings(record=True) as unfiltered:  # the premise: this torch warns (2.14 does, 2.11 not)
        warnings.resetwarnings()
        warnings.simplefilter("always")
        step()
    if not [w for w in unfiltered if "returned a view tensor" in str(w.message)]:
        pytest.skip(f"torch {torch.__version__} does not warn about a view returned by an FSDP2 module")
    step()
    assert not [w for w in recwarn if "returned a view tensor" in str(w.message)]
