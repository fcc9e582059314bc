import json

import pytest
import torch

from selfflow.eval.linear_probe import (
    LinearProbeEvaluator,
    block_features,
    labelled_splits,
    ridge_probe,
)


def test_ridge_probe_separates_separable_classes_and_not_random_labels():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    centres = torch.randn(3, 16, generator=g) * 3
    x = centres[y] + 0.3 * torch.randn(300, 16, generator=g)
    acc, lam = ridge_probe(x[:200], y[:200], x[200:], y[200:], 3)
    assert acc == 1.0 and lam > 0
    noise = torch.randn(300, 16, generator=g)
    acc_random, _ = ridge_probe(noise[:200], y[:200], noise[200:], y[200:], 3)
    assert acc_random < 0.6


def test_labelled_splits_name_the_dataset_they_cannot_probe():
    class Options:
        dataset = "latent_shards"

    class Modality:
        options = Options()

    with pytest.raises(ValueError, match="latent_shards"):
        labelled_splits(Modality(), 1, 1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from selfflow.core.cli import main

    root = tmp_path_factory.mktemp("runs")
    sets = ["model.preset=tiny", "model.depth_single=1", "train.batch_size=4", "train.steps=2",
            "sample.num_samples=4", "sample.steps=2", f"output_dir={root}", "name=lp"]
    assert main(["train", "--no-progress", *[a for s in sets for a in ("--set", s)]]) == 0
    return root / "lp"


def test_block_features_are_token_means_per_block_and_depend_on_the_noise_level(tiny_run):
    from selfflow.core.pretrained import load_model

    loaded = load_model(tiny_run, "cpu")
    model, modality = loaded.model, loaded.modality
    (images, _), _ = labelled_splits(modality, 6, 1)
    clean = block_features(model, modality, images, 0.0, [1, 3])
    noisy = block_features(model, modality, images, 0.5, [1, 3])
    assert sorted(clean) == [1, 3] and clean[1].shape == (6, model.cfg.hidden_size)
    assert not torch.allclose(clean[3], noisy[3])
    assert torch.equal(clean[1], block_features(model, modality, images, 0.0, [1], batch=4)[1])


def test_online_evaluator_scores_a_model(tiny_run):
    from selfflow.core.pretrained import load_model

    loaded = load_model(tiny_run, "cpu")
    model, modality = loaded.model, loaded.modality
    scores = LinearProbeEvaluator(modality, levels=(0.0,), n_fit=40, n_test=20)(model)
    assert set(scores) == {f"lp_acc/b{k}/t0.0" for k in range(1, model.depth + 1)} | {"lp_acc_best"}
    assert all(0 <= v <= 1 for v in scores.values())


def test_linear_probe_cli_writes_json_and_plot(tiny_run, capsys):
    from selfflow.core.cli import main

    assert main(["eval", "linear-probe", "--run", str(tiny_run), "--num-fit", "40", "--num-test", "20",
                 "--levels", "0", "0.5", "--blocks", "1", "3"]) == 0
    result = json.loads((tiny_run / "linear_probe.json").read_text())
    assert result["blocks"] == [1, 3] and set(result["accuracy"]["3"]) == {"0.0", "0.5"}
    assert (tiny_run / "linear_probe.png").is_file()
    assert "block" in capsys.readouterr().out
    assert main(["eval", "linear-probe", "--run", str(tiny_run), "--levels", "1.0"]) == 2
    # the run's export probes the same (its EMA weights), its report written inside it
    assert main(["eval", "linear-probe", "--run", str(tiny_run / "pretrained"), "--num-fit", "40", "--num-test",
                 "20", "--levels", "0", "0.5", "--blocks", "1", "3"]) == 0
    assert json.loads((tiny_run / "pretrained" / "linear_probe.json").read_text())["accuracy"] == result["accuracy"]


def test_a_text_conditioned_run_is_probed_on_its_datas_classes():
    """The probe's classes are the dataset's labels: a text-conditioned shapes run (num_classes 0) used to
    fail in one_hot ("Class values must be smaller than num_classes")."""
    from selfflow.core.config import load_config
    from selfflow.core.run_setup import build_run
    from selfflow.eval.linear_probe import linear_probe

    cfg = load_config(None, ["model.preset=tiny", "model.depth_single=1", "data.options.conditioning=text",
                             "data.options.text={kind: tiny, dim: 16}"])
    run = build_run(cfg)
    modality = run.modality(None, "test")
    assert modality.num_classes == 0 and modality.context_dim == 16
    result = linear_probe(run.backbone.eval(), modality, levels=(0.0,), blocks=[1], n_fit=40, n_test=20)
    assert 0 <= result["accuracy"]["1"]["0.0"] <= 1


def test_an_evaluator_that_cannot_score_the_run_is_refused_before_training(tmp_path, caplog):
    """It used to train until the first evaluation step, then stop with no checkpoint."""
    from selfflow.core.config import load_config
    from selfflow.core.trainer import Trainer

    audio = ["data.modality=audio", "data.options={sample_rate: 8000, num_samples: 1024, patch: 64}",
             "model.preset=tiny", "model.depth_single=1", "train.batch_size=2", "train.steps=4",
             f"output_dir={tmp_path}"]
    with pytest.raises(ValueError, match="the linear probe needs labelled held-out data"):
        Trainer(load_config(None, [*audio, "name=lp", "eval.every=2", "eval.evaluators=[linear_probe]"]),
                progress=False)
    trainer = Trainer(load_config(None, [*audio, "name=none", "eval.every=2"]), progress=False)
    assert "eval.every=2 but no online evaluator scores audio (installed: " in caplog.text
    assert "eval.every=2 but no online evaluator" in (trainer.run_dir / "train.log").read_text()  # kept there
