import pytest
import torch
from diffusers import AutoencoderRAE

from selfflow.image.modality import ImageModality
from selfflow.image.rae import RAE, rae_latent_stats
from selfflow.image.sd_vae import LatentCodec

TINY = dict(encoder_type="dinov2", encoder_hidden_size=64, encoder_patch_size=14, encoder_num_hidden_layers=2,
            decoder_hidden_size=32, decoder_num_hidden_layers=2, decoder_num_attention_heads=2,
            decoder_intermediate_size=64, patch_size=8, encoder_input_size=56, num_channels=3)
STAT_MEAN = torch.randn(64, 4, 4, generator=torch.Generator().manual_seed(1))
STAT_VAR = torch.rand(64, 4, 4, generator=torch.Generator().manual_seed(2)) + 0.2


@pytest.fixture(scope="module")
def rae_dirs(tmp_path_factory):
    """The same tiny random AutoencoderRAE (56-px encoder input → 4×4×64 latents → 32 px) without latent
    statistics (``plain``) and with RAE-style ``stat.pt`` statistics converted by ``rae_latent_stats``."""
    torch.manual_seed(0)
    plain = AutoencoderRAE(**TINY)
    mean, std = rae_latent_stats(STAT_MEAN, STAT_VAR)
    stats = AutoencoderRAE(**TINY, latents_mean=mean, latents_std=std)
    missing, unexpected = stats.load_state_dict(
        {k: v for k, v in plain.state_dict().items() if "latents_" not in k}, strict=False)
    assert not unexpected and all("latents_" in k for k in missing)
    dirs = tmp_path_factory.mktemp("rae_plain"), tmp_path_factory.mktemp("rae_stats")
    plain.save_pretrained(dirs[0])
    stats.save_pretrained(dirs[1])
    return dirs


def test_rae_normalises_once_like_the_original(rae_dirs):
    plain, rae = RAE.from_pretrained(rae_dirs[0]), RAE.from_pretrained(rae_dirs[1])
    assert rae.latent_channels == 64 and rae.downsample == 8 and rae.image_size == 32
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    # the plain model divides by (1 + 1e-5): undo it to get the raw DINOv2 features
    raw = plain.encode(x) * (1 + 1e-5)
    z = rae.encode(x)
    assert z.shape == (2, 64, 4, 4)
    assert torch.allclose(z, (raw - STAT_MEAN) / torch.sqrt(STAT_VAR + 1e-5), atol=1e-5)  # RAE's formula
    y = rae.decode(z)
    assert y.shape == (2, 3, 32, 32) and y.min() >= -1 and y.max() <= 1
    assert torch.allclose(y, plain.decode(raw / (1 + 1e-5)), atol=1e-5)  # decoder sees the same raw latents
    # [-1, 1] in: the encoder receives (x + 1)/2
    with torch.no_grad():
        ref = rae.vae.encode((x + 1) / 2).latent
    assert torch.allclose(z, ref, atol=1e-6)


def test_modality_runs_on_rae_tokens(rae_dirs, tmp_path):
    mod = ImageModality({"codec": "rae", "vae_path": str(rae_dirs[1]), "image_size": 32, "patch_size": 1,
                         "device": "cpu"})
    assert isinstance(mod.codec, LatentCodec) and mod.codec.grid == (1, 4, 4) and mod.token_channels == 64
    tk, cond = mod.encode(next(iter(mod.stream(2, seed=0))), "cpu")
    assert tk.x.shape == (2, 16, 64) and cond.labels.shape == (2,)
    assert mod.decode(tk.x).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="image_size 32"):
        ImageModality({"codec": "rae", "vae_path": str(rae_dirs[1]), "image_size": 64, "patch_size": 1})
    with pytest.raises(FileNotFoundError, match=r"no AutoencoderRAE at .*nothing.*RAE-dinov2"):
        RAE.from_pretrained(tmp_path / "nothing")
