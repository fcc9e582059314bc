"""Data-loading benchmarks: video clip decode (decord vs PyAV) and latent shard reads (webdataset tar vs
one ``.npy`` file per sample), in samples/s; and the ImageNet stream's read rate that ``make gpu-check`` sets
against the training step. Inputs are generated in a temporary directory (so they sit in
the page cache: these are decode/parse costs, not disk speed)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .timing import Row, paired_median

VIDEO_FRAMES, VIDEO_SIZE, FPS, GOP = 192, 256, 24, 24
CLIP_FRAMES, CLIP_STRIDE = 17, 2


def _write_test_mp4(path: Path) -> Path:
    """8 s of 256² H.264 at 24 fps with a keyframe every second (as typical camera/web video): a textured
    background and a moving square, so the encoder has real work and the decoder real bits."""
    import av

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:VIDEO_SIZE, :VIDEO_SIZE]
    texture = rng.integers(0, 40, (VIDEO_SIZE, VIDEO_SIZE, 1), dtype=np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width = stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = GOP
        stream.options = {"crf": "20", "keyint_min": str(GOP), "sc_threshold": "0"}
        for t in range(VIDEO_FRAMES):
            frame = np.empty((VIDEO_SIZE, VIDEO_SIZE, 3), np.uint8)
            frame[..., 0] = (xx + 3 * t) % 256
            frame[..., 1] = (yy + 2 * t) % 256
            frame[..., 2] = 128
            frame = frame + texture
            x0 = (5 * t) % (VIDEO_SIZE - 48)
            frame[64:112, x0:x0 + 48] = (240, 30, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def bench_video_decode(tmp: Path, quick: bool) -> list[Row]:
    from selfflow.video.clips import clip_indices
    from selfflow.video.video_io import has_decord, read_frames

    if not has_decord():
        return [Row("video clip decode: decord not installed (PyAV only)", 0.0, None, None, None, "clips/s")]
    path = _write_test_mp4(tmp / "clip.mp4")
    n_clips = 6 if quick else 12
    rng = np.random.default_rng(0)
    windows = [clip_indices(VIDEO_FRAMES, CLIP_FRAMES, CLIP_STRIDE, rng) for _ in range(n_clips)]
    a = read_frames(path, windows[0], "decord")
    b = read_frames(path, windows[0], "pyav")
    if not np.array_equal(a, b):  # same bitstream, same FFmpeg: the frames must match
        raise AssertionError("decord and PyAV decoded different frames")

    def reader(backend):
        return lambda: [read_frames(path, w, backend) for w in windows]

    t_d, t_p = paired_median(reader("decord"), reader("pyav"), 3 if quick else 5)
    tag = f"{CLIP_FRAMES}-frame clips (stride {CLIP_STRIDE}) at random starts, {VIDEO_SIZE}² H.264, GOP {GOP}"
    rows = [Row(f"video decode {tag}: decord vs PyAV", n_clips / t_d, n_clips / t_p, t_p / t_d, None,
                "clips/s", "each clip opens the file, as the clip dataset does")]
    # Whole-video sequential decode (no seeking): the decoders themselves.
    every = list(range(VIDEO_FRAMES))
    t_d, t_p = paired_median(lambda: read_frames(path, every, "decord"),
                             lambda: read_frames(path, every, "pyav"), 2 if quick else 3)
    rows.append(Row(f"video decode all {VIDEO_FRAMES} frames sequentially: decord vs PyAV",
                    VIDEO_FRAMES / t_d, VIDEO_FRAMES / t_p, t_p / t_d, None, "frames/s"))
    return rows


def write_imagenet_shards(out: Path, n: int, side: int = 32) -> None:
    """``n`` samples as ``selfflow prepare imagenet --flip`` writes them with the SD-VAE, 256 per shard: moments
    ``(8, side, side)`` float32 (mean, then std) and the mirrored image's, and a class label."""
    import webdataset as wds

    from selfflow.core.data.shard_format import npy_bytes

    rng = np.random.default_rng(0)
    for first in range(0, n, 256):
        with wds.TarWriter(str(out / f"shard-{first // 256:06d}.tar")) as sink:
            for i in range(first, min(n, first + 256)):
                mean = rng.standard_normal((4, side, side), dtype=np.float32)
                moments = np.concatenate([mean, np.full_like(mean, 0.1)])
                sink.write({"__key__": f"{i:08d}", "moments.npy": npy_bytes(moments, np.float32),
                            "moments_flip.npy": npy_bytes(moments[..., ::-1], np.float32),
                            "cls": str(i % 1000).encode()})


