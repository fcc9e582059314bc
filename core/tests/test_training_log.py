import pytest
import torch

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
