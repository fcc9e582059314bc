from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from selfflow.eval import adm_eval, cli
from selfflow.eval.adm_metrics import inception_score, precision_recall
from selfflow.eval.inception import WEIGHTS_URL
from selfflow.eval.registry import Metric


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="selfflow")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, make_images) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    ref_imgs, smp_imgs = make_images(4, 32, 32, seed=21), make_images(5, 32, 32, seed=22)
    (root / "ref").mkdir()
    for i, im in enumerate(ref_imgs):
        Image.fromarray(im).save(root / "ref" / f"{i}.png")
    np.savez(root / "samples.npz", arr_0=smp_imgs)
    return {"root": root, "ref_dir": root / "ref", "samples": root / "samples.npz",
            "ref_imgs": ref_imgs, "smp_imgs": smp_imgs}


@pytest.fixture(scope="module")
def tf_features(data, inception_weights: Path) -> dict[str, np.ndarray]:
    """Independent features from torch-fidelity's extractor with the same weights."""
    ext = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=str(inception_weights))
    captured = {}
    ext.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.__setitem__("c", o))
    out = {}
    for name in ("ref", "smp"):
        x = torch.from_numpy(data[f"{name}_imgs"]).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            pool, logits = ext(x)
        c = captured["c"]
        out[name] = (pool.double().numpy(), logits.numpy(),
                     c[:, :7].permute(0, 2, 3, 1).reshape(len(x), -1).double().numpy())
    return out


class FDSpy:
    """Stands in for checked_distance: records its arguments and returns preset values.

    The 2048-d FD costs seconds on CI CPUs and is validated against scipy in test_frechet.py; here
    we check what the CLI feeds it (which statistics, in which order) and where the result goes."""

    def __init__(self, values: list[float]) -> None:
        self.calls: list[tuple[np.ndarray, ...]] = []
        self.values = values

    def __call__(self, metric: str, a, b) -> tuple[float, list[str]]:
        self.calls.append((a.mean, a.cov, b.mean, b.cov))
        return self.values[len(self.calls) - 1], []


def assert_stats_close(mu, sigma, feats: np.ndarray) -> None:
    ref_sigma = np.cov(feats, rowvar=False)
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-4, atol=1e-5 * np.abs(feats).max())
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-3, atol=1e-4 * np.abs(ref_sigma).max())


