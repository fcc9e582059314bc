"""``selfflow sample --out-dir``: rank-independent, resumable many-sample generation with an ADM npz."""

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
    assert np.array_equal(np.load(out / f"samples_{NUM}.npz")["arr_0"], np.load(full / f"samples_{NUM}.npz")["arr_0"])


def test_labels_balanced_and_per_index(run_dir):
    from selfflow.core.sample_many import sample_generator

    a = torch.randn(3, generator=sample_generator(0, 5))
    assert torch.equal(a, torch.randn(3, generator=sample_generator(0, 5)))
    assert not torch.equal(a, torch.randn(3, generator=sample_generator(0, 6)))
    assert not torch.equal(a, torch.randn(3, generator=sample_generator(1, 5)))
