from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from selfflow.eval.inception import (
    WEIGHTS_NAME,
    WEIGHTS_URL,
    FIDInceptionV3,
    load_inception,
    resolve_weights,
)


@pytest.fixture(scope="module")
def reference(inception_weights: Path):
    """torch-fidelity's extractor (the TF-exact PyTorch port) with the same random weights, plus a
    hook on Mixed_6d.branch1x1 (TF ``mixed_6/conv``) for the sFID features."""
    ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=str(inception_weights))
    captured: dict[str, torch.Tensor] = {}
    ref.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.__setitem__("conv", o.clone()))
    return ref, captured


@pytest.mark.parametrize("size", [48, 256])
def test_features_match_torch_fidelity(size: int, inception_model: FIDInceptionV3, reference, make_images) -> None:
    ref, captured = reference
    n = 2 if size < 100 else 1
    nhwc = torch.from_numpy(make_images(n, size, size, seed=size))
    with torch.no_grad():
        ref_pool, ref_logits = ref(nhwc.permute(0, 3, 1, 2).contiguous())
    ours = inception_model(nhwc)  # NHWC input is accepted directly
    assert ours.pool is not None and ours.spatial is not None and ours.logits is not None
    assert ours.pool.shape == (n, 2048) and ours.spatial.shape == (n, 2023) and ours.logits.shape == (n, 1008)
    torch.testing.assert_close(ours.pool, ref_pool, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.logits, ref_logits, rtol=1e-4, atol=1e-4)
    conv = captured["conv"]  # (n, 192, 17, 17) post-ReLU
    assert conv.shape == (n, 192, 17, 17)
    # ADM: mixed_6/conv:0[..., :7] of an NHWC tensor, reshaped → index (h·17 + w)·7 + c
    for b, h, w, c in [(0, 0, 0, 0), (0, 3, 11, 6), (n - 1, 16, 16, 2), (n - 1, 9, 0, 5)]:
        assert ours.spatial[b, (h * 17 + w) * 7 + c] == pytest.approx(float(conv[b, c, h, w]), rel=1e-4, abs=1e-5)
    torch.testing.assert_close(ours.spatial, conv[:, :7].permute(0, 2, 3, 1).reshape(n, -1), rtol=1e-4, atol=1e-4)
    # the random network is not degenerate: features depend on the input
    other = inception_model(torch.from_numpy(make_images(1, size, size, seed=size + 1)))
    assert (other.pool[0] - ours.pool[0]).abs().max() > 1e-3
    assert ours.spatial.std() > 1e-2


def test_nchw_equals_nhwc_and_partial_outputs(inception_model: FIDInceptionV3, make_images) -> None:
    nhwc = torch.from_numpy(make_images(1, 40, 56, seed=5))
    a = inception_model(nhwc, spatial=False, logits=False)
    b = inception_model(nhwc.permute(0, 3, 1, 2))
    assert a.spatial is None and a.logits is None
    assert torch.equal(a.pool, b.pool)


def test_input_validation(inception_model: FIDInceptionV3) -> None:
    with pytest.raises(TypeError, match="uint8"):
        inception_model(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="colour channels"):
        inception_model(torch.zeros(1, 4, 32, 32, dtype=torch.uint8))


def test_missing_weights_name_file_and_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SELFFLOW_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError) as e:
        load_inception(tmp_path / "nope.pth")
    assert "nope.pth" in str(e.value) and WEIGHTS_URL in str(e.value) and WEIGHTS_NAME in str(e.value)
    with pytest.raises(FileNotFoundError, match="SELFFLOW_WEIGHTS"):
        resolve_weights(None)
    monkeypatch.setenv("SELFFLOW_WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        resolve_weights(None)


def test_weights_from_env_dir_and_strict_keys(tmp_path: Path, inception_weights: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFFLOW_WEIGHTS", str(inception_weights.parent))
    assert resolve_weights(None) == inception_weights
    assert resolve_weights(inception_weights.parent) == inception_weights
    sd = torch.load(inception_weights, weights_only=True)
    sd["AuxLogits.fc.weight"] = torch.zeros(1)
    del sd["Mixed_7c.branch_pool.conv.weight"]
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(ValueError, match=r"missing keys .*Mixed_7c\.branch_pool\.conv\.weight"):
        load_inception(bad)
    # a cut file or another format names the file (it used to be a torch traceback, or "error: 105")
    bad.write_bytes(inception_weights.read_bytes()[:4096])
    with pytest.raises(ValueError, match=r"Inception weights .*bad\.pth is truncated or corrupt"):
        load_inception(bad)
    bad.write_text("not weights at all")
    with pytest.raises(ValueError, match=r"bad\.pth is truncated or corrupt \(not a PyTorch file\)"):
        load_inception(bad)
