"""The mixed recipes' samplers: each mixture entry resolves to its own settings (entry > run > modality)."""

from pathlib import Path

from selfflow.core.config import load_config
from selfflow.core.registry import get_modality

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _samplers(path: Path) -> dict[str, tuple]:
    cfg = load_config(path)
    out = {}
    for entry in cfg.data.entries():
        s = cfg.sampler(get_modality(entry.modality))  # the class carries name and default_sampler
        out[entry.modality] = (s.solver, s.steps, s.cfg_scale, s.shift)
    return out


def test_paper_mixed_run_samples_each_modality_with_the_paper_s_guidance_and_its_training_shift():
    cfg = load_config(CONFIGS / "mixed_625m.yaml")
    assert _samplers(CONFIGS / "mixed_625m.yaml") == {
        "image": ("euler", 50, 3.5, 8 ** 0.5), "video": ("euler", 50, 5.0, 3.0), "audio": ("euler", 50, 5.0, 0.75)}
    assert cfg.eval.cfg_scale == 1.0  # the paper's metrics: no guidance


def test_tiny_mixed_run_keeps_one_unshifted_sampler_for_every_modality():
    """The golden run's mixed samples depend on these: heun 20, CFG 3, shift 1 for all."""
    assert set(_samplers(CONFIGS / "tiny" / "mixed.yaml").values()) == {("heun", 20, 3.0, 1.0)}
