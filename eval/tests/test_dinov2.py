"""FD-DINOv2 (dgm-eval protocol) on a tiny random Hugging Face Dinov2Model."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from selfflow.eval import dinov2
from selfflow.eval.frechet import frechet_distance


def smooth_images(n: int, h: int, w: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Seeded smooth uint8 images with an edge, so resizes are non-trivial."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        low = (rng.random((max(h // 8, 2), max(w // 8, 2), 3)) * 255).astype(np.uint8)
        img = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BILINEAR), np.float64)
        img[h // 3: h // 2, w // 4: w // 2] = 255.0 * (i % 2)
        out[i] = np.clip(img + shift, 0, 255).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, patch_size=14, image_size=518,  # 37×37 grid like ViT-L/14
                       initializer_range=0.2)  # larger weights: features vary across images
    model = Dinov2Model(cfg).eval()
    path = tmp_path_factory.mktemp("dinov2")
    model.save_pretrained(path)
    return str(path)


def test_preprocess_is_dgm_eval_transform() -> None:
    # dgm-eval: torchvision Resize((224,224), BICUBIC) on a PIL image, ToTensor, Normalize(ImageNet)
    ref_tf = transforms.Compose([
        transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(), transforms.Normalize(dinov2.IMAGENET_MEAN, dinov2.IMAGENET_STD)])
    for h, w in [(100, 80), (512, 512), (64, 300)]:
        imgs = smooth_images(2, h, w, seed=h)
        ours = dinov2.dgm_eval_preprocess(list(imgs))
        ref = torch.stack([ref_tf(Image.fromarray(im)) for im in imgs])
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
        # the PIL path is quantised and antialiased: not the float torch resize of EDM2's default
        torch_mode = F.interpolate(torch.from_numpy(imgs).permute(0, 3, 1, 2).float(), size=(224, 224),
                                   mode="bicubic", antialias=True) / 255.0
        mean = torch.tensor(dinov2.IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(dinov2.IMAGENET_STD).view(1, 3, 1, 1)
        assert not torch.allclose(ours, (torch_mode - mean) / std, atol=1e-4)


def _bicubic_1d(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """(n_out, n_in) matrix of PyTorch's bicubic (a=-0.75, half-pixel, clamped border) when the
    source coordinate is (dst + 0.5) / scale - 0.5."""
    a = -0.75

    def k(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0

    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        x0 = math.floor(src)
        t = src - x0
        for off in (-1, 0, 1, 2):
            m[i, min(max(x0 + off, 0), n_in - 1)] += k(t - off)
    return m


def test_pos_embed_uses_official_offset() -> None:
    torch.manual_seed(1)
    grid, dim, rows = 37, 8, 16
    pos = torch.randn(1, 1 + grid * grid, dim)
    ours = dinov2.official_pos_embed(pos, rows, rows)
    assert ours.shape == (1, 1 + rows * rows, dim)
    torch.testing.assert_close(ours[:, :1], pos[:, :1])
    # independent computation: separable bicubic with scale (16 + 0.1) / 37
    mat = _bicubic_1d(grid, rows, (rows + 0.1) / grid)
    g = pos[0, 1:].double().numpy().reshape(grid, grid, dim)
    ref = np.einsum("ai,bj,ijd->abd", mat, mat, g).reshape(rows * rows, dim)
    np.testing.assert_allclose(ours[0, 1:].double().numpy(), ref, rtol=0, atol=2e-5)
    # ... which is not what size=(16, 16) (Hugging Face's default) gives
    mat_hf = _bicubic_1d(grid, rows, rows / grid)
    ref_hf = np.einsum("ai,bj,ijd->abd", mat_hf, mat_hf, g).reshape(rows * rows, dim)
    assert np.abs(ref - ref_hf).max() > 1e-3
    assert dinov2.official_pos_embed(pos, grid, grid) is pos  # no resample on the native grid


def test_features_are_cls_after_final_norm_with_official_pos_embed(tiny_dir: str) -> None:
    model = dinov2.load_dinov2(tiny_dir)
    extractor = dinov2.DinoV2Features(model, batch_size=3, progress=False)
    imgs = smooth_images(5, 96, 128, seed=3)
    feats = extractor(imgs)
    assert feats.dtype == np.float64 and feats.shape == (5, 32)
    assert feats.std(0).min() > 1e-3
    # manual forward: patches + CLS + independently resampled pos-embed → encoder → norm → CLS
    x = dinov2.dgm_eval_preprocess(list(imgs))
    with torch.no_grad():
        emb = model.embeddings
        patches = emb.patch_embeddings(x)
        tokens = torch.cat([emb.cls_token.expand(len(x), -1, -1), patches], dim=1)
        mat = torch.from_numpy(_bicubic_1d(37, 16, 16.1 / 37)).float()
        grid = emb.position_embeddings[0, 1:].reshape(37, 37, -1)
        pos = torch.einsum("ai,bj,ijd->abd", mat, mat, grid).reshape(1, 256, -1)
        pos = torch.cat([emb.position_embeddings[:, :1], pos], dim=1)
        hidden = model.encoder(tokens + pos).last_hidden_state
        ref = model.layernorm(hidden)[:, 0].double().numpy()
    np.testing.assert_allclose(feats, ref, rtol=0, atol=1e-4)
    # the stock Hugging Face interpolation gives other features: the override matters
    from transformers import Dinov2Model

    stock = Dinov2Model.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        stock_feats = stock(pixel_values=x).pooler_output.double().numpy()
    assert np.abs(stock_feats - feats).max() > 1e-3


def test_fd_dinov2_end_to_end(tiny_dir: str, tmp_path) -> None:
    real_dir, fake_dir = tmp_path / "real", tmp_path / "fake"
    for d, shift, seed in ((real_dir, 0.0, 10), (fake_dir, 60.0, 20)):
        d.mkdir()
        for i, im in enumerate(smooth_images(40, 64, 64, seed=seed, shift=shift)):
            Image.fromarray(im).save(d / f"{i:03d}.png")
    model = dinov2.load_dinov2(tiny_dir)
    stats_file = tmp_path / "real_stats.npz"
    res = dinov2.fd_dinov2(fake_dir, real_dir, model, batch_size=16, progress=False,
                           save_real_stats=stats_file)
    assert set(res) >= {"fd_dinov2", "protocol", "weights", "n_fake", "n_real"}
    assert res["n_fake"] == res["n_real"] == 40
    # by hand: features → np.mean / np.cov (ddof=1) → frechet_distance
    ext = dinov2.DinoV2Features(model, progress=False)
    f_real, f_fake = ext(real_dir), ext(fake_dir)
    by_hand = frechet_distance(f_fake.mean(0), np.cov(f_fake, rowvar=False), f_real.mean(0),
                               np.cov(f_real, rowvar=False))
    assert res["fd_dinov2"] > 1e-2
    assert res["fd_dinov2"] == pytest.approx(by_hand, rel=1e-6)
    same = dinov2.fd_dinov2(real_dir, real_dir, model, progress=False)["fd_dinov2"]
    assert abs(same) < 1e-6 * res["fd_dinov2"] + 1e-8
    from_stats = dinov2.fd_dinov2(fake_dir, stats_file, model, progress=False)["fd_dinov2"]
    assert from_stats == pytest.approx(res["fd_dinov2"], rel=1e-9)
    # a reference saved with one weights folder is refused with another (it gave a number, silently)
    import shutil

    by_path = tmp_path / "by_path.npz"
    dinov2.fd_dinov2(fake_dir, real_dir, tiny_dir, progress=False, save_real_stats=by_path)
    other = shutil.copytree(tiny_dir, tmp_path / "other_dinov2")
    (other / "config.json").write_text((other / "config.json").read_text() + "\n")
    with pytest.raises(ValueError, match=r"by_path\.npz holds statistics of dinov2 weights with sha256"):
        dinov2.fd_dinov2(fake_dir, by_path, other, progress=False)
    with np.load(by_path) as z:  # `selfflow eval stats` output: Inception's (a shape error after the features)
        np.savez(tmp_path / "adm.npz", mu=z["mu"], sigma=z["sigma"], inception_sha256=np.asarray("ab"))
    with pytest.raises(ValueError, match=r"adm\.npz holds inception statistics, not dinov2 ones"):
        dinov2.fd_dinov2(fake_dir, tmp_path / "adm.npz", model, progress=False)


def test_missing_weights_error_names_file_and_source(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json.*facebook/dinov2-large"):
        dinov2.load_dinov2(tmp_path / "nowhere")
