"""FVD (StyleGAN-V protocol) on a TorchScript stand-in for ``i3d_torchscript.pt``, and framewise FID."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from selfflow.eval import fvd as fvd_mod
from selfflow.eval.cli_media import add_fvd_parser
from selfflow.eval.frechet import frechet_distance
from selfflow.eval.i3d import I3DFeatures, load_i3d, to_bcthw_uint8
from selfflow.eval.video_io import list_videos, read_video

# the published detector is TorchScript, which torch now flags as deprecated
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")


class TinyI3D(nn.Module):
    """Same call signature as StyleGAN-V's ``src.i3dpt_jit.I3D``; refuses non-uint8 input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 16, kernel_size=3, stride=(1, 2, 2), padding=1)
        self.logits = nn.Conv3d(16, 400, kernel_size=1)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8, "expects uint8 videos"
        assert x.shape[1] == 3, "expects [B, 3, T, H, W]"
        h = x.float()
        if rescale:
            h = h / 255.0 * 2.0 - 1.0
        if resize:
            h = F.interpolate(h, size=(h.shape[2], 32, 32), mode="trilinear", align_corners=False)
        h = torch.relu(self.conv(h))
        h = F.adaptive_avg_pool3d(h, (h.shape[2], 1, 1))
        logits = self.logits(h).squeeze(-1).squeeze(-1).mean(2)  # (B, 400), mean over time
        if return_features:
            return logits
        return torch.softmax(logits, dim=1)


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    torch.jit.script(TinyI3D().eval()).save(str(path))
    return str(path)


