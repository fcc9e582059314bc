import pytest

from selfflow.core.timesteps import TimestepDistribution
from selfflow.image.codecs import default_timesteps
from selfflow.image.modality import ImageModality


def test_default_timesteps_follow_the_codec_as_in_the_paper_recipes():
    assert default_timesteps("pixel", (3, 32, 32)) == TimestepDistribution()  # uniform, no shift
    assert default_timesteps("sd_vae", (4, 32, 32)) == TimestepDistribution()
    flux2 = default_timesteps("flux2", (128, 16, 16))
    assert flux2.kind == "logit_normal" and flux2.shift == pytest.approx(8**0.5)  # configs/imagenet256 recipe
    rae = default_timesteps("rae", (768, 16, 16))
    assert rae.kind == "plateau_logit_normal" and rae.plateau == 0.1
    assert rae.shift == pytest.approx(6.928203230275509)


def test_the_modality_default_uses_its_codec_latent_shape(tmp_path):
    from diffusers import AutoencoderKLFlux2

    assert ImageModality({}).default_timesteps == TimestepDistribution()
    AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                       norm_num_groups=8, sample_size=32, patch_size=(2, 2)).save_pretrained(tmp_path)
    m = ImageModality({"codec": "flux2", "vae_path": str(tmp_path), "image_size": 32, "patch_size": 1,
                       "device": "cpu"})
    # 16 channels at 8×8 after the 2×2 patchify: sqrt(16·8·8 / 4096)
    assert m.default_timesteps.kind == "logit_normal" and m.default_timesteps.shift == pytest.approx(0.5)


@pytest.mark.parametrize("codec,tokens,channels", [("sd_vae", 16 * 16, 4 * 2 * 2), ("flux2", 16 * 16, 128),
                                                   ("rae", 16 * 16, 768)])
def test_under_shapes_only_a_missing_autoencoder_is_its_published_shape(codec, tokens, channels, tmp_path):
    """At the paper's 256 px and patch (2 for SD-VAE, 1 on the already 2×2-patchified FLUX.2 and on RAE)."""
    from selfflow.core.codec import shapes_only

    options = {"dataset": "latent_shards", "shards": str(tmp_path / "none"), "codec": codec, "image_size": 256,
               "vae_path": str(tmp_path / "vae"), "patch_size": 2 if codec == "sd_vae" else 1, "device": "cpu"}
    with pytest.raises(FileNotFoundError, match=r"config\.json missing"):
        ImageModality(options)
    with shapes_only():
        m = ImageModality(options)
        assert m.sample_ids(1, "cpu").shape[1] == tokens and m.token_channels == channels
        if codec == "rae":
            with pytest.raises(ValueError, match=r"codec rae needs image_size 256 .*published RAE's, assumed"):
                ImageModality({**options, "image_size": 128})


def test_under_shapes_only_image_text_shards_need_neither_shards_nor_captions(tmp_path):
    from selfflow.core.codec import shapes_only

    options = {"dataset": "image_text_shards", "shards": str(tmp_path / "none"), "image_size": 32, "patch_size": 4,
               "text": {"kind": "tiny", "dim": 8}}
    with pytest.raises(FileNotFoundError, match=r"data\.options\.shards: .*none does not exist"):
        ImageModality(options)  # it named the parent folder's codec.json
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match=r"none/codec\.json not found: is .* a `selfflow prepare image-text`"):
        ImageModality(options)
    with shapes_only():
        assert ImageModality(options).context_dim == 8
