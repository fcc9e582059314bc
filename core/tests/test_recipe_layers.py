"""Every shipped recipe aligns block round(0.3·D) to the teacher's block round(0.7·D), D counting all blocks
(double and single MMDiT blocks together: the authors' rule, black-forest-labs/Self-Flow issue 8)."""

from pathlib import Path

import pytest

from selfflow.core.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))


def test_the_shipped_recipes_are_found():
    names = {p.name for p in CONFIGS}
    assert {"mixed_625m.yaml", "selfflow_sit_xl2.yaml", "rae_selfflow.yaml", "image.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_student_and_teacher_blocks_are_three_and_seven_tenths_of_the_depth(path):
    cfg = load_config(path)
    depth = cfg.model.depth
    resolved = cfg.objective.resolve(depth, 0.25, None)
    assert resolved.student_layer == round(0.3 * depth), f"{path}: student block of a {depth}-block model"
    if cfg.objective.kind == "repa":  # the documented exception: REPA's target is DINOv2, no teacher block
        assert cfg.objective.teacher_layer is None
        return
    assert resolved.teacher_layer == round(0.7 * depth), f"{path}: teacher block of a {depth}-block model"
