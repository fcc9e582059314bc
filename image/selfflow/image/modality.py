"""The image modality: synthetic shapes (embedded default) in pixel space, PNG grids."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from selfflow.core.mmdit import Conditioning
from selfflow.core.modality import Batch, DataStream, Modality
from selfflow.core.registry import register_modality
from selfflow.core.tokens import Tokens, grid_ids

from .grid import save_grid
from .pixel_codec import PixelCodec
from .synthetic_shapes import CLASS_NAMES, render_batch


class ImageOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: Literal["synthetic_shapes"] = "synthetic_shapes"
    codec: Literal["pixel"] = "pixel"
    image_size: int = Field(32, ge=8)
    patch_size: int = Field(4, ge=1)
    data_seed: int = Field(0, description="which synthetic stream (independent of the training seed)")


class SyntheticShapesStream(DataStream):
    """Rank ``r``'s batches of the global stream: step ``n`` covers indices ``[n·B·W + r·B, … + B)``."""

    def __init__(self, batch_size: int, data_seed: int, image_size: int, rank: int, world_size: int):
        self.batch_size, self.data_seed, self.image_size = batch_size, data_seed, image_size
        self.rank, self.world_size = rank, world_size
        self.step = 0

    def __iter__(self) -> Iterator[Batch]:
        while True:
            start = (self.step * self.world_size + self.rank) * self.batch_size
            images, labels = render_batch(self.data_seed, range(start, start + self.batch_size), self.image_size)
            self.step += 1
            yield {"media": images, "labels": labels}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["batch_size"] * state["world_size"] != self.batch_size * self.world_size:
            raise ValueError(f"cannot resume the synthetic stream: global batch was "
                             f"{state['batch_size'] * state['world_size']}, now "
                             f"{self.batch_size * self.world_size}")
        self.step = int(state["step"])


@register_modality
class ImageModality(Modality):
    name = "image"
    Options = ImageOptions
    default_mask_ratio = 0.25

    def __init__(self, options: dict[str, Any] | BaseModel | None = None):
        super().__init__(options)
        self.codec = PixelCodec(self.options.image_size, self.options.patch_size)

    @property
    def token_channels(self) -> int:
        return self.codec.token_channels

    @property
    def num_classes(self) -> int:
        return len(CLASS_NAMES)

    @property
    def class_names(self) -> list[str]:
        return CLASS_NAMES

    @property
    def evaluator(self) -> str | None:
        return "shapes_probe" if self.options.dataset == "synthetic_shapes" else None

    def stream(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> DataStream:
        return SyntheticShapesStream(batch_size, self.options.data_seed, self.options.image_size, rank, world_size)

    def encode(self, batch: Batch, device: torch.device | str) -> tuple[Tokens, Conditioning]:
        tokens = self.codec.to_tokens(batch["media"].to(device))
        return tokens, Conditioning(labels=batch["labels"].to(device))

    def sample_ids(self, n: int, device: torch.device | str) -> torch.Tensor:
        return grid_ids(*self.codec.grid, batch=n, device=device)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.codec.from_tokens(x).clamp(-1, 1)

    def save_samples(self, media: torch.Tensor, labels: torch.Tensor | None, path: Path) -> Path:
        return save_grid(media, Path(path).with_suffix(".png"), labels, self.class_names)
