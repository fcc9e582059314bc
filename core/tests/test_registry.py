"""Modalities found through the ``selfflow.modalities`` entry points: a plug-in's name must be its class's."""

import pytest

from selfflow.core import registry
from selfflow.core.modality import Modality


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


def test_selfflow_modalities_says_which_plug_in_is_broken_and_why(tmp_path, monkeypatch, capsys):
    from selfflow.core.cli import main

    _install(tmp_path, monkeypatch, "misnamed = selfflow.image.modality:ImageModality")
    assert main(["modalities"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "image" in lines and any(line.startswith("misnamed  (broken: entry point selfflow.modalities:misnamed = "
                                                    "selfflow.image.modality:ImageModality must be a Modality class "
                                                    "whose name is 'misnamed'") for line in lines), lines


def test_a_modality_whose_module_does_not_import_is_named(tmp_path, monkeypatch):
    from selfflow.core.config import load_config
    from selfflow.core.run_setup import build_modalities

    _install(tmp_path, monkeypatch, "broken = no_such_modality_module:Thing")
    with pytest.raises(ValueError, match=r"entry point broken = no_such_modality_module:Thing failed to load: "
                                         r"ModuleNotFoundError"):
        build_modalities(load_config(None, ["data.modality=broken"]))


class _Incomplete(Modality):
    name = "incomplete"
    Options = None
    default_mask_ratio = 0.25

    def encode(self, batch, device): ...


def test_a_class_that_cannot_serve_as_a_modality_is_refused_at_registration():
    with pytest.raises(ValueError, match=r"register_modality\('dict'\) must be a Modality subclass"):
        registry.register_modality(dict)
    with pytest.raises(ValueError, match=r"_Incomplete does not implement decode, sample_ids, save_samples, stream, "
                                         r"token_channels"):
        registry.register_modality(_Incomplete)

    from selfflow.image.modality import ImageModality

    class CountOnly(ImageModality):  # the contract before sample indices: a count and nothing else
        def sample_conditions(self, n):
            return super().sample_conditions(n, "cpu")

    with pytest.raises(ValueError, match=r"CountOnly\.sample_conditions\(self, n\) must take \(self, samples, device\)"):
        registry.register_modality(CountOnly)

    class NoRatio(ImageModality):
        default_mask_ratio = None

    class Nameless(ImageModality):
        name = ""

    with pytest.raises(ValueError, match=r"NoRatio needs a class attribute default_mask_ratio \(R_M, in \[0, 1\]\), "
                                         r"got None"):
        registry.register_modality(NoRatio)
    with pytest.raises(ValueError, match=r"Nameless needs a class attribute name \(a non-empty str, its "
                                         r"data\.modality\), got ''"):
        registry.register_modality(Nameless)
    assert "incomplete" not in registry.available_modalities()


def test_an_entry_point_to_a_class_that_is_no_modality_is_refused_when_looked_up(tmp_path, monkeypatch):
    _install(tmp_path, monkeypatch, "dataclass = dataclasses:dataclass")
    with pytest.raises(ValueError, match=r"entry point selfflow\.modalities:dataclass = dataclasses:dataclass must be "
                                         r"a Modality subclass, got <function dataclass"):
        registry.get_modality("dataclass")
