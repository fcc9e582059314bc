"""CLIP score for text-to-image samples, and the ``selfflow eval t2i`` subcommand (FD-DINOv2 +
CLIP score).

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

import argparse
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

from .dinov2 import WEIGHTS_HELP as DINOV2_WEIGHTS_HELP
from .dinov2 import ImageSource, batched, iter_images, list_images
from .report import report_results

PROTOCOL = ("CLIP score (torchmetrics convention): CLIP ViT-L/14; PIL bicubic shortest side 224 "
            "on uint8, centre crop 224, CLIP mean/std; text truncated to 77 tokens keeping EOS; "
            "mean over pairs of 100*max(cos, 0)")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHTS_HELP = ("a Hugging Face CLIPModel directory with its tokenizer (config.json, "
                "model.safetensors, vocab.json, merges.txt / tokenizer.json), e.g. "
                "`huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR` on a "
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

    def image_features(self, source: ImageSource) -> np.ndarray:
        images, total = iter_images(source)
        out = []
        with tqdm(total=total, desc="CLIP images", unit="img", disable=not self.progress) as bar:
            for batch in batched(images, self.batch_size):
                out.append(self._image_batch(batch).double().cpu().numpy())
                bar.update(len(batch))
        return np.concatenate(out)

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        out = [self._text_batch(b).double().cpu().numpy()
               for b in batched(tqdm(texts, desc="CLIP text", disable=not self.progress),
                                self.batch_size)]
        return np.concatenate(out)

    def scores(self, images: ImageSource, texts: Sequence[str]) -> np.ndarray:
        """Per-pair ``100 · max(cos, 0)`` (float64)."""
        img = self.image_features(images)
        if len(img) != len(texts):
            raise ValueError(f"{len(img)} images but {len(texts)} prompts: they must pair up")
        txt = self.text_features(texts)
        return 100.0 * np.maximum((img * txt).sum(-1), 0.0)


def clip_score(images: ImageSource, prompts: Sequence[str], model: Any | str | os.PathLike,
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


# ----------------------------------------------------------------------------------------------
# CLI: selfflow eval t2i


def _run_t2i(args: argparse.Namespace) -> int:
    from .dinov2 import fd_dinov2

    results: dict[str, Any] = {}
    if args.dinov2 and args.ref:
        results["fd_dinov2"] = fd_dinov2(args.images, args.ref, args.dinov2,
                                         batch_size=args.batch_size, device=args.device,
                                         save_real_stats=args.save_ref_stats)
    if args.clip and args.prompts:
        files, texts = read_prompts(args.prompts, args.images)
        results["clip_score"] = clip_score(files, texts, args.clip, batch_size=args.batch_size,
                                           device=args.device)
    if not results:
        print("nothing to compute: give --dinov2 with --ref, and/or --clip with --prompts")
        return 2
    return report_results(results, args.out)


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``t2i`` (FD-DINOv2 and CLIP score) to an argparse subparsers object."""
    parser = subparsers.add_parser(
        "t2i", help="text-to-image metrics: FD-DINOv2 and CLIP score",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "FD-DINOv2 (dgm-eval protocol) between --images and --ref, and/or CLIP score "
            "(ViT-L/14, mean of 100*max(cos,0)) of --images against --prompts.\n\n"
            "Inputs: --images is a folder of generated images (png/jpg, any size). --ref is a "
            "folder of reference images or a .npz of DINOv2 statistics saved by --save-ref-stats. "
            "--prompts is a .jsonl ({\"image\": \"relative/path.png\", \"prompt\": \"...\"} per "
            "line) or a .txt with one prompt per line in the sorted order of --images.\n\n"
            "Weights (local directories, nothing is downloaded):\n"
            f"  --dinov2: {DINOV2_WEIGHTS_HELP}\n"
            f"  --clip:   {WEIGHTS_HELP}"))
    parser.add_argument("--images", required=True, help="folder of generated images")
    parser.add_argument("--ref", help="reference image folder or DINOv2 stats .npz")
    parser.add_argument("--prompts", help="prompts (.jsonl or .txt) paired with --images")
    parser.add_argument("--dinov2", help="local Hugging Face DINOv2 ViT-L/14 directory "
                                         "(facebook/dinov2-large)")
    parser.add_argument("--clip", help="local Hugging Face CLIP directory "
                                       "(openai/clip-vit-large-patch14)")
    parser.add_argument("--save-ref-stats", help="write the reference DINOv2 stats to this .npz")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="also write the JSON results to this file")
    parser.set_defaults(func=_run_t2i)
    return parser
