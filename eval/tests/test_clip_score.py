"""CLIP score and the ``t2i`` subcommand on a tiny random Hugging Face CLIPModel."""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from selfflow.eval import clip_score as cs
from selfflow.eval.cli_media import add_t2i_parser


def smooth_images(n: int, h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        low = (rng.random((max(h // 8, 2), max(w // 8, 2), 3)) * 255).astype(np.uint8)
        out[i] = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BILINEAR))
        out[i, h // 3: h // 2, w // 4: w // 2] = 255 * (i % 2)
    return out


def _byte_chars() -> list[str]:
    """The 256 byte-level BPE symbols of GPT-2/CLIP tokenizers."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs_ = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs_.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs_]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A CLIP directory as on the hub: tiny random model + a character-level CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    path = tmp_path_factory.mktemp("clip")
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 512, 513
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer.from_pretrained(str(path)).save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={"vocab_size": 514, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
                     "bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 224, "patch_size": 32},
        projection_dim=16)
    CLIPModel(cfg).eval().save_pretrained(str(path))
    return str(path)


def _reference_processor():
    try:  # transformers 5: the PIL backend is a separate class
        from transformers import CLIPImageProcessorPil as Ref
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as Ref
    return Ref(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})


def test_preprocess_matches_clip_image_processor() -> None:
    ref = _reference_processor()
    for h, w in [(300, 200), (201, 333), (224, 224), (97, 500), (512, 512)]:
        imgs = smooth_images(2, h, w, seed=h + w)
        ours = cs.clip_preprocess(list(imgs))
        theirs = torch.as_tensor(np.asarray(ref(images=list(imgs), return_tensors="np")["pixel_values"]))
        assert ours.shape == theirs.shape == (2, 3, 224, 224)
        torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-5)


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4 / 5


def test_clip_score_equals_direct_computation(tiny_dir: str) -> None:
    model, tokenizer = cs.load_clip(tiny_dir)
    torch.manual_seed(0)
    with torch.no_grad():  # random projections: with this seed, cosines of both signs occur
        model.text_projection.weight.normal_()
        model.visual_projection.weight.normal_()
    imgs = smooth_images(12, 160, 240, seed=0)
    words = ["cat", "dog", "car", "tree", "house", "boat", "bird", "fish", "lamp", "cup", "sun", "hat"]
    prompts = [f"a photo of {w}" for w in words]
    res = cs.clip_score(list(imgs), prompts, model, tokenizer, batch_size=5, progress=False)
    assert set(res) >= {"clip_score", "protocol", "weights", "n"} and res["n"] == 12
    # direct: reference image processor, tokenizer, get_*_features, 100·max(cos, 0), mean
    pix = torch.as_tensor(np.asarray(_reference_processor()(images=list(imgs), return_tensors="np")["pixel_values"]))
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = _features(model.get_image_features(pixel_values=pix.float())).double()
        txt = _features(model.get_text_features(input_ids=enc["input_ids"],
                                                attention_mask=enc["attention_mask"])).double()
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1).numpy()
    assert (cos < 0).any() and (cos > 0).any()  # random weights: the clamp is exercised
    expected = float(np.mean(100 * np.maximum(cos, 0)))
    assert res["clip_score"] == pytest.approx(expected, rel=1e-5)
    assert res["clip_score"] != pytest.approx(float(np.mean(100 * cos)), rel=1e-3)


def test_long_prompts_are_truncated_to_77_tokens_keeping_eos(tiny_dir: str) -> None:
    model, tokenizer = cs.load_clip(tiny_dir)
    scorer = cs.ClipScorer(model, tokenizer, progress=False)
    long = "abc " * 60  # ~240 character tokens
    enc = tokenizer([long], padding=True, truncation=True, max_length=77)
    ids = enc["input_ids"][0]
    assert len(ids) == 77 and ids[-1] == tokenizer.eos_token_id
    a = scorer.text_features([long])
    b = scorer.text_features([long + " and a different ending"])  # differs only after token 77
    np.testing.assert_allclose(a, b, atol=1e-7)
    c = scorer.text_features(["abc " * 5])
    assert np.abs(a - c).max() > 1e-3


def test_t2i_cli_runs_both_metrics(tiny_dir: str, tmp_path) -> None:
    from transformers import Dinov2Config, Dinov2Model

    d2 = tmp_path / "dinov2"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, patch_size=14, image_size=518,
                             initializer_range=0.2)).save_pretrained(str(d2))
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    gen.mkdir()
    ref.mkdir()
    lines = []
    for i, im in enumerate(smooth_images(6, 64, 80, seed=5)):
        Image.fromarray(im).save(gen / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "prompt": f"picture number {i}"}))
    for i, im in enumerate(smooth_images(6, 64, 64, seed=6)):
        Image.fromarray(im).save(ref / f"{i}.png")
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "prompts.txt").write_text("\n".join(f"picture number {i}" for i in range(6)) + "\n")
    files_j, texts_j = cs.read_prompts(tmp_path / "prompts.jsonl", gen)
    files_t, texts_t = cs.read_prompts(tmp_path / "prompts.txt", gen)
    assert texts_j == texts_t and [f.name for f in files_j] == [f.name for f in files_t]

    parser = argparse.ArgumentParser()
    add_t2i_parser(parser.add_subparsers())
    out = tmp_path / "res.json"
    args = parser.parse_args(["t2i", "--images", str(gen), "--ref", str(ref), "--dinov2", str(d2),
                              "--clip", tiny_dir, "--prompts", str(tmp_path / "prompts.jsonl"),
                              "--out", str(out)])
    assert args.func(args) == 0
    res = json.loads(out.read_text())
    assert res["fd_dinov2"]["fd_dinov2"] > 0 and res["fd_dinov2"]["n_real"] == 6
    model, tok = cs.load_clip(tiny_dir)
    direct = cs.clip_score(files_j, texts_j, model, tok, progress=False)["clip_score"]
    assert res["clip_score"]["clip_score"] == pytest.approx(direct, rel=1e-9)
    help_text = parser.format_help() + add_t2i_parser(argparse.ArgumentParser().add_subparsers()).format_help()
    assert "openai/clip-vit-large-patch14" in help_text and "facebook/dinov2-large" in help_text


def test_missing_weights_error_names_source(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json.*openai/clip-vit-large-patch14"):
        cs.load_clip(tmp_path / "missing")
