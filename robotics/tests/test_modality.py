import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from selfflow.core.config import load_config
from selfflow.core.registry import get_modality
from selfflow.core.trainer import Trainer
from selfflow.robotics.modality import RT1Modality


def _modality(data_dir, **opts):
    return RT1Modality({"dataset": "fake", "fake_dir": str(data_dir), **opts})


def test_registered_through_entry_points():
    assert get_modality("rt1") is RT1Modality


def test_pack_layout_and_round_trip(fake_data_dir):
    assert _modality(fake_data_dir, image_size=(16, 24)).action_copies == 1  # the schedule's default
    m = _modality(fake_data_dir, frames=2, chunk=4, image_size=(16, 24), patch=(1, 8, 8), schedule=None)
    assert m.grid == (2, 2, 3) and m.token_channels == 192 + 7 + 1 and m.action_copies == 28  # legacy: fill
    frames = torch.rand(3, 3, 2, 16, 24) * 2 - 1
    actions = torch.rand(3, 4, 7) * 2 - 1
    tok = m.pack(frames, actions)
    assert tok.x.shape == (3, 12 + 4, 200)
    assert (tok.x[:, :12, -1] == -1).all() and (tok.x[:, 12:, -1] == 1).all()  # token-type flag
    assert (tok.x[:, :12, 192:199] == 0).all()  # video tokens: action channels empty
    np.testing.assert_array_equal(tok.x[:, 12:, 7:14], actions)  # second copy of the action
    ids = tok.ids[0]
    assert ids[:12, 1].max() == 1 and (ids[12:, 1] == 2).all()  # actions: a slot outside the video grid
    assert ids[12:, 0].tolist() == [1, 1, 1, 1] and ids[12:, 2].tolist() == [0, 1, 2, 3]
    assert torch.equal(m.sample_ids(3, "cpu"), tok.ids)
    f2, a2 = m.unpack(tok.x)
    assert torch.equal(f2, frames) and torch.allclose(a2, actions, atol=1e-6)
    media = m.decode(tok.x)
    f3, a3 = m.split_media(media)
    assert torch.allclose(f3, frames) and torch.allclose(a3, actions, atol=1e-6)


def test_action_time_follows_the_frame_it_produces(fake_data_dir):
    m = _modality(fake_data_dir, frames=4, chunk=6, image_size=(16, 16), patch=(2, 8, 8), context="noised")
    # action k produces frame k+1 → latent frame (k+1)//2, clamped to the last latent frame
    assert m.action_ids(1, "cpu")[0, :, 0].tolist() == [0, 1, 1, 1, 1, 1]


def test_bad_options_are_clear_errors(fake_data_dir):
    with pytest.raises(ValueError, match="not divisible by patch"):
        _modality(fake_data_dir, image_size=(30, 40))
    with pytest.raises(ValueError, match=r"episode_shards\.shards\n  Field required"):
        RT1Modality({"dataset": "episode_shards"})
    with pytest.raises(ValueError, match=r"episode_shards\.fake_dir\n  Extra inputs are not permitted"):
        RT1Modality({"dataset": "episode_shards", "shards": "x", "fake_dir": "y"})
    m = _modality(fake_data_dir, conditioning="class")
    with pytest.raises(ValueError, match="conditioning 'class' knows only"):
        m.with_labels({"captions": ["stack the blocks"]})


def test_tiny_model_overfits_one_batch_of_action_chunks(fake_data_dir, tmp_path):
    """The real Trainer (Self-Flow objective under the rt1 token schedule, EMA teacher) on one repeated
    batch: the actions' flow-matching error at fixed levels and noise (current frame clean) must fall
    strongly within 120 steps, and the per-group losses are logged. (At the config's lr, 1e-3, the error falls
    to 0.27-0.38 of its start over train.seed 0-3; at 3e-3 it oscillated, 0.57-0.75 at 80 steps.)"""
    from selfflow.robotics.validate import flow_losses

    cfg = load_config("configs/tiny/rt1.yaml", [
        f"output_dir={tmp_path}", f"data.options.fake_dir={fake_data_dir}", "train.steps=120",
        "train.batch_size=4", "optim.lr=0.001", "optim.warmup_steps=0", "data.options.image_size=[16,16]"])
    torch.manual_seed(0)
    tr = Trainer(cfg, resume=False, progress=False)
    objective = tr.run.objectives["rt1"]
    assert objective.mask_ratio == 0.1 and objective.gamma == 0.8  # Self-Flow stays on (video)
    m = tr.run.modalities["rt1"]
    assert m.action_copies == 1 and m.token_groups(m.pack(torch.zeros(1, 3, 2, 16, 16), torch.zeros(1, 4, 7))
                                                  ).tolist() == [0] * 4 + [1] * 4 + [2] * 4
    batch = next(iter(tr.streams["rt1"]))
    tokens, cond = m.encode(batch, "cpu")

    def action_error() -> float:
        return flow_losses(tr.raw, m, tokens, cond, (0.3, 0.6), seed=0)["val_loss_fm_action"]

    before = action_error()
    for _ in range(120):
        out = tr.train_step([batch], "rt1")
    after = action_error()
    assert {"loss_fm_video", "loss_fm_action"} <= set(out) and np.isfinite(out["loss"])
    assert "loss_fm_context" not in out  # the clean current frame carries no loss
    assert after < 0.6 * before, (before, after)


