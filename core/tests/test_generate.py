import pytest
import torch

from selfflow.core.config import ConfigError, load_config
from selfflow.core.generate import conditions_for, generate, generate_share_batches, sampler_config
from selfflow.core.run_setup import build_run
from selfflow.core.sampler import SamplerConfig

from .test_pretrained import TEXT
from .test_trainer import TINY


def generate_share(*args, **kwargs):
    """All the batches of :func:`generate_share_batches` as one ``(media, labels)``."""
    made = list(generate_share_batches(*args, **kwargs))
    labels = [shown for _, shown in made]
    return torch.cat([media for media, _ in made]), None if labels[0] is None else torch.cat(labels)


def _run(tmp_path, *sets):
    return build_run(load_config(None, [*TINY, f"output_dir={tmp_path}", *sets]))


def test_prompts_cycle_and_change_the_samples(tmp_path):
    run = _run(tmp_path, *TEXT)
    modality = run.modalities["image"]
    cond, null, shown = conditions_for(modality, 3, "cpu", prompts=["a red circle", "a blue square"])
    assert shown is None and cond.context.shape[0] == 3 and not null.context_mask.any()
    assert torch.equal(cond.context[0], cond.context[2]) and not torch.equal(cond.context[0], cond.context[1])
    with torch.no_grad():
        for p in run.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sampler = SamplerConfig(steps=2)
    a, _ = generate(run.backbone, modality, 2, sampler, 0, "cpu", prompts=["a red circle"])
    b, _ = generate(run.backbone, modality, 2, sampler, 0, "cpu", prompts=["a blue square"])
    again, _ = generate(run.backbone, modality, 2, sampler, 0, "cpu", prompts=["a red circle"])
    assert torch.equal(a, again) and not torch.equal(a, b)


def test_prompts_on_a_class_conditional_run_and_labels_on_a_text_run_are_errors(tmp_path):
    classes = _run(tmp_path).modalities["image"]
    with pytest.raises(ConfigError, match=r"prompts need a text-conditioned run.*class-conditional \(10 classes\)"):
        conditions_for(classes, 2, "cpu", prompts=["x"])
    cond, null, shown = conditions_for(classes, 4, "cpu", labels=[3, 1])
    assert cond.labels.tolist() == [3, 1, 3, 1] and null.labels.tolist() == [10] * 4 and shown.tolist() == [3, 1, 3, 1]
    with pytest.raises(ConfigError, match=r"class labels must lie in 0…9, got \[10\]"):
        conditions_for(classes, 2, "cpu", labels=[10])
    text = _run(tmp_path, *TEXT).modalities["image"]
    with pytest.raises(ConfigError, match=r"class labels need a class-conditional run.*give prompts instead"):
        conditions_for(text, 2, "cpu", labels=[0])


def test_sampler_config_overrides_and_names_a_bad_value():
    base = SamplerConfig(steps=7, guidance_interval=(0.1, 0.9))
    got = sampler_config(base, cfg_scale=2.0, guidance_high=0.7)
    assert (got.steps, got.cfg_scale, got.guidance_interval) == (7, 2.0, (0.1, 0.7))
    with pytest.raises(ConfigError, match=r"sampler setting cfg_scale: .* \(got -1.0\)"):
        sampler_config(base, cfg_scale=-1.0)


@pytest.mark.parametrize(("extra", "solver"), [([], "heun"), ([], "sde"), (TEXT, "euler")])
def test_shares_of_a_set_are_the_set_one_process_makes(tmp_path, extra, solver):
    """Online evaluation on several ranks: each makes a share of the indices; together they are the whole set,
    labels or captions included, on any cut (batch-size effects aside), and a padded share repeats samples exactly."""
    run = _run(tmp_path, *extra)
    modality = run.modalities["image"]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in run.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sampler = SamplerConfig(steps=3, solver=solver, cfg_scale=2.0)
    whole, labels = generate_share(run.backbone, modality, 5, range(5), sampler, 7, "cpu")
    a, _ = generate_share(run.backbone, modality, 5, [0, 1, 2], sampler, 7, "cpu")
    b, labels_b = generate_share(run.backbone, modality, 5, [3, 4, 4], sampler, 7, "cpu")
    torch.testing.assert_close(torch.cat([a, b[:2]]), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b[2], b[1], rtol=0, atol=0)  # the padding repeats its sample
    in_batches, labels_in_batches = generate_share(run.backbone, modality, 5, range(5), sampler, 7, "cpu",
                                                   batch_size=2)  # 2 + 2 + 1 samples per sampler run
    torch.testing.assert_close(in_batches, whole, rtol=1e-5, atol=1e-5)
    assert torch.equal(labels_in_batches, labels)
    _, _, shown = conditions_for(modality, 5, "cpu")  # the preview conditioning: classes, or captions in turn
    assert labels.tolist() == shown.tolist() and labels_b.tolist() == shown[[3, 4, 4]].tolist()
    other_seed, _ = generate_share(run.backbone, modality, 5, [0, 1, 2], sampler, 8, "cpu")
    assert not torch.allclose(other_seed, a)
    with pytest.raises(ValueError, match=r"sample indices must be a non-empty list in 0…4, got \[5\]"):
        generate_share(run.backbone, modality, 5, [5], sampler, 7, "cpu")


def test_a_batch_of_a_large_text_conditioned_set_encodes_only_its_own_captions(tmp_path, monkeypatch):
    """Online evaluation of a text-conditioned run: a rank's batch of FID-10k encodes its 2 captions, not 10,000."""
    run = _run(tmp_path, *TEXT)
    modality = run.modalities["image"]
    encoder, encoded = modality.conditioner.encoder, []
    real_encode = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda captions, device: encoded.append(list(captions))
                        or real_encode(captions, device))
    captions = modality.class_names
    batches = generate_share_batches(run.backbone, modality, 10_000, [9_001, 9_998, 9_999], SamplerConfig(steps=1),
                                     7, "cpu", batch_size=2)
    shown = [labels.tolist() for _, labels in batches]
    expected = [[i % len(captions) for i in batch] for batch in ([9_001, 9_998], [9_999])]
    assert shown == expected and encoded == [[captions[k] for k in batch] for batch in expected]


def test_a_modality_whose_preview_conditioning_ignores_the_indices_is_named(tmp_path, monkeypatch):
    """A plug-in that reads ``samples`` as a count and returns a fixed-size set: a one-line error naming it, not a
    shape mismatch inside the backbone's label embedding."""
    run = _run(tmp_path)
    modality = run.modalities["image"]
    fixed = type(modality).sample_conditions
    monkeypatch.setattr(modality, "sample_conditions", lambda samples, device: fixed(modality, 4, device))
    with pytest.raises(ValueError, match=r"modality 'image': sample_conditions gave conditioning\.labels of shape "
                                         r"\(4,\) for 2 samples; it must return one row per sample"):
        next(generate_share_batches(run.backbone, modality, 10, [6, 7], SamplerConfig(steps=1), 7, "cpu"))
    with pytest.raises(ValueError, match=r"conditioning\.labels of shape \(4,\) for 3 samples"):
        conditions_for(modality, 3, "cpu")
