import json
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from scipy.spatial.transform import Rotation

from selfflow.core.data.shard_format import shard_urls
from selfflow.robotics.dataset import cut_window, decode_episode, episode_window_stream
from selfflow.robotics.fractal import (
    GRIPPER,
    IS_FIRST,
    EpisodeError,
    parse_episode,
    read_episodes,
)
from selfflow.robotics.normalize import (
    ActionNormalizer,
    ActionStats,
    gripper_abs_to_rel,
    gripper_rel_to_abs,
    rpy_to_axis_angle,
)
from selfflow.robotics.prepare import episode_key, is_validation, name_number


def _source_episodes(folder):
    errors: list[dict] = []
    eps = {episode_key(name_number(p.name), e.meta["index"]): e
           for p in sorted(folder.iterdir()) for e in read_episodes(p, errors)}
    return eps, errors


def test_reader_uses_real_keys_and_rejects_base_motion(fake_tfrecords):
    eps, errors = _source_episodes(fake_tfrecords)
    assert len(eps) == 7 and len(errors) == 1 and "base_displacement" in errors[0]["error"]
    ep = eps["fractal_00000_000"]
    assert ep.actions.shape == (ep.length, 7) and ep.actions.dtype == np.float32
    assert ep.proprio.shape == (ep.length, 8)
    assert all(f[:2] == b"\xff\xd8" for f in ep.frames)  # JPEG SOI
    assert set(np.unique(ep.actions[:, 6])) <= {-1.0, 0.0, 1.0} and (ep.actions[:, 6] == 1).any()
    with pytest.raises(EpisodeError, match="base_displacement"):
        list(read_episodes(sorted(fake_tfrecords.iterdir())[0]))  # no error list: raised


def test_parse_errors_name_the_key():
    from tfrecord import example_pb2

    ex = example_pb2.Example()
    ex.features.feature[IS_FIRST].int64_list.value.extend([1, 0])
    with pytest.raises(EpisodeError, match="0 images for 2 steps"):
        parse_episode(ex.SerializeToString())
    ex.features.feature["steps/observation/image"].bytes_list.value.extend([b"a", b"b"])
    with pytest.raises(EpisodeError, match="world_vector"):
        parse_episode(ex.SerializeToString())
    assert GRIPPER.startswith("steps/action/")


def test_prepare_round_trip(fake_tfrecords, prepared):
    out, manifest = prepared
    source, _ = _source_episodes(fake_tfrecords)
    assert manifest["episodes"]["train"] + manifest["episodes"]["val"] == 7 and len(manifest["rejected"]) == 1
    seen = {}
    for split in ("train", "val"):
        for raw in wds.WebDataset(shard_urls(out / split), shardshuffle=False, empty_check=False):
            ep = decode_episode(raw)
            seen[ep["key"]] = split
            src = source[ep["key"]]
            np.testing.assert_array_equal(ep["actions"], src.actions)  # bit-exact
            assert ep["jpegs"] == [bytes(f) for f in src.frames]  # original JPEGs, no re-encode
            assert ep["instruction"] == src.instruction and ep["meta"]["sha256"] == src.meta["sha256"]
            assert split == ("val" if is_validation(ep["key"], 0.3) else "train")
    assert set(seen) == set(source)
    assert sorted(manifest["split"]["train"]) == sorted(k for k, s in seen.items() if s == "train")
    stats = json.loads((out / "stats.json").read_text())
    train = np.concatenate([source[k].actions for k in manifest["split"]["train"]]).astype(np.float64)
    np.testing.assert_allclose(stats["q01"], np.quantile(train, 0.01, axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], train.std(0), rtol=1e-6)
    assert stats["count"] == len(train)


def test_split_is_deterministic_and_roughly_proportional():
    keys = [f"fractal_{s:05d}_{i:03d}" for s in range(20) for i in range(50)]
    val = [k for k in keys if is_validation(k, 0.05)]
    assert val == [k for k in keys if is_validation(k, 0.05)]
    assert 25 <= len(val) <= 75
    assert not any(is_validation(k, 0.0) for k in keys)


def test_gripper_conversions():
    o, c = 1.0, -1.0
    np.testing.assert_array_equal(gripper_rel_to_abs(np.array([0, 0, 1, 0, 0, -1, 0])), [o, o, c, c, c, o, o])
    np.testing.assert_array_equal(gripper_rel_to_abs(np.array([0.05, -0.05, 0])), [o, o, o])  # below ±0.1
    # Octo's rel2abs_gripper_actions: before the first event, the state it leaves — a first "open" means the
    # gripper was closed until then (it used to read open)
    np.testing.assert_array_equal(gripper_rel_to_abs(np.array([0, 0, 0, -1, 0, 1, 0])), [c, c, c, o, o, c, c])
    assert gripper_abs_to_rel(c, o) == 1.0 and gripper_abs_to_rel(o, c) == -1.0 and gripper_abs_to_rel(c, c) == 0.0


def _stats():
    rng = np.random.default_rng(0)
    return ActionStats.compute(rng.normal(size=(500, 7)) * [1, 2, 3, 0.1, 0.2, 0.3, 1])