def test_a_run_resumes_exactly_with_its_data_moved_and_refuses_other_data(fake_data_dir, tmp_path):
    """The data copied elsewhere between two sessions (another disk, a node's scratch): the option that says where
    it lies (``data_location``) may change on a resume, and the stream checks that the shards there are those it
    was reading (names below their folder, sizes), then continues with the uninterrupted run's numbers. The
    changed path used to refuse the resume; other data is refused now, by the stream."""
    from selfflow.core.metrics import read_metrics

    here, there, other = tmp_path / "here", tmp_path / "there", tmp_path / "other"
    shutil.copytree(fake_data_dir, here)

    def fit(name: str, data: Path, steps: int) -> list[float]:
        cfg = load_config("configs/tiny/rt1.yaml", [
            f"output_dir={tmp_path}", f"name={name}", f"data.options.fake_dir={data}", f"train.steps={steps}",
            "train.batch_size=2", "data.options.image_size=[16,16]", "checkpoint.every=2", "sample.every=0",
            "logging.every=1"])
        tr = Trainer(cfg, progress=False)
        with tr.log.text_log():
            tr.fit()
        return [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]

    whole = fit("whole", here, 4)
    fit("split", here, 2)
    shutil.copytree(here, there)
    shutil.copytree(here, other)
    shutil.rmtree(here)  # the data is gone from where the run began
    assert fit("split", there, 4) == whole
    assert "data.options.fake_dir" in (tmp_path / "split" / "train.log").read_text()  # the move is logged
    sorted((other / "train").glob("*.tar"))[-1].unlink()
    with pytest.raises(Exception, match=r"on other data than it was reading \(4 shards then, 3 now; not there"):
        fit("split", other, 6)


def test_legacy_plain_objective_still_trains(fake_data_dir, tmp_path):
    """``schedule: null``: the plain per-token objective, actions repeated to fill their token."""
    cfg = load_config("configs/tiny/rt1.yaml", [
        f"output_dir={tmp_path}", f"data.options.fake_dir={fake_data_dir}", "train.steps=2",
        "train.batch_size=2", "data.options.image_size=[16,16]", "data.options.schedule=null"])
    tr = Trainer(cfg, resume=False, progress=False)
    m = tr.run.modalities["rt1"]
    assert m.token_schedule() is None and m.action_copies == 28
    out = tr.train_step([next(iter(tr.streams["rt1"]))], "rt1")
    assert {"loss", "loss_fm", "loss_rep"} <= set(out) and not any(k.startswith("loss_fm_") for k in out)


def test_clean_context_needs_single_frame_tokens(fake_data_dir):
    with pytest.raises(ValueError, match="context = clean needs"):
        _modality(fake_data_dir, frames=4, image_size=(16, 16), patch=(2, 8, 8))
    assert _modality(fake_data_dir, frames=4, image_size=(16, 16), patch=(2, 8, 8), context="noised").grid[0] == 2


def test_stream_refuses_batches_larger_than_the_split(fake_data_dir):
    m = _modality(fake_data_dir)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        m.stream(batch_size=64, seed=0)
    batch = next(iter(m.stream(batch_size=2, seed=0)))
    assert batch["frames"].shape == (2, 3, 2, 32, 40) and batch["actions"].shape == (2, 4, 7)
    assert batch["frames"].min() >= -1 and batch["frames"].max() <= 1


