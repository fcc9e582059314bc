from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from selfflow.eval.extract import extract_activations, pool_to_logits
from selfflow.eval.image_io import open_images
from selfflow.eval.inception import FIDInceptionV3


def _make_npz(path: Path, images: np.ndarray) -> Path:
    np.savez(path, arr_0=images)
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, inception_model: FIDInceptionV3, make_images):
    """3 images (odd: 2 ranks get shards of 2 and 1) extracted by one process, batch 2."""
    imgs = make_images(3, 32, 32, seed=11)
    src = _make_npz(tmp_path_factory.mktemp("extract") / "s.npz", imgs)
    return imgs, src, extract_activations(open_images(src), inception_model, batch_size=2, progress=False)


def test_extract_matches_direct_forward(single, inception_model: FIDInceptionV3) -> None:
    imgs, _, acts = single
    direct = inception_model(torch.from_numpy(imgs))
    assert acts.pool.shape == (3, 2048) and acts.pool.dtype == np.float32
    np.testing.assert_allclose(acts.pool, direct.pool.numpy(), rtol=1e-4, atol=1e-6)
    spatial = direct.spatial.double().numpy()
    np.testing.assert_allclose(acts.spatial_stats.mean, spatial.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(acts.spatial_stats.cov, np.cov(spatial, rowvar=False), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(acts.pool_stats.cov, np.cov(acts.pool.astype(np.float64), rowvar=False),
                               rtol=1e-6, atol=1e-10)
    # IS logits from stored pool features equal the network's own logits
    torch.testing.assert_close(pool_to_logits(acts.pool, inception_model), direct.logits, rtol=1e-5, atol=1e-5)


WORKER = textwrap.dedent("""
    import sys, numpy as np, torch, torch.distributed as dist
    from selfflow.eval.extract import extract_activations
    from selfflow.eval.image_io import open_images
    from selfflow.eval.inception import load_inception
    rank, world, port, weights, src, out = sys.argv[1:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=int(rank), world_size=int(world))
    acts = extract_activations(open_images(src), load_inception(weights), batch_size=2, progress=False)
    np.savez(out, pool=acts.pool, mu=acts.pool_stats.mean, sigma=acts.pool_stats.cov,
             mu_s=acts.spatial_stats.mean, sigma_s=acts.spatial_stats.cov, count=acts.pool_stats.count)
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_rank_gloo_extraction_equals_single_process(tmp_path: Path, inception_weights: Path, single) -> None:
    _, src, acts = single
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", str(port), str(inception_weights),
                               str(src), str(tmp_path / f"out{r}.npz")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out.decode()[-3000:]
    for r in range(2):
        with np.load(tmp_path / f"out{r}.npz") as z:
            assert int(z["count"]) == 3
            # batches differ (shards of 2 and 1): fp32 conv round-off only
            np.testing.assert_allclose(z["pool"], acts.pool, rtol=1e-4, atol=1e-5)  # gathered in order
            np.testing.assert_allclose(z["mu"], acts.pool_stats.mean, rtol=1e-4, atol=1e-5)
            sig, sig_s = acts.pool_stats.cov, acts.spatial_stats.cov
            np.testing.assert_allclose(z["sigma"], sig, rtol=1e-3, atol=1e-4 * np.abs(sig).max())
            np.testing.assert_allclose(z["mu_s"], acts.spatial_stats.mean, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(z["sigma_s"], sig_s, rtol=1e-3, atol=1e-4 * np.abs(sig_s).max())