@pytest.mark.parametrize("mode", ["bound", "gaussian"])
def test_normalizer_inverse_and_clipping(mode):
    stats = _stats()
    norm = ActionNormalizer(stats, mode)
    lo, hi = np.array(stats.q01), np.array(stats.q99)
    x = np.random.default_rng(1).uniform(lo, hi, size=(50, 7)).astype(np.float32)
    x[:, 6] = np.sign(x[:, 6])
    np.testing.assert_allclose(norm.denormalize(norm.normalize(x)), x, rtol=1e-5, atol=1e-5)
    if mode == "bound":
        far = (hi * 10)[None].astype(np.float32)
        assert np.allclose(norm.normalize(far)[0, :6], 1.0)
        np.testing.assert_allclose(norm.normalize(lo[None])[0, :6], -1.0, atol=1e-6)
    # a sampled chunk is clipped where training targets lie: a 2.5-sigma motion is a gaussian target, not a bound one
    sampled = torch.tensor([[0.5, 2.5, -3.0, 1.5, 0.0, -1.2, 1.7]])
    clipped = norm.clip(sampled)
    arm = [0.5, 1.0, -1.0, 1.0, 0.0, -1.0] if mode == "bound" else [0.5, 2.5, -3.0, 1.5, 0.0, -1.2]
    assert clipped[0].tolist() == pytest.approx([*arm, 1.0])


def test_relative_gripper_pads_with_no_change(prepared):
    out, _ = prepared
    raw = next(iter(wds.WebDataset(shard_urls(out / "train"), shardshuffle=False, empty_check=False)))
    ep = decode_episode(raw)
    ep["actions"][-1, 6] = 1.0  # the episode ends on a close command: the padding must not repeat it
    norm = ActionNormalizer(ActionStats.load(out / "stats.json"), gripper="relative")
    w = cut_window(ep, len(ep["jpegs"]) - 1, frames=2, chunk=4, size=(16, 20), normalizer=norm)
    assert w["actions"][:, 6].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_rpy_to_axis_angle_matches_scipy_and_small_angle_passthrough():
    rng = np.random.default_rng(0)
    for rpy in rng.uniform(-1.0, 1.0, (20, 3)):
        np.testing.assert_allclose(rpy_to_axis_angle(rpy), Rotation.from_euler("xyz", rpy).as_rotvec(), atol=1e-9)
    for rpy in rng.uniform(-0.03, 0.03, (20, 3)):  # fractal's deltas: both conventions agree to first order
        assert np.abs(rpy_to_axis_angle(rpy) - rpy).max() < 1e-3


def test_window_padding_at_episode_end(prepared):
    out, _ = prepared
    raw = next(iter(wds.WebDataset(shard_urls(out / "train"), shardshuffle=False, empty_check=False)))
    ep = decode_episode(raw)
    t = len(ep["jpegs"])
    norm = ActionNormalizer(ActionStats.load(out / "stats.json"))
    w = cut_window(ep, t - 2, frames=3, chunk=4, size=(16, 20), normalizer=norm)
    assert w["frames"].shape == (3, 3, 16, 20) and w["actions"].shape == (4, 7)
    assert w["action_mask"].tolist() == [True, True, False, False]
    np.testing.assert_array_equal(w["frames"][:, 1], w["frames"][:, 2])  # last frame repeated
    target = norm.training_target(ep["actions"])
    np.testing.assert_allclose(w["actions"][:2], target[-2:])
    np.testing.assert_allclose(w["actions"][2:, :6], np.broadcast_to(norm.normalize(np.zeros(7))[:6], (2, 6)))
    assert (w["actions"][2:, 6] == target[-1, 6]).all()
    assert set(np.unique(target[:, 6])) <= {-1.0, 1.0}  # absolute gripper target


def test_window_stream_resumes_exactly(prepared):
    out, _ = prepared
    norm = ActionNormalizer(ActionStats.load(out / "stats.json"))
    urls = shard_urls(out / "train")

    def make():
        return episode_window_stream(urls, 2, norm, frames=2, chunk=3, size=(16, 20), seed=5)

    a = make()
    it = iter(a)
    next(it)
    state = a.state_dict()
    expected = next(it)
    b = make()
    b.load_state_dict(state)
    got = next(iter(b))
    assert got["captions"] == expected["captions"]
    np.testing.assert_array_equal(got["actions"].numpy(), expected["actions"].numpy())


