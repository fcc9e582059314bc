import pytest
import torch
from diffusers import AutoencoderKL

from selfflow.core.tokens import patchify
from selfflow.image.modality import ImageModality
from selfflow.image.sd_vae import SD_VAE_SCALE, SDVAE, LatentCodec


def test_scaled_latents_and_token_layout(tiny_vae_dir):
    vae = SDVAE.from_pretrained(tiny_vae_dir)
    raw = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ref = raw.encode(x).latent_dist.mean * SD_VAE_SCALE
        assert torch.allclose(vae.encode(x), ref, atol=1e-6)
        z = torch.randn(2, 4, 8, 8)
        assert torch.allclose(vae.decode(z), raw.decode(z / SD_VAE_SCALE).sample.clamp(-1, 1), atol=1e-6)
    codec = LatentCodec(vae, 16, 2)
    assert codec.token_channels == 16 and codec.grid == (1, 4, 4)
    tokens = codec.to_tokens(x)
    assert torch.allclose(tokens.x, patchify(ref.unsqueeze(2), (1, 2, 2)).x, atol=1e-6)
    assert codec.from_tokens(tokens.x).shape == (2, 3, 16, 16)
    # the image modality runs on SD-VAE tokens (online encoding of the synthetic stream)
    mod = ImageModality({"codec": "sd_vae", "vae_path": str(tiny_vae_dir), "image_size": 16, "patch_size": 2,
                         "device": "cpu"})
    batch = next(iter(mod.stream(2, seed=0)))
    tk, cond = mod.encode(batch, "cpu")
    assert tk.x.shape == (2, 16, 16) and mod.token_channels == 16 and cond.labels.shape == (2,)
    assert mod.evaluation_array(mod.decode(tk.x)).shape == (2, 16, 16, 3)


def test_loading_prints_no_install_accelerate_notice(tiny_vae_dir):
    """Without accelerate, diffusers' default load printed "Cannot initialize model with low cpu memory usage
    because `accelerate` was not found … pip install accelerate" at every VAE load of every run."""
    import logging

    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger("diffusers")  # diffusers' own handler writes to the stderr it saw at import
    logger.addHandler(handler)
    try:
        SDVAE.from_pretrained(tiny_vae_dir)
    finally:
        logger.removeHandler(handler)
    assert not [m for m in said if "accelerate" in m], said


def test_missing_vae_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no AutoencoderKL at .*nothing.*sd-vae-ft-ema"):
        SDVAE.from_pretrained(tmp_path / "nothing")
    with pytest.raises(ValueError, match="vae_path"):
        ImageModality({"codec": "sd_vae"})