def test_init_from_a_video_run_keeps_blocks_and_adds_rt1_projections(fake_data_dir, tmp_path):
    from safetensors.torch import save_file

    from selfflow.core.backbones import build_backbone
    from selfflow.core.run_setup import build_model_config
    from selfflow.video.modality import VideoModality

    video_cfg = load_config("configs/tiny/video.yaml")
    source = build_backbone(build_model_config(video_cfg, VideoModality(video_cfg.data.options), True))
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "ema.safetensors"))
    cfg = load_config("configs/tiny/rt1.yaml", [
        f"output_dir={tmp_path}", f"data.options.fake_dir={fake_data_dir}", f"train.init_from={tmp_path}",
        "train.steps=1", "train.batch_size=2"])
    tr = Trainer(cfg, resume=False, progress=False)
    assert any(k.startswith("img_in.rt1") for k in tr.init_report["fresh"])
    assert any(k.startswith("img_in.video") for k in tr.init_report["ignored"])
    name = next(k for k in source.state_dict() if k.startswith("single_blocks.0."))
    assert torch.equal(tr.raw.state_dict()[name], source.state_dict()[name])


def _tiny_wan_dir(tmp_path):
    """The video package's tiny random Wan2.2-layout VAE (its test helper), saved in diffusers format."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "video_test_helpers", Path(__file__).parents[2] / "video" / "tests" / "conftest.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    helpers.tiny_wan("wan2.2").save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


def test_wan_codec_layout_and_policy(fake_data_dir, tmp_path):
    from selfflow.core.backbones import build_backbone
    from selfflow.core.run_setup import build_model_config
    from selfflow.robotics.policy import SelfFlowPolicy

    m = _modality(fake_data_dir, codec="wan2.2", vae_dir=str(_tiny_wan_dir(tmp_path)), frames=5, chunk=8,
                  image_size=(32, 32), patch=(1, 1, 1))
    assert m.latent_shape == (4, 2, 2, 2) and m.grid == (2, 2, 2) and m.video_channels == 4
    # Wan's temporal stride 4: actions 0–3 produce frames 1–4 (latent frame 1); later ones clamp to it
    assert m.action_ids(1, "cpu")[0, :, 0].tolist() == [1] * 8
    frames = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    actions = torch.rand(2, 8, 7) * 2 - 1
    tok = m.pack(frames, actions)
    assert tok.x.shape == (2, 8 + 8, m.token_channels)
    torch.testing.assert_close(tok.x[:, :8, :4], m.wan.encode(frames).permute(0, 2, 3, 4, 1).reshape(2, 8, 4))
    video, acts = m.unpack(tok.x)
    assert video.shape == (2, 3, 5, 32, 32) and torch.allclose(acts, actions, atol=1e-6)
    cfg = load_config("configs/tiny/rt1.yaml", [f"data.options.fake_dir={fake_data_dir}"])
    model = build_backbone(build_model_config(cfg, m, uses_projector=False))
    chunk = SelfFlowPolicy(model, m, steps=2)(np.zeros((64, 64, 3), np.uint8), "open top drawer")
    assert chunk.shape == (8, 7) and np.isfinite(chunk).all()


def test_action_repeat_is_validated_at_construction(fake_data_dir):
    with pytest.raises(ValueError, match="at most 28 copies"):
        _modality(fake_data_dir, image_size=(16, 16), action_repeat=29)
    assert _modality(fake_data_dir, image_size=(16, 16), action_repeat=1).action_copies == 1


def test_the_action_statistics_are_recorded_and_used_without_the_data(fake_data_dir, tmp_path):
    """`selfflow simpler --run` on a machine without the dataset, or after it was prepared again: the policy
    de-normalises with the statistics it trained on (recorded with the run), not with whatever is on disk."""
    from selfflow.core.data.data_facts import collecting, replaying

    with collecting() as facts:
        trained = _modality(fake_data_dir)
    key = str(fake_data_dir / "stats.json")
    assert facts[key] == trained.stats.model_dump()
    recorded = {key: {**facts[key], "q99": [v * 2 for v in facts[key]["q99"]]}}  # the data changed since
    gone = tmp_path / "gone"
    with replaying({str(gone / "stats.json"): facts[key], **recorded}):
        assert _modality(fake_data_dir).stats.q99 == recorded[key]["q99"]
        assert _modality(gone).stats == trained.stats and not gone.exists()  # no fake data made in its place


def test_one_sample_file_holds_the_frames_and_the_actions(fake_data_dir, tmp_path):
    """`selfflow sample --out-dir` keeps the one file `write_sample` returns: the default (a PNG, actions in a
    JSON beside it) lost the actions."""
    m = _modality(fake_data_dir, image_size=(16, 16))
    frames = torch.rand(2, 3, 2, 16, 16) * 2 - 1
    actions = torch.rand(2, 4, 7) * 4 - 2  # partly outside the normalised range: decode clips them
    media = m.decode(m.pack(frames, actions).x)
    path = m.write_sample(media[1], 2, tmp_path / "000001")
    assert path == tmp_path / "000001.npz" and sorted(p.name for p in tmp_path.iterdir()) == ["000001.npz"]
    got = np.load(path)
    np.testing.assert_array_equal(got["frames"], ((frames[1].clamp(-1, 1) + 1) * 127.5).round().byte().permute(
        1, 2, 3, 0).numpy())
    want = m.normalizer.denormalize(m.normalizer.clip(actions[1]).numpy())
    assert got["actions_raw"].dtype == np.float32 and got["actions_raw"].shape == (4, 7)
    np.testing.assert_allclose(got["actions_raw"], want, rtol=1e-5, atol=1e-6)
    assert str(got["instruction"]) == m.class_names[2]
    assert str(np.load(m.write_sample(media[0], None, tmp_path / "x"))["instruction"]) == ""


@pytest.mark.distributed
def test_two_ranks_resume_with_the_uninterrupted_runs_numbers(fake_data_dir, tmp_path):
    """Each rank reads its own share of the shards, and an uneven split (11 training episodes) puts the ranks at
    different positions. A checkpoint kept rank 0's position only and gave it to every rank, so after a resume
    rank 1 read other samples than the uninterrupted run: the global losses differed from step 7 on. Every
    rank's position is kept now."""
    import json
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]

    def fit(name: str, steps: int) -> list[float]:
        sets = [f"output_dir={tmp_path}", f"name={name}", f"train.steps={steps}", "train.batch_size=2",
                f"data.options.fake_dir={fake_data_dir}", "data.options.image_size=[16,16]", "sample.every=0",
                "checkpoint.every=3", "logging.every=1", "train.num_threads=1"]
        r = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
             "selfflow.core.cli", "train", "--config", str(repo / "configs/tiny/rt1.yaml"), "--no-progress",
             *(a for s in sets for a in ("--set", s))],
            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [rec["loss"] for rec in map(json.loads, lines) if "loss" in rec]

    whole = fit("whole", 12)
    fit("split", 6)
    state = torch.load(tmp_path / "split/checkpoints/step_00000006.pt", weights_only=True)["streams"]["per_rank"]
    assert state[0]["rt1"] != state[1]["rt1"]  # the premise: the ranks stood at different places
    assert fit("split", 12) == whole


