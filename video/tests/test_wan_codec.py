import pytest
import torch

from selfflow.video.wan_codec import WanCodec

from .conftest import tiny_wan


@pytest.mark.parametrize(("version", "latent"), [("wan2.1", (1, 4, 3, 4, 4)), ("wan2.2", (1, 4, 3, 2, 2))])
def test_encode_decode_shapes_and_normalisation(version, latent):
    vae = tiny_wan(version)
    codec = WanCodec(vae)
    assert codec.compression == ((4, 8, 8) if version == "wan2.1" else (4, 16, 16))
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    raw = codec.encode_raw(video)
    z = codec.encode(video)
    assert raw.shape == z.shape == latent and codec.latent_shape(9, 32, 32) == latent[1:]
    # the normalisation is the config's per-channel (z − mean) / std, and it inverts exactly
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert torch.allclose(z, (vae.encode(video).latent_dist.mean - mean) / std, atol=1e-5)
    assert torch.allclose(codec.denormalize(z), raw, atol=1e-6)
    out = codec.decode(z)
    assert out.shape == video.shape and out.abs().max() <= 1
    assert torch.allclose(out, vae.decode(raw).sample.clamp(-1, 1), atol=1e-5)
    with pytest.raises(ValueError, match="4k\\+1 frames"):
        codec.encode(torch.zeros(1, 3, 8, 32, 32))


def test_from_pretrained_and_missing_directory(tmp_path, wan_dir):
    codec = WanCodec.from_pretrained(wan_dir, "wan2.2")
    assert codec.latent_channels == 4 and codec.describe()["latent_std"] == [1.5, 0.5, 2.0, 1.0]
    with pytest.raises(FileNotFoundError, match=r"(?s)nope.*Wan-AI/Wan2.2-TI2V-5B-Diffusers"):
        WanCodec.from_pretrained(tmp_path / "nope", "wan2.2")
    with pytest.raises(ValueError, match="compresses \\(4, 8, 8\\)"):
        WanCodec.from_pretrained(wan_dir, "wan2.1")  # a Wan2.2-layout VAE is not a Wan2.1 one
