"""CLAP audio embeddings for FAD, through ``transformers`` (never the ``laion_clap`` package, which
downloads tokenizers at import time).

Three variants, as microsoft/fadtk defines them (checkpoint, architecture, rate, window, scaling):

============  =================  ==========================================  =====  ======  ======
paper name    fadtk name         checkpoint (architecture)                   rate   window  output
============  =================  ==========================================  =====  ======  ======
CLAP-A        clap-laion-audio   ``630k-audioset-best.pt`` (HTSAT-tiny)       48 k   10 s    512, L2
CLAP-M        clap-laion-music   ``music_audioset_epoch_15_esc_90.14.pt``     48 k   10 s    512, L2
                                 (HTSAT-base)
CLAP          clap-2023          ``CLAP_weights_2023.pth`` (MS-CLAP, HTSAT)   44.1 k  7 s    1024, raw
============  =================  ==========================================  =====  ======  ======

The paper-name mapping is an inference (fadtk ships exactly these three CLAP embeddings); the
paper text using the labels was not available. Windows are 1 s apart, see ``fad.py``.

Weights are local directories, in one of two layouts:

* a Hugging Face ``ClapModel`` directory (``laion/clap-htsat-unfused`` = ``630k-audioset-best.pt``
  per the LAION authors; ``laion/larger_clap_music`` is believed, not confirmed, to be
  ``music_audioset_epoch_15_esc_90.14.pt``), or the output of transformers' script
  ``convert_clap_original_pytorch_to_hf.py``; only the audio tower and audio projection are used;
* the audio-only directory written by :func:`convert_checkpoint` from the original ``.pt`` /
  ``.pth`` file: ``config.json`` + ``model.safetensors`` of a ``ClapAudioModel``, plus
  ``projection.safetensors`` and ``selfflow_clap.json``. This is the only way to use MS-CLAP, whose
  projection (Linear → GELU → Linear, residual, LayerNorm, no biases) has no ``transformers`` class.

The mel front-end is ``ClapFeatureExtractor`` (numpy STFT, Slaney mel = librosa's, dB with
amin 1e-10, no top_db), configured from the variant, not from any saved preprocessor file. It
matches torchlibrosa's conv STFT up to float round-off (not measured on real weights here).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from selfflow.core.checkpoint import not_a_torch_file, unreadable_torch_file


@dataclass(frozen=True)
class ClapVariant:
    key: str  # metric key
    paper_name: str
    fadtk_name: str
    checkpoint: str
    url: str
    hf_equivalent: str | None
    arch: str
    sample_rate: int
    window_s: int
    hop_s: int
    int16_roundtrip: bool  # LAION's clip(-1,1)·32767 → int16 → /32767 before embedding
    normalize: bool
    projection: str  # "mlp" (LAION: Linear-ReLU-Linear) or "msclap" (residual + LayerNorm)
    hop_length: int = 480
    fft: int = 1024
    mel_bins: int = 64
    fmin: float = 50.0
    fmax: float = 14_000.0


HF_LAION = "https://huggingface.co/lukewys/laion_clap/resolve/main/"
VARIANTS: dict[str, ClapVariant] = {
    "clap_a": ClapVariant("fad_clap_a", "CLAP-A", "clap-laion-audio", "630k-audioset-best.pt",
                          HF_LAION + "630k-audioset-best.pt", "laion/clap-htsat-unfused",
                          "HTSAT-tiny", 48_000, 10, 1, True, True, "mlp"),
    "clap_m": ClapVariant("fad_clap_m", "CLAP-M", "clap-laion-music",
                          "music_audioset_epoch_15_esc_90.14.pt",
                          HF_LAION + "music_audioset_epoch_15_esc_90.14.pt",
                          "laion/larger_clap_music (believed equivalent, unconfirmed)",
                          "HTSAT-base", 48_000, 10, 1, True, True, "mlp"),
    # MS-CLAP's HTSATWrapper ignores the yaml's fmax=8000 and builds its front-end from
    # msclap/models/config.py (44.1 kHz, hop 320, fmax 14000); convert_checkpoint checks the
    # checkpoint's own mel filterbank against these values.
    "clap": ClapVariant("fad_clap", "CLAP", "clap-2023", "CLAP_weights_2023.pth",
                        "https://huggingface.co/microsoft/msclap/resolve/main/CLAP_weights_2023.pth",
                        None, "HTSAT-tiny", 44_100, 7, 1, False, False, "msclap", hop_length=320),
}
ARCHS = {  # HTS-AT sizes of the LAION/MS checkpoints (ClapAudioConfig fields)
    "HTSAT-tiny": {"patch_embeds_hidden_size": 96, "depths": [2, 2, 6, 2], "hidden_size": 768},
    "HTSAT-base": {"patch_embeds_hidden_size": 128, "depths": [2, 2, 12, 2], "hidden_size": 1024},
}


def weights_help(v: ClapVariant) -> str:
    hf = f" or the Hugging Face directory {v.hf_equivalent}" if v.hf_equivalent else ""
    return (f"{v.paper_name} ({v.fadtk_name}) needs a local directory converted from {v.checkpoint} "
            f"(published at {v.url}) with `selfflow eval fad --convert-from {v.checkpoint} "
            f"--convert-to DIR --variant {next(k for k, x in VARIANTS.items() if x == v)}`{hf}")


def make_feature_extractor(v: ClapVariant) -> Any:
    """``ClapFeatureExtractor`` with the variant's front-end (``rand_trunc`` + ``repeatpad``,
    which never crop nor pad here: every window is exactly ``window_s`` long)."""
    from transformers import ClapFeatureExtractor

    return ClapFeatureExtractor(feature_size=v.mel_bins, sampling_rate=v.sample_rate,
                                hop_length=v.hop_length, max_length_s=v.window_s,
                                fft_window_size=v.fft, frequency_min=v.fmin,
                                frequency_max=v.fmax, truncation="rand_trunc", padding="repeatpad")


class MSClapProjection(nn.Module):
    """MS-CLAP's audio projection: ``LayerNorm(e + Linear(GELU(e)))`` with ``e = Linear(x)``."""

    def __init__(self, d_in: int = 768, d_out: int = 1024) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_in, d_out, bias=False)
        self.linear2 = nn.Linear(d_out, d_out, bias=False)
        self.layer_norm = nn.LayerNorm(d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.linear1(x)
        return self.layer_norm(e + self.linear2(F.gelu(e)))


class ClapAudioEmbedder(nn.Module):
    """Waveform windows → CLAP audio embeddings (HTS-AT tower + projection [+ L2 norm])."""

    def __init__(self, audio_model: nn.Module, projection: nn.Module, variant: ClapVariant,
                 weights: str = "in-memory model") -> None:
        super().__init__()
        self.audio_model = audio_model.eval().float()
        self.projection = projection.eval().float()
        self.variant = variant
        self.weights = weights
        self.feature_extractor = make_feature_extractor(variant)

    @property
    def window_samples(self) -> int:
        return self.variant.window_s * self.variant.sample_rate

    def features(self, windows: list[np.ndarray]) -> np.ndarray:
        """The :class:`~selfflow.eval.extractor.FeatureExtractor` view: B windows → (B, D) float64."""
        return self(np.stack(windows))

    @torch.no_grad()
    def forward(self, windows: np.ndarray) -> np.ndarray:
        """(B, window_samples) float waveforms at the variant's rate → (B, D) float64."""
        windows = np.asarray(windows, dtype=np.float32)
        if windows.ndim != 2 or windows.shape[1] != self.window_samples:
            raise ValueError(f"expected windows (B, {self.window_samples}), got {windows.shape}")
        feats = self.feature_extractor(list(windows), sampling_rate=self.variant.sample_rate,
                                       return_tensors="pt")
        device = next(self.audio_model.parameters()).device
        out = self.audio_model(input_features=feats["input_features"].to(device))
        emb = self.projection(out.pooler_output)
        if self.variant.normalize:
            emb = F.normalize(emb, dim=-1)
        return emb.double().cpu().numpy()


# ----------------------------------------------------------------------------------------------
# loading


def load_clap(path: str | os.PathLike, variant: str) -> ClapAudioEmbedder:
    """Load a variant (``clap``, ``clap_m``, ``clap_a``) from a local directory (see module doc)."""
    v = VARIANTS[variant]
    root = Path(path)
    cfg_file = root / "config.json"
    if root.is_file():  # the published .pt/.pth itself, most likely: it named "<file>/config.json" as missing
        raise ValueError(f"--clap {root} is a file; CLAP weights are a directory. {weights_help(v)}.")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"CLAP weights not found: {cfg_file} is missing. {weights_help(v)}.")
    cfg = json.loads(cfg_file.read_text())
    meta_file = root / "selfflow_clap.json"
    if meta_file.is_file():  # our audio-only layout
        from safetensors.torch import load_file
        from transformers import ClapAudioModel

        meta = json.loads(meta_file.read_text())
        if meta["variant"] != variant:
            raise ValueError(f"{root} was converted for variant {meta['variant']!r}, not {variant!r}")
        audio = ClapAudioModel.from_pretrained(str(root), local_files_only=True)
        proj = _make_projection(v, audio.config, meta["projection_dim"])
        proj.load_state_dict(load_file(str(root / "projection.safetensors")))
        return ClapAudioEmbedder(audio, proj, v, weights=str(root))
    if v.projection != "mlp" or cfg.get("model_type") != "clap":
        raise ValueError(f"{root} is not a CLAP directory usable for {v.paper_name}. {weights_help(v)}.")
    from transformers import ClapModel

    model = ClapModel.from_pretrained(str(root), local_files_only=True)
    return ClapAudioEmbedder(model.audio_model, model.audio_projection, v, weights=str(root))


