"""Convert SongBloom's audio VAE (stable-audio-tools layout) to diffusers ``AutoencoderOobleck``.

SongBloom ships ``stable_audio_1920_vae.json`` and a ``state_dict`` of a stable-audio-tools
``AudioAutoencoder`` (Oobleck encoder/decoder of ``nn.Sequential`` ``layers``, VAE bottleneck without
weights). diffusers' class holds the same network under other names, *provided* the config uses Snake
activations without anti-aliasing, no final tanh, a transposed-conv decoder and an encoder output of
``channels`` (split into mean and scale) — asserted here, since diffusers cannot express the other options.

Key map (``i`` = block, ``j`` = residual unit; Snake ``alpha``/``beta`` reshape ``(C,)`` → ``(1, C, 1)``):

- ``encoder.layers.0`` → ``encoder.conv1``; block ``layers.{i+1}.layers.{j}.layers.{0,1,2,3}`` →
  ``block.{i}.res_unit{j+1}.{snake1,conv1,snake2,conv2}``, ``.layers.3`` → ``snake1``, ``.layers.4`` →
  ``conv1``; the last two layers → ``snake1``, ``conv2``.
- ``decoder.layers.0`` → ``decoder.conv1``; block ``.layers.0`` → ``snake1``, ``.layers.1`` → ``conv_t1``,
  ``.layers.{2,3,4}`` → ``res_unit{1,2,3}``; the last two layers → ``snake1``, ``conv2``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

_UNIT = ("snake1", "conv1", "snake2", "conv2")


def diffusers_config(sat: dict[str, Any]) -> dict[str, Any]:
    """stable-audio-tools autoencoder config (the JSON) → ``AutoencoderOobleck`` constructor arguments."""
    model = sat.get("model", sat)
    enc, dec = model["encoder"]["config"], model["decoder"]["config"]
    checks = {
        "encoder/decoder type oobleck": model["encoder"].get("type") == model["decoder"].get("type") == "oobleck",
        "use_snake": enc.get("use_snake", False) and dec.get("use_snake", False),
        "final_tanh false": dec.get("final_tanh", True) is False,
        "no antialias_activation": not enc.get("antialias_activation") and not dec.get("antialias_activation"),
        "no use_nearest_upsample": not dec.get("use_nearest_upsample"),
        "encoder latent_dim == channels": enc["latent_dim"] == enc["channels"],
        "decoder latent_dim == channels / 2": 2 * dec["latent_dim"] == enc["latent_dim"],
        "same strides and c_mults": enc["strides"] == dec["strides"] and enc["c_mults"] == dec["c_mults"],
        "vae bottleneck": model.get("bottleneck", {}).get("type", "vae") == "vae",
    }
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raise ValueError(f"this VAE config cannot be hosted by diffusers AutoencoderOobleck: {failed} fail")
    return dict(encoder_hidden_size=enc["channels"], downsampling_ratios=list(enc["strides"]),
                channel_multiples=list(enc["c_mults"]), decoder_channels=dec["channels"],
                decoder_input_channels=dec["latent_dim"], audio_channels=enc["in_channels"],
                sampling_rate=sat.get("sample_rate", 48000))


def _rename(key: str, n_blocks: int) -> str:
    side, rest = key.split(".", 1)
    m = re.match(r"layers\.(\d+)\.(.*)", rest)
    if m is None:
        raise KeyError(f"unexpected key {key!r}")
    i, tail = int(m.group(1)), m.group(2)
    if i == 0:
        return f"{side}.conv1.{tail}"
    if i == n_blocks + 1:
        return f"{side}.snake1.{tail}"
    if i == n_blocks + 2:
        return f"{side}.conv2.{tail}"
    b = i - 1
    m = re.match(r"layers\.(\d+)\.(.*)", tail)
    k, tail = int(m.group(1)), m.group(2)
    units = (0, 1, 2) if side == "encoder" else (2, 3, 4)
    if k in units:
        u = re.match(r"layers\.(\d+)\.(.*)", tail)
        return f"{side}.block.{b}.res_unit{units.index(k) + 1}.{_UNIT[int(u.group(1))]}.{u.group(2)}"
    name = {("encoder", 3): "snake1", ("encoder", 4): "conv1", ("decoder", 0): "snake1",
            ("decoder", 1): "conv_t1"}[(side, k)]
    return f"{side}.block.{b}.{name}.{tail}"


def convert_state_dict(sd: dict[str, torch.Tensor], n_blocks: int) -> dict[str, torch.Tensor]:
    """stable-audio-tools ``AudioAutoencoder`` weights → ``AutoencoderOobleck`` weights."""
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("autoencoder.")
        if not key.startswith(("encoder.", "decoder.")):
            continue  # bottleneck / pretransform: no weights in a VAE bottleneck
        key = key.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v")
        if key.endswith((".alpha", ".beta")) and value.ndim == 1:
            value = value.view(1, -1, 1)
        out[_rename(key, n_blocks)] = value
    return out


def convert_checkpoint(config_json: str | Path, ckpt: str | Path, out_dir: str | Path) -> Path:
    """SongBloom's ``stable_audio_1920_vae.json`` + ``.ckpt`` → a diffusers-format directory."""
    from diffusers import AutoencoderOobleck

    sat = json.loads(Path(config_json).read_text())
    cfg = diffusers_config(sat)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    vae = AutoencoderOobleck(**cfg)
    vae.load_state_dict(convert_state_dict(state, len(cfg["downsampling_ratios"])), strict=True)
    vae.save_pretrained(out_dir)
    return Path(out_dir)


if __name__ == "__main__":  # python -m selfflow.audio.songbloom CONFIG CKPT OUT_DIR
    print(convert_checkpoint(*sys.argv[1:4]))
