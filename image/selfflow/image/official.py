"""The released Self-Flow ImageNet checkpoint, and SiT / DiT / REPA checkpoints, as our :class:`DiT`.

``load_official_selfflow(path)`` builds the official configuration (SiT-XL/2 per-token DiT, 1001-row label
table with null id 1000, learned-sigma head, projector 1152→2304→1152) and loads the weights **strictly**:
any missing, unexpected or mis-shaped key is an error that names it and the file. The returned model's
``model(x, ids, t, labels)`` equals the official ``forward(x, timesteps=t, vector=labels)`` for tokens
``x (B, 256, 16)`` and RF timesteps ``t`` of shape ``(B,)`` or ``(B, 256)``.

Checkpoint files may hold the state dict directly or under ``ema`` / ``model`` / ``state_dict``; ``module.``
(DDP) and ``_orig_mod.`` (torch.compile) prefixes are stripped. ``convert_sit_checkpoint`` adapts SiT, DiT
and REPA checkpoints: the conv patch embedding becomes the Linear one, REPA's ``projectors.*`` are dropped and
the Self-Flow projector stays freshly initialised.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

import torch

from selfflow.core.dit import DiT, DiTConfig

WeightsKey = Literal["auto", "ema", "model", "state_dict", "raw"]
Source = Literal["sit", "repa", "dit"]
_STRIP = ("module.", "_orig_mod.")


def official_config(**overrides: Any) -> DiTConfig:
    """The configuration of the released checkpoint (``sample.py::load_model`` of the official repo)."""
    base = dict(preset="XL/2", num_classes=1000, learn_sigma=True, time_input="sit", projector_mult=2.0,
                patch_size=2, grid_size=16, modalities={"image": 16})
    return DiTConfig(**{**base, **overrides})


def check_checkpoint_file(path: str | Path) -> Path:
    """``path`` as a Path; a FileNotFoundError saying where the released weights are when it is no file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (the released Self-Flow weights are "
                                "linked from github.com/black-forest-labs/Self-Flow)")
    return path


def read_checkpoint(path: str | Path) -> Any:
    """Load ``.safetensors`` or a torch pickle without running pickled code (argparse namespaces, as in
    SiT/REPA checkpoints, are allowed)."""
    path = check_checkpoint_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"cannot load {path} safely (weights_only=True): {e}") from e