def _make_projection(v: ClapVariant, audio_config: Any, projection_dim: int) -> nn.Module:
    if v.projection == "msclap":
        return MSClapProjection(audio_config.hidden_size, projection_dim)
    from transformers.models.clap.modeling_clap import ClapProjectionLayer

    audio_config.projection_dim = projection_dim
    audio_config.projection_hidden_act = "relu"
    return ClapProjectionLayer(audio_config)


# ----------------------------------------------------------------------------------------------
# conversion of the original checkpoints (no laion_clap / msclap needed)

# HTS-AT (LAION and MS-CLAP share RetroCirce's code) → transformers ClapAudioEncoder names, the
# same substitutions transformers' convert_clap_original_pytorch_to_hf.py applies, in order.
_RENAMES = (("attn", "attention.self"), ("self.proj", "output.dense"),
            ("attention.self_mask", "attn_mask"), ("mlp.fc1", "intermediate.dense"),
            ("mlp.fc2", "output.dense"), ("norm1", "layernorm_before"),
            ("norm2", "layernorm_after"), ("bn0", "batch_norm"))
_DROPPED = ("spectrogram_extractor.", "logmel_extractor.", "tscam_conv.", "head.", "attn_mask")
PREFIXES = {"mlp": ("audio_branch.", "audio_projection."),
            "msclap": ("audio_encoder.base.htsat.", "audio_encoder.projection.")}