def test_prepare_by_ranks_resumes_and_matches_one_process(fake_tfrecords, prepared, tmp_path, monkeypatch):
    from selfflow.robotics import prepare as prep

    _, single = prepared
    opts = {"input": str(fake_tfrecords), "out": str(tmp_path), "val_fraction": 0.3}
    assert prep.prepare_rt1({**opts, "rank": 0, "world_size": 2}) == {"pending": [1]}
    assert not (tmp_path / "manifest.json").exists()
    merged = prep.prepare_rt1({**opts, "rank": 1, "world_size": 2})
    assert merged["split"] == single["split"] and merged["rejected"] == single["rejected"]
    assert json.loads((tmp_path / "stats.json").read_text()) == json.loads((prepared[0] / "stats.json").read_text())

    def boom(*args, **kwargs):
        raise AssertionError("a converted shard was converted again")

    monkeypatch.setattr(prep, "convert_shard", boom)
    assert prep.prepare_rt1(opts)["episodes"] == single["episodes"]  # rerun: only the merge
    assert not list(tmp_path.rglob("*.tmp"))
    # a rerun with other split options would mix two conversions under one manifest: refused
    with pytest.raises(ValueError, match=r"converted with other options \(val_fraction: 0.3 then, 0.5 now\)"):
        prep.prepare_rt1({**opts, "val_fraction": 0.5})
    # a rerun with fewer shards keeps every converted shard in the statistics, as training reads them all
    assert prep.prepare_rt1({**opts, "max_shards": 1})["episodes"] == single["episodes"]


def test_a_rerun_over_another_subset_of_the_files_converts_each_file_once(fake_tfrecords, prepared, tmp_path):
    """Reports were numbered by position: shard 1 converted alone became report 0, then the full set skipped
    shard 0 as done and converted shard 1 twice. Numbered by the names' shard numbers, any order of partial
    runs (a copy still running) gives the one-pass result."""
    from selfflow.robotics import prepare as prep

    _, single = prepared
    part = tmp_path / "part"
    part.mkdir()
    files = sorted(fake_tfrecords.iterdir())
    os.symlink(files[1], part / files[1].name)
    opts = {"out": str(tmp_path / "out"), "val_fraction": 0.3}
    first = prep.prepare_rt1({**opts, "input": str(part)})
    assert sorted(first["split"]["train"] + first["split"]["val"]) == sorted(
        k for s in ("train", "val") for k in single["split"][s] if k.startswith("fractal_00001_"))
    merged = prep.prepare_rt1({**opts, "input": str(fake_tfrecords)})
    assert merged["split"] == single["split"] and merged["episodes"] == single["episodes"]


def test_files_without_distinct_shard_numbers_get_distinct_keys(fake_tfrecords, tmp_path, caplog):
    """Two files named a.tfrecord and b.tfrecord both gave fractal_00000_* keys (and so one split and window
    start for two episodes); they are numbered by order, and a changed file list is then refused."""
    from selfflow.robotics import prepare as prep

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for name, src in zip(("a.tfrecord", "b.tfrecord"), sorted(fake_tfrecords.iterdir()), strict=True):
        os.symlink(src, renamed / name)
    out = tmp_path / "out"
    manifest = prep.prepare_rt1({"input": str(renamed), "out": str(out), "val_fraction": 0.3})
    keys = manifest["split"]["train"] + manifest["split"]["val"]
    assert len(keys) == len(set(keys)) == 7 and {k[:14] for k in keys} == {"fractal_00000_", "fractal_00001_"}
    assert "numbered by their sorted order" in caplog.text
    (renamed / "a.tfrecord").rename(renamed / "c.tfrecord")  # now b is first: shard 0 would be another file
    with pytest.raises(ValueError, match=r"00000\.json was converted from a\.tfrecord, but shard 0 of the input "
                                         r"is now b\.tfrecord"):
        prep.prepare_rt1({"input": str(renamed), "out": str(out), "val_fraction": 0.3})


def test_an_over_large_frame_skips_the_episode(prepared, tmp_path, monkeypatch, caplog):
    """A frame over PIL's decompression-bomb bound (lowered here to the real frames' size) makes its episode
    a corrupt sample: skipped, counted and logged with shard and key — not a warning and a huge decode."""
    import io
    import logging
    import warnings

    from PIL import Image

    out, _ = prepared
    raw = next(iter(wds.WebDataset(shard_urls(out / "train"), shardshuffle=False, empty_check=False)))
    members = {k: v for k, v in raw.items() if not k.startswith("__")}
    w, h = Image.open(io.BytesIO(members[min(k for k in members if k.endswith(".jpg"))])).size
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", w * h)
    buf = io.BytesIO()
    Image.new("RGB", (w * 3 // 2, h)).save(buf, format="jpeg")  # 1.5× the bound: PIL alone only warns
    bomb = {k: buf.getvalue() if k.endswith(".jpg") else v for k, v in members.items()}
    shard = tmp_path / "episodes-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        sink.write({"__key__": "bomb", **bomb})
        sink.write({"__key__": "good", **members})
    caplog.set_level(logging.WARNING, "selfflow.shards")
    norm = ActionNormalizer(ActionStats.load(out / "stats.json"))
    stream = episode_window_stream([str(shard)], 1, norm, frames=2, chunk=3, size=(16, 20))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        it = iter(stream)
        batches = [next(it), next(it)]  # two epochs: the bomb episode is met at least once
    assert not [c for c in caught if issubclass(c.category, Image.DecompressionBombWarning)]
    assert [b["frames"].shape for b in batches] == [(1, 3, 2, 16, 20)] * 2 and stream.skipped >= 1
    assert "episodes-000000.tar, key bomb): ValueError: image bomb frame" in caplog.text