def unwrap_state_dict(obj: Any, weights: WeightsKey = "auto", source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: ``auto`` prefers ``ema``, then ``model``, then ``state_dict``, else the
    object itself; prefixes ``module.`` and ``_orig_mod.`` are removed wherever they occur."""
    if not isinstance(obj, dict):
        raise ValueError(f"{source} holds a {type(obj).__name__}, not a state dict")
    if weights == "auto":
        key = next((k for k in ("ema", "model", "state_dict") if isinstance(obj.get(k), dict)), None)
        sd = obj[key] if key else obj
    elif weights == "raw":
        sd = obj
    else:
        if not isinstance(obj.get(weights), dict):
            raise KeyError(f"{source} has no {weights!r} entry (top-level keys: {sorted(obj)[:10]})")
        sd = obj[weights]
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{source}: entry {k!r} is a {type(v).__name__}, not a tensor")
        for prefix in _STRIP:
            k = k.replace(prefix, "")
        out[k] = v
    return out


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str,
                     allow_missing: tuple[str, ...] = ()) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped key (strict loading, loud)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd and not k.startswith(allow_missing)]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
             for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        lines = [f"{source} does not match the model:"]
        lines += [f"  missing key {k}" for k in missing]
        lines += [f"  unexpected key {k}" for k in unexpected]
        lines += [f"  wrong shape {w}" for w in wrong]
        raise ValueError("\n".join(lines))


def build_from_state_dict(cfg: DiTConfig, sd: dict[str, torch.Tensor], source: str,
                          device: torch.device | str = "cpu", allow_missing: tuple[str, ...] = ()) -> DiT:
    """A :class:`DiT` holding ``sd`` (fp32), built on the meta device so no random init is paid for."""
    with torch.device("meta"):
        model = DiT(cfg)
    check_state_dict(model, sd, source, allow_missing)
    if model.projector is not None and not any(k.startswith("projector.") for k in sd):
        sd = {**sd, **fresh_projector_state(cfg)}  # the source never had one (allowed by allow_missing)
    model.load_state_dict({k: v.to(device=device, dtype=torch.float32) for k, v in sd.items()},
                          strict=True, assign=True)
    model.pos_embed.requires_grad_(False)
    return model.eval()


def fresh_projector_state(cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """A newly initialised projector (Xavier, zero bias) under ``projector.*`` keys."""
    with torch.device("meta"):
        shell = DiT(cfg.model_copy(update={"depth": 1}))
    proj = shell.projector.to_empty(device="cpu")
    for m in proj.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            torch.nn.init.zeros_(m.bias)
    return {f"projector.{k}": v for k, v in proj.state_dict().items()}


def load_official_selfflow(path: str | Path, device: torch.device | str = "cpu", weights: WeightsKey = "auto",
                           config: DiTConfig | None = None) -> DiT:
    """The released Self-Flow model from ``path``, strictly loaded (see the module docstring)."""
    sd = unwrap_state_dict(read_checkpoint(path), weights, str(path))
    return build_from_state_dict(config or official_config(), sd, str(path), device)


def convert_sit_checkpoint(sd: dict[str, torch.Tensor], source: Source = "sit", **overrides: Any
                           ) -> tuple[dict[str, torch.Tensor], DiTConfig]:
    """SiT / DiT / REPA weights → our key layout and the matching :class:`DiTConfig` (inferred from shapes).

    ``source`` sets the time convention: ``sit`` (SiT, official Self-Flow: embeds SiT time, predicts
    data − noise) and ``repa`` (embeds RF time, predicts noise − data) are flow models; ``dit`` weights are a
    DDPM noise predictor, converted for initialisation only (its outputs are not velocities). Head counts
    are not visible in shapes: the S/B/L/XL convention (64-wide heads, 16 for L and XL) is assumed unless
    ``num_heads`` is given in ``overrides``.
    """
    sd = dict(sd)
    w = sd.get("x_embedder.proj.weight")
    if w is None:
        raise ValueError("not a SiT/DiT checkpoint: x_embedder.proj.weight is missing")
    if w.ndim == 4:  # conv (D, c, p, p) → linear (D, c·p·p) in (c, p, q) order, the token layout
        sd["x_embedder.proj.weight"] = w.reshape(w.shape[0], -1)
        patch = w.shape[-1]
    else:
        patch = 2
    sd = {k: v for k, v in sd.items() if not k.startswith("projectors.")}  # REPA's alignment MLPs
    hidden = sd["x_embedder.proj.weight"].shape[0]
    channels = sd["x_embedder.proj.weight"].shape[1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    out = sd["final_layer.linear.weight"].shape[0]
    num_classes = sd["y_embedder.embedding_table.weight"].shape[0] - 1 if "y_embedder.embedding_table.weight" in sd else 0
    grid = round(sd["pos_embed"].shape[1] ** 0.5)
    heads = 16 if hidden in (1024, 1152) else hidden // 64
    cfg = DiTConfig(**{**dict(hidden_size=hidden, num_heads=heads, depth=depth, patch_size=patch,
                              grid_size=grid, learn_sigma=out == 2 * channels,
                              time_input="rf" if source == "repa" else "sit", num_classes=num_classes,
                              modalities={"image": channels}), **overrides})
    return sd, cfg


def load_converted(path: str | Path, source: Source = "sit", device: torch.device | str = "cpu",
                   weights: WeightsKey = "auto", **overrides: Any) -> DiT:
    """A SiT/DiT/REPA checkpoint as our DiT, with a fresh Self-Flow projector."""
    raw = unwrap_state_dict(read_checkpoint(path), weights, str(path))
    sd, cfg = convert_sit_checkpoint(raw, source, **overrides)
    return build_from_state_dict(cfg, sd, str(path), device, allow_missing=("projector.",))