def rename_htsat(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HTS-AT tower state_dict (keys relative to the tower) → ``ClapAudioModel`` keys; splits
    fused ``qkv`` into query/key/value and drops the spectrogram, mel and classifier weights."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(_DROPPED) or key.endswith(_DROPPED):
            continue
        new = key
        for old, rep in _RENAMES:
            new = new.replace(old, rep)
        new = "audio_encoder." + new
        if ".qkv." in new:
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[new.replace("qkv", name)] = part.clone()
        else:
            out[new] = value
    return out


def infer_htsat_config(tower: dict[str, torch.Tensor]) -> dict[str, Any]:
    """HTS-AT sizes read from the (renamed) weights: width, blocks and heads per stage, window.
    For the released checkpoints this gives ``ARCHS[variant.arch]``."""
    embed = int(tower["audio_encoder.patch_embed.proj.weight"].shape[0])
    depths: list[int] = []
    heads: list[int] = []
    window = 0
    for stage in range(16):
        tables = [t for k, t in tower.items() if k.startswith(f"audio_encoder.layers.{stage}.blocks.")
                  and k.endswith("relative_position_bias_table")]
        if not tables:
            break
        depths.append(len(tables))
        heads.append(int(tables[0].shape[1]))
        window = (math.isqrt(int(tables[0].shape[0])) + 1) // 2
    return {"patch_embeds_hidden_size": embed, "depths": depths, "num_attention_heads": heads,
            "window_size": window, "hidden_size": embed * 2 ** (len(depths) - 1)}


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    try:
        ck = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # pickled extras that weights_only=True refuses — or not a checkpoint
        if not_a_torch_file(path):
            raise unreadable_torch_file(path, err, "CLAP checkpoint") from err
        raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True) ({err}). "
                         "Re-save its state_dict on a trusted machine: "
                         "torch.save(torch.load(p, weights_only=False), p)") from err
    except Exception as err:  # truncated, or not a PyTorch file at all
        raise unreadable_torch_file(path, err, "CLAP checkpoint") from err
    for key in ("state_dict", "model"):
        if isinstance(ck, dict) and isinstance(ck.get(key), dict):
            ck = ck[key]
    return {k.removeprefix("module."): v for k, v in ck.items() if isinstance(v, torch.Tensor)}


