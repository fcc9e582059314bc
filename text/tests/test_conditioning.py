import pytest
import torch

from selfflow.core.mmdit import MMDiT, MMDiTConfig
from selfflow.core.objective import drop_labels
from selfflow.text.conditioning import CaptionConditioner, null_conditioning_like


def test_label_dropout_replaces_captions_by_the_empty_caption():
    cond = CaptionConditioner("text", ["a b"], {"dim": 4}).from_batch(
        {"captions": ["one two three", "four", "five six"]}, "cpu")
    dropped = drop_labels(cond, torch.tensor([False, True, False]), null_label=0)
    assert torch.equal(dropped.context[0], cond.context[0]) and torch.equal(dropped.context_mask[2], cond.context_mask[2])
    assert (dropped.context[1] == 0).all() and not dropped.context_mask[1].any()
    assert drop_labels(cond, 0.0, 0) is cond
    # the dropped sample is exactly the unconditional (null) sample for the backbone
    torch.manual_seed(0)
    model = MMDiT(MMDiTConfig(hidden_size=32, num_heads=2, depth_double=1, depth_single=1, axes_dim=(4, 6, 6),
                              context_dim=4, modalities={"m": 6})).eval()
    for p in model.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    x, ids, t = torch.randn(3, 5, 6), torch.zeros(3, 5, 3, dtype=torch.long), torch.full((3,), 0.5)
    null = null_conditioning_like(cond)
    with torch.no_grad():
        v_drop, v_null, v_cond = model(x, ids, t, dropped), model(x, ids, t, null), model(x, ids, t, cond)
    assert torch.allclose(v_drop[1], v_null[1], atol=1e-6) and not torch.allclose(v_cond[1], v_null[1], atol=1e-4)


def test_class_mode_cycles_labels_with_a_null_label():
    c = CaptionConditioner("class", ["x", "y", "z"], {})
    _, null, labels = c.for_samples(4, "cpu")
    assert labels.tolist() == [0, 1, 2, 0] and (null.labels == 3).all() and c.context_dim == 0
    cond, null, labels = c.for_samples(torch.tensor([7, 3]), "cpu")  # samples by index: 7 mod 3, 3 mod 3
    assert cond.labels.tolist() == labels.tolist() == [1, 0] and null.labels.tolist() == [3, 3]


def test_for_prompts_encodes_each_prompt_with_an_empty_caption_null():
    text = CaptionConditioner("text", ["a b"], {"dim": 4})
    cond, null = text.for_prompts(["a red circle", "a b"], "cpu")
    expected = text.from_batch({"captions": ["a red circle", "a b"]}, "cpu")
    assert torch.equal(cond.context, expected.context) and torch.equal(cond.context_mask, expected.context_mask)
    assert not null.context_mask.any() and null.context.shape == cond.context.shape
    with pytest.raises(ValueError, match="class-conditional"):
        CaptionConditioner("class", ["x"], {}).for_prompts(["x"], "cpu")
