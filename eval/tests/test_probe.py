import pytest
import torch

from selfflow.eval.probe import probe_features, probe_metrics, reference_stats, train_shapes_probe
from selfflow.image.synthetic_shapes import render_batch


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELFFLOW_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield train_shapes_probe()


def test_probe_recognises_real_classes_and_is_cached(probe):
    images, labels = render_batch(11, range(500))
    _, preds = probe_features(probe, images)
    assert (preds == labels).float().mean() > 0.9
    from selfflow.core.cached_training import cache_file
    from selfflow.eval.probe import PROBE_VERSION

    path = cache_file("shapes_probe", f"v{PROBE_VERSION}-0-400-32")
    assert path.is_file()
    marked = {k: torch.full_like(v, 0.5) for k, v in probe.state_dict().items()}
    torch.save(marked, path)  # the next call must read this file instead of training
    again = train_shapes_probe()
    assert all((v == 0.5).all() for v in again.state_dict().values())
    torch.save(probe.state_dict(), path)


def test_probe_fd_separates_real_from_broken_samples(probe):
    ref = reference_stats(probe, n=1000)
    real, labels = render_batch(12, range(500))
    good = probe_metrics(real, labels, probe, ref)
    blurred = torch.nn.functional.avg_pool2d(real, 5, stride=1, padding=2)
    noisy = (real + 0.5 * torch.randn_like(real)).clamp(-1, 1)
    wrong = probe_metrics(real, (labels + 1) % 10, probe, ref)
    assert good["probe_acc"] > 0.9 and wrong["probe_acc"] < 0.1
    assert good["probe_fd"] < 0.2 * probe_metrics(blurred, labels, probe, ref)["probe_fd"]
    assert good["probe_fd"] < 0.2 * probe_metrics(noisy, labels, probe, ref)["probe_fd"]


def test_probe_metrics_takes_label_lists_and_rejects_images_outside_minus1_1(probe):
    ref = reference_stats(probe, n=200)
    real, labels = render_batch(12, range(100))
    want = probe_metrics(real, labels, probe, ref)
    assert probe_metrics(real, labels.tolist(), probe, ref) == want
    assert probe_metrics(real.numpy(), labels.numpy(), probe, ref) == want
    with pytest.raises(ValueError, match=r"shape \(100,\).*\(1,\)"):
        probe_metrics(real, [3], probe, ref)  # would broadcast to "every sample is class 3"
    as_uint8 = ((real + 1) * 127.5).round().to(torch.uint8)
    with pytest.raises(ValueError, match=r"float images in \[-1, 1\], got dtype torch.uint8"):
        probe_metrics(as_uint8, labels, probe, ref)
    with pytest.raises(ValueError, match=r"float images in \[-1, 1\], got values in \[0, 255\]"):
        probe_metrics(as_uint8.float(), labels, probe, ref)
    assert probe_metrics(real * 1.005, labels, probe, ref)["probe_fd"] >= 0  # round-off is forgiven


def test_online_evaluation_during_training(probe, tmp_path):
    from selfflow.core.config import load_config
    from selfflow.core.metrics import read_metrics
    from selfflow.core.trainer import Trainer

    cfg = load_config(None, ["model.preset=tiny", "model.depth_single=1", "train.batch_size=4", "train.steps=4",
                             "eval.every=2", "eval.num_samples=20", "sample.steps=2",
                             "sample.num_samples=10", f"output_dir={tmp_path}", "name=online"])
    Trainer(cfg, progress=False).fit()
    evals = [r for r in read_metrics(tmp_path / "online" / "metrics.jsonl") if "probe_fd" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["probe_fd"] > 0 and 0 <= r["probe_acc"] <= 1 for r in evals)


def test_probe_cli_scores_a_run(probe, tmp_path, capsys):
    import json

    from selfflow.core.cli import main

    sets = ["model.preset=tiny", "model.depth_single=1", "train.batch_size=4", "train.steps=2",
            "sample.num_samples=10", "sample.steps=2", "sample.cfg_scale=3", f"output_dir={tmp_path}", "name=cli"]
    assert main(["train", "--no-progress", *[a for s in sets for a in ("--set", s)]]) == 0
    assert main(["eval", "probe", "--run", str(tmp_path / "cli"), "--num", "30", "--steps", "2"]) == 0
    result = json.loads((tmp_path / "cli" / "probe_metrics.json").read_text())
    assert result["num_samples"] == 30 and result["probe_fd"] > 0 and "not FID" in result["protocol"]
    assert (result["sampler"]["cfg_scale"], result["sampler"]["steps"]) == (1.0, 2)  # a metric: no guidance
    printed = capsys.readouterr()
    assert "probe_fd" in printed.out
    # as many held-out real images, scored the same way: the floor at 30 (a 2-step model is far above it)
    floor = result["real_images"]
    assert floor["num_images"] == 30 and 0 < floor["probe_fd"] < result["probe_fd"] and floor["probe_acc"] > 0.8
    assert "real images: probe_fd" in printed.out and "the floor at this count" in printed.out
    # 30 samples of 128-d features: said, in the JSON and on stderr (the README suggested --num 100 once)
    [note] = result["notes"]
    assert note.startswith("probe_fd: only 30 generated feature vectors for a 128-d feature; the covariance is singular")
    assert f"note: {note}" in printed.err and "MetricNote" not in printed.err  # once, not also as a warning
    # the run's export (the same EMA weights) scores the same; so does its weights file
    for source in (tmp_path / "cli" / "pretrained", tmp_path / "cli" / "ema.safetensors"):
        out = tmp_path / f"{source.name}.json"
        assert main(["eval", "probe", "--run", str(source), "--num", "30", "--steps", "2", "--out", str(out)]) == 0
        assert json.loads(out.read_text())["probe_fd"] == result["probe_fd"], source
