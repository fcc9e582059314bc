import pytest
from PIL import Image

from selfflow.core.cli import build_parser, main

from .test_trainer import TINY


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "train" in out and "sample" in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "--set" in capsys.readouterr().out


def test_train_then_sample(tmp_path, capsys):
    sets = [a for s in [*TINY, "train.steps=2", f"output_dir={tmp_path}", "name=cli"] for a in ("--set", s)]
    assert main(["train", "--no-progress", *sets]) == 0
    out = tmp_path / "grid"
    assert main(["sample", "--run", str(tmp_path / "cli"), "--num", "10", "--steps", "2", "--seed", "3",
                 "--out", str(out)]) == 0
    assert Image.open(tmp_path / "grid.png").size[0] > 100
    assert "wrote" in capsys.readouterr().out


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["train", "--set", "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err
    assert main(["sample", "--run", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
