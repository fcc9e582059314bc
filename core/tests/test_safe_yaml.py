import pytest

from selfflow.core.safe_yaml import MAX_DEPTH, YamlError, parse_yaml


def _laughs(levels: int) -> str:
    """The "billion laughs": each anchor aliases the previous one nine times (9^levels values, ~300 bytes)."""
    lines = ["l0: &l0 [ha, ha, ha, ha, ha, ha, ha, ha, ha]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines)


def test_plain_yaml_anchors_and_merge_keys_load_like_safe_load():
    text = "base: &b {lr: 0.1, steps: 3}\nrun: {<<: *b, steps: 5}\nxs: [1, 2.5, .inf]\n"
    assert parse_yaml(text, "x") == {"base": {"lr": 0.1, "steps": 3}, "run": {"lr": 0.1, "steps": 5},
                                     "xs": [1, 2.5, float("inf")]}
    assert parse_yaml("", "x") is None
    assert parse_yaml(_laughs(3), "x")["l2"][0][0] == ["ha"] * 9  # 9^3 values: fine


def test_an_alias_bomb_is_refused_before_it_expands():
    text = _laughs(9)
    assert len(text) < 1500
    with pytest.raises(YamlError, match=r"^config file a\.yaml expands to more than 100000 values") as e:
        parse_yaml(text, "config file a.yaml")
    assert len(str(e.value)) < 200


@pytest.mark.parametrize("text, why", [
    ("[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5), "nests deeper than"),
    ("[" * 20000 + "]" * 20000, "nests too deeply"),
    ("a: &a [1, *a]", "refers to itself"),
    ("a: [1, 2\nb: 3", r"not valid YAML: .*\(line \d+, column \d+\)$"),
])
def test_deep_cyclic_and_invalid_yaml_is_one_line_naming_the_source(text, why):
    with pytest.raises(YamlError, match=why) as e:
        parse_yaml(text, "config file a.yaml")
    assert str(e.value).startswith("config file a.yaml") and "\n" not in str(e.value)