@pytest.mark.distributed
def test_a_two_rank_run_goes_on_in_one_process_with_resplit_data(fake_data_dir, tmp_path):
    """A job requeued on fewer GPUs: 2 torchrun ranks × 2 train 4 steps, then one process × 4 (the same global
    batch) resumes only with --resplit-data, its shard stream from the next epoch; model, optimizer and step go
    on."""
    import os
    import subprocess
    import sys

    from selfflow.core.metrics import read_metrics

    repo = Path(__file__).resolve().parents[2]
    base = [f"output_dir={tmp_path}", "name=r", f"data.options.fake_dir={fake_data_dir}",
            "data.options.image_size=[16,16]", "sample.every=0", "logging.every=1", "train.num_threads=1"]

    def train(launcher: list[str], *sets: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *launcher, "-m", "selfflow.core.cli", "train", "--config",
             str(repo / "configs/tiny/rt1.yaml"), "--no-progress", *flags,
             *(a for s in [*base, *sets] for a in ("--set", s))],
            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})

    two = train(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], "train.steps=4",
                "train.batch_size=2")
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    refused = train([], "train.steps=8", "train.batch_size=4")
    assert refused.returncode == 2 and "--resplit-data" in refused.stderr, refused.stderr[-2000:]
    one = train([], "train.steps=8", "train.batch_size=4", flags=("--resplit-data",))
    assert one.returncode == 0, one.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl")] == list(range(1, 9))
    assert "read otherwise (was 2×2, 0 workers, shuffle buffer 0; now 1×4, 0 workers" in one.stderr
    state = torch.load(tmp_path / "r/checkpoints/step_00000008.pt", weights_only=True)["streams"]["per_rank"]
    assert len(state) == 1 and state[0]["rt1"]["world_size"] == 1
