import json
import math

import pytest
import torch

from selfflow.eval.digits_probe import DigitsProbeEvaluator


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELFFLOW_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def test_evaluator_scores_real_digits_well_and_noise_badly(cache):
    from selfflow.image.digits import digits_split

    evaluator = DigitsProbeEvaluator()
    images, labels = digits_split("test")
    real = evaluator(images, labels)
    held_out = evaluator.real_images(500)  # `selfflow eval probe`'s floor: the test split, at most all of it
    assert all(torch.equal(a, b) for a, b in zip(held_out, (images, labels))) and len(evaluator.real_images(30)[0]) == 30
    noise = evaluator(torch.rand(297, 3, 16, 16) * 2 - 1, labels)
    assert all(math.isfinite(v) for v in (*real.values(), *noise.values()))
    assert real["probe_acc"] > 0.9 and real["probe_fd"] < noise["probe_fd"] / 10


def test_a_repa_run_on_digits_with_the_toy_encoder_trains_and_evaluates_online(cache, tmp_path, monkeypatch):
    from selfflow.core.cli import main
    from selfflow.image import toy_encoder

    monkeypatch.setattr(toy_encoder, "TRAIN_STEPS", 5)
    sets = ["model.preset=tiny", "model.depth_single=1", "train.batch_size=4", "train.steps=2",
            "sample.num_samples=4", "sample.steps=2", f"output_dir={tmp_path}", "name=d",
            "data.options.dataset=digits", "data.options.repa_encoder=toy", "objective.kind=repa",
            "eval.every=2", "eval.num_samples=10", "eval.evaluators=[linear_probe]"]
    assert main(["train", "--no-progress", *[a for s in sets for a in ("--set", s)]]) == 0
    rows = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    scores = [r for r in rows if "probe_fd" in r]
    assert len(scores) == 1 and scores[0]["step"] == 2
    assert all(math.isfinite(scores[0][k]) for k in ("probe_fd", "probe_acc", "lp_acc_best", "lp_acc/b1/t0.0"))
    assert any(r.get("loss_rep", 0) != 0 for r in rows)  # the REPA term is live
