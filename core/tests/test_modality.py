"""What core checks of a modality before and while it trains (core/modality.py): the token layout and stream
when a run is built, the options a lax pydantic model would ignore, the labels of the first batch — each refused
with the modality and the member named. The plug-in example stands in for a third-party modality."""

import sys
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from selfflow.core.modality import check_first_batch, check_layout, open_stream
from selfflow.core.tokens import Conditioning

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "plugins"))
from sine_waves_modality import SineWaves


class Lax(BaseModel):  # no extra="forbid": pydantic alone would drop a typo'd key
    length: int = 32
    patch: int = 4
    noise: float = 0.0
    data_seed: int = 0


class LaxWaves(SineWaves):
    Options = Lax


def first_tokens(waves):
    return waves.encode(next(iter(open_stream(waves, 4, 0))), "cpu")


def test_the_example_passes_every_check(caplog):
    waves = SineWaves({"length": 32, "patch": 4})
    check_layout(waves)
    check_first_batch(waves, *first_tokens(waves))
    assert not caplog.records


def test_a_bad_token_layout_is_named():
    class FlatIds(SineWaves):
        def sample_ids(self, n, device):
            return super().sample_ids(n, device)[0]  # (L, 3): the batch dimension forgotten

    class FloatIds(SineWaves):
        def sample_ids(self, n, device):
            return super().sample_ids(n, device).float()

    class NoChannels(SineWaves):
        token_channels = 0

    with pytest.raises(ValueError, match=r"modality 'sine_waves': sample_ids\(1, 'cpu'\) must give integer token "
                                         r"positions \(1, L, 3\) — \(t, h, w\) of each of the L tokens; got \(16, 3\) "
                                         r"torch\.int64"):
        check_layout(FlatIds())
    with pytest.raises(ValueError, match=r"got \(1, 16, 3\) torch\.float32"):
        check_layout(FloatIds())
    with pytest.raises(ValueError, match=r"token_channels must be a positive int .* got 0"):
        check_layout(NoChannels())


def test_a_stream_that_cannot_be_resumed_is_refused_before_training():
    class GeneratorWaves(SineWaves):
        def stream(self, batch_size, seed, rank=0, world_size=1):
            return (batch for batch in iter(super().stream(batch_size, seed, rank, world_size)))

    with pytest.raises(ValueError, match=r"modality 'sine_waves': stream\(\) must return a DataStream .* got "
                                         r"generator"):
        open_stream(GeneratorWaves(), 4, 0)


def test_labels_counted_from_one_are_refused():
    waves = SineWaves()  # 4 classes: 4 is the null label, which the backbone accepts
    tokens, _ = first_tokens(waves)
    check_first_batch(waves, tokens, Conditioning(labels=torch.tensor([0, 3])))
    with pytest.raises(ValueError, match=r"modality 'sine_waves': num_classes is 4, but encode gave no class labels"):
        check_first_batch(waves, tokens, Conditioning())  # the backbone's error named neither modality nor encode
    with pytest.raises(ValueError, match=r"modality 'sine_waves': encode gave class labels in 1…4, outside 0…3 "
                                         r"\(num_classes = 4; 4 is the null label"):
        check_first_batch(waves, tokens, Conditioning(labels=torch.tensor([1, 4])))
    with pytest.raises(ValueError, match=r"labels in -1…2"):
        check_first_batch(waves, tokens, Conditioning(labels=torch.tensor([-1, 2])))


def test_tokens_other_than_the_declared_layout_are_named(caplog):
    """Channels other than token_channels are refused (the backbone's input projection would fail with a bare
    shape error); a token count other than sample_ids' is warned about (previews decode sample_ids' layout)."""
    class WideTokens(SineWaves):
        @property
        def token_channels(self):
            return super().token_channels + 1

    class ShortSamples(SineWaves):
        def sample_ids(self, n, device):
            return super().sample_ids(n, device)[:, :-1]

    tokens, cond = first_tokens(SineWaves())
    with pytest.raises(ValueError, match=r"modality 'sine_waves': encode gave tokens \(4, 16, 8\) of 8 channels, "
                                         r"but token_channels is 9"):
        check_first_batch(WideTokens(), tokens, cond)
    check_first_batch(ShortSamples(), tokens, cond)
    assert "modality 'sine_waves': encode gave 16 tokens per sample, sample_ids 15" in caplog.text


def test_an_option_a_lax_options_model_would_ignore_is_refused():
    assert LaxWaves({"length": 16}).options.length == 16
    with pytest.raises(ValueError, match=r"unknown option\(s\) pach of modality 'sine_waves'; its options: "
                                         r"data_seed, length, noise, patch"):
        LaxWaves({"length": 16, "pach": 8})


def test_a_training_run_stops_on_labels_counted_from_one(tmp_path, monkeypatch):
    from selfflow.core import registry
    from selfflow.core.config import load_config
    from selfflow.core.trainer import Trainer

    class FromOne(SineWaves):
        def encode(self, batch, device):
            tokens, cond = super().encode(batch, device)
            return tokens, Conditioning(labels=cond.labels + 1)

    monkeypatch.setattr(registry, "_MODALITIES", {**registry._MODALITIES, "sine_waves": FromOne})
    cfg = load_config(None, ["model.hidden_size=32", "model.num_heads=2", "model.depth_double=1",
                             "model.depth_single=2", "model.axes_dim=[4,6,6]", "data.modality=sine_waves",
                             "data.options={length: 32, patch: 4}", "train.batch_size=8", "train.steps=2",
                             f"output_dir={tmp_path}", "name=from_one"])
    with pytest.raises(ValueError, match=r"encode gave class labels in 1…4, outside 0…3"):
        Trainer(cfg, progress=False).fit()
