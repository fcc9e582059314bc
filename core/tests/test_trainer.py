import json

import pytest
import torch
from PIL import Image

from selfflow.core.config import ConfigError, load_config
from selfflow.core.metrics import read_metrics
from selfflow.core.trainer import Trainer

TINY = ["model.hidden_size=32", "model.num_heads=2", "model.depth_double=1", "model.depth_single=2",
        "model.axes_dim=[4,6,6]", "train.batch_size=4", "logging.every=1", "logging.plot_every=2",
        "data.options.image_size=16", "data.options.patch_size=4", "sample.steps=2", "sample.num_samples=10",
        "ema.decay=0.9", "optim.warmup_steps=2"]


def _cfg(tmp_path, name, *extra):
    return load_config(None, [*TINY, f"output_dir={tmp_path}", f"name={name}", *extra])


@pytest.mark.parametrize("kind", ["self_flow", "flow_matching"])
def test_run_writes_every_artifact(tmp_path, kind):
    cfg = _cfg(tmp_path, kind, "train.steps=4", f"objective.kind={kind}")
    result = Trainer(cfg, progress=False).fit()
    run = tmp_path / kind
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("step", "loss", "loss_fm", "loss_rep", "lr", "grad_norm", "samples_per_s"):
        assert key in records[-1]
    assert (records[-1]["loss_rep"] < 0) == (kind == "self_flow")
    assert (run / "config.yaml").is_file() and (run / "ema.safetensors").is_file()
    assert result["checkpoint"].name == "step_00000004.pt"
    assert Image.open(result["samples"]).size[0] > 100 and Image.open(run / "loss.png").size[0] > 100
    assert list((run / "tensorboard").iterdir())
    if kind == "flow_matching":
        assert Trainer(cfg, progress=False).model.projector is None