def test_stats_then_adm_matches_independent_computation(data, inception_weights: Path, tf_features,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    root = data["root"]
    spy = FDSpy([3.5, 4.5])
    monkeypatch.setattr(adm_eval, "checked_distance", spy)
    assert run(["eval", "stats", str(data["ref_dir"]), "--out", str(root / "ref_stats.npz"),
                "--inception", str(inception_weights), "--keep-features", "--no-progress"]) == 0
    with np.load(root / "ref_stats.npz") as z:
        assert {"mu", "sigma", "mu_s", "sigma_s", "count", "count_s", "pool_3"} <= set(z.files)
        assert z["sigma"].shape == (2048, 2048) and z["sigma_s"].shape == (2023, 2023) and int(z["count"]) == 4

    out = root / "metrics.json"
    assert run(["eval", "adm", str(root / "ref_stats.npz"), str(data["samples"]), "--inception",
                str(inception_weights), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for label in ("Inception Score:", "FID:", "sFID:", "Precision:", "Recall:"):
        assert label in printed
    m = json.loads(out.read_text())
    assert {"fid", "sfid", "is", "precision", "recall", "protocol", "weights"} <= set(m)
    assert m["weights"][0]["sha256"] and m["weights"][0]["url"] == WEIGHTS_URL
    assert m["num_samples"] == 5 and m["num_ref_images"] == 4

    # FD inputs = (samples, ref) statistics of the independent features; FD itself: test_frechet.py
    (rp, _, rs), (sp, sl, ss) = tf_features["ref"], tf_features["smp"]
    (mu_a, sig_a, mu_b, sig_b), (mus_a, sigs_a, mus_b, sigs_b) = spy.calls
    assert_stats_close(mu_a, sig_a, sp)
    assert_stats_close(mu_b, sig_b, rp)
    assert_stats_close(mus_a, sigs_a, ss)
    assert_stats_close(mus_b, sigs_b, rs)
    assert (m["fid"], m["sfid"]) == (3.5, 4.5)
    assert m["is"] == pytest.approx(inception_score(sl), rel=1e-4)
    pr = precision_recall(torch.from_numpy(rp).float(), torch.from_numpy(sp).float())
    assert (m["precision"], m["recall"]) == (pr.precision, pr.recall)

    # the statistics name their Inception weights: features of other weights are refused, not compared
    with np.load(root / "ref_stats.npz") as z:
        np.savez(root / "other_stats.npz", **{**{k: z[k] for k in z.files}, "inception_sha256": np.asarray("0" * 64)})
        np.savez(root / "bad_sigma.npz", **{**{k: z[k] for k in z.files}, "sigma": np.eye(100)})

    def extracted(*args, **kwargs):
        raise AssertionError("features extracted before the statistics file was checked")

    monkeypatch.setattr(adm_eval, "load_feature_set", extracted)  # the refusal comes before any extraction
    assert run(["eval", "adm", str(root / "other_stats.npz"), str(data["samples"]), "--inception",
                str(inception_weights), "--out", str(out), "--no-progress"]) != 0
    assert "holds statistics of Inception weights with sha256 0000000000000000…" in capsys.readouterr().err
    from selfflow.eval.image_io import read_reference_stats

    with pytest.raises(ValueError, match=r"bad_sigma\.npz: mu must be \(D,\) and sigma \(D, D\); got \(2048,\), "
                                         r"\(100, 100\)"):
        read_reference_stats(root / "bad_sigma.npz")


def test_adm_reference_batch_uses_stored_statistics(data, inception_weights: Path, tf_features,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Like ADM: ref mu/sigma from the file (not from its arr_0, which only feeds precision/recall)."""
    root = data["root"]
    spy = FDSpy([11.0, 22.0])
    monkeypatch.setattr(adm_eval, "checked_distance", spy)
    rng = np.random.default_rng(0)
    mu, mu_s = rng.uniform(0, 1, 2048), rng.uniform(0, 1, 2023)
    np.savez(root / "VIRTUAL_ref.npz", arr_0=data["ref_imgs"], mu=mu, sigma=np.eye(2048) * 0.01,
             mu_s=mu_s, sigma_s=np.eye(2023) * 0.01)
    out = root / "m2.json"
    assert run(["eval", "adm", str(root / "VIRTUAL_ref.npz"), str(data["samples"]), "--inception",
                str(inception_weights), "--out", str(out), "--no-progress", "--fp32-distances"]) == 0
    m = json.loads(out.read_text())
    (rp, _, _), (sp, _, ss) = tf_features["ref"], tf_features["smp"]
    (mu_a, sig_a, mu_b, sig_b), (mus_a, sigs_a, mus_b, sigs_b) = spy.calls
    assert_stats_close(mu_a, sig_a, sp)
    assert_stats_close(mus_a, sigs_a, ss)
    np.testing.assert_array_equal(mu_b, mu)
    np.testing.assert_array_equal(sig_b, np.eye(2048) * 0.01)
    np.testing.assert_array_equal(mus_b, mu_s)
    np.testing.assert_array_equal(sigs_b, np.eye(2023) * 0.01)
    assert (m["fid"], m["sfid"]) == (11.0, 22.0)
    pr = precision_recall(torch.from_numpy(rp).float(), torch.from_numpy(sp).float(), fp16=False)
    assert (m["precision"], m["recall"]) == (pr.precision, pr.recall)
    assert "fp32" in m["protocol"]["precision_recall"]
    assert math.isfinite(m["is"]) and m["is"] >= 1.0


def test_adm_notes_small_n_and_unpublished_weights(data, inception_weights: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """8-sample runs once printed FID −3.8e15 with no notes: too few samples and random weights
    (not the published 6726825d… file) must be said in the JSON and on stderr."""
    import warnings

    out = data["root"] / "m3.json"
    with warnings.catch_warnings(record=True) as warned:  # said once, as notes: not warned as well
        warnings.simplefilter("always")
        assert run(["eval", "adm", str(data["ref_dir"]), str(data["samples"]), "--inception",
                    str(inception_weights), "--out", str(out), "--no-progress"]) == 0
    assert not [w for w in warned if "only 5 generated" in str(w.message)]
    notes = json.loads(out.read_text())["notes"]
    assert any(n.startswith("FID: only 5 generated") and "2048-d" in n for n in notes)
    assert any(n.startswith("FID: only 4 reference") for n in notes)
    assert any(n.startswith("sFID: only 5 generated") and "2023-d" in n for n in notes)
    assert any("not the published 6726825d" in n for n in notes)
    err = capsys.readouterr().err
    assert all(err.count(n) == 1 and f"note: {n}" in err for n in notes), err


def test_errors_are_clear(data, inception_weights: Path, inception_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("SELFFLOW_WEIGHTS", raising=False)
    assert run(["eval", "adm", str(data["ref_dir"]), str(data["samples"]), "--inception",
                str(tmp_path / "missing.pth")]) == 2
    err = capsys.readouterr().err
    assert "missing.pth" in err and WEIGHTS_URL in err
    assert run(["eval"]) == 2  # no metric given: help on stderr
    # a missing input is named before the network loads (the weights are missing too: not mentioned)
    assert run(["eval", "adm", str(tmp_path / "typo.npz"), str(data["samples"]), "--inception",
                str(tmp_path / "missing.pth")]) == 2
    err = capsys.readouterr().err
    assert "no such image folder or npz file: " in err and "typo.npz" in err and "missing.pth" not in err
    assert run(["eval", "adm", str(tmp_path / "VIRTUAL_imagenet256_labeled.npz"), str(data["samples"])]) == 2
    assert ("openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/, e.g. "
            "imagenet/256/VIRTUAL_imagenet256_labeled.npz") in capsys.readouterr().err  # where to get it
    (tmp_path / "junk.npz").write_text("junk")  # was a zipfile.BadZipFile traceback
    assert run(["eval", "adm", str(tmp_path / "junk.npz"), str(data["samples"]), "--inception",
                str(tmp_path / "missing.pth")]) == 2
    assert "junk.npz is not a readable .npz file" in capsys.readouterr().err
    # a grid PNG, one image, an .npz of other arrays: named before the network loads (the weights are missing)
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (8, 8)).save(one / "grid.png")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    for given, says in [(one / "grid.png", "grid.png: expected an image folder or an .npz holding arr_0"),
                        (one, "one: 1 image; a Fréchet distance's covariance needs at least 2"),
                        (tmp_path / "other.npz", "other.npz: neither images ('arr_0') nor mu/sigma/mu_s/sigma_s "
                                                 "statistics; arrays: ['x']")]:
        assert run(["eval", "adm", str(data["ref_dir"]), str(given), "--inception",
                    str(tmp_path / "missing.pth")]) == 2
        err = capsys.readouterr().err
        assert says in err and "missing.pth" not in err, err
    bad_dir = tmp_path / "bad_images"
    bad_dir.mkdir()
    for name in ("y.png", "z.png"):  # PIL's error is an OSError: it used to escape the handler
        (bad_dir / name).write_bytes(b"not a png")
    assert run(["eval", "stats", str(bad_dir), "--out", str(tmp_path / "s.npz"), "--inception",
                str(inception_weights)]) == 2
    assert "bad_images/y.png: not a readable image" in capsys.readouterr().err
    # a bad file or one of another size among the samples: named before the network loads (and before the
    # reference's features, which it used to follow)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (8, 8)).save(mixed / "a.png")
    Image.new("RGB", (8, 6)).save(mixed / "b.png")
    assert run(["eval", "adm", str(data["ref_dir"]), str(mixed), "--inception", str(tmp_path / "missing.pth")]) == 2
    assert "images must share one size: " in (err := capsys.readouterr().err) and "b.png is 8x6" in err, err
    (mixed / "b.png").write_bytes(b"garbage")
    assert run(["eval", "adm", str(data["ref_dir"]), str(mixed), "--inception", str(tmp_path / "missing.pth")]) == 2
    assert "mixed/b.png: not a readable image" in (err := capsys.readouterr().err) and "missing.pth" not in err
    # an --out that cannot be written is refused before the work, not after it
    with pytest.raises(SystemExit) as stop:
        run(["eval", "adm", str(data["ref_dir"]), str(data["samples"]), "--out", str(tmp_path)])
    assert stop.value.code == 2 and "is a folder; name a file" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        run(["eval", "stats", str(data["ref_dir"]), "--out", str(tmp_path / "file" / "stats.npz")])
    assert "is a file, not a folder" in capsys.readouterr().err
    # from Python too, the samples are checked before the reference's features are extracted
    def no_extraction(*args, **kwargs):
        raise AssertionError("extracted features before checking the samples")

    monkeypatch.setattr(adm_eval, "extract_activations", no_extraction)
    with pytest.raises(FileNotFoundError, match="typo"):
        adm_eval.evaluate_adm(data["ref_dir"], tmp_path / "typo", inception_model, progress=False)


def test_too_few_images_for_precision_recall_leave_the_other_metrics(data, inception_model, tmp_path) -> None:
    """3 samples failed the whole evaluation after the Inception pass ("need more than k=3 feature vectors")."""
    three = tmp_path / "three.npz"
    np.savez(three, arr_0=data["smp_imgs"][:3])
    metrics = adm_eval.evaluate_adm(data["ref_dir"], three, inception_model, progress=False)
    assert metrics["precision"] is metrics["recall"] is None and math.isfinite(metrics["fid"])
    assert any("need more than 3 images a side (samples 3)" in n for n in metrics["notes"])


def test_swapped_arguments_and_two_resolutions_are_noted(data, inception_model, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Both orders and both sizes are valid inputs, but IS/precision/recall of a swapped call describe the
    reference, and a FID across resolutions is not the published protocol: each is said in the notes."""
    monkeypatch.setattr(adm_eval, "checked_distance", FDSpy([1.0, 2.0, 3.0, 4.0]))
    rng = np.random.default_rng(0)
    stats = tmp_path / "VIRTUAL_ref.npz"
    np.savez(stats, arr_0=np.concatenate([data["ref_imgs"]] * 2), mu=rng.uniform(0, 1, 2048),
             sigma=np.eye(2048), mu_s=rng.uniform(0, 1, 2023), sigma_s=np.eye(2023))
    swapped = adm_eval.evaluate_adm(data["samples"], stats, inception_model, progress=False)["notes"]
    assert any("the samples (VIRTUAL_ref.npz) hold stored statistics and the reference (samples.npz) does not: "
               "the order is `eval adm REF SAMPLES`" in n for n in swapped), swapped
    assert not any("resized" in n for n in swapped)  # both 32x32
    small = tmp_path / "small.npz"
    np.savez(small, arr_0=data["smp_imgs"][:, :16, :24])
    notes = adm_eval.evaluate_adm(stats, small, inception_model, progress=False)["notes"]
    assert any("the reference images are 32x32 and the samples 24x16" in n for n in notes), notes
    assert not any("order" in n for n in notes)


def test_registered_with_core_cli() -> None:
    from selfflow.core.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["eval", "adm", "ref.npz", "samples.npz", "--out", "m.json"])
    assert args.func is cli.cmd_adm and args.out == Path("m.json")
    args = parser.parse_args(["eval", "stats", "dir", "--out", "s.npz"])
    assert args.func is cli.cmd_stats


def test_broken_metric_module_does_not_break_the_cli(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(cli.METRICS, "fvd", Metric("selfflow.eval.no_such_module:add_parser"))
    assert run(["eval", "fvd"]) == 2
    assert "no_such_module" in capsys.readouterr().err
    assert run(["eval"]) == 2  # the other subcommands are still there (the help lists them)


@pytest.mark.distributed
def test_two_rank_stats_through_core_distributed_setup(data, inception_weights: Path, tmp_path: Path) -> None:
    """``torchrun``-style env (RANK, WORLD_SIZE, MASTER_*): the CLI joins through core's
    init_distributed, shards the images, rank 0 writes the file, both ranks exit 0."""
    single = tmp_path / "single.npz"
    assert run(["eval", "stats", str(data["ref_dir"]), "--out", str(single), "--inception",
                str(inception_weights), "--no-progress", "--device", "cpu"]) == 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = tmp_path / "two.npz"
    procs = []
    for r in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "LOCAL_RANK": str(r),
               "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "selfflow.core.cli", "eval", "stats", str(data["ref_dir"]), "--out",
             str(two), "--inception", str(inception_weights), "--no-progress", "--device", "cpu"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out.decode()[-3000:]
    with np.load(single) as a, np.load(two) as b:
        assert int(b["count"]) == int(a["count"]) == 4
        np.testing.assert_allclose(b["mu"], a["mu"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b["sigma"], a["sigma"], rtol=1e-3, atol=1e-4 * np.abs(a["sigma"]).max())


@pytest.mark.distributed
def test_an_error_on_one_rank_ends_the_job_with_its_message(inception_weights: Path, tmp_path: Path) -> None:
    """A corrupt image met by one rank only: that rank used to wait in the teardown barrier while the other
    waited in the feature all-gather, both silent until gloo's 30-minute timeout."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(7):
        Image.new("RGB", (32, 32), (30 * i, 0, 0)).save(folder / f"{i}.png")
    (folder / "z.png").write_bytes(b"not a png")  # sorts last: one rank's share
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "selfflow.core.cli", "eval", "stats", str(folder), "--out", str(tmp_path / "s.npz"), "--inception",
         str(inception_weights), "--no-progress", "--device", "cpu"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and time.monotonic() - start < 200
    assert "z.png" in proc.stderr and "selfflow: error:" in proc.stderr


@pytest.mark.parametrize("argv", [["probe", "--run", "r"], ["linear-probe", "--run", "r"],
                                  ["t2i", "--images", "i", "--clip", "c", "--prompts", "p"],
                                  ["fvd", "--fake", "f", "--real", "r"], ["fad", "--fake", "f", "--real", "r"]])
def test_commands_that_do_not_shard_refuse_several_ranks(argv, monkeypatch, capsys) -> None:
    """Under torchrun each rank used to compute the whole metric and write the same --out."""
    from selfflow.core.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["eval", *argv]) == 2
    assert f"selfflow eval {argv[0]} runs in one process" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["probe", "--run", "missing"], ["linear-probe", "--run", "missing"],
                                  ["linear-probe", "--run", "missing", "--levels", "1.0"],
                                  ["stats", "missing", "--out", "s.npz"], ["adm", "missing", "missing"],
                                  ["fvd", "--fake", "f", "--real", "r"]], ids=" ".join)
def test_every_eval_error_has_one_prefix_and_exit_code_2(argv, capsys) -> None:
    """The Inception and linear-probe commands used to say ``selfflow eval: error:``, the probe and the media
    metrics (errors that reach core's main) ``selfflow: error:``."""
    from selfflow.core.cli import main

    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfflow: error: ") and err.count("\n") == 1, err
