"""The ``rt1`` modality: joint video–action tokens for one MMDiT input/output projection.

The backbone holds one input projection and one head per modality and takes one modality per forward,
so video frames and the action chunk form ONE token sequence of a common width::

    video token  (patch of frames):  [patch (Cv) | 0 (7)                     | −1]   ids (t, h, w), patch grid
    action token (control step k):   [action (7) × R copies | 0 (Cv + 7 − 7R)   | +1]   ids (t_k, grid_h, k)

``Cv = c·pt·ph·pw`` with ``c = 3`` in pixel space (as the video package's pixel codec) or the Wan VAE's latent
channels (``codec: wan2.2 | wan2.1``, encoded on the fly; its causal first latent frame is the current frame
alone, so the policy can pin it). Action ``k`` produces frame ``k + 1``, so it sits at that frame's latent
time ``t_k`` (pixels: ``(k + 1) // pt``; Wan, temporal stride ``s``: ``(k // s + 1) // pt``; clamped to the
last latent frame); its spatial slot ``h = grid_h`` lies outside the video grid, ``w = k`` keeps the K
actions apart. The last channel flags the token type.

**Schedule** (core's token-group hook, :mod:`selfflow.core.token_schedule`). Three groups: ``context`` (the
current frame's tokens, latent frame 0: always clean, t = 0, no loss — the policy conditions on the observed
image exactly as trained), ``video`` (future frames: Self-Flow's Dual-Timestep masking and representation
loss, weight 1) and ``action`` (weight ``action_loss_weight``, its own level from ``action_timesteps``). Per
sample one of four modes is drawn with ``schedule`` probabilities (after UWM / VideoVLA):

- ``independent``: video at ``t`` (masked tokens ``s``), actions at their own ``t_a``;
- ``shared``: actions at the video's ``t``;
- ``policy``: future video at pure noise (t = 1, no video loss), actions at ``t_a`` — the fast test-time mode;
- ``video``: actions at pure noise (t = 1, no action loss) — video predicted *without* actions (UWM's
  marginal "video" mode; clean actions would instead be forward dynamics, which this mix does not train).

Losses are per-group means (video, action) combined with the weights, each logged (``loss_fm_video``,
``loss_fm_action``), and the action group's mean covers its 7·R action channels only. ``schedule: null``
restores the plain per-token objective (and noised context), where ``action_repeat`` copies (default: as
many as fit) were the only action-loss weight; under the schedule ``action_repeat`` defaults to 1 (copies
would also lower the actions' effective noise level below their scheduled ``t``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from selfflow.core.data.data_facts import data_fact, is_recorded
from selfflow.core.data.shard_format import shard_urls
from selfflow.core.distributed import main_rank_first
from selfflow.core.modality import (
    Batch,
    DataStream,
    Modality,
    data_location,
    model_location,
    options_union,
)
from selfflow.core.registry import register_modality
from selfflow.core.timesteps import TimestepDistribution
from selfflow.core.token_schedule import ScheduleMode, TokenGroup, TokenSchedule
from selfflow.core.tokens import Conditioning, Tokens, grid_ids, patchify, unpatchify
from selfflow.text.conditioning import CaptionConditioner, CaptionedModalityMixin
from selfflow.text.encoder import TextEncoderOptions

from .dataset import episode_window_stream
from .fractal import FAKE_INSTRUCTIONS, write_fake_shards
from .normalize import ActionNormalizer, ActionStats

ACTION_DIM = 7


class RT1Schedule(BaseModel):
    """Probabilities of the schedule modes per sample (normalised; see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    independent: float = Field(0.45, ge=0)
    shared: float = Field(0.2, ge=0)
    policy: float = Field(0.2, ge=0, description="future video at pure noise (t = 1), actions denoised")
    video: float = Field(0.15, ge=0, description="actions at pure noise (t = 1): video without actions")


class _CommonRT1Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    split: Literal["train", "val"] = "train"
    frames: int = Field(2, ge=1, description="frames per window: the current one + future ones")
    chunk: int = Field(4, ge=1, description="actions per window (K)")
    image_size: tuple[int, int] = Field((32, 40), description="(H, W) frames are resized to (fractal: 256×320)")
    codec: Literal["pixel", "wan2.2", "wan2.1"] = Field("pixel", description="wan*: frames = 4k+1, vae_dir")
    vae_dir: str | None = model_location("Wan codec: local diffusers-format vae/ directory")
    patch: tuple[PositiveInt, PositiveInt, PositiveInt] = (1, 8, 8)
    action_norm: Literal["bound", "gaussian"] = "bound"
    gripper: Literal["absolute", "relative"] = "absolute"
    action_repeat: int | None = Field(None, ge=1, description="copies of the action per token (None: 1 "
                                      "under the schedule; fill the token with schedule: null)")
    schedule: RT1Schedule | None = Field(default_factory=RT1Schedule,
                                         description="null: plain per-token objective (legacy)")
    action_loss_weight: float = Field(1.0, ge=0, description="weight of the action group's mean loss")
    action_timesteps: TimestepDistribution = Field(
        default_factory=lambda: TimestepDistribution(kind="uniform"),
        description="the actions' own level (independent and policy modes)")
    context: Literal["clean", "noised"] = Field(
        "clean", description="current frame: clean, no loss (needs patch[0] = 1); noised: like the others")
    conditioning: Literal["text", "class"] = Field("text", description="class: only for the fake instructions")
    text: TextEncoderOptions = Field(default_factory=TextEncoderOptions)
    sample_captions: list[str] | None = Field(None, description="preview instructions (None: the fake ones)")


class FakeRT1Options(_CommonRT1Options):
    """Generated RT-1-format TFRecords, converted once (embedded runs and tests)."""

    dataset: Literal["fake"] = "fake"
    fake_dir: str = data_location("where the generated data is converted", "runs/rt1-fake-data")


class EpisodeShardsOptions(_CommonRT1Options):
    dataset: Literal["episode_shards"]
    shards: str = data_location("output directory of `selfflow prepare rt1`")


RT1Options = options_union("dataset", "fake", FakeRT1Options, EpisodeShardsOptions)


@register_modality
class RT1Modality(CaptionedModalityMixin, Modality):
    name = "rt1"
    Options = RT1Options
    default_mask_ratio = 0.1  # the video ratio: Dual-Timestep Scheduling stays on
    default_timesteps = TimestepDistribution(kind="logit_normal", mean=0.0, std=1.0, shift=3.0)

    def __init__(self, options: dict[str, Any] | BaseModel | None = None):
        super().__init__(options)
        o = self.options
        self.wan = None
        if o.codec != "pixel":
            from selfflow.video.wan_codec import WanCodec

            if not o.vae_dir:
                raise ValueError(f"codec {o.codec!r} needs data.options.vae_dir (a local vae/ folder)")
            self.wan = WanCodec.from_pretrained(o.vae_dir, o.codec)
        _, f, h, w = self.latent_shape
        pt, ph, pw = o.patch
        if f % pt or h % ph or w % pw:
            raise ValueError(f"data.options: latent (T, H, W) = {(f, h, w)} not divisible by patch {o.patch}")
        self.grid = (f // pt, h // ph, w // pw)
        if o.schedule is not None and o.context == "clean" and pt != 1:
            raise ValueError(f"data.options.context = clean needs data.options.patch[0] = 1 (got {o.patch}): "
                             "a token must not mix the current frame with a future one (or set context: noised)")
        self.action_copies  # noqa: B018 - validates action_repeat now, not at the first batch
        self.root = Path(o.shards) if o.dataset == "episode_shards" else Path(o.fake_dir)
        stats_path = self.root / "stats.json"
        if o.dataset == "fake" and not is_recorded(str(stats_path)):
            # under torchrun rank 0 generates it, once; a second rank converting into the same folder would race
            main_rank_first(lambda: None if stats_path.is_file() else make_fake_dataset(self.root))

        def read_stats() -> dict:
            if not stats_path.is_file():
                raise FileNotFoundError(f"{stats_path} not found: is {self.root} a `selfflow prepare rt1` output?")
            return json.loads(stats_path.read_text())

        # recorded with the run: evaluation de-normalises with the statistics it trained on, data or not
        self.stats = ActionStats.model_validate(data_fact(str(stats_path), read_stats))
        self.normalizer = ActionNormalizer(self.stats, o.action_norm, o.gripper)
        self.conditioner = CaptionConditioner(o.conditioning, FAKE_INSTRUCTIONS, o.text, o.sample_captions)

    # --- layout -----------------------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """``(C, T, H, W)`` of one window's frames before patchify."""
        o = self.options
        if self.wan is None:
            return (3, o.frames, *o.image_size)
        return self.wan.latent_shape(o.frames, *o.image_size)

    @property
    def video_channels(self) -> int:
        pt, ph, pw = self.options.patch
        return self.latent_shape[0] * pt * ph * pw

    @property
    def token_channels(self) -> int:
        return self.video_channels + ACTION_DIM + 1

    @property
    def action_copies(self) -> int:
        fit = (self.token_channels - 1) // ACTION_DIM
        r = self.options.action_repeat or (1 if self.options.schedule is not None else fit)
        if r > fit:
            raise ValueError(f"data.options.action_repeat = {r}, but at most {fit} copies fit in a token")
        return r

    @property
    def num_video_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def action_ids(self, n: int, device: torch.device | str) -> torch.Tensor:
        """``(n, K, 3)`` positions of the action tokens (see the module docstring)."""
        gt, gh, _ = self.grid
        k = torch.arange(self.options.chunk, device=device)
        frame_latent = k + 1 if self.wan is None else k // self.wan.compression[0] + 1
        t = (frame_latent // self.options.patch[0]).clamp(max=gt - 1)
        return torch.stack([t, torch.full_like(k, gh), k], -1)[None].expand(n, -1, -1)

    def pack(self, frames: torch.Tensor, actions: torch.Tensor) -> Tokens:
        """``frames (B, 3, F, H, W)`` in [−1, 1] and ``actions (B, K, 7)`` normalised → tokens ``(B, Lv + K, C)``."""
        video = patchify(frames if self.wan is None else self.wan.to(frames.device).encode(frames), self.options.patch)
        b, lv, cv = video.x.shape
        k = actions.shape[1]
        x = video.x.new_zeros(b, lv + k, self.token_channels)
        x[:, :lv, :cv] = video.x
        x[:, :lv, -1] = -1.0
        x[:, lv:, :ACTION_DIM * self.action_copies] = actions.to(x).repeat(1, 1, self.action_copies)
        x[:, lv:, -1] = 1.0
        return Tokens(x=x, ids=torch.cat([video.ids, self.action_ids(b, x.device).to(video.ids)], 1))

    def unpack(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``(B, Lv + K, C)`` → ``frames (B, 3, F, H, W)`` and ``actions (B, K, 7)``."""
        lv, cv, r = self.num_video_tokens, self.video_channels, self.action_copies
        actions = x[:, lv:, :ACTION_DIM * r].reshape(x.shape[0], -1, r, ACTION_DIM).mean(2)
        z = unpatchify(x[:, :lv, :cv], self.grid, self.options.patch)
        return (z if self.wan is None else self.wan.to(z.device).decode(z)), actions

    # --- schedule (core's token-group hook) --------------------------------------------------------
    def token_schedule(self) -> TokenSchedule | None:
        o = self.options
        if o.schedule is None:
            return None
        clean = {"context": "clean"}
        p = o.schedule
        return TokenSchedule(
            groups=(TokenGroup("context", 0.0, channels=self.video_channels),
                    TokenGroup("video", 1.0, self_flow=True, channels=self.video_channels),
                    TokenGroup("action", o.action_loss_weight, timesteps=o.action_timesteps,
                               channels=ACTION_DIM * self.action_copies)),
            modes=(ScheduleMode("independent", p.independent, clean),
                   ScheduleMode("shared", p.shared, {**clean, "action": "shared"}),
                   ScheduleMode("policy", p.policy, {**clean, "video": "noise"}),
                   ScheduleMode("video", p.video, {**clean, "action": "noise"})))

    def group_index(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``(L,)`` long: 0 context (latent frame 0, when ``context: clean``), 1 future video, 2 action."""
        lv, per_frame = self.num_video_tokens, self.grid[1] * self.grid[2]
        groups = torch.full((lv + self.options.chunk,), 1, dtype=torch.long, device=device)
        if self.options.context == "clean":
            groups[:per_frame] = 0
        groups[lv:] = 2
        return groups

    def token_groups(self, tokens: Tokens) -> torch.Tensor | None:
        return self.group_index(tokens.x.device) if self.options.schedule is not None else None

    # --- data -------------------------------------------------------------------------------------
    def stream(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> DataStream:
        o = self.options
        manifest = self.root / "manifest.json"
        if manifest.is_file():  # one window per episode and epoch: fewer episodes than a batch never fill one
            count = json.loads(manifest.read_text())["episodes"][o.split]
            if count < batch_size * world_size:
                raise ValueError(f"{self.root}/{o.split} holds {count} episode(s), fewer than one global batch "
                                 f"({world_size} × {batch_size}): lower train.batch_size")
        return episode_window_stream(shard_urls(self.root / o.split), batch_size, self.normalizer, o.frames,
                                   o.chunk, tuple(o.image_size), seed, rank, world_size)

    def encode(self, batch: Batch, device: torch.device | str) -> tuple[Tokens, Conditioning]:
        cond = self.conditioner.from_batch(self.with_labels(batch), device)
        return self.pack(batch["frames"].to(device), batch["actions"].to(device)), cond

    def with_labels(self, batch: Batch) -> Batch:
        if self.conditioner.encoder is not None or "labels" in batch:
            return batch
        names = self.conditioner.class_names
        unknown = sorted({c for c in batch["captions"] if c not in names})
        if unknown:
            raise ValueError(f"conditioning 'class' knows only {names}; got {unknown} (use conditioning: text)")
        return {**batch, "labels": torch.tensor([names.index(c) for c in batch["captions"]])}

    # --- sampling ---------------------------------------------------------------------------------
    def sample_ids(self, n: int, device: torch.device | str) -> torch.Tensor:
        return torch.cat([grid_ids(*self.grid, batch=n, device=device), self.action_ids(n, device)], 1)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Generated tokens → ``(B, 3·F·H·W + K·7)``: flattened frames in [−1, 1], then the normalised
        actions (split with :meth:`split_media`)."""
        frames, actions = self.unpack(x)
        return torch.cat([frames.clamp(-1, 1).flatten(1), self.normalizer.clip(actions).flatten(1)], 1)

    def split_media(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, (h, w) = media.shape[0], self.options.image_size
        n = 3 * self.options.frames * h * w
        return (media[:, :n].reshape(b, 3, self.options.frames, h, w),
                media[:, n:].reshape(b, self.options.chunk, ACTION_DIM))

    def save_samples(self, media: torch.Tensor, labels: torch.Tensor | None, path: Path) -> Path:
        """A PNG (one row per frame, samples side by side) and the de-normalised actions as JSON."""
        from PIL import Image

        from selfflow.video.writer import tile_clips

        frames, actions = self.split_media(media)
        tiles = tile_clips(frames, columns=len(frames))  # (F, H', W', 3)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        png = path.with_suffix(".png")
        Image.fromarray(np.concatenate(list(tiles), 0)).save(png)
        names = self.class_names
        rows = [{"instruction": names[int(labels[i])] if labels is not None else None,
                 "actions_raw": self.normalizer.denormalize(a.float().cpu().numpy()).tolist()}
                for i, a in enumerate(actions)]
        path.with_suffix(".json").write_text(json.dumps(rows, indent=1))
        return png

    def write_sample(self, media: torch.Tensor, label: int | None, path: Path) -> Path:
        """One sample exactly, as ``<path>.npz``: ``frames`` uint8 ``(F, H, W, 3)``, ``actions_raw`` float32
        ``(K, 7)`` (de-normalised, clipped to the action bounds) and ``instruction`` (a class-conditioned run's class
        name, else empty: ``--prompts`` go to ``prompts.jsonl``). ``selfflow sample --out-dir`` keeps one file per
        sample: the default PNG writer lost the actions."""
        from selfflow.video.writer import to_uint8_frames

        frames, actions = self.split_media(media[None])
        path = Path(path).with_suffix(".npz")
        np.savez(path, frames=to_uint8_frames(frames[0]).numpy(),
                 actions_raw=self.normalizer.denormalize(actions[0].float().cpu().numpy()).astype(np.float32),
                 instruction=np.array("" if label is None else self.class_names[label]))
        return path


def make_fake_dataset(root: str | Path, *, shards: int = 4, episodes_per_shard: int = 4, seed: int = 0) -> Path:
    """Generate fake RT-1 TFRecords (real key names, synthetic content) and convert them under ``root``."""
    from .prepare import prepare_rt1

    root = Path(root)
    write_fake_shards(root / "tfrecords", shards=shards, episodes_per_shard=episodes_per_shard, seed=seed)
    # all of it in this process, also under torchrun (whose RANK / WORLD_SIZE would give it a share)
    prepare_rt1({"input": str(root / "tfrecords"), "out": str(root), "val_fraction": 0.2, "rank": 0, "world_size": 1})
    return root