def check_mel_filters(state: dict[str, torch.Tensor], v: ClapVariant, prefix: str) -> None:
    """Compare the checkpoint's torchlibrosa mel matrix (if stored) with our front-end's."""
    mel = state.get(prefix + "logmel_extractor.melW")
    if mel is None:
        return
    ours = make_feature_extractor(v).mel_filters_slaney
    if mel.shape != ours.shape or not np.allclose(mel.double().numpy(), ours, atol=1e-5):
        raise ValueError(f"the checkpoint's mel filterbank does not match {v.paper_name}'s front-end "
                         f"(rate {v.sample_rate}, fmin {v.fmin}, fmax {v.fmax}, {v.mel_bins} mels)")


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, variant: str) -> Path:
    """Convert an original LAION ``.pt`` or MS-CLAP ``.pth`` into the audio-only directory that
    :func:`load_clap` reads. Every tower and projection weight must be found (strict)."""
    from safetensors.torch import save_file
    from transformers import ClapAudioConfig, ClapAudioModel

    v = VARIANTS[variant]
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"checkpoint not found: {src}. {v.checkpoint} is published at {v.url}")
    state = _read_checkpoint(src)
    tower_prefix, proj_prefix = PREFIXES[v.projection]
    check_mel_filters(state, v, tower_prefix)
    tower = rename_htsat({k[len(tower_prefix):]: t for k, t in state.items()
                          if k.startswith(tower_prefix)})
    proj_state = {k[len(proj_prefix):]: t for k, t in state.items() if k.startswith(proj_prefix)}
    if v.projection == "mlp":  # Sequential(Linear, ReLU, Linear)
        proj_state = {k.replace("0.", "linear1.", 1) if k.startswith("0.") else
                      k.replace("2.", "linear2.", 1): t for k, t in proj_state.items()}
    if not tower or not proj_state:
        raise ValueError(f"{src}: no keys under {tower_prefix!r} / {proj_prefix!r}; is it the "
                         f"{v.checkpoint} checkpoint?")
    projection_dim = int(next(t for k, t in proj_state.items() if k.startswith("linear1")).shape[0])
    sizes = infer_htsat_config(tower)
    expected = ARCHS[v.arch]
    if any(sizes[k] != (list(x) if isinstance(x, list) else x) for k, x in expected.items()):
        warnings.warn(f"{src}: HTS-AT sizes {sizes} are not those of {v.arch} {expected}; is it "
                      f"really {v.checkpoint}?", stacklevel=2)
    config = ClapAudioConfig(**sizes, num_mel_bins=v.mel_bins, enable_fusion=False,
                             projection_dim=projection_dim)
    audio = ClapAudioModel(config)
    missing, unexpected = audio.load_state_dict(tower, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    proj = _make_projection(v, config, projection_dim)
    p_missing, p_unexpected = proj.load_state_dict(proj_state, strict=False)
    if missing or unexpected or p_missing or p_unexpected:
        raise ValueError(f"{src} does not fit {v.arch} + {v.projection} projection: missing "
                         f"{(missing + p_missing)[:6]}, unexpected {(unexpected + p_unexpected)[:6]}")
    dst.mkdir(parents=True, exist_ok=True)
    audio.save_pretrained(str(dst))
    save_file({k: t.contiguous() for k, t in proj.state_dict().items()},
              str(dst / "projection.safetensors"))
    meta = {"variant": variant, "projection_dim": projection_dim, "source": src.name,
            "protocol": asdict(v)}
    (dst / "selfflow_clap.json").write_text(json.dumps(meta, indent=2) + "\n")
    return dst
