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


@pytest.mark.parametrize("name", ["../escape", "/etc/run", "a/../../b", "", "C:/x", "..\\up"])
def test_run_name_must_stay_inside_output_dir(name):
    with pytest.raises(ConfigError, match=r"name: .*relative path without '\.\.'"):
        load_config(None, [f"name={name!r}"])
    assert load_config(None, ["name=sweep/run1"]).run_dir.as_posix() == "runs/sweep/run1"


def test_preset_of_the_wrong_type_is_a_config_error():
    with pytest.raises(ConfigError, match="model preset must be a name"):
        load_config(None, ["model.preset={x: 1}"])


def test_modality_errors_name_the_option_key(tmp_path):
    from selfflow.core.run_setup import build_modalities

    missing = str(tmp_path / "no-vae")
    cfg = load_config(None, ["data.options.codec=sd_vae", f"data.options.vae_path={missing}"])
    with pytest.raises(FileNotFoundError, match=r"data\.options\.vae_path="):
        build_modalities(cfg)


def test_a_moved_key_names_its_new_place_in_files_and_overrides(tmp_path):
    p = tmp_path / "old.yaml"
    p.write_text("train:\n  steps: 5\n  log_every: 2\n  checkpoint_every: 10\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "train.log_every moved to logging.every" in msg
    assert "train.checkpoint_every moved to checkpoint.every" in msg
    with pytest.raises(ConfigError, match=r"train\.eval_samples moved to eval\.num_samples"):
        load_config(None, ["train.eval_samples=3"])
    cfg = load_config(None, ["logging.every=2", "checkpoint.keep_last=1", "eval.every=4", "sample.every=3"])
    assert (cfg.logging.every, cfg.checkpoint.keep_last, cfg.eval.every, cfg.sample.every) == (2, 1, 4, 3)
