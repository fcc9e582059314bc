"""``selfflow eval t2i | fvd | fad`` pair samples with the prompts.jsonl written by ``selfflow sample --out-dir``."""

from __future__ import annotations

import argparse
import json

import pytest
from PIL import Image

from selfflow.core.prompts import write_prompt_records
from selfflow.eval.cli_media import add_t2i_parser, recorded_prompts

from .test_clip_score import smooth_images, tiny_dir  # noqa: F401 — tiny_dir is a fixture


def _samples(folder, prompts):
    folder.mkdir()
    files = []
    for i, im in enumerate(smooth_images(len(prompts), 32, 32, seed=3)):
        Image.fromarray(im).save(folder / f"{i:06d}.png")
        files.append(f"{i:06d}.png")
    write_prompt_records(folder, files, prompts)
    return files


def test_recorded_prompts_summarise_and_check_the_files(tmp_path):
    assert recorded_prompts(tmp_path) is None
    files = _samples(tmp_path / "s", ["a", "b", "a"])
    assert recorded_prompts(tmp_path / "s") == {"file": str(tmp_path / "s" / "prompts.jsonl"), "n": 3, "distinct": 2}
    (tmp_path / "s" / files[1]).unlink()
    with pytest.raises(FileNotFoundError, match=r"lists 1 sample\(s\) missing .* e.g. 000001.png"):
        recorded_prompts(tmp_path / "s")


def test_t2i_pairs_images_with_their_recorded_prompts(tiny_dir, tmp_path):  # noqa: F811
    prompts = ["a red circle", "a blue square", "a green triangle"]
    _samples(tmp_path / "s", prompts)
    (tmp_path / "explicit.txt").write_text("\n".join(prompts) + "\n")
    parser = argparse.ArgumentParser()
    add_t2i_parser(parser.add_subparsers())
    scores = []
    for extra in ([], ["--prompts", str(tmp_path / "explicit.txt")]):
        out = tmp_path / f"res{len(extra)}.json"
        args = parser.parse_args(["t2i", "--images", str(tmp_path / "s"), "--clip", tiny_dir, "--out", str(out),
                                  *extra])
        assert args.func(args) == 0
        scores.append(json.loads(out.read_text())["clip_score"])
    assert scores[0]["n"] == 3 and scores[0]["clip_score"] == scores[1]["clip_score"]
    # half a metric's flags is an error naming the missing one (FD-DINOv2 used to be dropped without a word)
    from selfflow.core.config import ConfigError

    for extra in (["--dinov2", str(tmp_path / "dino")], ["--ref", str(tmp_path / "s")]):
        args = parser.parse_args(["t2i", "--images", str(tmp_path / "s"), "--clip", tiny_dir, *extra])
        with pytest.raises(ConfigError, match=r"FD-DINOv2 needs both --dinov2 DIR and --ref"):
            args.func(args)


def test_metric_notes_print_once_as_note_lines(capsys):
    """fvd / fad / t2i printed their notes as Python warnings with a source line (`frechet.py:304: MetricNote: …`
    and the code beneath it); eval adm printed `note: …` lines. Other warnings still pass on."""
    import warnings

    from selfflow.eval.cli_media import notes_as_lines
    from selfflow.eval.frechet import MetricNote

    def run(args):
        for _ in range(2):
            warnings.warn("FVD: only 12 generated feature vectors", MetricNote, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
        return 0

    with pytest.warns(UserWarning, match="something else"):
        assert notes_as_lines(run)(argparse.Namespace()) == 0
    err = capsys.readouterr().err
    assert err.count("note: FVD: only 12 generated feature vectors") == 1 and "MetricNote" not in err
