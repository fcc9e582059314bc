import logging
import sys
import types

import pytest
import torch
from PIL import Image

from selfflow.core.config import load_config
from selfflow.core.distributed import DistInfo
from selfflow.core.metrics import read_metrics
from selfflow.core.training_log import StepCost, TrainingLog


def _log(tmp_path, *sets):
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=run", "train.steps=5", "logging.every=2", *sets])
    costs = {"image": StepCost(8, 80, 4e12), "audio": StepCost(2, 40, 1e12)}
    return TrainingLog(cfg, DistInfo(), torch.device("cpu"), progress=False, step_cost=costs.__getitem__)


def _steps(log, steps, modality="image"):
    for step in steps:
        log.step_started()
        log.step_done(step, modality, {"loss": 1.0 / step, "loss_rep": -0.5, "lr": 0.1}, {"skipped_steps": 0})


def test_records_every_n_steps_and_at_the_end_with_rates(tmp_path):
    log = _log(tmp_path, "logging.peak_tflops=1000", "logging.tensorboard=false", "logging.plot_every=100")
    log.open(0)
    _steps(log, [1, 2, 3])
    _steps(log, [4], "audio")
    _steps(log, [5])
    log.scores(5, {"fd": 3.5})
    log.close()
    assert log.finish().name == "loss.png"
    run = tmp_path / "run"
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 5, 5]
    assert list(records[0]) == ["step", "modality", "loss", "loss_rep", "lr", "samples_per_s", "tokens_per_s",
                                "mfu", "skipped_steps"]
    # the window of step 4 holds one image and one audio step: 8 + 2 samples, 80 + 40 tokens
    r = records[1]
    assert r["tokens_per_s"] / r["samples_per_s"] == pytest.approx(12)
    assert r["mfu"] * 1e15 / r["samples_per_s"] == pytest.approx(5e11)
    assert records[-1] == {"step": 5, "fd": 3.5}
    with Image.open(run / "eval.png") as im:  # the scores' plot: one panel
        assert im.width == 420
    assert (run / "config.yaml").is_file() and not (run / "tensorboard").exists()


def test_resume_drops_records_after_the_resumed_step(tmp_path):
    log = _log(tmp_path)
    log.open(0)
    _steps(log, [1, 2, 3, 4])
    log.close()
    log = _log(tmp_path)
    log.open(2)
    _steps(log, [3, 4])
    log.close()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4] and "mfu" not in records[0]
    assert (tmp_path / "run" / "tensorboard").is_dir()


MIXTURE = ["data.mixture=[{modality: image, weight: 0.5}, {modality: audio, weight: 0.5}]"]


def test_mixed_runs_plot_per_step_values_per_modality(tmp_path):
    log = _log(tmp_path, "logging.plot_every=100", *MIXTURE)
    record = {"step": 2, "modality": "audio", "loss": 0.5, "grad_norm": 1.0, "lr": 0.1, "samples_per_s": 3.0,
              "skipped_steps": 0, "steps/audio": 1}
    assert log._tags(record, "audio") == {"loss/audio": 0.5, "grad_norm/audio": 1.0, "lr": 0.1,
                                          "samples_per_s": 3.0, "skipped_steps": 0, "steps/audio": 1}
    assert _log(tmp_path)._tags(record, "audio")["loss"] == 0.5  # one modality: plain tags


def test_a_mixed_run_logs_each_modality_of_the_window_also_across_a_resume(tmp_path):
    """Audio trains at step 2 only; the logging step 4 is an image step. The window's record of step 4 comes
    with audio's step 2 (its values, no rates) — in an uninterrupted run and in one resumed at step 2."""
    def run(name, stop_at=None, state=None):
        log = _log(tmp_path, f"name={name}", "logging.every=4", "logging.plot_every=100", *MIXTURE)
        log.open(0 if state is None else 2)
        if state is not None:
            log.load_state_dict(state)
        for step, modality in [(1, "image"), (2, "audio"), (3, "image"), (4, "image")][0 if state is None else 2:]:
            _steps(log, [step], modality)
            if step == stop_at:
                break
        log.close()
        return log.state_dict()

    run("full")
    run("split", state=run("split", stop_at=2))
    for name in ("full", "split"):
        records = read_metrics(tmp_path / name / "metrics.jsonl")
        assert [(r["step"], r["modality"]) for r in records] == [(2, "audio"), (4, "image")]
        assert records[0] == {"step": 2, "modality": "audio", "loss": 0.5, "loss_rep": -0.5, "lr": 0.1}
        assert "samples_per_s" in records[1]


