import json
import logging
import wave

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from selfflow.core import atomic
from selfflow.core.metrics import MetricsLogger, frame_strip, read_metrics


def _write(path, steps, tail=""):
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in steps) + tail)


def test_resume_drops_a_torn_last_line_with_a_warning(tmp_path, caplog):
    _write(tmp_path / "metrics.jsonl", [1, 2, 3], tail='{"step": 4, "lo')
    with caplog.at_level(logging.WARNING, "selfflow"):
        MetricsLogger(tmp_path, resume_step=3, tensorboard=False).close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert "metrics.jsonl line 4" in caplog.text


def test_a_kill_during_the_resume_rewrite_keeps_the_history(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    _write(path, [1, 2, 3, 4])
    before = path.read_text()

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        MetricsLogger(tmp_path, resume_step=2, tensorboard=False)
    assert path.read_text() == before


def test_resume_without_a_history_says_it_is_lost(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text("")
    with caplog.at_level(logging.WARNING, "selfflow"):
        MetricsLogger(tmp_path, resume_step=20, tensorboard=False).close()
    assert "steps 1-20 are lost" in caplog.text


def _tags(tmp_path):
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "audio": 0}).Reload()
    return events.Tags()


def test_sample_files_become_tensorboard_media(tmp_path):
    Image.new("RGB", (8, 6), "red").save(tmp_path / "s.png")
    frames = [Image.new("RGB", (4, 4), c) for c in ("red", "green", "blue")]
    frames[0].save(tmp_path / "v.gif", save_all=True, append_images=frames[1:])
    with wave.open(str(tmp_path / "a.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.zeros((800, 2), "<i2").tobytes())
    log = MetricsLogger(tmp_path, tensorboard=True)
    log.log({"step": 1, "loss": 0.5, "modality": "image"}, {"loss/image": 0.5})
    log.log_media(1, "samples/image", tmp_path / "s.png")
    log.log_media(1, "samples/video", tmp_path / "v.mp4")  # read from the GIF beside it
    log.log_media(1, "samples/audio", tmp_path / "a.wav")
    log.close()
    tags = _tags(tmp_path)
    assert tags["scalars"] == ["loss/image"]
    assert set(tags["images"]) == {"samples/image", "samples/video"} and tags["audio"] == ["samples/audio"]


def test_frame_strip_puts_frames_side_by_side():
    frames = np.arange(20)[:, None, None, None] * np.ones((20, 2, 3, 3), np.uint8)
    strip = frame_strip(frames, max_frames=4)
    assert strip.shape == (2, 12, 3) and strip[0, ::3, 0].tolist() == [0, 6, 13, 19]


def test_the_loss_plot_has_a_panel_per_token_group(tmp_path, monkeypatch):
    """rt1 logs loss_fm_video and loss_fm_action (its token schedule's groups): loss.png left them out."""
    from selfflow.core import metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0, "loss_fm": 0.9, "loss_rep": -0.1,
                                        "loss_fm_video": 0.5, "loss_fm_action": 0.4}) + "\n" for s in (1, 2)))
    from matplotlib.axes import Axes

    titles = []
    set_title = Axes.set_title
    monkeypatch.setattr(Axes, "set_title", lambda ax, title, *a, **k: (titles.append(title),
                                                                       set_title(ax, title, *a, **k))[1])
    metrics.plot_losses(path, tmp_path / "loss.png")
    assert titles == ["loss", "loss_fm", "loss_rep", "loss_fm_action", "loss_fm_video"]
    assert (tmp_path / "loss.png").is_file()