def videos(n: int, t: int, seed: int, shift: float = 0.0, hw: tuple[int, int] = (24, 40)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.random((n, t, hw[0] // 4, hw[1] // 4, 3)) * 200 + shift
    v = base.repeat(4, axis=2).repeat(4, axis=3)
    return np.clip(v, 0, 255).astype(np.uint8)


def test_fvd_matches_hand_computation(i3d_file: str, tmp_path) -> None:
    real, fake = videos(48, 20, seed=1), videos(48, 18, seed=2, shift=40.0)
    res = fvd_mod.fvd(fake, real, i3d_file, batch_size=10, progress=False)
    assert set(res) >= {"fvd", "protocol", "weights", "detector_kwargs", "n_fake", "n_real", "notes"}
    assert any(n.startswith("FVD: only 48 generated") and "400-d" in n for n in res["notes"])
    assert res["detector_kwargs"] == {"rescale": True, "resize": True, "return_features": True}
    assert res["n_fake"] == res["n_real"] == 48 and res["weights"] == i3d_file
    # by hand: first 16 frames, [B,3,T,H,W] uint8, documented kwargs, biased covariance
    det = torch.jit.load(i3d_file)

    def feats(v: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(v[:, :16]).permute(0, 4, 1, 2, 3).contiguous()
        with torch.no_grad():
            return det(x, rescale=True, resize=True, return_features=True).double().numpy()

    fr, ff = feats(real), feats(fake)
    assert fr.shape == (48, 400) and fr.std(0).min() > 0
    expected = frechet_distance(ff.mean(0), np.cov(ff, rowvar=False, bias=True),
                                fr.mean(0), np.cov(fr, rowvar=False, bias=True))
    assert res["fvd"] > 1e-3
    assert res["fvd"] == pytest.approx(expected, rel=1e-6)
    stats, _ = fvd_mod.i3d_stats(real, I3DFeatures(det, progress=False))
    # features come from float32 batches of another size, so compare to float32 round-off, not bits
    np.testing.assert_allclose(stats.cov, np.cov(fr, rowvar=False, bias=True), rtol=1e-4, atol=1e-9)
    assert not np.allclose(stats.cov, np.cov(fr, rowvar=False), rtol=1e-3, atol=0)  # ÷N, not ÷(N-1)
    same = fvd_mod.fvd(real, real, i3d_file, progress=False)["fvd"]
    assert abs(same) < 1e-6 * res["fvd"]
    # real statistics round-trip through a .npz
    stats = tmp_path / "real_i3d.npz"
    fvd_mod.fvd(fake, real, i3d_file, progress=False, save_real_stats=stats)
    again = fvd_mod.fvd(fake, stats, i3d_file, progress=False)["fvd"]
    assert again == pytest.approx(res["fvd"], rel=1e-9)
    # ... and refuse a protocol they were not made under; foreign statistics get a note
    with pytest.raises(ValueError, match=r"another protocol:\n  theirs: .*with stride 1.*\n  this run: .*stride 2"):
        fvd_mod.fvd(fake, stats, i3d_file, progress=False, stride=2)
    with np.load(stats) as z:
        np.savez(tmp_path / "foreign.npz", **{k: z[k] for k in z.files if k != "protocol"})
    assert "its protocol is not recorded" in fvd_mod.fvd(fake, tmp_path / "foreign.npz", i3d_file,
                                                         progress=False)["notes"][0]
    # ... and refuse, before I3D loads, a reference of other I3D weights or of another network (both gave numbers)
    other = tmp_path / "other_i3d.pt"
    other.write_bytes(Path(i3d_file).read_bytes() + b"\0")
    with pytest.raises(ValueError, match=r"holds statistics of i3d weights with sha256 \w+…, but .*other_i3d\.pt is"):
        fvd_mod.fvd(fake, stats, other, progress=False)
    with np.load(stats) as z:
        np.savez(tmp_path / "dino.npz", **{**{k: z[k] for k in z.files}, "feature": np.asarray("dinov2")})
    with pytest.raises(ValueError, match=r"dino\.npz holds dinov2 statistics, not i3d ones"):
        fvd_mod.fvd(fake, tmp_path / "dino.npz", i3d_file, progress=False)


def test_extractor_rejects_float_videos_and_batches_by_shape(i3d_file: str) -> None:
    ext = I3DFeatures(load_i3d(i3d_file), batch_size=4, progress=False)
    with pytest.raises(TypeError, match="uint8"):
        ext.features(np.zeros((1, 16, 8, 8, 3), dtype=np.float32))
    clips = [videos(1, 16, seed=s, hw=hw)[0] for s, hw in enumerate([(24, 40), (24, 40), (32, 32)])]
    mixed = ext(clips)
    alone = np.concatenate([ext([c]) for c in clips])
    np.testing.assert_allclose(mixed, alone, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("frames", [3, 16])
def test_channels_last_clips_become_bcthw_also_with_3_frames(frames: int) -> None:
    clips = np.random.default_rng(0).integers(0, 256, (2, frames, 8, 6, 3), dtype=np.uint8)
    assert torch.equal(to_bcthw_uint8(clips), torch.from_numpy(clips).permute(0, 4, 1, 2, 3))
    assert to_bcthw_uint8(torch.from_numpy(clips).permute(0, 4, 1, 2, 3)).shape == (2, 3, frames, 8, 6)


def test_cli_reads_video_folders(i3d_file: str, tmp_path) -> None:
    real_dir, fake_dir = tmp_path / "real", tmp_path / "fake"
    real_dir.mkdir()
    fake_dir.mkdir()
    real = videos(6, 16, seed=3)
    for i, v in enumerate(real):
        np.save(real_dir / f"{i}.npy", v)
    fake = videos(3, 16, seed=4, shift=30.0)
    np.save(fake_dir / "0.npy", fake[0])
    frames = fake_dir / "1"
    frames.mkdir()
    for j, fr in enumerate(fake[1]):
        Image.fromarray(fr).save(frames / f"{j:04d}.png")
    gif = [Image.fromarray(fr) for fr in fake[2]]
    gif[0].save(fake_dir / "2.gif", save_all=True, append_images=gif[1:], duration=40)
    read = [read_video(p) for p in list_videos(fake_dir)]
    np.testing.assert_array_equal(read[0], fake[0])
    np.testing.assert_array_equal(read[1], fake[1])  # PNG frames are lossless
    assert read[2].shape == fake[2].shape  # GIF is palettised: only the shape is exact

    parser = argparse.ArgumentParser()
    add_fvd_parser(parser.add_subparsers())
    out = tmp_path / "res.json"
    args = parser.parse_args(["fvd", "--fake", str(fake_dir), "--real", str(real_dir),
                              "--i3d", i3d_file, "--out", str(out)])
    assert args.func(args) == 0
    res = json.loads(out.read_text())["fvd"]
    assert res["n_fake"] == 3 and res["n_real"] == 6 and res["fvd"] > 0
    direct = fvd_mod.fvd(read, real, i3d_file, progress=False)["fvd"]
    assert res["fvd"] == pytest.approx(direct, rel=1e-9)


def test_inputs_are_checked_before_the_network_loads_or_a_set_is_embedded(i3d_file: str, tmp_path) -> None:
    """A typo in --fake (or audio, images given as videos) is refused before I3D loads and before the real set
    is embedded; the weights path here does not even exist."""
    real_dir, audio_dir = tmp_path / "real", tmp_path / "audio"
    real_dir.mkdir()
    audio_dir.mkdir()
    np.save(real_dir / "0.npy", videos(1, 16, seed=0)[0])
    (audio_dir / "0.wav").write_bytes(b"RIFF")
    for fake, says in [(tmp_path / "nothere", "video folder not found: .*nothere"),
                       (audio_dir, "no videos .* in .*audio")]:
        with pytest.raises(FileNotFoundError, match=says):
            fvd_mod.fvd(fake, real_dir, tmp_path / "no_i3d.pt", progress=False)
        with pytest.raises(FileNotFoundError, match=says):
            fvd_mod.fid_frames(real_dir, fake, tmp_path / "no_inception.pth", progress=False)


def test_videos_all_too_short_say_so_and_the_protocol_names_its_frames(i3d_file: str, tmp_path) -> None:
    short = videos(3, 8, seed=1)
    with pytest.raises(ValueError, match=r"I3D real: all 3 videos are shorter than the 16 frames a clip takes .*"
                                         r"the longest has 8\): pass --frames"):
        fvd_mod.fvd(short, short, i3d_file, progress=False)
    res = fvd_mod.fvd(short, short, i3d_file, num_frames=8, progress=False)
    assert res["protocol"].startswith("StyleGAN-V fvd2048_8f: ") and "; 8 consecutive frames" in res["protocol"]
    assert fvd_mod.PROTOCOL_FVD.format(frames=16, start=0, stride=1, max_clips=2048).startswith(
        "StyleGAN-V fvd2048_16f: ")  # the default's string, as statistics saved before recorded it


def test_training_previews_given_as_samples_are_noted(i3d_file: str, tmp_path) -> None:
    """A video preview is a tiled grid of clips: FVD reads it as one video, so the result says what it got."""
    fake_dir = tmp_path / "fake"
    fake_dir.mkdir()
    frames = [Image.fromarray(fr) for fr in videos(1, 16, seed=2)[0]]
    frames[0].save(fake_dir / "step_00000040.gif", save_all=True, append_images=frames[1:], duration=40)
    np.save(fake_dir / "000000.npy", videos(1, 16, seed=3)[0])
    res = fvd_mod.fvd(fake_dir, videos(4, 16, seed=4), i3d_file, progress=False)
    assert res["notes"][0].startswith("1 of the 2 generated files look like training previews or sample grids "
                                      "(e.g. step_00000040.gif")
    (fake_dir / "step_00000040.gif").unlink()  # per-sample files only: no such note
    np.save(fake_dir / "000001.npy", videos(1, 16, seed=5)[0])
    res = fvd_mod.fvd(fake_dir, videos(4, 16, seed=4), i3d_file, progress=False)
    assert not any("previews" in note for note in res["notes"])


def test_missing_i3d_error_names_file_and_source(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"i3d_torchscript\.pt.*dropbox"):
        load_i3d(tmp_path)


class Recorder:
    """Forwards calls to a real FIDInceptionV3 and keeps what went in and came out."""

    def __init__(self, net: nn.Module) -> None:
        self.net, self.inputs, self.pools = net, [], []

    def __call__(self, x: torch.Tensor, *, spatial: bool = True, logits: bool = True):
        out = self.net(x, spatial=spatial, logits=logits)
        self.inputs.append(x.clone())
        self.pools.append(out.pool.double().numpy())
        return out


def test_frame_stats_feed_frames_to_fid_inception() -> None:
    from selfflow.eval.inception import FIDInceptionV3

    torch.manual_seed(0)
    net = FIDInceptionV3()
    with torch.no_grad():  # sane BatchNorm buffers so that random features are not degenerate
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
                m.running_mean.normal_(0, 0.1)
    vids = videos(2, 2, seed=7, hw=(32, 32))
    rec = Recorder(net)
    stats = fvd_mod.frame_stats(vids, rec, batch_size=3, progress=False)
    frames = torch.cat(rec.inputs)
    assert frames.dtype == torch.uint8 and frames.shape == (4, 32, 32, 3)
    assert torch.equal(frames, torch.from_numpy(vids.reshape(4, 32, 32, 3)))
    pools = np.concatenate(rec.pools)
    assert pools.shape == (4, 2048) and pools.std(0).max() > 0
    assert stats.count == 4 and stats.biased
    np.testing.assert_allclose(stats.mean, pools.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(pools, rowvar=False, bias=True), rtol=1e-8, atol=1e-12)


class TinyInception(nn.Module):
    """Cheap stand-in with FIDInceptionV3's call convention (uint8 NHWC in, ``.pool`` out)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, stride=2)

    def forward(self, x: torch.Tensor, *, spatial: bool = True, logits: bool = True):
        h = torch.tanh(self.conv(x.permute(0, 3, 1, 2).float() / 128 - 1))
        return type("Feats", (), {"pool": h.mean((2, 3))})()


def test_fid_frames_value_and_frame_cap() -> None:
    torch.manual_seed(0)
    net = TinyInception()
    real, fake = videos(3, 5, seed=7, hw=(32, 32)), videos(3, 4, seed=8, shift=50.0, hw=(32, 32))
    res = fvd_mod.fid_frames(fake, real, net, batch_size=7, progress=False)
    assert set(res) >= {"fid_frames", "protocol", "weights"}
    assert res["n_real"] == 15 and res["n_fake"] == 12
    with torch.no_grad():
        pr = net(torch.from_numpy(real.reshape(-1, 32, 32, 3))).pool.double().numpy()
        pf = net(torch.from_numpy(fake.reshape(-1, 32, 32, 3))).pool.double().numpy()
    expected = frechet_distance(pf.mean(0), np.cov(pf, rowvar=False, bias=True),
                                pr.mean(0), np.cov(pr, rowvar=False, bias=True))
    assert expected > 1e-3
    assert res["fid_frames"] == pytest.approx(expected, rel=1e-6)
    capped = fvd_mod.fid_frames(fake, real, net, max_frames=7, progress=False)
    assert capped["n_real"] == capped["n_fake"] == 7
