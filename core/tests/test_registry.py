"""Modalities found through the ``selfflow.modalities`` entry points: a plug-in's name must be its class's."""

import pytest

from selfflow.core import registry


def _install(tmp_path, monkeypatch, entry: str) -> None:
    """A fake installed distribution declaring ``entry`` in the modalities group."""
    dist = tmp_path / "my_modality-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-modality\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[selfflow.modalities]\n{entry}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_MODALITIES", dict(registry._MODALITIES))


def test_an_entry_point_named_other_than_its_modality_is_refused_when_looked_up(tmp_path, monkeypatch):
    """It used to train, then fail at the first preview: the model's projections are keyed by the class's name."""
    _install(tmp_path, monkeypatch, "misnamed = selfflow.image.modality:ImageModality")
    with pytest.raises(ValueError, match=r"selfflow\.modalities:misnamed = selfflow\.image\.modality:ImageModality "
                                         r"must be a Modality class whose name is 'misnamed', got name 'image'"):
        registry.get_modality("misnamed")


def test_a_modality_whose_module_does_not_import_is_named(tmp_path, monkeypatch):
    from selfflow.core.config import load_config
    from selfflow.core.run_setup import build_modalities

    _install(tmp_path, monkeypatch, "broken = no_such_modality_module:Thing")
    with pytest.raises(ValueError, match=r"entry point broken = no_such_modality_module:Thing failed to load: "
                                         r"ModuleNotFoundError"):
        build_modalities(load_config(None, ["data.modality=broken"]))
