"""Captions → the backbone's :class:`Conditioning`, and the null (empty-caption) conditioning for CFG."""

from __future__ import annotations

import torch

from selfflow.core.modality import sample_indices
from selfflow.core.tokens import Conditioning

from .encoder import TextEncoder, model_identity, pad_embeddings


def caption_conditioning(encoder: TextEncoder, captions: list[str], device: torch.device | str
                         ) -> Conditioning:
    """``Conditioning(context (B, Lc, Dc), context_mask (B, Lc))`` of the captions."""
    context, mask = encoder.encode(captions, device)
    return Conditioning(context=context, context_mask=mask)


def embeddings_conditioning(items: list[torch.Tensor], dim: int, device: torch.device | str) -> Conditioning:
    """The same from precomputed unpadded ``(Li, Dc)`` embeddings (e.g. read from shards)."""
    context, mask = pad_embeddings(items, dim)
    return Conditioning(context=context.to(device), context_mask=mask.to(device))


def null_conditioning_like(cond: Conditioning) -> Conditioning:
    """The empty caption for every sample: zero context, fully masked — what label dropout trains on
    (:func:`selfflow.core.objective.drop_labels`), with the same ``Lc`` so CFG halves batch together."""
    if cond.context is None:
        raise ValueError("null_conditioning_like needs a conditioning with a text context")
    return Conditioning(context=torch.zeros_like(cond.context),
                        context_mask=torch.zeros(cond.context.shape[:2], dtype=torch.bool,
                                                 device=cond.context.device))


class CaptionConditioner:
    """How a captioned, class-labelled dataset conditions the backbone: by ``class`` labels or by ``text``.

    Modalities delegate their conditioning to one of these, so video and audio share the rules: a batch
    carries ``labels (B,)``, ``captions`` (list of str) and/or precomputed ``emb`` (list of ``(Li, Dc)``);
    previews cycle through ``sample_captions`` (sample ``i`` gets caption ``i mod n``, display label ``i mod
    n``) with the empty caption as the CFG null.
    """

    def __init__(self, mode: str, class_names: list[str], text_options: dict | object,
                 sample_captions: list[str] | None = None):
        from .build_encoder import build_text_encoder

        if mode not in ("class", "text"):
            raise ValueError(f"conditioning must be 'class' or 'text', got {mode!r}")
        self.mode, self.class_names = mode, list(class_names)
        self.sample_captions = list(sample_captions or class_names)
        self.encoder = build_text_encoder(text_options) if mode == "text" else None

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.mode == "class" else 0

    @property
    def context_dim(self) -> int:
        return self.encoder.dim if self.encoder is not None else 0

    @property
    def display_names(self) -> list[str]:
        return self.class_names if self.mode == "class" else self.sample_captions

    def from_batch(self, batch: dict, device: torch.device | str) -> Conditioning:
        if self.encoder is None:
            return Conditioning(labels=batch["labels"].to(device))
        if batch.get("emb") is not None:
            return embeddings_conditioning(batch["emb"], self.encoder.dim, device)
        return caption_conditioning(self.encoder, list(batch["captions"]), device)

    def for_samples(self, samples: int | torch.Tensor, device: torch.device | str
                    ) -> tuple[Conditioning, Conditioning, torch.Tensor]:
        """Preview conditioning of ``samples`` (indices ``(N,)``, or ``n`` for ``0…n−1``), its CFG null and display
        labels (indices into :attr:`display_names`): sample ``i`` gets entry ``i mod`` their number."""
        labels = sample_indices(samples, device) % len(self.display_names)
        if self.encoder is None:
            return (Conditioning(labels=labels),
                    Conditioning(labels=torch.full_like(labels, len(self.class_names))), labels)
        cond = caption_conditioning(self.encoder, [self.sample_captions[i] for i in labels.tolist()], device)
        return cond, null_conditioning_like(cond), labels

    def for_prompts(self, prompts: list[str], device: torch.device | str) -> tuple[Conditioning, Conditioning]:
        """The conditioning of one sample per prompt (text mode) and its CFG null."""
        if self.encoder is None:
            raise ValueError("this run is class-conditional (conditioning: class): it takes class labels, "
                             "not prompts")
        cond = caption_conditioning(self.encoder, list(prompts), device)
        return cond, null_conditioning_like(cond)


class CaptionedModalityMixin:
    """Put before :class:`~selfflow.core.modality.Modality` in a modality's bases: its classes, context
    width and preview conditionings come from ``self.conditioner`` (a :class:`CaptionConditioner`)."""

    conditioner: CaptionConditioner

    @property
    def num_classes(self) -> int:
        return self.conditioner.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.conditioner.display_names

    @property
    def context_dim(self) -> int:
        return self.conditioner.context_dim

    def sample_conditions(self, samples: int | torch.Tensor, device: torch.device | str
                          ) -> tuple[Conditioning, Conditioning | None, torch.Tensor | None]:
        return self.conditioner.for_samples(samples, device)

    def prompt_conditions(self, prompts: list[str], device: torch.device | str
                          ) -> tuple[Conditioning, Conditioning]:
        return self.conditioner.for_prompts(prompts, device)

    def check_stored_captions(self, info: dict, shards: str) -> None:
        """Caption embeddings stored in the shards (``info``: their ``codec.json``) must come from the configured
        encoder: previews and the CFG null are encoded with it, so another model, layer set or length — even
        of the same width — would train and sample on different spaces."""
        stored, enc = info.get("text"), self.conditioner.encoder
        if not stored or enc is None:
            return
        if model_identity(stored["cache_id"]) != model_identity(enc.cache_id):  # the folder's name may differ
            raise ValueError(f"{shards} stores caption embeddings of {stored['cache_id']} but "
                             f"data.options.text gives {enc.cache_id}: configure the same text encoder")
        # Shards written before weights were recorded, and planning (config.json alone), have no weights_id.
        if stored.get("weights_id") and enc.weights_id and stored["weights_id"] != enc.weights_id:
            raise ValueError(f"{shards} stores caption embeddings of {stored['cache_id']} with weights "
                             f"{stored['weights_id']}, but the files in data.options.text.model_dir now give "
                             f"{enc.weights_id}: the weights, tokenizer or dtype changed since preparation — "
                             "prepare the shards again, or point model_dir at the encoder they were prepared with")
