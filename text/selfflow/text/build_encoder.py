"""The text encoder a config names (:class:`TextEncoderOptions`), cached on disk when asked — apart from
:mod:`.encoder` so that the interface does not import its implementations."""

from __future__ import annotations

import torch

from selfflow.core.codec import shapes_only_active

from .cache import CachedTextEncoder
from .encoder import HFTextEncoder, HFTextEncoderShape, TextEncoder, TextEncoderOptions
from .tiny import TinyTextEncoder


def build_text_encoder(options: TextEncoderOptions | dict, device: torch.device | str = "cpu") -> TextEncoder:
    """The encoder ``options`` describe, wrapped in the on-disk cache when ``cache_dir`` is set (under
    ``shapes_only()``, an ``hf`` encoder's shape read from its config.json)."""
    opts = TextEncoderOptions.model_validate(options)
    if opts.kind == "tiny":
        enc: TextEncoder = TinyTextEncoder(opts.dim, opts.max_length)
    else:
        if opts.model_dir is None:
            raise ValueError("text.kind is 'hf' but text.model_dir is not set (a local model directory)")
        if shapes_only_active():
            return HFTextEncoderShape(opts.model_dir, opts.layers, opts.max_length)
        enc = HFTextEncoder(opts.model_dir, opts.layers, opts.max_length, device)
    return CachedTextEncoder(enc, opts.cache_dir) if opts.cache_dir else enc
