"""Inception feature extraction over an image source, optionally sharded over torch.distributed ranks.

With an initialised process group every rank takes a contiguous shard of the images; the pool_3
features are all-gathered back **in the original order** (ADM's IS splits are consecutive rows) and
the streaming statistics are merged, so every rank ends with the same result as a single process.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .extractor import exact_fp32
from .frechet import FeatureStats
from .image_io import ImageSource
from .inception import FIDInceptionV3

POOL_DIM = 2048
SPATIAL_DIM = 2023


@dataclass
class InceptionActivations:
    pool: np.ndarray  # (N, 2048) float32, in source order
    pool_stats: FeatureStats
    spatial_stats: FeatureStats

    def __len__(self) -> int:
        return int(self.pool.shape[0])


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return _dist_info()[0]


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous, balanced ``[start, stop)`` of ``n`` items for ``rank``."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _prefetch(it: Iterator[np.ndarray], depth: int = 2) -> Iterator[np.ndarray]:
    """Decode the next batches in a thread while the network runs (PIL/zlib release the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def worker() -> None:
        try:
            for item in it:
                q.put(item)
        except BaseException as e:  # surfaced in the consumer
            q.put(e)
        q.put(done)

    threading.Thread(target=worker, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_stats(stats: FeatureStats) -> FeatureStats:
    """Merge the statistics of all ranks (a no-op without a process group)."""
    _, world = _dist_info()
    if world == 1:
        return stats
    dev = _collective_device()
    st = stats.state()
    packed = torch.cat([torch.tensor([float(st["count"])], dtype=torch.float64),
                        st["mean"].double().cpu(), st["m2"].double().reshape(-1).cpu()]).to(dev)
    parts = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed)
    d = stats.dim
    assert d is not None
    merged = FeatureStats(d, biased=stats.biased)
    for p in parts:
        p = p.cpu()
        merged.merge(FeatureStats.from_state(int(p[0].item()), p[1:1 + d], p[1 + d:].reshape(d, d)))
    return merged


def gather_rows(x: np.ndarray) -> np.ndarray:
    """Concatenate each rank's (n_r, D) array in rank order (all ranks get the result)."""
    _, world = _dist_info()
    if world == 1:
        return x
    dev = _collective_device()
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(counts), x.shape[1], dtype=torch.float32, device=dev)
    padded[:x.shape[0]] = torch.from_numpy(x).to(dev)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return np.concatenate([p[:c].cpu().numpy() for p, c in zip(parts, counts)], axis=0)


@torch.no_grad()
def extract_activations(source: ImageSource, model: FIDInceptionV3, *, batch_size: int = 64,
                        progress: bool = True, desc: str | None = None, shard: bool = True) -> InceptionActivations:
    """pool_3 features and pool/spatial statistics of every image of ``source``.

    ``batch_size`` 64 is ADM's; it only changes float32 round-off. Runs on ``model``'s device. ``shard=False``:
    this process does all of it, even inside a process group (whose other ranks are busy elsewhere: a run's
    online evaluation scores on rank 0 alone).
    """
    rank, world = _dist_info() if shard else (0, 1)
    start, stop = shard_range(len(source), rank, world)
    device = model.fc.weight.device
    pool_stats = FeatureStats(POOL_DIM, device=device)
    spatial_stats = FeatureStats(SPATIAL_DIM, device=device)
    pools: list[np.ndarray] = []
    bar = tqdm(total=stop - start, desc=desc or f"inception {source.path.name}", unit="img",
               disable=not progress or rank != 0, dynamic_ncols=True)
    with exact_fp32():
        for batch in _prefetch(source.batches(batch_size, start, stop)):
            feats = model(torch.from_numpy(batch).to(device), logits=False)
            assert feats.pool is not None and feats.spatial is not None
            pool_stats.update(feats.pool)
            spatial_stats.update(feats.spatial)
            pools.append(feats.pool.cpu().numpy())
            bar.update(len(batch))
    bar.close()
    pool = np.concatenate(pools) if pools else np.zeros((0, POOL_DIM), np.float32)
    if not shard:
        return InceptionActivations(pool=pool, pool_stats=pool_stats, spatial_stats=spatial_stats)
    return InceptionActivations(pool=gather_rows(pool), pool_stats=gather_stats(pool_stats),
                                spatial_stats=gather_stats(spatial_stats))


@torch.no_grad()
def pool_to_logits(pool: np.ndarray | torch.Tensor, model: FIDInceptionV3, chunk: int = 4096) -> torch.Tensor:
    """The 1008 IS logits ``pool @ Wᵀ`` (no bias), float32 on CPU."""
    w = model.softmax_weight.float()
    x = torch.as_tensor(pool, dtype=torch.float32)
    out = [x[i:i + chunk].to(w.device).mm(w.T).cpu() for i in range(0, len(x), chunk)]
    return torch.cat(out) if out else torch.zeros(0, w.shape[0])
