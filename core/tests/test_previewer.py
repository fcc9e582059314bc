from collections import Counter

import pytest
import torch
from torch import nn

from selfflow.core import previewer as previewer_module
from selfflow.core.config import load_config
from selfflow.core.distributed import DistInfo
from selfflow.core.previewer import Previewer
from selfflow.core.run_setup import build_run

from .test_trainer import TINY


@pytest.fixture
def run(tmp_path):
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", "name=run", "train.steps=10", "sample.every=4",
                             "eval.every=5", "eval.num_samples=3", "sample.num_samples=2"])
    return build_run(cfg)


@pytest.fixture
def samplers():
    """The sampler of every generate() call seen by ``calls``."""
    return []


@pytest.fixture
def calls(monkeypatch, samplers):
    """Every generate() (preview) and generate_share_batches() (evaluation) call as (modality, n, seed), with blank
    samples."""
    seen = []

    def fake_generate(model, modality, n, sampler, seed, device, progress=None):
        seen.append((modality.name, n, seed))
        samplers.append(sampler)
        return torch.zeros(n, 3, 16, 16), torch.zeros(n, dtype=torch.long)

    def fake_share(model, modality, n, indices, sampler, seed, device, progress=None, batch_size=None):
        return fake_generate(model, modality, len(indices), sampler, seed, device)

    monkeypatch.setattr(previewer_module, "generate", fake_generate)
    monkeypatch.setattr(previewer_module, "generate_share_batches", lambda *a, **k: iter_of(fake_share(*a, **k)))
    return seen


def iter_of(*batches):
    """A generator of ``batches`` (what generate_share_batches returns; the previewer closes it)."""
    yield from batches


def _previewer(run, rank=0, strategy="none"):
    return Previewer(run.config, run.modalities, run.backbone, DistInfo(rank=rank, world_size=1 + rank), strategy,
                     "cpu")


def test_due_steps(run):
    p = _previewer(run)
    assert [s for s in range(1, 11) if p.samples_due(s)] == [4, 8]  # the final preview is the caller's
    assert [s for s in range(1, 11) if p.eval_due(s)] == [5, 10]


def test_rank_0_writes_the_previews(run, calls, tmp_path):
    (path,) = _previewer(run).write_samples(4)
    assert calls == [("image", 2, run.config.sample.seed)]
    assert path.parent == tmp_path / "run" / "samples" and "step_00000004" in path.name


@pytest.mark.parametrize(("strategy", "generates"), [("ddp", False), ("fsdp2", True)])
def test_other_ranks_generate_only_under_fsdp2(run, calls, strategy, generates, monkeypatch, tmp_path):
    assert _previewer(run, rank=1, strategy=strategy).write_samples(4) == []
    assert bool(calls) == generates and not (tmp_path / "run" / "samples").exists()


def test_evaluate_scores_modalities_with_an_evaluator(run, calls, monkeypatch):
    assert run.modalities["image"].evaluator  # synthetic shapes: the shapes probe
    monkeypatch.setattr(previewer_module, "get_evaluator",
                        lambda name: lambda modality: lambda media, labels: {"score": float(len(media))})
    assert _previewer(run).evaluate() == {"score": 3.0}
    assert calls == [("image", 3, run.config.sample.seed + 1)]
    assert _previewer(run, rank=1, strategy="ddp").evaluate() == {}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_every_rank_generates_an_equal_share_of_the_evaluation_samples(run, strategy, monkeypatch):
    """3 samples on 2 ranks: rank 0 makes 0 and 1, rank 1 makes 2 and a repeat of it (equal shares gather as one
    tensor and, under FSDP2, run as many forwards); only rank 0 scores."""
    shares = []

    def fake_share(model, modality, n, indices, sampler, seed, device, progress=None, batch_size=None):
        assert batch_size == run.config.eval.batch_size == 64
        shares.append((n, list(indices), seed))
        return torch.zeros(len(indices), 3, 16, 16), torch.as_tensor(list(indices))

    scored = []
    monkeypatch.setattr(previewer_module, "generate_share_batches", lambda *a, **k: iter_of(fake_share(*a, **k)))
    monkeypatch.setattr(previewer_module, "get_evaluator",
                        lambda name: lambda modality: lambda media, labels: scored.append(labels.tolist()) or {})
    seed = run.config.sample.seed + 1

    def previewer(rank):
        return Previewer(run.config, run.modalities, run.backbone, DistInfo(rank=rank, world_size=2), strategy, "cpu")

    previewer(0).evaluate()
    assert shares == [(3, [0, 1], seed)]
    assert scored == [[0, 1]]  # without a process group rank 0 has its own share only
    shares.clear()
    assert previewer(1).evaluate() == {}
    assert shares == [(3, [2, 2], seed)] and scored == [[0, 1]]


