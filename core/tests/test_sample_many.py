"""``selfflow sample --out-dir``: rank-independent, resumable many-sample generation with an ADM npz."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from selfflow.core.dit import DiT, DiTConfig

from .conftest import randomize

pytestmark = pytest.mark.distributed

NUM, BATCH = 64, 8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny DiT run directory (config + EMA weights) on the built-in 32-px image modality."""
    d = tmp_path_factory.mktemp("run")
    cfg = {"name": "r", "model": {"arch": "dit", "preset": "tiny", "patch_size": 4, "grid_size": 8},
           "objective": {"kind": "flow_matching"},
           "data": {"modality": "image", "options": {"image_size": 32, "patch_size": 4}},
           "sample": {"solver": "sde", "steps": 6}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    model = randomize(DiT(DiTConfig(preset="tiny", patch_size=4, grid_size=8, num_classes=10, projector_mult=0,
                                    modalities={"image": 48})))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "ema.safetensors"))
    return d


def launch(run_dir, out, nproc=1, env=None, popen=False, extra=()):
    args = ["sample", "--run-dir", str(run_dir), "--out-dir", str(out), "--num-samples", str(NUM), "--batch-size", str(BATCH),
            "--device", "cpu", "--no-progress", "--cfg-scale", "2", *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "selfflow.core.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "selfflow.core.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_two_ranks_equal_one_rank_bit_for_bit(run_dir, tmp_path):
    out1 = launch(run_dir, tmp_path / "one", 1)
    launch(run_dir, tmp_path / "two", 2)
    a = np.load(tmp_path / "one" / f"samples_{NUM}.npz")["arr_0"]
    b = np.load(tmp_path / "two" / f"samples_{NUM}.npz")["arr_0"]
    assert a.shape == (NUM, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert len({a[i].tobytes() for i in range(NUM)}) == NUM  # distinct samples, not one repeated
    assert sorted(p.name for p in (tmp_path / "two").glob("*.png")) == [f"{i:06d}.png" for i in range(NUM)]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(tmp_path / "two" / "000013.png")), a[13])  # PNG == npz row
    assert "selfflow eval probe" in out1 and "samples_64.npz" in out1 and "imagenet" not in out1.lower()
    labels = np.load(tmp_path / "two" / f"samples_{NUM}.npz")["arr_1"]  # the class of each row, any rank count
    assert np.array_equal(labels, np.load(tmp_path / "one" / f"samples_{NUM}.npz")["arr_1"]) and labels.shape == (NUM,)


def test_killed_half_way_and_restarted_finishes_exactly(run_dir, tmp_path):
    full = tmp_path / "full"
    launch(run_dir, full, 1)
    out = tmp_path / "killed"
    proc = launch(run_dir, out, 1, env={"SELFFLOW_FAULT_SAMPLE_DELAY": "0.5"}, popen=True)
    end = time.time() + 240
    while len(list((out / "parts").glob("batch_*.npy"))) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < end, "timed out"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((out / "parts").glob("batch_*.npy")))
    assert 3 <= done < NUM // BATCH and not (out / f"samples_{NUM}.npz").exists()
    launch(run_dir, out, 1)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [f"{i:06d}.png" for i in range(NUM)]  # none missing, none twice, no temp leftovers
    assert not list(out.rglob("*.tmp*"))
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".png") == ["parts", f"samples_{NUM}.npz"]
    assert not list((out / "parts").glob("staging-*"))  # a batch killed while writing its files: cleared
    assert np.array_equal(np.load(out / f"samples_{NUM}.npz")["arr_0"], np.load(full / f"samples_{NUM}.npz")["arr_0"])


def test_labels_balanced_and_per_index(run_dir):
    from selfflow.core.sample_many import sample_generator

    a = torch.randn(3, generator=sample_generator(0, 5))
    assert torch.equal(a, torch.randn(3, generator=sample_generator(0, 5)))
    assert not torch.equal(a, torch.randn(3, generator=sample_generator(0, 6)))
    assert not torch.equal(a, torch.randn(3, generator=sample_generator(1, 5)))


