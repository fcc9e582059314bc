"""Throughput of the media extractors (DINOv2, CLIP, I3D, CLAP) on tiny random models, CPU fp32.

The numbers measure our pipelines (preprocessing + batching + forward), not the real backbones:
the networks are tiny, so preprocessing dominates. Targets need real weights and a device.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from torch import nn


def _rate(fn: Callable[[], Any], items: int, min_seconds: float = 1.0) -> float:
    fn()  # warm-up
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += items
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return n / elapsed


def _row(name: str, ours: float, unit: str) -> dict[str, Any]:
    return {"name": name, "ours": round(ours, 2), "baseline": None, "ratio": None,
            "target": None, "unit": unit}


def _images(n: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def bench_dinov2() -> dict[str, Any]:
    from transformers import Dinov2Config, Dinov2Model

    from selfflow.eval.dinov2 import DinoV2Features, use_official_pos_embed

    model = use_official_pos_embed(Dinov2Model(Dinov2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        patch_size=14, image_size=518)).eval())
    ext = DinoV2Features(model, batch_size=16, progress=False)
    imgs = _images(16, 256, 256)
    return _row("dinov2 tiny (256px -> 224, PIL bicubic)", _rate(lambda: ext(imgs), 16), "images/s")


def bench_clip() -> list[dict[str, Any]]:
    from transformers import CLIPConfig, CLIPModel

    from selfflow.eval.clip_score import ClipScorer

    cfg = CLIPConfig(text_config={"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 2, "num_attention_heads": 2,
                                  "bos_token_id": 510, "eos_token_id": 511, "pad_token_id": 511},
                     vision_config={"hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 2, "num_attention_heads": 2,
                                    "image_size": 224, "patch_size": 32}, projection_dim=16)
    model = CLIPModel(cfg).eval()

    def tokenizer(texts: list[str], **_: Any) -> dict[str, torch.Tensor]:  # ids = bytes, fixed 32
        ids = torch.tensor([[min(b, 511) for b in t.encode()[:32].ljust(32)] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    scorer = ClipScorer(model, tokenizer, batch_size=16, progress=False)
    imgs = _images(16, 512, 384)
    texts = [f"a photo of object number {i}" for i in range(64)]
    return [_row("clip tiny images (512x384 -> 224 crop)", _rate(lambda: scorer.image_features(imgs), 16),
                 "images/s"),
            _row("clip tiny text", _rate(lambda: scorer.text_features(texts), 64), "prompts/s")]


class _TinyI3D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 16, 3, stride=(1, 2, 2), padding=1)
        self.head = nn.Conv3d(16, 400, 1)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        h = x.float()
        if rescale:
            h = h / 255.0 * 2.0 - 1.0
        if resize:
            h = nn.functional.interpolate(h, size=(h.shape[2], 64, 64), mode="trilinear")
        h = torch.relu(self.conv(h)).mean((3, 4), keepdim=True)
        out = self.head(h).flatten(2).mean(2)
        return out if return_features else out.softmax(1)


def bench_i3d() -> dict[str, Any]:
    from selfflow.eval.i3d import I3DFeatures

    det = torch.jit.script(_TinyI3D().eval())
    ext = I3DFeatures(det, batch_size=8, progress=False)
    clips = list(np.random.default_rng(0).integers(0, 256, (8, 16, 128, 128, 3), dtype=np.uint8))
    return _row("i3d torchscript stand-in (16x128x128 clips)", _rate(lambda: ext(clips), 8),
                "clips/s")


def bench_clap() -> dict[str, Any]:
    from transformers import ClapAudioConfig, ClapAudioModel
    from transformers.models.clap.modeling_clap import ClapProjectionLayer

    from selfflow.eval.clap import VARIANTS, ClapAudioEmbedder

    cfg = ClapAudioConfig(patch_embeds_hidden_size=8, depths=[1, 1, 1, 1], hidden_size=64,
                          num_attention_heads=[1, 1, 2, 2], projection_dim=16)
    emb = ClapAudioEmbedder(ClapAudioModel(cfg), ClapProjectionLayer(cfg), VARIANTS["clap_a"])
    wins = np.random.default_rng(0).uniform(-0.5, 0.5, (4, 480_000)).astype(np.float32)
    return _row("clap tiny (10 s windows at 48 kHz, mel front-end)", _rate(lambda: emb(wins), 4),
                "windows/s")


def bench_extractors() -> list[dict[str, Any]]:
    """One row per extractor: ``{name, ours, baseline, ratio, target, unit}`` (features/s)."""
    torch.manual_seed(0)
    with torch.no_grad():
        return [bench_dinov2(), *bench_clip(), bench_i3d(), bench_clap()]


if __name__ == "__main__":
    for row in bench_extractors():
        print(f"{row['name']:55s} {row['ours']:10.2f} {row['unit']}")
