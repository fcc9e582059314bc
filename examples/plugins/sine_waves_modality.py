"""A modality plug-in that lives outside core: class-conditional 1-D signals, registered as ``data.modality:
sine_waves``.

It shows the whole :class:`selfflow.core.modality.Modality` contract on the smallest data there is — two-channel
sine waves whose frequency is the class — with synthetic samples made on the fly (no files, no codec). A
package exposes it with an entry point, e.g. in its ``pyproject.toml``::

    [project.entry-points."selfflow.modalities"]
    sine_waves = "sine_waves_modality:SineWaves"

(the entry point's name must be the class's ``name``), after which ``data: {modality: sine_waves, options:
{length: 64, patch: 4}}`` trains with ``selfflow train``, and ``selfflow sample`` / ``export`` /
``selfflow.core.load`` work on the run. What each part does:

- ``Options``: the ``data.options`` section, validated (unknown keys are errors naming them);
- ``stream``: the training data for one rank; :class:`~selfflow.core.data.indexed_stream.IndexedStream` makes a
  synthetic dataset resumable and rank-invariant from a ``render(indices)`` function;
- ``encode`` / ``decode``: media ↔ tokens ``(B, L, C)``, here patches of ``patch`` samples of both channels;
- ``sample_ids``: each token's ``(t, h, w)`` position — a 1-D signal runs along ``t`` (so it needs a backbone
  with 3-D positions, the default MMDiT; the DiT's 2-D table refuses it);
- ``save_samples`` / ``write_sample``: what ``selfflow sample`` writes (a plot of the grid; one ``.npy`` per
  sample with ``--out-dir``: only the returned file of ``write_sample`` is kept).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from selfflow.core.data.indexed_stream import IndexedStream
from selfflow.core.modality import Batch, DataStream, Modality
from selfflow.core.tokens import Conditioning, Tokens, grid_ids

FREQUENCIES = (1, 2, 3, 5)  # cycles per signal: the classes


class SineWavesOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: Literal["sine_waves"] = "sine_waves"
    length: int = Field(64, ge=4, description="samples per signal")
    patch: int = Field(4, ge=1, description="samples per token (must divide length)")
    noise: float = Field(0.05, ge=0, description="std of the noise added to each training signal")
    data_seed: int = Field(0, description="seed of the synthetic signals (sample i is drawn from (seed, i))")


def render(indices: range, o: SineWavesOptions) -> Batch:
    """Signals ``(B, 2, length)`` in [-1, 1] (sine and cosine of a random phase) and their class labels."""
    media, labels = [], []
    x = torch.arange(o.length) / o.length
    for i in indices:
        g = torch.Generator().manual_seed(o.data_seed * 1_000_003 + i)
        k = i % len(FREQUENCIES)
        phase = float(torch.rand((), generator=g)) * 2 * math.pi
        angle = 2 * math.pi * FREQUENCIES[k] * x + phase
        wave = 0.8 * torch.stack([torch.sin(angle), torch.cos(angle)])
        media.append(wave + o.noise * torch.randn(wave.shape, generator=g))
        labels.append(k)
    return {"media": torch.stack(media), "labels": torch.tensor(labels)}


class SineWaves(Modality):
    name = "sine_waves"
    Options = SineWavesOptions
    default_mask_ratio = 0.25

    def __init__(self, options=None):
        super().__init__(options)
        if self.options.length % self.options.patch:
            raise ValueError(f"data.options.patch={self.options.patch} must divide data.options.length="
                             f"{self.options.length}")

    @property
    def tokens(self) -> int:
        return self.options.length // self.options.patch

    @property
    def token_channels(self) -> int:
        return 2 * self.options.patch

    @property
    def num_classes(self) -> int:
        return len(FREQUENCIES)

    @property
    def class_names(self) -> list[str]:
        return [f"{f} Hz" for f in FREQUENCIES]

    def stream(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> DataStream:
        return IndexedStream(lambda indices: render(indices, self.options), batch_size, rank, world_size)

    def encode(self, batch: Batch, device: torch.device | str) -> tuple[Tokens, Conditioning]:
        media = batch["media"].to(device)  # (B, 2, length)
        b = media.shape[0]
        x = media.reshape(b, 2, self.tokens, self.options.patch).permute(0, 2, 1, 3).reshape(b, self.tokens, -1)
        return Tokens(x, self.sample_ids(b, device)), Conditioning(labels=batch["labels"].to(device))

    def sample_ids(self, n: int, device: torch.device | str) -> torch.Tensor:
        return grid_ids(self.tokens, 1, 1, batch=n, device=device)  # (n, L, 3): positions along t

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]  # (B, L, 2·patch) → (B, 2, length)
        return x.reshape(b, self.tokens, 2, self.options.patch).permute(0, 2, 1, 3).reshape(b, 2, -1).clamp(-1, 1)

    def save_samples(self, media: torch.Tensor, labels: torch.Tensor | None, path: Path) -> Path:
        """One PNG: a row per sample, both channels, titled with its class."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from selfflow.core.atomic import atomic_path

        fig, axes = plt.subplots(len(media), 1, figsize=(4, 0.9 * len(media) + 0.3), squeeze=False)
        for i, (ax, wave) in enumerate(zip(axes[:, 0], media.float().cpu())):
            ax.plot(wave[0], lw=1)
            ax.plot(wave[1], lw=1)
            ax.set_ylim(-1.1, 1.1)
            ax.set_axis_off()
            if labels is not None:
                ax.set_title(self.class_names[int(labels[i])], fontsize=7)
        fig.tight_layout()
        out = Path(path).with_suffix(".png")
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=80, format="png")
        plt.close(fig)
        return out

    def write_sample(self, media: torch.Tensor, label: int | None, path: Path) -> Path:
        out = Path(path).with_suffix(".npy")
        np.save(out, media.float().cpu().numpy())  # (2, length)
        return out