def _in_process(run_dir, out, **changes):
    """``sample_many`` on one rank in this process: 8 samples in batches of 4, 2 SDE steps."""
    from selfflow.core.distributed import DistInfo
    from selfflow.core.pretrained import load_model
    from selfflow.core.sample_many import SampleManyConfig, sample_many

    loaded = load_model(run_dir, "cpu")
    model = changes.pop("model", loaded.model)
    sampler = loaded.config.sampler(loaded.modality).model_copy(update={"steps": changes.pop("steps", 2)})
    opts = SampleManyConfig(**{"num": 8, "batch_size": 4, "out_dir": out, **changes})
    return sample_many(model, changes.get("modality", loaded.modality), sampler, opts, DistInfo(), progress=False)


def test_a_restart_with_other_settings_is_refused_naming_them(run_dir, tmp_path):
    from selfflow.core.config import ConfigError
    from selfflow.core.pretrained import load_model

    out = tmp_path / "s"
    first = np.load(_in_process(run_dir, out))["arr_0"]
    assert np.array_equal(np.load(_in_process(run_dir, out))["arr_0"], first)  # the same command: resumes
    other = load_model(run_dir, "cpu").model
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    for change, says in [({"seed": 1}, "seed: 0 then, 1 now"), ({"batch_size": 2}, "batch_size: 4 then, 2 now"),
                         ({"steps": 3}, "sampler: "), ({"num": 6}, "num: 8 then, 6 now"),
                         ({"labels": "balanced"}, "labels: "), ({"model": other}, "weights: ")]:
        with pytest.raises(ConfigError, match=f"holds samples made with other settings \\({says}"):
            _in_process(run_dir, out, **change)
    assert np.array_equal(np.load(out / "samples_8.npz")["arr_0"], first)  # untouched


def test_a_larger_num_extends_the_run_to_the_samples_of_a_fresh_one(run_dir, tmp_path, capsys):
    """6 samples in batches of 4, then 10 in the same folder: batch 0 is kept, batch 1 (cut short at 6) is
    redone with its 4 indices, batch 2 is new — and the 10 equal a fresh run of 10 bit for bit."""
    out = tmp_path / "s"
    _in_process(run_dir, out, num=6)
    kept = (out / "parts" / "batch_000000.npy").stat().st_mtime_ns
    npz = _in_process(run_dir, out, num=10)
    err = capsys.readouterr().err
    assert "extending the 6 samples" in err and "removed samples_6.npz" in err
    assert not (out / "samples_6.npz").exists()  # left beside samples_10.npz, it was easy to evaluate by mistake
    assert (out / "parts" / "batch_000000.npy").stat().st_mtime_ns == kept
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(10)]
    fresh = _in_process(run_dir, tmp_path / "fresh", num=10)
    assert np.array_equal(np.load(npz)["arr_0"], np.load(fresh)["arr_0"])
    assert np.array_equal(np.load(npz)["arr_1"], np.load(fresh)["arr_1"])
    assert np.array_equal(np.load(_in_process(run_dir, out, num=10))["arr_0"], np.load(fresh)["arr_0"])  # resumes


def test_balanced_labels_need_classes(run_dir, tmp_path, monkeypatch):
    from selfflow.core.config import ConfigError
    from selfflow.core.distributed import DistInfo
    from selfflow.core.pretrained import load_model
    from selfflow.core.sample_many import SampleManyConfig, sample_many

    loaded = load_model(run_dir, "cpu")
    sampler = loaded.config.sampler(loaded.modality)
    monkeypatch.setattr(type(loaded.modality), "num_classes", property(lambda self: 0))
    with pytest.raises(ConfigError, match="--labels balanced spreads the samples over the classes, but 'image'"):
        sample_many(loaded.model, loaded.modality, sampler,
                    SampleManyConfig(num=4, batch_size=4, labels="balanced", out_dir=tmp_path), DistInfo())


def test_a_larger_num_is_another_run_in_the_official_layout(tmp_path):
    """The official layout seeds batches by rank over ceil(N / W) samples each: another N moves every batch."""
    from selfflow.core.config import ConfigError
    from selfflow.core.sample_many import check_settings

    (tmp_path / "parts").mkdir()
    for official in (False, True):
        record = {"num": 8, "batch_size": 4, "official_repro": official}
        (tmp_path / "parts" / "settings.json").write_text(json.dumps(record))
        assert check_settings(tmp_path, record) is None
        if official:
            with pytest.raises(ConfigError, match="num: 8 then, 12 now"):
                check_settings(tmp_path, {**record, "num": 12})
        else:
            assert check_settings(tmp_path, {**record, "num": 12}) == 8  # ours: extended from 8


