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


def tiny_flux2_ae():
    """A tiny random AutoencoderKLFlux2 (4 raw channels, downsampling 2 → 16 channels after the 2×2 patchify)
    with non-trivial BN statistics. Draws from torch's global generator: seed before calling."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                             norm_num_groups=8, sample_size=32, patch_size=(2, 2))
    vae.bn.running_mean.copy_(torch.randn(16))
    vae.bn.running_var.copy_(torch.rand(16) + 0.5)
    return vae


def write_jpeg_folder(root, *, seed: int, per_class: int, size: tuple[int, int], signal: int,
                      broken_in: str, broken_bytes: bytes):
    """An ImageNet-style folder (``n01/``, ``n02/``) of random JPEGs of random sizes in ``[size)`` with a
    class signal in channel ``c``, plus one corrupt ``broken.JPEG`` in ``broken_in``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, wnid in enumerate(["n01", "n02"]):
        (root / wnid).mkdir()
        for i in range(per_class):
            h, w = int(rng.integers(*size)), int(rng.integers(*size))
            arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
            arr[..., c] = signal
            Image.fromarray(arr).save(root / wnid / f"img{i}.JPEG", quality=90)
    (root / broken_in / "broken.JPEG").write_bytes(broken_bytes)
    return root