def test_evaluators_of_the_eval_section_run_after_the_modality_s_own_and_may_take_the_model(run, calls,
                                                                                           monkeypatch):
    class ModelEvaluator:
        needs_model = True

        def __init__(self, modality):
            pass

        def __call__(self, model):
            return {"model_is_the_backbone": float(model is run.backbone)}

    factories = {"shapes_probe": lambda modality: lambda media, labels: {"score": float(len(media))},
                 "on_model": ModelEvaluator}
    monkeypatch.setattr(previewer_module, "get_evaluator", factories.__getitem__)
    cfg = run.config.model_copy(update={"eval": run.config.eval.model_copy(update={"evaluators": ["on_model"]})})
    p = Previewer(cfg, run.modalities, run.backbone, DistInfo(rank=0, world_size=1), "none", "cpu")
    assert p.evaluate() == {"score": 3.0, "model_is_the_backbone": 1.0}
    assert len(calls) == 1  # samples are generated once per modality, and not for a model evaluator


@pytest.mark.parametrize(("extra", "scale"), [([], 1.0), (["eval.cfg_scale=2.5"], 2.5)])
def test_online_evaluation_samples_without_guidance_unless_configured(run, calls, samplers, monkeypatch, extra,
                                                                      scale, tmp_path):
    monkeypatch.setattr(previewer_module, "get_evaluator", lambda name: lambda modality: lambda media, labels: {})
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", "sample.cfg_scale=4", "sample.steps=3", *extra])
    p = Previewer(cfg, run.modalities, run.backbone, DistInfo(rank=0, world_size=1), "none", "cpu")
    p.evaluate()
    p.write_samples(4)
    assert [(s.cfg_scale, s.steps) for s in samplers] == [(scale, 3), (4.0, 3)]  # eval, then the preview


class _StepSpy(nn.Module):
    """The backbone, counting its forwards per modality (one per Euler step without guidance)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.steps = backbone, Counter()

    def forward(self, *args, modality=None, **kwargs):
        self.steps[modality] += 1
        return self.backbone(*args, modality=modality, **kwargs)


def test_a_mixed_run_previews_each_modality_with_its_entry_s_sampler(tmp_path):
    text = "conditioning: text, text: {kind: tiny, dim: 16}"
    image = f"{{dataset: synthetic_shapes, image_size: 16, patch_size: 4, {text}}}"
    audio = f"{{dataset: synthetic_tones, num_samples: 256, patch: 64, {text}}}"
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", "name=mixed", "sample.num_samples=2",
                             "sample.solver=euler", "sample.steps=2",
                             f"data.mixture=[{{modality: image, options: {image}, sample: {{steps: 3}}}},"
                             f" {{modality: audio, options: {audio}, sample: {{steps: 5}}}}]"])
    mixed = build_run(cfg)
    spy = _StepSpy(mixed.backbone)
    p = Previewer(cfg, mixed.modalities, spy, DistInfo(rank=0, world_size=1), "none", "cpu")
    assert p.samplers["audio"].shift == 2.0  # audio's default: its training shift, set by no level here
    p.write_samples(1)
    assert spy.steps == {"image": 3, "audio": 5}
    assert (tmp_path / "mixed" / "samples" / "audio").is_dir()


def test_an_interrupted_evaluation_stops_between_batches_and_restores_the_model(run, monkeypatch):
    """``interrupted()`` is asked before each batch of samples; a yes abandons the evaluation (the generator of
    batches is closed, so the model is back in training mode)."""
    from selfflow.core.previewer import EvaluationInterrupted

    monkeypatch.setattr(previewer_module, "get_evaluator", lambda name: lambda modality: lambda media, labels: {})
    cfg = run.config.model_copy(update={"eval": run.config.eval.model_copy(update={"batch_size": 1})})
    p = Previewer(cfg, run.modalities, run.backbone, DistInfo(), "none", "cpu")
    asked = []

    def interrupted():
        asked.append(run.backbone.training)
        return len(asked) == 3  # before the third of the 3 batches

    run.backbone.train()
    with pytest.raises(EvaluationInterrupted):
        p.evaluate(interrupted=interrupted)
    assert asked == [True, False, False] and run.backbone.training
    asked.clear()
    assert p.evaluate(interrupted=lambda: asked.append(1) and False) == {} and len(asked) == 4  # 3 batches + the end