def imagenet_read_rate(shard_dir: Path, batch: int, workers: int, device: str, batches: int) -> float:
    """Steady samples/s of the trainer's ImageNet stream over ``shard_dir`` (latents drawn from the moments,
    random flip, shuffle buffer) with ``workers`` DataLoader workers, each batch moved to ``device`` as the
    trainer moves it (pinned first on CUDA), over ``batches`` batches after the first (the workers' start-up)."""
    from selfflow.core.data.pinning import batch_to_device, pin_batch, resolve_pin_memory
    from selfflow.image.latent_shards import imagenet_stream

    pin = resolve_pin_memory("auto", torch.device(device))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    stream = iter(imagenet_stream(str(shard_dir), batch, seed=0, rank=0, world_size=1, flip=True,
                                  num_workers=workers))

    def take() -> None:
        b = next(stream)
        batch_to_device(pin_batch(b) if pin else b, device)

    take()
    sync()
    t0 = time.perf_counter()
    for _ in range(batches):
        take()
    sync()
    return batches * batch / (time.perf_counter() - t0)


def bench_shard_read(tmp: Path, quick: bool) -> list[Row]:
    from selfflow.core.data.shard_format import collate_samples, encode_sample, npy_load
    from selfflow.core.data.shard_stream import ShardStream
    from selfflow.core.data.shard_writer import write_shards

    n, batch = (256, 32) if quick else (512, 32)
    shape = (16, 5, 16, 16)  # a Wan-VAE latent of a 17-frame 128² clip, float16
    rng = np.random.default_rng(0)
    latents = [rng.standard_normal(shape).astype(np.float16) for _ in range(n)]
    emb = rng.standard_normal((24, 64)).astype(np.float16)
    items = list(range(n))
    shard_dir, npy_dir = tmp / "shards", tmp / "npy"
    write_shards(items, lambda i: {"latent": latents[i], "emb": emb, "caption": f"sample {i}", "label": i % 10},
                 shard_dir, shard_size=128)
    npy_dir.mkdir()
    for i in items:  # the baseline layout: the same members as loose files, one directory per sample
        d = npy_dir / f"{i:06d}"
        d.mkdir()
        for k, v in encode_sample({"latent": latents[i], "emb": emb, "caption": f"sample {i}",
                                   "label": i % 10}).items():
            (d / k).write_bytes(v.encode() if isinstance(v, str) else v)
    urls = sorted(str(p) for p in shard_dir.glob("*.tar"))

    def read_shards(workers: int = 0):
        stream = iter(ShardStream(urls, batch, collate_samples, num_workers=workers))
        return [next(stream) for _ in range(n // batch)]

    def read_npy():
        dirs = sorted(npy_dir.iterdir())
        out = []
        for b in range(0, n, batch):
            samples = []
            for d in dirs[b:b + batch]:
                samples.append({"latent": torch.from_numpy(npy_load((d / "latent.npy").read_bytes()).astype(np.float32)),
                                "emb": torch.from_numpy(npy_load((d / "emb.npy").read_bytes()).astype(np.float32)),
                                "caption": (d / "txt").read_text(), "label": int((d / "cls").read_text())})
            out.append(collate_samples(samples))
        return out

    t_s, t_n = paired_median(read_shards, read_npy, 3 if quick else 5)
    rows = [Row(f"latent read {n} samples {shape} f16 + caption emb: webdataset tar vs loose .npy files",
                n / t_s, n / t_n, t_n / t_s, ">= 1.0", "samples/s",
                "ShardStream (1 process, no DataLoader workers) vs np.load per file; page cache")]
    # DataLoader workers (each reads its slice of the shards). A worker's start-up (a process importing
    # torch) is paid once per epoch; the steady rate counts from the first batch on. One H100-class GPU
    # consumes ~1,000+ SiT-XL/2 latents/s: compare samples/s per worker with that.
    def steady_rate(workers: int) -> tuple[float, float]:
        stream = iter(ShardStream(urls, batch, collate_samples, num_workers=workers))
        t0 = time.perf_counter()
        next(stream)
        t1 = time.perf_counter()
        for _ in range(n // batch - 1):
            next(stream)
        return t1 - t0, (n - batch) / (time.perf_counter() - t1)

    base_start, base_rate = steady_rate(0)
    for workers in (1, 2):
        start, rate = steady_rate(workers)
        rows.append(Row(f"latent read, steady state: {workers} DataLoader worker(s) vs in-process",
                        rate, base_rate, rate / base_rate, None, "samples/s",
                        f"{rate / workers:.0f} samples/s per worker; first batch after {start:.2f} s "
                        f"(in-process {base_start:.3f} s); {os.cpu_count()} CPU cores"))
    return rows


def bench_data_loading(quick: bool) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="selfflow-bench-") as d:
        tmp = Path(d)
        rows = []
        try:
            rows += bench_video_decode(tmp, quick)
        except ImportError as e:  # selfflow-video not installed
            rows.append(Row(f"video decode: skipped ({e})", 0.0, None, None, None, "clips/s"))
        try:
            rows += bench_shard_read(tmp, quick)
        except ImportError as e:
            rows.append(Row(f"latent shard read: skipped ({e})", 0.0, None, None, None, "samples/s"))
        return rows
