"""The online FID evaluator: the numbers `selfflow eval adm` gives for the same samples, its checks at the start
of a run, and a 2-rank run that scores it on rank 0 alone."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from selfflow.eval.adm_eval import compute_stats_file, evaluate_adm
from selfflow.eval.image_io import ArrayImages
from selfflow.eval.online_fid import InceptionFIDEvaluator

TINY_IMAGES = ["model.preset=tiny", "model.depth_single=1", "data.options.image_size=16",
               "data.options.patch_size=4", "train.batch_size=2", "sample.steps=2", "sample.num_samples=2",
               "logging.every=1"]


def _modality(tmp_path, *sets):
    from selfflow.core.config import load_config
    from selfflow.core.run_setup import build_run

    return build_run(load_config(None, [*TINY_IMAGES, f"output_dir={tmp_path}", *sets])).modality(None, "test")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, inception_model):
    """ADM-layout statistics of 24 seeded 16×16 images."""
    from .conftest import smooth_images

    path = tmp_path_factory.mktemp("ref") / "ref_stats.npz"
    compute_stats_file(ArrayImages(smooth_images(24, 16, 16, seed=3), "ref"), inception_model, path, progress=False)
    return path


def test_scores_equal_selfflow_eval_adm_on_the_same_samples(tmp_path, reference, inception_weights,
                                                             inception_model, caplog):
    modality = _modality(tmp_path)
    media = torch.rand(20, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1  # decoded, in [-1, 1]
    with pytest.warns(UserWarning, match="not the published"):  # random test weights
        evaluator = InceptionFIDEvaluator(modality, reference=reference, inception=inception_weights)
    online = evaluator(media, None)
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=modality.evaluation_array(media))  # what `selfflow sample --out-dir` writes
    offline = evaluate_adm(reference, samples, inception_model, progress=False)
    assert set(online) == {"fid", "sfid", "is"}
    for key in online:
        assert online[key] == pytest.approx(offline[key], rel=1e-9), key
    assert online["fid"] > 0
    other = evaluator(media.flip(-1), None)  # other samples, other scores
    assert other["fid"] != pytest.approx(online["fid"], rel=1e-6)
    small_n = [r.message for r in caplog.records if "only 20 generated feature vectors for a 2048-d" in r.message]
    assert len(small_n) == 1  # said once, not at every evaluation


def test_what_cannot_work_is_refused_when_the_run_starts(tmp_path, reference, inception_weights):
    modality = _modality(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"reference statistics not found: .*missing\.npz"):
        InceptionFIDEvaluator(modality, reference=tmp_path / "missing.npz", inception=inception_weights)
    with pytest.raises(ValueError, match=r"is a folder: write its statistics once with `selfflow eval stats"):
        InceptionFIDEvaluator(modality, reference=tmp_path, inception=inception_weights)  # said "not found"
    images_only = tmp_path / "images.npz"
    np.savez(images_only, arr_0=np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"no mu/sigma/mu_s/sigma_s statistics: .*selfflow eval stats"):
        InceptionFIDEvaluator(modality, reference=images_only, inception=inception_weights)
    other_weights = tmp_path / "other" / inception_weights.name
    other_weights.parent.mkdir()
    from .conftest import random_inception_state_dict

    torch.save(random_inception_state_dict(seed=1), other_weights)
    with pytest.raises(ValueError, match="statistics of Inception weights with sha256"):
        InceptionFIDEvaluator(modality, reference=reference, inception=other_weights)
    audio = _modality(tmp_path, "data.modality=audio", "data.options={sample_rate: 8000, num_samples: 1024, patch: 64}")
    with pytest.raises(ValueError, match="inception_fid scores images, but the 'audio' modality is AudioModality"):
        InceptionFIDEvaluator(audio, reference=reference, inception=inception_weights)


def test_its_options_are_checked_by_name(tmp_path, reference):
    from selfflow.core.config import ConfigError, load_config
    from selfflow.core.trainer import Trainer

    base = [*TINY_IMAGES, f"output_dir={tmp_path}", "eval.every=2"]
    fid = [*base, "eval.evaluators=[inception_fid]"]
    with pytest.raises(ConfigError, match=r"eval.options.inception_fid: unknown option 'referense' "
                                          r"\(inception_fid takes reference, inception, batch_size, device\)"):
        Trainer(load_config(None, [*fid, f"eval.options={{inception_fid: {{referense: {reference}}}}}"]),
                progress=False)
    with pytest.raises(ConfigError, match=r"eval.options.inception_fid: missing a required argument: 'reference'"):
        Trainer(load_config(None, fid), progress=False)
    with pytest.raises(ConfigError, match="options for inception_fid, which this run does not evaluate with"):
        Trainer(load_config(None, [*base, f"eval.options={{inception_fid: {{reference: {reference}}}}}"]),
                progress=False)


@pytest.mark.distributed
def test_a_two_rank_run_logs_the_fid_of_its_samples(tmp_path, reference, inception_weights):
    """Each rank generates 3 of the 5 samples (one padded); rank 0 alone extracts the features (an all-gather
    there would wait for ranks that are not extracting)."""
    sets = [*TINY_IMAGES, f"output_dir={tmp_path}", "name=fid", "train.steps=2", "train.num_threads=1",
            "train.parallel=ddp", "sample.every=0", "eval.every=2", "eval.num_samples=5",
            "eval.evaluators=[inception_fid]",
            f"eval.options={{inception_fid: {{reference: {reference}, inception: {inception_weights}}}}}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "selfflow.core.cli", "train", "--no-progress", *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from selfflow.core.metrics import read_metrics

    scores = [r for r in read_metrics(tmp_path / "fid" / "metrics.jsonl") if "fid" in r]
    assert [r["step"] for r in scores] == [2] and scores[0]["fid"] > 0 and scores[0]["is"] >= 1
    assert f"eval_plot  {tmp_path / 'fid' / 'eval.png'}" in proc.stdout + proc.stderr  # drawn, and said
    assert (tmp_path / "fid" / "eval.png").is_file()


def test_in_a_mixed_run_it_scores_the_images_and_a_run_without_images_is_refused(tmp_path, reference,
                                                                                  inception_weights):
    from selfflow.core.config import ConfigError, load_config
    from selfflow.core.distributed import DistInfo
    from selfflow.core.previewer import Previewer
    from selfflow.core.run_setup import build_run

    options = (f"eval.options={{inception_fid: {{reference: {reference}, inception: {inception_weights}}}}}",
               "eval.every=2", "eval.evaluators=[inception_fid]")
    text = "conditioning: text, text: {kind: tiny, dim: 16}"
    image = f"{{dataset: synthetic_shapes, image_size: 16, patch_size: 4, {text}}}"
    audio = f"{{dataset: synthetic_tones, sample_rate: 8000, num_samples: 1024, patch: 64, {text}}}"
    mixed = load_config(None, [*TINY_IMAGES, f"output_dir={tmp_path}", *options,
                               f"data.mixture=[{{modality: image, options: {image}}}, {{modality: audio, options: {audio}}}]"])
    run = build_run(mixed)
    with pytest.warns(UserWarning, match="not the published"):
        previewer = Previewer(mixed, run.modalities, run.backbone, DistInfo(), "none", "cpu")
    built = {name: [type(e).__name__ for e in group] for name, group in previewer._evaluators.items()}
    assert built == {"image": ["ShapesProbeEvaluator", "InceptionFIDEvaluator"]}
    sound = load_config(None, [*TINY_IMAGES, f"output_dir={tmp_path}", *options, "data.modality=audio",
                               "data.options={sample_rate: 8000, num_samples: 1024, patch: 64}"])
    run = build_run(sound)
    with pytest.raises(ConfigError, match=r"eval.evaluators: inception_fid scores none of this run's modalities: "
                                          r"audio \(AudioModality\)"):
        Previewer(sound, run.modalities, run.backbone, DistInfo(), "none", "cpu")
