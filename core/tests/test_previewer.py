import pytest
import torch

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
def calls(monkeypatch):
    """Every generate() call as (modality, n, seed), with blank samples."""
    seen = []

    def fake_generate(model, modality, n, sampler, seed, device):
        seen.append((modality.name, n, seed))
        return torch.zeros(n, 3, 16, 16), torch.zeros(n, dtype=torch.long)

    monkeypatch.setattr(previewer_module, "generate", fake_generate)
    return seen


def _previewer(run, rank=0, strategy="none"):
    return Previewer(run.config, run.modalities, run.backbone, DistInfo(rank=rank, world_size=1 + rank), strategy,
                     "cpu")


def test_due_steps(run):
    p = _previewer(run)
    assert [s for s in range(1, 11) if p.samples_due(s)] == [4, 8]  # the final preview is the caller's
    assert [s for s in range(1, 11) if p.eval_due(s)] == [5, 10]


def test_rank_0_writes_the_previews(run, calls, tmp_path):
    path = _previewer(run).write_samples(4)
    assert calls == [("image", 2, run.config.sample.seed)]
    assert path.parent == tmp_path / "run" / "samples" and "step_00000004" in path.name


@pytest.mark.parametrize(("strategy", "generates"), [("ddp", False), ("fsdp2", True)])
def test_other_ranks_generate_only_under_fsdp2(run, calls, strategy, generates, monkeypatch, tmp_path):
    assert _previewer(run, rank=1, strategy=strategy).write_samples(4) is None
    assert bool(calls) == generates and not (tmp_path / "run" / "samples").exists()


def test_evaluate_scores_modalities_with_an_evaluator(run, calls, monkeypatch):
    assert run.modalities["image"].evaluator  # synthetic shapes: the shapes probe
    monkeypatch.setattr(previewer_module, "get_evaluator",
                        lambda name: lambda modality: lambda media, labels: {"score": float(len(media))})
    assert _previewer(run).evaluate() == {"score": 3.0}
    assert calls == [("image", 3, run.config.sample.seed + 1)]
    assert _previewer(run, rank=1, strategy="ddp").evaluate() == {}
