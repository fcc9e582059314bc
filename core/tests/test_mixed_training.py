"""Mixed-modality training (one modality per step) and fine-tuning from another run."""

import json
import os
import subprocess
import sys

import pytest
import torch

from selfflow.core.config import load_config
from selfflow.core.metrics import read_metrics
from selfflow.core.trainer import Trainer

MIXED = ["model.hidden_size=32", "model.num_heads=2", "model.depth_double=1", "model.depth_single=2",
         "model.axes_dim=[4,6,6]", "train.batch_size=2", "logging.every=1", "logging.plot_every=3",
         "sample.steps=2", "sample.num_samples=4", "ema.warmup=true", "sample.every=0",
         "train.num_threads=1",
         "data.mixture=[{modality: image, weight: 0.6, batch_size: 3, options: {image_size: 16, patch_size: 4, "
         "conditioning: text, text: {kind: tiny, dim: 16}}}, {modality: audio, weight: 0.4, options: "
         "{sample_rate: 8000, num_samples: 1024, patch: 64, conditioning: text, text: {kind: tiny, dim: 16}}}]"]


def _cfg(tmp_path, name, *extra):
    return load_config(None, [*MIXED, f"output_dir={tmp_path}", f"name={name}", *extra])


def test_mixed_run_logs_and_samples_each_modality(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "mix", "train.steps=8"), progress=False)
    assert set(trainer.raw.img_in) == {"image", "audio"} and trainer.raw.cfg.context_dim == 16
    assert trainer.run.objectives["image"].mask_ratio == 0.25 and trainer.run.objectives["audio"].mask_ratio == 0.5
    result = trainer.fit()
    assert [p.parent.name for p in result["previews"]] == ["image", "audio"]  # every modality's, for the summary
    assert result["samples"] == result["previews"][0]
    records = read_metrics(tmp_path / "mix" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    mods = [r["modality"] for r in records]
    assert set(mods) == {"image", "audio"}
    assert records[-1]["steps/image"] + records[-1]["steps/audio"] == 8
    assert records[-1]["steps/image"] == mods.count("image")
    import numpy as np
    import soundfile
    from PIL import Image

    (png,) = (tmp_path / "mix" / "samples" / "image").glob("*.png")
    (wav,) = (tmp_path / "mix" / "samples" / "audio").glob("*.wav")
    pixels = np.asarray(Image.open(png), dtype=np.float64)
    audio, _ = soundfile.read(wav)
    for arr in (pixels, audio):  # real content: finite and not constant
        assert np.isfinite(arr).all() and arr.std() > 1e-3
    assert (tmp_path / "mix" / "loss.png").is_file()


def test_mixed_resume_matches_uninterrupted(tmp_path):
    Trainer(_cfg(tmp_path, "full", "train.steps=6"), progress=False).fit()
    Trainer(_cfg(tmp_path, "split", "train.steps=3"), progress=False).fit()
    Trainer(_cfg(tmp_path, "split", "train.steps=6"), progress=False).fit()
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    split = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [(r["modality"], r["loss"]) for r in full] == [(r["modality"], r["loss"]) for r in split]


SCRIPT = r"""
import json, sys
from selfflow.core.config import load_config
from selfflow.core.trainer import Trainer
cfg = load_config(None, json.loads(sys.argv[1]))
trainer = Trainer(cfg, progress=False)
seen, draw = [], trainer.schedule.next
def record():
    seen.append(draw())
    return seen[-1]
trainer.schedule.next = record
trainer.fit()
with open(sys.argv[2] + f".{trainer.dist.rank}", "w") as f:
    json.dump(seen, f)
"""


@pytest.mark.distributed
def test_every_rank_trains_the_same_modality_at_every_step(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    overrides = [*MIXED, f"output_dir={tmp_path}", "name=ddp", "train.steps=10", "train.parallel=ddp"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), json.dumps(overrides), str(tmp_path / "seen")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "seen.0").read_text())
    r1 = json.loads((tmp_path / "seen.1").read_text())
    assert r0 == r1 and len(r0) == 10 and set(r0) == {"image", "audio"}


def test_fine_tune_from_another_run_adds_a_modality_and_freezes(tmp_path, caplog):
    Trainer(_cfg(tmp_path, "base", "train.steps=2", "data.mixture=null", "data.modality=image",
                 "data.options={image_size: 16, patch_size: 4, conditioning: text, text: {kind: tiny, dim: 16}}"),
            progress=False).fit()
    source = torch.load(tmp_path / "base/checkpoints/step_00000002.pt", weights_only=True)["ema"]
    # a broken newer checkpoint is passed over, as a resume does (it stopped the fine-tuning start)
    whole = (tmp_path / "base/checkpoints/step_00000002.pt").read_bytes()
    (tmp_path / "base/checkpoints/step_00000003.pt").write_bytes(whole[: len(whole) // 2])
    ft = Trainer(_cfg(tmp_path, "ft", "train.steps=2", f"train.init_from={tmp_path / 'base'}",
                      "train.freeze=[double_blocks]"), progress=False)
    assert "img_in.audio.weight" in ft.init_report["fresh"] and not ft.init_report["ignored"]
    assert "train.init_from: skipped " in caplog.text and "step_00000003.pt" in caplog.text
    own = ft.raw.state_dict()
    assert torch.equal(own["img_in.image.weight"], source["img_in.image.weight"])
    frozen = {n: p.clone() for n, p in ft.raw.named_parameters() if n.startswith("double_blocks")}
    assert frozen and all(not p.requires_grad for n, p in ft.raw.named_parameters() if n in frozen)
    ft.fit()
    after = dict(ft.raw.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in frozen.items())
    assert not torch.equal(after["img_in.image.weight"], source["img_in.image.weight"])
    # the README's promise: what was loaded, started fresh and stayed frozen is listed (console and train.log)
    log = (tmp_path / "ft" / "train.log").read_text()
    # which file of the run directory the weights came from
    assert f"init_from {tmp_path / 'base'} (ema weights of {tmp_path / 'base/checkpoints/step_00000002.pt'}): " in log
    assert "fresh (not in the source): " in log
    assert "img_in.audio.weight" in log and "0 ignored (not in this model)" in log
    assert "train.freeze ['double_blocks']: " in log and "parameter values frozen" in log


def test_a_model_of_another_size_is_one_short_line_naming_the_fix():
    """Every tensor of another preset differs: the message listed them all (~6,000 characters on one line)."""
    from selfflow.core.run_setup import init_from

    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(5)])
    other = {k: torch.zeros(8, *v.shape[1:]) for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as e:
        init_from(model, other)
    said = str(e.value)
    assert said.count(" vs model ") == 4 and "(10 tensors in all)" in said and "model section of the source" in said
