import pytest
from PIL import Image

from selfflow.core.cli import build_parser, main

from .test_trainer import TINY


def test_help_lists_commands(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps to the terminal's width
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "train" in out and "sample" in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    assert "--set" in out
    # the description wrapped to the terminal, the examples as written
    assert max(len(line) for line in out.split("examples:")[0].splitlines()) <= 100
    assert "\n  selfflow train --config configs/tiny/image.yaml\n" in out


def test_every_option_of_every_command_explains_itself(monkeypatch):
    """Each option has a help line, and each default that matters is shown (by the help text or by the
    formatter's ``(default: …)``), in every subcommand the installed packages register."""
    import argparse

    monkeypatch.setenv("COLUMNS", "300")

    def walk(parser, path):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")
            elif action.option_strings and not isinstance(action, argparse._HelpAction):
                yield path, action, formatter._expand_help(action) if action.help else ""

    seen = 0
    for path, action, line in walk(build_parser(), "selfflow"):
        seen += 1
        assert action.help, f"{path} {action.option_strings[0]} has no help"
        if action.default not in (None, False, []) and not isinstance(action, argparse._StoreFalseAction):
            assert "default" in line, f"{path} {action.option_strings[0]}: default {action.default!r} not shown"
    assert seen > 100


@pytest.mark.parametrize("argv", [[], ["prepare"], ["eval"]])
def test_a_missing_command_prints_help_to_stderr_with_exit_2(argv, capsys):
    assert main(argv) == 2  # the three used to disagree: stdout or stderr, exit 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: selfflow")


def test_a_second_ctrl_c_names_the_checkpoint_a_rerun_resumes_from(tmp_path, capsys, monkeypatch):
    from selfflow.core.trainer import Trainer

    sets = _sets(*TINY, f"output_dir={tmp_path}", "name=r", "sample.num_samples=2")
    assert main(["train", "--no-progress", *sets, "--set", "train.steps=1"]) == 0
    capsys.readouterr()

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted)
    assert main(["train", "--no-progress", *sets, "--set", "train.steps=3"]) == 130
    err = capsys.readouterr().err
    assert "stopped at once; the same command resumes from " in err and "step_00000001.pt" in err
    assert main(["train", "--no-progress", *_sets(*TINY, f"output_dir={tmp_path}", "name=fresh")]) == 130
    assert "the same command starts the run over (no checkpoint was written yet)" in capsys.readouterr().err


def test_a_config_given_without_config_is_pointed_at_it(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "configs/tiny/image.yaml"])
    assert stop.value.code == 2
    assert ("unrecognized arguments: configs/tiny/image.yaml — a config file goes after --config: --config "
            "configs/tiny/image.yaml") in capsys.readouterr().err


def test_train_then_sample(tmp_path, capsys):
    sets = [a for s in [*TINY, "train.steps=2", f"output_dir={tmp_path}", "name=cli",
                        "objective.timesteps={kind: logit_normal, mean: -0.5, std: 1, shift: 3}"] for a in ("--set", s)]
    assert main(["train", "--no-progress", *sets]) == 0
    # the start-up line says which timestep distribution the objective resolved
    log = (tmp_path / "cli" / "train.log").read_text()
    assert "γ=0.8, t~logit_normal(-0.5,1) shift 3; layers" in log
    from selfflow.core.host_malloc import host_malloc_summary
    from selfflow.core.linear import cpu_kernels

    # which kernels its fp32 products ran on (core.linear) and whether malloc keeps freed memory (core.host_malloc)
    assert f"cpu (Linear: {cpu_kernels()}, {host_malloc_summary()})" in log
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


