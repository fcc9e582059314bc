import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import

import pytest
import torch

TINY_OOBLECK = dict(encoder_hidden_size=8, downsampling_ratios=[2, 4], channel_multiples=[1, 2],
                    decoder_channels=8, decoder_input_channels=4, audio_channels=2, sampling_rate=8000)


def tiny_oobleck():
    from diffusers import AutoencoderOobleck

    torch.manual_seed(0)
    vae = AutoencoderOobleck(**TINY_OOBLECK).eval()
    with torch.no_grad():  # snake parameters start at 0 (log-scale 1): make them matter
        for name, p in vae.named_parameters():
            if name.endswith(("alpha", "beta")):
                p.normal_(0, 0.3)
    return vae


@pytest.fixture(scope="session")
def oobleck_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("oobleck") / "vae"
    tiny_oobleck().save_pretrained(path)
    return path
