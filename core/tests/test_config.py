import pytest

from selfflow.core.config import ConfigError, load_config, parse_override


def test_yaml_overrides_and_presets(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("name: a\nmodel:\n  preset: small\ntrain:\n  steps: 5\n")
    cfg = load_config(p, ["optim.lr=2e-4", "model.depth_single=3"])
    assert cfg.name == "a" and cfg.train.steps == 5 and cfg.optim.lr == 2e-4
    assert cfg.model.hidden_size == 384 and cfg.model.depth_single == 3  # explicit key beats the preset
    assert parse_override("sample.guidance_interval=[0, 0.7]") == (["sample", "guidance_interval"], [0, 0.7])


def test_unknown_key_names_key_value_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  stpes: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "train.stpes" in msg and "unknown key" in msg and str(p) in msg and "5" in msg


def test_bad_value_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lr.*greater than 0.*-1"):
        load_config(None, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match=r"objective\.kind"):
        load_config(None, ["objective.kind=diffusion"])
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