def test_a_finished_run_rerun_does_nothing_unless_steps_are_raised(tmp_path, capsys):
    sets = [a for s in [*TINY, f"output_dir={tmp_path}", "name=done"] for a in ("--set", s)]
    run = tmp_path / "done"
    assert main(["train", "--no-progress", *sets, "--set", "train.steps=2"]) == 0
    outputs = {p: p.stat().st_mtime_ns for p in [run / "ema.safetensors", run / "loss.png",
                                                 *run.glob("checkpoints/*"), *run.glob("samples/*")]}
    capsys.readouterr()
    assert main(["train", "--no-progress", *sets, "--set", "train.steps=2"]) == 0
    assert "already finished (step 2, train.steps=2)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in outputs} == outputs and len(list(run.glob("samples/*"))) == 1
    from selfflow.core.config import load_config
    from selfflow.core.trainer import Trainer

    # from Python too: fit() on a finished run used to rewrite its checkpoint, samples and EMA
    result = Trainer(load_config(None, [*TINY, f"output_dir={tmp_path}", "name=done", "train.steps=2"]),
                     progress=False).fit()
    assert result["last"] == {} and result["ema"] == run / "ema.safetensors"
    assert {p: p.stat().st_mtime_ns for p in outputs} == outputs
    assert main(["train", "--no-progress", *sets, "--set", "train.steps=3"]) == 0
    assert (run / "checkpoints" / "step_00000003.pt").is_file()
    log = (run / "train.log").read_text()
    assert log.count("resuming from") == 2 and "already finished" in log
    # a lower train.steps than the checkpoint's step, final outputs missing: said, and they are written there
    (run / "loss.png").unlink()
    capsys.readouterr()
    assert main(["train", "--no-progress", *sets, "--set", "train.steps=2"]) == 0
    assert ("train.steps=2 is below the checkpoint's step 3: no step is trained; the final outputs are written at "
            "step 3") in capsys.readouterr().err
    assert (run / "loss.png").is_file()


def _sets(*overrides):
    return [a for s in overrides for a in ("--set", s)]


def _one_line_error(argv, capsys):
    """Run ``selfflow ARGV``, check it failed with exit 2 and one ``selfflow: error:`` line; return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfflow: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_expected_failures_are_one_line_errors_with_exit_2(tmp_path, capsys):
    def error(argv):
        return _one_line_error(argv, capsys)

    binary = tmp_path / "run.yaml"
    binary.write_bytes(b"\x00\xff\xfe binary")
    assert "run.yaml is not UTF-8 text" in error(["train", "--config", str(binary)])
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    err = error(["train", "--no-progress", *_sets(*TINY, f"output_dir={blocker}", "train.steps=1")])
    assert str(blocker) in err and "Not a directory" in err
    err = error(["train", "--no-progress", *_sets(*TINY, "data.options.image_size=30", f"output_dir={tmp_path}")])
    assert "data.options.image_size=30" in err and "not divisible by patch_size" in err


def test_a_changed_model_and_a_tampered_ema_are_refused_naming_key_and_file(tmp_path, capsys):
    sets = _sets(*TINY, f"output_dir={tmp_path}", "name=r", "train.steps=1", "sample.num_samples=4")
    assert main(["train", "--no-progress", *sets]) == 0
    capsys.readouterr()
    assert main(["train", "--no-progress", *sets, "--set", "model.depth_single=3", "--set", "train.steps=2"]) == 2
    err = capsys.readouterr().err
    assert "model.depth_single (checkpoint 2, now 3)" in err and "step_00000001.pt" in err
    # an objective key written out at the value its default resolved to is the same objective: it resumes
    assert main(["train", "--no-progress", *sets, "--set", "objective.gamma=0.8", "--set", "train.steps=2"]) == 0
    assert main(["train", "--no-progress", *sets, "--set", "objective.gamma=0.5", "--set", "train.steps=3"]) == 2
    assert "objective.gamma (checkpoint 0.8, now 0.5)" in capsys.readouterr().err
    assert main(["train", "--no-progress", *sets, "--set", "objective.teacher_layer=3", "--set",
                 "train.steps=3"]) == 2
    assert "objective.teacher_layer (checkpoint null (the default), now 3)" in capsys.readouterr().err
    ema = tmp_path / "r" / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:50])
    assert main(["sample", "--run", str(tmp_path / "r"), "--num", "2", "--steps", "1"]) == 2
    assert f"{ema} is truncated or corrupt" in capsys.readouterr().err


def test_input_errors_past_parsing_are_one_line_errors(tmp_path, capsys):
    """ValueErrors (pydantic's ValidationError among them) from a command's own checks used to escape as
    tracebacks with exit 1; arguments out of range are argparse errors naming the option."""
    def error(argv):
        return _one_line_error(argv, capsys)

    empty = tmp_path / "empty"
    empty.mkdir()
    prepare = ["prepare", "image-text", "--out", str(tmp_path / "shards"), "--codec", "pixel", "--tiny-text", "8"]
    assert f"prepare input {empty} holds no media to prepare" in error([*prepare, "--input", str(empty),
                                                                       "--image-size", "32"])
    assert not (tmp_path / "shards").exists()  # nothing written: it used to leave a record refusing the real run
    Image.new("RGB", (40, 40)).save(empty / "a.png")
    err = error([*prepare, "--input", str(empty), "--image-size", "4"])
    assert "settings: image_size: Input should be greater than or equal to 8 (got 4)" in err
    with pytest.raises(SystemExit) as stop:
        main(["plan", "--config", "configs/tiny/image.yaml", "--gpus", "0"])  # used to divide by zero
    assert stop.value.code == 2 and "argument --gpus: must be an integer ≥ 1, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--config", "configs/tiny/image.yaml", "--gpu-mem", "-5"])
    assert "argument --gpu-mem: must be a number > 0, got '-5'" in capsys.readouterr().err


def test_a_refused_start_leaves_no_run_directory(tmp_path, capsys):
    # it used to leave runs/<name>/data_facts.json without config.yaml
    assert main(["train", "--no-progress", *_sets(*TINY, f"output_dir={tmp_path}", "name=r",
                                                  "train.freeze=[nope]")]) == 2
    assert "train.freeze: 'nope' matches no parameter" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_export_refuses_to_write_into_a_run_directory(tmp_path, capsys):
    # its config.json would make every later `--run RUN` read the export instead of the run's checkpoints
    sets = _sets(*TINY, f"output_dir={tmp_path}", "name=r", "train.steps=1", "sample.num_samples=4")
    assert main(["train", "--no-progress", *sets]) == 0
    capsys.readouterr()
    assert main(["export", "--run", str(tmp_path / "r"), "--out", str(tmp_path / "r")]) == 2
    assert "is a training run directory; export to a directory of its own" in capsys.readouterr().err
    assert not (tmp_path / "r" / "config.json").exists()


def test_every_run_option_has_the_spelling_torchrun_leaves_alone():
    """torchrun's own parser takes `--run` for its `--run-path` (and `--num` for `--numa-binding`)."""
    parser = build_parser()
    for argv in (["eval", "probe"], ["eval", "linear-probe"], ["export", "--out", "o"], ["simpler"], ["sample"]):
        args = parser.parse_args([*argv, "--run-dir", "r"])
        assert str(args.run) == "r", argv
    assert parser.parse_args(["eval", "probe", "--run-dir", "r", "--num-samples", "7"]).num == 7


@pytest.mark.parametrize("local_rank, printed", [("0", 1), ("1", 0)])
def test_under_torchrun_a_config_error_prints_once_per_node(tmp_path, capsys, monkeypatch, local_rank, printed):
    """Every rank reads the same config: 8 ranks used to print the same line 8 times."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", local_rank)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert main(["train", "--set", f"output_dir={tmp_path}", "--set", "train.no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("selfflow: error:") == printed and err.count("train.no_such_key: unknown key") == printed


def test_selfflows_own_warnings_are_one_line_others_keep_pythons_form(capsys, monkeypatch):
    """A warning raised in selfflow's code printed Python's way — its file, line and source line, under torchrun
    on every rank — where one line says it; a plug-in's or a library's warning keeps Python's form (its source
    line is the user's to read)."""
    import warnings

    from selfflow.core import precision
    from selfflow.core.cli import show_own_warnings

    python_form = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *rest: python_form.append(str(message)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    show_own_warnings()
    show_own_warnings()  # main() again in this process: still one line per warning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn_explicit("slow", UserWarning, filename=precision.__file__, lineno=40)
        warnings.warn_explicit("elsewhere", UserWarning, filename=__file__, lineno=1)
    err = capsys.readouterr().err
    assert err.startswith("selfflow: warning (rank 1): slow\n") and "precision.py" not in err
    assert python_form == ["elsewhere"] and "elsewhere" not in err