def test_resume_gives_the_uninterrupted_losses(tmp_path):
    Trainer(_cfg(tmp_path, "full", "train.steps=6"), progress=False).fit()
    Trainer(_cfg(tmp_path, "split", "train.steps=3"), progress=False).fit()
    resumed = Trainer(_cfg(tmp_path, "split", "train.steps=6"), progress=False)
    assert resumed.step == 3 and resumed.resumed_from.name == "step_00000003.pt"
    resumed.fit()
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    split = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in split] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, split):
        assert (a["loss"], a["loss_fm"], a["loss_rep"], a["grad_norm"]) == (
            b["loss"], b["loss_fm"], b["loss_rep"], b["grad_norm"])
    sa = torch.load(tmp_path / "full/checkpoints/step_00000006.pt", weights_only=True)["ema"]
    sb = torch.load(tmp_path / "split/checkpoints/step_00000006.pt", weights_only=True)["ema"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_nonfinite_loss_skips_the_step(tmp_path, monkeypatch):
    trainer = Trainer(_cfg(tmp_path, "nan", "train.steps=2"), progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batch = next(iter(trainer.streams["image"]))
    batch["media"][0, 0, 0, 0] = float("nan")
    out = trainer.train_step([batch], "image")
    assert out["skipped"] == 1.0 and trainer.guard.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    trainer.train_step([next(iter(trainer.streams["image"]))], "image")  # a good step resets the count
    assert trainer.guard.nonfinite_in_a_row == 0


def test_repeated_nonfinite_steps_abort_and_keep_the_last_checkpoint(tmp_path):
    from selfflow.core.step_guard import NonFiniteLossError

    cfg = _cfg(tmp_path, "nan2", "train.steps=2")
    Trainer(cfg, progress=False).fit()
    cfg = _cfg(tmp_path, "nan2", "train.steps=10", "train.max_nonfinite_steps=3", "optim.lr=1e30",
               "optim.grad_clip=1e30")
    trainer = Trainer(cfg, progress=False)
    with torch.no_grad():
        for p in trainer.raw.parameters():
            p.fill_(float("inf"))
    # steps 3, 4, 5 fail: the message counts steps from 1, as metrics.jsonl and the checkpoints do
    with pytest.raises(NonFiniteLossError, match=r"3 optimizer steps in a row.*\(at step 5\).*step_00000002\.pt"):
        trainer.fit()
    assert sorted(p.name for p in (tmp_path / "nan2" / "checkpoints").iterdir()) == ["step_00000002.pt"]


def test_grad_accumulation_equals_a_big_batch(tmp_path):
    Trainer(_cfg(tmp_path, "big", "train.batch_size=4", "train.steps=3"), progress=False).fit()
    Trainer(_cfg(tmp_path, "acc", "train.batch_size=2", "train.grad_accum_steps=2", "train.steps=3"),
            progress=False).fit()
    big = read_metrics(tmp_path / "big" / "metrics.jsonl")
    acc = read_metrics(tmp_path / "acc" / "metrics.jsonl")
    for a, b in zip(big, acc, strict=True):
        for key in ("loss", "loss_fm", "loss_rep", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_resume_on_another_split_of_the_global_batch(tmp_path):
    """The synthetic stream resumes at the same sample when ranks × micro-batch × accumulation change but the
    global batch does not; a split it cannot continue is one clear error, not a traceback."""
    from selfflow.core.checkpoint import CheckpointLoadError

    Trainer(_cfg(tmp_path, "whole", "train.batch_size=4", "train.steps=4"), progress=False).fit()
    Trainer(_cfg(tmp_path, "split", "train.batch_size=4", "train.steps=2"), progress=False).fit()
    resumed = Trainer(_cfg(tmp_path, "split", "train.batch_size=2", "train.grad_accum_steps=2", "train.steps=4"),
                      progress=False)
    assert resumed.step == 2
    resumed.fit()
    whole = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    split = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    for a, b in zip(whole, split, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    # 4 steps × 4 samples = 16 consumed: not a whole number of micro-batches of 3 (it used to raise a bare
    # ValueError, a traceback through the CLI)
    with pytest.raises(CheckpointLoadError, match=r"its streams state does not fit this run \(cannot resume the "
                                                   r"synthetic stream: it stopped after 16 samples.*3 × 1"):
        Trainer(_cfg(tmp_path, "split", "train.batch_size=3", "train.steps=6"), progress=False)


def test_lr_schedule():
    from selfflow.core.run_setup import lr_factor

    assert [lr_factor(s, 4, 20, "constant", 0) for s in (0, 3, 10)] == [0.25, 1.0, 1.0]
    assert lr_factor(4, 4, 20, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(20, 4, 20, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(12, 4, 20, "cosine", 0.0) == pytest.approx(0.5)


def test_bad_modality_options_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.options\.patch_sise"):
        Trainer(_cfg(tmp_path, "bad", "data.options.patch_sise=2"), progress=False)
    with pytest.raises(ConfigError, match=r"teacher_layer = 9"):
        Trainer(_cfg(tmp_path, "bad", "objective.teacher_layer=9"), progress=False)
    with pytest.raises(KeyError, match="unknown modality 'smell'"):
        Trainer(_cfg(tmp_path, "bad", "data.modality=smell"), progress=False)


def test_config_is_saved_resolved(tmp_path):
    cfg = _cfg(tmp_path, "saved", "train.steps=1")
    Trainer(cfg, progress=False).fit()
    again = load_config(tmp_path / "saved" / "config.yaml")
    assert again == cfg
    assert json.loads(json.dumps(again.model_dump(mode="json")))["model"]["hidden_size"] == 32


@pytest.mark.parametrize("option", ["train.activation_checkpointing=true", "train.compile=true"])
def test_checkpointing_and_compile_keep_the_losses(tmp_path, option):
    Trainer(_cfg(tmp_path, "plain", "train.steps=2", "sample.every=0"), progress=False).fit()
    Trainer(_cfg(tmp_path, "opt", "train.steps=2", option), progress=False).fit()
    a = read_metrics(tmp_path / "plain" / "metrics.jsonl")
    b = read_metrics(tmp_path / "opt" / "metrics.jsonl")
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "loss_fm", "loss_rep", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), (option, key)


def test_a_broken_checkpoint_skipped_on_resume_is_named_in_train_log(tmp_path):
    Trainer(_cfg(tmp_path, "run", "train.steps=1"), progress=False).fit()
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step_00000002.pt").write_bytes((ckpts / "step_00000001.pt").read_bytes()[:100])  # truncated
    assert Trainer(_cfg(tmp_path, "run", "train.steps=2"), progress=False).step == 1
    log = (tmp_path / "run" / "train.log").read_text()
    assert "WARNING selfflow: warning: skipped a broken checkpoint: checkpoint " in log
    assert "step_00000002.pt is truncated or corrupt" in log and "resuming from" in log


def test_each_record_logs_the_lr_its_step_applied(tmp_path):
    Trainer(_cfg(tmp_path, "lr", "train.steps=3", "optim.lr=1e-3", "optim.warmup_steps=4"), progress=False).fit()
    assert [r["lr"] for r in read_metrics(tmp_path / "lr" / "metrics.jsonl")] == pytest.approx([2.5e-4, 5e-4, 7.5e-4])


def test_a_resume_trains_with_the_optimizer_settings_of_its_config(tmp_path):
    """Lowering optim.lr (or changing the decay, betas, eps) and resuming must take effect, not the old values."""
    Trainer(_cfg(tmp_path, "run", "train.steps=2", "optim.lr=1e-3", "optim.weight_decay=0.1"), progress=False).fit()
    resumed = Trainer(_cfg(tmp_path, "run", "train.steps=4", "optim.lr=1e-4", "optim.weight_decay=0.05",
                           "optim.betas=[0.9,0.95]", "ema.decay=0.5", "train.seed=7"), progress=False)
    decay, no_decay = resumed.optimizer.param_groups
    assert (decay["lr"], decay["initial_lr"], decay["weight_decay"], decay["betas"]) == (1e-4, 1e-4, 0.05, (0.9, 0.95))
    assert (no_decay["lr"], no_decay["weight_decay"]) == (1e-4, 0.0) and resumed.scheduler.base_lrs == [1e-4, 1e-4]
    assert resumed.optimizer.state  # the moments themselves came back
    resumed.fit()
    assert [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == pytest.approx([5e-4, 1e-3, 1e-4, 1e-4])
    log = (tmp_path / "run" / "train.log").read_text()
    assert "resume: optim lr 0.001 → 0.0001 (param groups 0, 1), as this run's config says" in log  # one line
    assert "weight_decay 0.1 → 0.05 (param group 0)" in log
    assert "betas (0.9, 0.999) → (0.9, 0.95) (param groups 0, 1)" in log
    # the train and ema sections too (they were taken silently, config.yaml rewritten as the only trace)
    assert "resume: ema.decay 0.9 → 0.5, from step 2 on" in log
    assert "resume: train.seed 0 → 7 (no effect on a resumed run: its generator and data streams continue" in log
    assert "train.steps" not in log.split("resume: ema")[1]  # raising the steps is how a run goes on
    assert "global batch" not in log  # unchanged


def test_a_resume_on_other_ranks_or_batch_says_how_the_global_batch_changes(tmp_path):
    """train.batch_size is per rank: 2 ranks × 2 resumed in one process as "the same command" trained on with
    half the batch, unsaid. The checkpoint records the global batch; a change is a warning with the way back."""
    Trainer(_cfg(tmp_path, "run", "train.steps=1", "train.batch_size=4"), progress=False).fit()
    resumed = Trainer(_cfg(tmp_path, "run", "train.steps=2", "train.batch_size=2"), progress=False)
    assert resumed.global_batch_changes() == ["image's global batch 4 → 2 (1 rank(s) × 2 × 1 accumulation step(s): "
                                              "the batch size is per rank; 4 per rank keeps 4)"]
    assert "resume: image's global batch 4 → 2" in (tmp_path / "run" / "train.log").read_text()
    resumed.resumed_batches = (2, None)  # a checkpoint of 2 ranks from before the global batch was recorded
    assert resumed.global_batch_changes() == ["2 rank(s) then, 1 now: the batch size is per rank, so image's "
                                              "global batch changed with them (now 2)"]


def test_a_fresh_start_sets_the_earlier_checkpoints_aside(tmp_path):
    """--no-resume: a later plain rerun must resume the fresh run, not the earlier one's higher steps."""
    Trainer(_cfg(tmp_path, "run", "train.steps=4", "checkpoint.every=2"), progress=False).fit()
    Trainer(_cfg(tmp_path, "run", "train.steps=1"), resume=False, progress=False).fit()
    ckpts = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpts.glob("step_*.pt")] == ["step_00000001.pt"]
    (aside,) = ckpts.glob("replaced-*")
    assert sorted(p.name for p in aside.iterdir()) == ["step_00000002.pt", "step_00000004.pt"]
    again = Trainer(_cfg(tmp_path, "run", "train.steps=2"), progress=False)
    assert again.step == 1 and again.resumed_from.name == "step_00000001.pt"
    assert "--no-resume: moved the 2 checkpoint(s) of the earlier run" in (tmp_path / "run" / "train.log").read_text()


def test_a_skipped_step_moves_the_lr_schedule_on(tmp_path, recwarn):
    # The schedule follows the step count: after a skipped first step, step 2 trains at step 2's rate.
    trainer = Trainer(_cfg(tmp_path, "skiplr", "train.steps=4", "optim.warmup_steps=4"), progress=False)
    stream = iter(trainer.streams["image"])
    bad = next(stream)
    bad["media"][0, 0, 0, 0] = float("nan")
    first = trainer.train_step([bad], "image")
    second = trainer.train_step([next(stream)], "image")
    assert first["skipped"] == 1.0 and "skipped" not in second
    assert (first["lr"], second["lr"]) == pytest.approx((trainer.cfg.optim.lr / 4, trainer.cfg.optim.lr / 2))
    assert not [w for w in recwarn if "lr_scheduler.step" in str(w.message)]


def test_mfu_counts_the_caption_tokens(tmp_path):
    """A text-conditioned step also runs the context stream and joint attention over its Lc tokens: the MFU's
    FLOPs must count them (they used to be left out: ~2× low for 64-token captions on 64-token samples)."""
    from selfflow.core.flops import train_step_flops

    trainer = Trainer(_cfg(tmp_path, "mfu", "train.steps=1", "logging.peak_tflops=1",
                           "data.options.conditioning=text"), progress=False)
    trainer.train_step([next(iter(trainer.streams["image"]))], "image")
    lc, tokens = trainer.context_per_sample["image"], trainer.tokens_per_sample["image"]
    layer = trainer.run.objectives["image"].teacher_layer
    assert lc > 0
    assert trainer._step_cost("image").flops == 4 * train_step_flops(trainer.raw, tokens, lc, teacher_layer=layer)
    assert trainer._step_cost("image").flops > 4 * train_step_flops(trainer.raw, tokens, 0, teacher_layer=layer)


def test_a_warning_raised_at_every_step_is_shown_once(tmp_path, monkeypatch):
    """Python shows a warning once per place; the LR step's catch_warnings() around every step reset that, so
    FSDP2's view-tensor note printed at every step on every rank."""
    import warnings

    trainer = Trainer(_cfg(tmp_path, "warn", "train.steps=6", "sample.every=0", "logging.plot_every=1000"),
                      progress=False)
    original = trainer.train_step

    def noisy_step(*args, **kwargs):
        warnings.warn("a note from deep inside a step", UserWarning, stacklevel=1)
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", noisy_step)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # once per place, as Python shows warnings by default
        trainer.fit()
    # at most twice: the first step's LR call still filters torch's skipped-first-step note (and so resets the
    # once-per-place record once); it was once per step
    assert sum("a note from deep inside a step" in str(w.message) for w in caught) <= 2


def test_a_preview_that_fails_loses_no_steps_of_a_checkpoint_due_with_it(tmp_path, monkeypatch):
    """A plug-in's writer that raised at the first preview used to lose that step's checkpoint: it came after."""
    from selfflow.core.previewer import Previewer

    def broken(self, step):
        raise OSError("the plug-in's writer failed")

    monkeypatch.setattr(Previewer, "write_samples", broken)
    cfg = _cfg(tmp_path, "broken", "train.steps=4", "sample.every=2", "checkpoint.every=2")
    with pytest.raises(OSError, match="writer failed"):
        Trainer(cfg, progress=False).fit()
    assert [p.name for p in (tmp_path / "broken/checkpoints").glob("*.pt")] == ["step_00000002.pt"]
    monkeypatch.undo()
    assert Trainer(cfg, progress=False).step == 2  # the fixed plug-in resumes there


def test_a_run_killed_among_its_final_outputs_writes_them_on_rerun(tmp_path):
    """A kill after ema.safetensors but before pretrained/ and loss.png left a run that said "already finished"
    and never wrote them."""
    import shutil

    cfg = _cfg(tmp_path, "end", "train.steps=3")
    Trainer(cfg, progress=False).fit()
    run = tmp_path / "end"
    assert Trainer(cfg, progress=False).finished
    shutil.rmtree(run / "pretrained")
    (run / "loss.png").unlink()
    again = Trainer(cfg, progress=False)
    assert not again.finished and again.step == 3
    again.fit()
    assert (run / "pretrained" / "config.json").is_file() and (run / "loss.png").is_file()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]  # no step trained again
    assert Trainer(cfg, progress=False).finished
