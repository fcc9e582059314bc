"""3D rotary position embedding over integer ``(t, h, w)`` token ids (FLUX-style, one band per axis)."""

from __future__ import annotations

import torch


def rope_frequencies(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float) -> torch.Tensor:
    """Rotation angles ``(B, L, head_dim / 2)`` for ids ``(B, L, n_axes)``.

    Axis ``a`` owns ``axes_dim[a]`` channels of each head (``sum(axes_dim) == head_dim``), rotated at
    ``theta ** (-2i / axes_dim[a])`` per unit of position along that axis.
    """
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"ids have {ids.shape[-1]} axes but axes_dim has {len(axes_dim)}")
    angles = []
    for axis, dim in enumerate(axes_dim):
        if dim % 2:
            raise ValueError(f"RoPE channels per axis must be even, got {dim} for axis {axis}")
        inv_freq = theta ** (-torch.arange(0, dim, 2, device=ids.device, dtype=torch.float64) / dim)
        angles.append(ids[..., axis, None].to(torch.float64) * inv_freq)
    return torch.cat(angles, dim=-1).float()


def rope_cos_sin(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of :func:`rope_frequencies`, shaped ``(B, 1, L, head_dim / 2)`` for broadcasting."""
    ang = rope_frequencies(ids, axes_dim, theta).unsqueeze(1)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(2i, 2i+1)`` of ``x (B, H, L, D)`` by the given angles."""
    x2 = x.float().unflatten(-1, (-1, 2))
    a, b = x2[..., 0], x2[..., 1]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return out.type_as(x)