def test_a_batch_killed_while_writing_its_files_leaves_nothing_behind(run_dir, tmp_path, monkeypatch, capsys):
    """A crash inside the writer (a kill between a sample's file and the batch's part) is redone on restart,
    and whatever a writer leaves beside its samples (a video preview's GIF …) never reaches the folder."""
    from selfflow.core.pretrained import load_model

    out = tmp_path / "s"
    (out / "parts" / "staging-rank3").mkdir(parents=True)  # a killed 4-rank run's leftovers
    (out / "parts" / "staging-rank3" / "000005.png").write_bytes(b"half")
    modality_cls = type(load_model(run_dir, "cpu").modality)
    original, written = modality_cls.write_sample, []

    def write_then_die(self, media, label, path):
        f = original(self, media, label, path)
        path.with_suffix(".extra.txt").write_text("beside the sample")
        written.append(f.name)
        if len(written) == 6:
            raise KeyboardInterrupt("killed")
        return f

    monkeypatch.setattr(modality_cls, "write_sample", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        _in_process(run_dir, out)
    assert (out / "parts" / "batch_000000.npy").is_file() and not (out / "parts" / "batch_000001.npy").exists()
    capsys.readouterr()
    npz = _in_process(run_dir, out)  # the restart, which says what it reuses (a killed run's was silent)
    assert "resuming " in (err := capsys.readouterr().err) and ": 1 of its 2 batches are done" in err
    assert sorted(p.name for p in out.iterdir()) == [*(f"{i:06d}.png" for i in range(8)), "parts", npz.name]
    assert sorted(p.name for p in (out / "parts").iterdir()) == [
        "batch_000000.json", "batch_000000.npy", "batch_000001.json", "batch_000001.npy", "settings.json"]
    monkeypatch.setattr(modality_cls, "write_sample", original)
    fresh = _in_process(run_dir, tmp_path / "fresh")
    assert np.array_equal(np.load(npz)["arr_0"], np.load(fresh)["arr_0"])


def test_a_modality_without_classes_or_prompts_is_asked_for_the_batch_s_own_indices(run_dir, monkeypatch):
    """``sample --out-dir`` on a modality with its own preview conditioning: batch k's samples get theirs, not
    those of samples 0…B−1 (the set made in batches is the set made at once)."""
    from selfflow.core.pretrained import load_model
    from selfflow.core.sample_many import generate_batch
    from selfflow.core.tokens import Conditioning

    loaded = load_model(run_dir, "cpu")
    modality, asked = loaded.modality, []
    monkeypatch.setattr(type(modality), "num_classes", property(lambda self: 0))

    def conditions(samples, device):
        asked.append(samples.tolist())
        labels = samples.to(device) % 10
        return Conditioning(labels=labels), Conditioning(labels=torch.full_like(labels, 10)), labels

    monkeypatch.setattr(modality, "sample_conditions", conditions)
    sampler = loaded.config.sampler(modality).model_copy(update={"steps": 2})
    media, labels = generate_batch(loaded.model, modality, sampler, [12, 13], 0, "balanced", torch.device("cpu"))
    assert asked == [[12, 13]] and media.shape[0] == 2 and labels is None


def test_ctrl_c_says_how_far_the_samples_got_and_how_to_finish(tmp_path, capsys):
    from selfflow.core.sample_many import part_path, resume_note_on_interrupt

    part_path(tmp_path, 0).parent.mkdir(parents=True)
    part_path(tmp_path, 0).touch()
    with pytest.raises(KeyboardInterrupt), resume_note_on_interrupt(tmp_path, 3, True):
        raise KeyboardInterrupt
    assert capsys.readouterr().err == (f"selfflow: 1 of 3 batches of samples are written in {tmp_path}; run the same "
                                       "command again to make the rest\n")
    with pytest.raises(KeyboardInterrupt), resume_note_on_interrupt(tmp_path, 3, False):  # rank ≠ 0: silent
        raise KeyboardInterrupt
    assert capsys.readouterr().err == ""


def test_balanced_labels_that_do_not_divide_say_so(run_dir, tmp_path, capsys):
    from selfflow.core.pretrained import load_model

    k = load_model(run_dir, "cpu").modality.num_classes
    _in_process(run_dir, tmp_path / "even", labels="balanced", num=k, batch_size=k)
    assert "balanced" not in capsys.readouterr().err
    _in_process(run_dir, tmp_path / "uneven", labels="balanced", num=k + 1, batch_size=k + 1)
    assert f"over {k} classes: classes 0…0 get one sample more than the others" in capsys.readouterr().err
