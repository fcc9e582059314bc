import re

import pytest
import torch
from diffusers import AutoencoderKLFlux2

from selfflow.core.tokens import patchify
from selfflow.image.flux2_ae import (
    Flux2AE,
    convert_flux2_ae_single_file,
    patchify_2x2,
    unpatchify_2x2,
)
from selfflow.image.modality import ImageModality
from selfflow.image.sd_vae import LatentCodec

from .conftest import tiny_flux2_ae


@pytest.fixture(scope="module")
def tiny_flux2_dir(tmp_path_factory):
    """A tiny random AutoencoderKLFlux2 (4 raw channels, downsampling 2) with non-trivial BN statistics."""
    d = tmp_path_factory.mktemp("flux2")
    torch.manual_seed(0)
    vae = tiny_flux2_ae()
    vae.save_pretrained(d)
    return d


def test_patchify_order_matches_the_flux2_pipeline():
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    z = torch.randn(2, 4, 6, 8)
    p = patchify_2x2(z)
    assert p.shape == (2, 16, 3, 4) and torch.equal(p, Flux2Pipeline._patchify_latents(z))
    assert torch.equal(unpatchify_2x2(p), z)
    assert torch.equal(p[:, 1::4], z[:, :, 0::2, 1::2])  # channel order (c, pi, pj)


def test_encode_normalises_with_bn_stats_and_decode_inverts(tiny_flux2_dir):
    ae = Flux2AE.from_pretrained(tiny_flux2_dir)
    raw_vae = AutoencoderKLFlux2.from_pretrained(tiny_flux2_dir).eval()
    assert ae.latent_channels == 16 and ae.downsample == 4 and ae.eps == 1e-4
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        raw = raw_vae.encode(x).latent_dist.mean  # (2, 4, 8, 8)
        mean, var = raw_vae.bn.running_mean, raw_vae.bn.running_var
        ref = (patchify_2x2(raw) - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-4)
        z = ae.encode(x)
        assert z.shape == (2, 16, 4, 4) and torch.allclose(z, ref, atol=1e-5)
        assert torch.allclose(ae.denormalize(ae.normalize(raw)), raw, atol=1e-5)
        assert torch.allclose(ae.normalize(ae.denormalize(z)), z, atol=1e-5)
        y = ae.decode(z)
        assert y.shape == (2, 3, 16, 16)
        assert torch.allclose(y, raw_vae.decode(raw).sample.clamp(-1, 1), atol=1e-5)
    codec = LatentCodec(ae, 16, 1)
    assert codec.token_channels == 16 and codec.grid == (1, 4, 4)
    assert torch.allclose(codec.to_tokens(x).x, patchify(ref.unsqueeze(2), (1, 1, 1)).x, atol=1e-5)


def test_modality_runs_on_flux2_tokens(tiny_flux2_dir, tmp_path):
    mod = ImageModality({"codec": "flux2", "vae_path": str(tiny_flux2_dir), "image_size": 16, "patch_size": 1,
                         "device": "cpu"})
    tk, cond = mod.encode(next(iter(mod.stream(2, seed=0))), "cpu")
    assert tk.x.shape == (2, 16, 16) and mod.token_channels == 16 and cond.labels.shape == (2,)
    assert mod.decode(tk.x).shape == (2, 3, 16, 16)
    with pytest.raises(FileNotFoundError, match=r"no AutoencoderKLFlux2 at .*nothing.*FLUX\.2-dev"):
        Flux2AE.from_pretrained(tmp_path / "nothing")
    with pytest.raises(ValueError, match="flux2 needs a local diffusers autoencoder directory"):
        ImageModality({"codec": "flux2"})


def to_bfl_single_file(sd: dict, num_blocks: int) -> dict:
    """Independent inverse: diffusers keys → BFL ``ae.safetensors`` keys, from the documented LDM rules."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^(post_)?quant_conv\.", lambda m: ("decoder." if m[1] else "encoder.") + m[0], k)
        k = k.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut", "nin_shortcut")
        k = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
        k = re.sub(r"encoder\.down_blocks\.(\d)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"encoder\.down_blocks\.(\d)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d)\.(resnets|upsamplers\.0)\.",
                   lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}."
                             f"{'block' if m[2] == 'resnets' else 'upsample'}.", k)
        if ".mid_block.attentions.0." in k:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.").replace("group_norm", "norm")
            k = re.sub(r"to_([qkv])\.", r"\1.", k).replace("to_out.0.", "proj_out.")
            v = v[:, :, None, None] if v.ndim == 2 else v  # BFL's attention projections are 1×1 convs
        out[k] = v
    return out


def test_single_file_conversion_round_trips_a_tiny_model(tiny_flux2_dir):
    src = AutoencoderKLFlux2.from_pretrained(tiny_flux2_dir).eval()
    bfl = to_bfl_single_file(src.state_dict(), num_blocks=2)
    assert "encoder.quant_conv.weight" in bfl and "encoder.mid.attn_1.q.weight" in bfl
    assert bfl["encoder.mid.attn_1.q.weight"].ndim == 4 and not any("_blocks" in k for k in bfl)
    dst = AutoencoderKLFlux2.from_config(src.config).eval()
    dst.load_state_dict(convert_flux2_ae_single_file(bfl), strict=True)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        a, b = Flux2AE(src), Flux2AE(dst)
        za, zb = a.encode(x), b.encode(x)
        assert torch.allclose(za, zb, atol=1e-5) and torch.allclose(a.decode(za), b.decode(za), atol=1e-5)
