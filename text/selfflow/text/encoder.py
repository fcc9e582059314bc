"""Text encoders behind one interface: captions → padded embeddings ``(B, Lc, Dc)`` and a mask ``(B, Lc)``.

Two implementations:

- :class:`~selfflow.text.tiny.TinyTextEncoder` — built in, deterministic, no downloads (embedded runs);
- :class:`HFTextEncoder` — any ``transformers`` encoder or decoder LM (T5/umT5, Qwen, Mistral …) read from
  a local directory with ``HF_HUB_OFFLINE=1``; hidden states of several layers are stacked on the feature
  axis (as FLUX.2 does), so ``Dc = hidden_size · len(layers)``.

Encoders return *unpadded* per-caption embeddings (:meth:`TextEncoder.encode_unpadded`), which is what the
on-disk cache and the shards store; :func:`pad_embeddings` makes a batch;
:func:`selfflow.text.build_encoder.build_text_encoder` builds the one a config names.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from selfflow.core.modality import cache_location, model_location
from selfflow.core.model_folders import files_fingerprint

# encoder-decoder families whose encoder half is a class of its own in transformers
_ENCODER_ONLY = {"t5": "T5EncoderModel", "umt5": "UMT5EncoderModel", "mt5": "MT5EncoderModel"}


class TextEncoderOptions(BaseModel):
    """Which text encoder a modality conditions on (``data.options.text`` in a run config)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["tiny", "hf"] = Field("tiny", description="tiny: built-in hashed words; hf: transformers")
    dim: int = Field(64, ge=1, description="tiny encoder width (hf: taken from the model)")
    model_dir: str | None = model_location("hf: local directory with config, tokenizer, weights")
    layers: tuple[int, ...] = Field((-1,), min_length=1, description="hf: hidden-state layers to stack")
    max_length: int = Field(64, ge=1, description="captions are truncated to this many tokens")
    cache_dir: str | None = cache_location("on-disk embedding cache (None: no cache)")


class TextEncoder(ABC):
    """Captions → embeddings. Subclasses set :attr:`dim` and :attr:`cache_id` and encode unpadded."""

    dim: int
    cache_id: str  # identifies the model and settings: the cache key is (cache_id, weights_id, caption)
    # The weights, tokenizer and dtype behind cache_id — "" where cache_id already fixes them (the tiny encoder).
    # Apart from cache_id because planning (HFTextEncoderShape) reads config.json alone and must still match it.
    weights_id: str = ""

    def describe(self) -> dict:
        """What prepared shards record of the encoder of their stored caption embeddings (``codec.json``)."""
        return {"cache_id": self.cache_id, "dim": self.dim, "weights_id": self.weights_id}

    @abstractmethod
    def encode_unpadded(self, texts: list[str]) -> list[torch.Tensor]:
        """One ``(Li, dim)`` float32 CPU tensor per caption (``Li`` may be 0 for an empty caption)."""

    def encode(self, texts: list[str], device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ``(B, Lc, dim)`` embeddings and ``(B, Lc)`` mask (True = real token) on ``device``."""
        emb, mask = pad_embeddings(self.encode_unpadded(texts), self.dim)
        return emb.to(device), mask.to(device)


def pad_embeddings(items: list[torch.Tensor], dim: int, length: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``(Li, dim)`` tensors to ``(B, L, dim)`` with a ``(B, L)`` mask.

    ``L`` is the longest caption (at least 1, so an all-empty batch still has a — fully masked — context
    token and CFG halves can be concatenated), or ``length`` if given.
    """
    n = max([1, *(int(e.shape[0]) for e in items)]) if length is None else length
    device = items[0].device if items else None  # pad where the items are (a training batch: on the GPU)
    out = torch.zeros(len(items), n, dim, device=device)
    mask = torch.zeros(len(items), n, dtype=torch.bool, device=device)
    for i, e in enumerate(items):
        k = min(int(e.shape[0]), n)
        out[i, :k] = e[:k].float()
        mask[i, :k] = True
    return out, mask


def read_hf_config(model_dir: Path, layers: tuple[int, ...], max_length: int, missing: str = ""):
    """``(config, dim, cache_id)`` of a local ``transformers`` model directory, from its ``config.json`` alone
    (``dim`` = hidden size × stacked layers); ``missing`` replaces the download hint when it is absent."""
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"text encoder directory {model_dir} has no config.json. " + (missing or
            "Download the model on a machine with network (e.g. `hf download google/t5-v1_1-base --local-dir DIR`, "
            "or Qwen/Qwen3-0.6B) and point data.options.text.model_dir (training) or --text-model-dir (prepare) at it."))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # effective only before the first HF import
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    dim = getattr(config, "text_config", config).hidden_size * len(layers)
    digest = hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()[:12]
    return config, dim, f"hf:{model_dir.name}:{digest}:layers={list(layers)}:max={max_length}"


def model_identity(cache_id: str) -> str:
    """``cache_id`` without an ``hf`` model folder's name (``hf:<folder name>:<config digest>:…``): the name is
    where the model was downloaded to, not which model it is (the digest and ``weights_id`` say that)."""
    kind, _, rest = cache_id.partition(":")
    return f"hf:{rest.partition(':')[2]}" if kind == "hf" and rest.count(":") >= 1 else cache_id


class HFTextEncoderShape(TextEncoder):
    """An ``hf`` encoder's shape under ``selfflow.core.codec.shapes_only()`` (``selfflow plan``): its width from
    ``config.json``, no weights read; every caption becomes ``max_length`` zero vectors, the longest context
    the run can see."""

    def __init__(self, model_dir: str | Path, layers: tuple[int, ...] = (-1,), max_length: int = 64):
        hint = ("Planning reads only that file (its hidden size is the context width): fetch it alone, e.g. "
                f"`hf download google/t5-v1_1-xxl config.json --local-dir {model_dir}`.")
        _, self.dim, self.cache_id = read_hf_config(Path(model_dir), tuple(layers), max_length, hint)
        self.max_length = max_length

    def encode_unpadded(self, texts: list[str]) -> list[torch.Tensor]:
        return [torch.zeros(self.max_length, self.dim) for _ in texts]


class HFTextEncoder(TextEncoder):
    """A ``transformers`` model from a local directory; stacked hidden states of ``layers``."""

    def __init__(self, model_dir: str | Path, layers: tuple[int, ...] = (-1,), max_length: int = 64,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        model_dir = Path(model_dir)
        config, self.dim, self.cache_id = read_hf_config(model_dir, layers, max_length)
        import transformers

        cls = getattr(transformers, _ENCODER_ONLY.get(config.model_type, "AutoModel"))
        self.model = cls.from_pretrained(model_dir, local_files_only=True, torch_dtype=dtype).to(device).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.layers, self.max_length, self.device = tuple(layers), max_length, torch.device(device)
        self.weights_id = f"files:{files_fingerprint(model_dir)}:{str(dtype).removeprefix('torch.')}"

    @torch.no_grad()
    def encode_unpadded(self, texts: list[str]) -> list[torch.Tensor]:
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        if batch["input_ids"].shape[1] == 0:  # only empty captions, and a tokenizer without special tokens
            return [torch.zeros(0, self.dim) for _ in texts]  # (0, D): the empty caption, as the tiny encoder
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         output_hidden_states=True)
        hidden = torch.cat([out.hidden_states[i] for i in self.layers], dim=-1).float().cpu()  # (B, L, D)
        keep = batch["attention_mask"].bool().cpu()
        return [h[k] for h, k in zip(hidden, keep)]
