import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import

import numpy as np
import pytest
import torch

from selfflow.video.video_io import write_mp4

TINY_WAN = {  # modality-anchors §1.8: tiny random configs of the real classes (CPU, milliseconds)
    "wan2.1": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                   temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                   latents_std=[1.5, 0.5, 2.0, 1.0]),
}
TINY_WAN["wan2.2"] = {**TINY_WAN["wan2.1"], "decoder_base_dim": 12, "is_residual": True, "in_channels": 12,
                      "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16,
                      "scale_factor_temporal": 4}


def tiny_wan(version: str):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(**TINY_WAN[version]).eval()


@pytest.fixture(scope="session")
def wan_dir(tmp_path_factory):
    """A tiny random Wan2.2-layout VAE saved in diffusers format (what `vae_dir` points at)."""
    path = tmp_path_factory.mktemp("wan22") / "vae"
    tiny_wan("wan2.2").save_pretrained(path)
    return path


def moving_bar_video(path, frames=9, size=64, fps=8, shift=0):
    """A small H.264 clip with a bright bar moving right (frame f has the bar at column 4f + shift)."""
    x = np.zeros((frames, size, size, 3), dtype=np.uint8)
    x[..., 2] = 60
    for f in range(frames):
        c = (4 * f + shift) % (size - 8)
        x[f, :, c:c + 8] = (250, 200, 30)
    return write_mp4(x, path, fps)