def test_the_scores_plot_has_a_panel_per_score_and_leaves_the_probe_grid_out(tmp_path):
    import json

    from selfflow.core.metrics import SCORE_PANELS, plot_scores

    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"step": 10, "modality": "image", "loss": 1.0},
        {"step": 10, "fid": 90.0, "is": 3.0, "lp_acc/b1/t0.0": 0.5, "lp_acc_best": 0.5, "note": "text"},
        {"step": 20, "modality": "image", "loss": 0.8},
        {"step": 20, "fid": 70.0, "is": 4.0, "lp_acc/b1/t0.0": 0.6, "lp_acc_best": 0.6, "probe_fd/image": 12.0},
    ]) + "\n")
    with Image.open(plot_scores(path, tmp_path / "eval.png")) as im:
        assert im.width == 4 * 420  # fid, is, lp_acc_best, probe_fd/image
    many = tmp_path / "many.jsonl"
    many.write_text(json.dumps({"step": 1, **{f"s{i}": float(i) for i in range(12)}}) + "\n")
    with Image.open(plot_scores(many, tmp_path / "many.png")) as im:
        assert im.width == SCORE_PANELS * 420
    losses = tmp_path / "losses.jsonl"
    losses.write_text(json.dumps({"step": 1, "modality": "image", "loss": 1.0}) + "\n")
    assert plot_scores(losses, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


class FakeWandb(types.ModuleType):
    """Records ``wandb.init`` keyword arguments and logged values."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged = [], []
        self.Image = self.Audio = self.Video = lambda path: ("media", path)

    def init(self, **kw):
        self.inits.append(kw)
        return types.SimpleNamespace(log=lambda values, step: self.logged.append((step, values)),
                                     finish=lambda: None)


def test_wandb_resumes_the_stored_run_and_gets_sample_media(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for step in (0, 2):  # a run, then its resume
        log = _log(tmp_path, "logging.wandb=true", "logging.tensorboard=false", "logging.plot_every=100")
        log.open(step)
        _steps(log, [step + 1, step + 2])
        log.close()
        log.finish()
    first, second = fake.inits
    assert first["id"] == second["id"] == (tmp_path / "run" / "wandb_run_id").read_text().strip()
    assert second["resume"] == "allow"
    assert [s for s, _ in fake.logged] == [2, 4]
    png = tmp_path / "s.png"
    Image.new("RGB", (4, 4)).save(png)
    log.media(4, "image", png)
    assert fake.logged[-1] == (4, {"samples/image": ("media", str(png))})


def test_text_log_appends_the_console_lines_to_train_log(tmp_path, capsys):
    for line in ("first run", "resumed run"):
        log = _log(tmp_path)
        with log.text_log():
            logging.getLogger("selfflow").info(line)
            logging.getLogger("selfflow.shards").warning("skipped a sample")
        logging.getLogger("selfflow").info("not logged after the run")
    text = (tmp_path / "run" / "train.log").read_text()
    assert [ln.split(" ", 3)[3] for ln in text.splitlines()] == ["first run", "skipped a sample", "resumed run",
                                                                  "skipped a sample"]
    captured = capsys.readouterr()
    assert captured.out == "first run\nresumed run\n" and captured.err.count("skipped a sample") == 2
    with pytest.raises(RuntimeError), _log(tmp_path).text_log():
        raise RuntimeError("disk full")
    assert (tmp_path / "run" / "train.log").read_text().splitlines()[-1].endswith(
        "ERROR stopped: RuntimeError: disk full")


def test_without_a_progress_bar_each_logging_step_is_a_line_of_train_log(tmp_path, capsys):
    """A batch job (``--no-progress``) would otherwise log nothing but metrics.jsonl while it trains."""
    log = _log(tmp_path, "logging.tensorboard=false", "logging.plot_every=100")
    with log.text_log():
        log.open(0)
        _steps(log, [1, 2, 3])
        log.close()
    lines = [ln.split(" ", 3)[3] for ln in (tmp_path / "run" / "train.log").read_text().splitlines()]
    assert [ln.split(" samples/s")[0].rsplit(", ", 1)[0] for ln in lines] == ["step 2/5: loss 0.5000, rep -0.500"]
    assert "step 2/5: loss 0.5000" in capsys.readouterr().out
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=run"])
    asked = TrainingLog(cfg, DistInfo(), torch.device("cpu"), progress=True, step_cost=None)
    assert not asked.progress  # stderr is not a terminal here (pytest captures it): lines, not a bar
