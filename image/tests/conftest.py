import pytest
import torch


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    """A tiny random diffusers AutoencoderKL (the SD-VAE class; downsampling 2) saved to a directory."""
    from diffusers import AutoencoderKL

    d = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                  norm_num_groups=8, sample_size=32).save_pretrained(d)
    return d
