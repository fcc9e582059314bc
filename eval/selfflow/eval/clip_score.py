"""CLIP score for text-to-image samples (``selfflow eval t2i`` pairs it with FD-DINOv2).

Convention (torchmetrics ``CLIPScore``, the de-facto T2I reference): CLIP ViT-L/14
(``openai/clip-vit-large-patch14``); per (image, prompt) pair ``100 · max(cos(E_I, E_T), 0)``;
the metric is the mean over pairs. Image preprocessing is the PIL pipeline of the original CLIP
and of ``CLIPImageProcessor`` in transformers 4.x: bicubic resize of the shortest side to 224 on
uint8, centre crop 224×224 (offsets ``(size - 224) // 2``), /255, CLIP mean/std. We do it
ourselves because transformers 5 defaults ``CLIPProcessor`` to a torchvision backend whose
antialiased float resize gives different numbers. Text: CLIP tokenizer, truncated to 77 tokens
keeping the end-of-text token (torchmetrics slices ids instead and so drops EOS on captions longer
than 77 tokens — only those captions differ). Other scales exist (CLIPScore paper: 2.5·max(cos,0),
ViT-B/32, prefix "A photo depicts"): results always carry backbone and scale in ``protocol``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .extractor import batched, exact_fp32, extract
from .image_io import ImageInput, iter_images, list_images

PROTOCOL = ("CLIP score (torchmetrics convention): CLIP ViT-L/14; PIL bicubic shortest side 224 "
            "on uint8, centre crop 224, CLIP mean/std; text truncated to 77 tokens keeping EOS; "
            "mean over pairs of 100*max(cos, 0)")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHTS_HELP = ("a Hugging Face CLIPModel directory with its tokenizer (config.json, "
                "model.safetensors, vocab.json, merges.txt / tokenizer.json), e.g. "
                "`hf download openai/clip-vit-large-patch14 --local-dir DIR` on a "
                "machine with network (https://huggingface.co/openai/clip-vit-large-patch14)")


def clip_preprocess(images: Sequence[np.ndarray], size: int = 224) -> torch.Tensor:
    """uint8 (H, W, 3) images → float32 (N, 3, size, size): PIL bicubic resize of the shortest
    side to ``size`` (long side ``int(size * long / short)``), centre crop with floor offsets,
    /255, CLIP mean/std."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        if h <= w:
            nh, nw = size, int(size * w / h)
        else:
            nh, nw = int(size * h / w), size
        pil = Image.fromarray(np.ascontiguousarray(img), mode="RGB")
        arr = np.asarray(pil.resize((nw, nh), Image.Resampling.BICUBIC))
        top, left = (nh - size) // 2, (nw - size) // 2
        out[i] = arr[top:top + size, left:left + size]
    x = torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def load_clip(path: str | os.PathLike) -> tuple[Any, Any]:
    """(CLIPModel in fp32 eval mode, tokenizer) from a local Hugging Face directory."""
    root = Path(path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"CLIP weights not found: {root / 'config.json'} is missing. "
                                f"Expected {WEIGHTS_HELP}.")
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(str(root), local_files_only=True).float().eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise FileNotFoundError(f"CLIP tokenizer files (vocab.json + merges.txt or tokenizer.json) "
                                f"not found in {root}. Expected {WEIGHTS_HELP}.") from err
    return model, tokenizer


class ClipScorer:
    """Batched CLIP image/text embeddings (L2-normalised, float64) and per-pair scores."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 64,
                 device: str | torch.device = "cpu", progress: bool = True) -> None:
        self.model = model.eval().to(device=device, dtype=torch.float32)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.progress = progress
        self.max_tokens = int(model.config.text_config.max_position_embeddings)
        self.image_size = int(model.config.vision_config.image_size)

    @torch.no_grad()
    def _image_batch(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        x = clip_preprocess(images, self.image_size).to(self.device)
        pooled = self.model.vision_model(pixel_values=x).pooler_output
        return F.normalize(self.model.visual_projection(pooled), dim=-1)

    @torch.no_grad()
    def _text_batch(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(list(texts), padding=True, truncation=True,
                             max_length=self.max_tokens, return_tensors="pt")
        pooled = self.model.text_model(input_ids=enc["input_ids"].to(self.device),
                                       attention_mask=enc["attention_mask"].to(self.device)
                                       ).pooler_output
        return F.normalize(self.model.text_projection(pooled), dim=-1)

    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(B, D) float64 L2-normalised image embeddings of uint8 (H, W, 3) images."""
        return self._image_batch(images).double().cpu().numpy()

    def image_features(self, source: ImageInput) -> np.ndarray:
        images, total = iter_images(source)
        return extract(self, images, batch_size=self.batch_size, total=total, desc="CLIP images",
                       unit="img", progress=self.progress)

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        with exact_fp32():
            out = [self._text_batch(b).double().cpu().numpy()
                   for b in batched(tqdm(texts, desc="CLIP text", disable=not self.progress),
                                    self.batch_size)]
        return np.concatenate(out)

    def scores(self, images: ImageInput, texts: Sequence[str]) -> np.ndarray:
        """Per-pair ``100 · max(cos, 0)`` (float64)."""
        img = self.image_features(images)
        if len(img) != len(texts):
            raise ValueError(f"{len(img)} images but {len(texts)} prompts: they must pair up")
        txt = self.text_features(texts)
        return 100.0 * np.maximum((img * txt).sum(-1), 0.0)


def clip_score(images: ImageInput, prompts: Sequence[str], model: Any | str | os.PathLike,
               tokenizer: Any = None, *, batch_size: int = 64, device: str = "cpu",
               progress: bool = True) -> dict[str, Any]:
    """Mean CLIP score of (image, prompt) pairs. ``model``: a local CLIP directory, or a loaded
    CLIPModel together with ``tokenizer``."""
    weights = str(model) if isinstance(model, (str, os.PathLike)) else getattr(
        model.config, "_name_or_path", "in-memory model")
    if isinstance(model, (str, os.PathLike)):
        model, tokenizer = load_clip(model)
    if tokenizer is None:
        raise ValueError("a loaded CLIPModel needs its tokenizer")
    per_pair = ClipScorer(model, tokenizer, batch_size=batch_size, device=device,
                          progress=progress).scores(images, list(prompts))
    return {"clip_score": float(per_pair.mean()), "clip_score_std": float(per_pair.std()),
            "n": len(per_pair), "protocol": PROTOCOL, "weights": weights}


def read_prompts(prompts: str | os.PathLike, image_dir: str | os.PathLike) -> tuple[list[Path],
                                                                                  list[str]]:
    """Pair images with prompts. ``.jsonl``: one object per line with the image path (key
    ``image`` or ``file``, relative to ``image_dir``) and ``prompt`` (or ``caption``/``text``).
    ``.txt``: one prompt per line, matched to the sorted images of ``image_dir``."""
    path = Path(prompts)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    root = Path(image_dir)
    if path.suffix == ".jsonl":
        files, texts = [], []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            name = rec.get("image", rec.get("file"))
            text = rec.get("prompt", rec.get("caption", rec.get("text")))
            if name is None or text is None:
                raise ValueError(f"{path}:{n}: needs keys image/file and prompt/caption/text")
            files.append(root / name)
            texts.append(str(text))
        return files, texts
    files = list_images(root)
    texts = [t for t in path.read_text().splitlines() if t.strip()]
    if len(texts) != len(files):
        raise ValueError(f"{path} has {len(texts)} prompts but {root} has {len(files)} images")
    return files, texts
