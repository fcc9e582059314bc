import pytest
from pydantic import ValidationError

from selfflow.core.config import ConfigError, load_config, parse_override, save_config


def test_yaml_overrides_and_presets(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("name: a\nmodel:\n  preset: small\ntrain:\n  steps: 5\n")
    cfg = load_config(p, ["optim.lr=2e-4", "model.depth_single=3"])
    assert cfg.name == "a" and cfg.train.steps == 5 and cfg.optim.lr == 2e-4
    assert cfg.model.hidden_size == 384 and cfg.model.depth_single == 3  # explicit key beats the preset
    assert parse_override("sample.guidance_interval=[0, 0.7]") == (["sample", "guidance_interval"], [0, 0.7])


def test_overrides_address_list_items_by_index_and_one_string_is_one_override():
    mix = ("data.mixture=[{modality: image, options: {image_size: 16, patch_size: 4}, batch_size: 4}, "
           "{modality: image, options: {image_size: 16, patch_size: 4}, batch_size: 4}]")
    cfg = load_config(None, [mix, "data.mixture.1.batch_size=2", "data.mixture[0].options.image_size=32"])
    assert [e.batch_size for e in cfg.data.mixture] == [4, 2] and cfg.data.mixture[0].options["image_size"] == 32
    # these used to say "'mixture' is a value" or create a key "mixture[0]" named as unknown
    with pytest.raises(ConfigError, match=r"data\.mixture is a list of 2 entries; address one by its index 0…1"):
        load_config(None, [mix, "data.mixture.2.batch_size=2"])
    with pytest.raises(ConfigError, match=r"'batch_size' is a value, not a section"):
        load_config(None, [mix, "data.mixture.0.batch_size.x=2"])
    assert load_config(None, "train.steps=5").train.steps == 5  # not split into characters


def test_unknown_key_names_key_value_and_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  stpes: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "train.stpes" in msg and "unknown key" in msg and str(p) in msg and "5" in msg
    assert "YAML needs a space" not in msg and "did you mean 'steps'?" in msg


def test_an_unknown_key_names_the_declared_keys_it_may_have_meant():
    """Close spellings, else the keys that contain it — in a section, the model's arch, a mixture entry and a
    modality's options; nothing when no key is close."""
    mix = "data.mixture=[{modality: image, wieght: 1}]"
    for sets, says in [(["model.depth=4"], "model.depth: unknown key (value 4) — did you mean 'depth_double' or "
                                           "'depth_single'?"),
                       (["model={arch: dit, preset: tiny, hiden_size: 3}"], "did you mean 'hidden_size'?"),
                       ([mix], "data.mixture.0.wieght: unknown key (value 1) — did you mean 'weight'?"),
                       (["logging.zzz=1"], "logging.zzz: unknown key (value 1)\n")]:
        with pytest.raises(ConfigError) as e:
            load_config(None, sets)
        assert says in str(e.value) + "\n", str(e.value)
    from selfflow.core.run_setup import build_modalities

    with pytest.raises(ConfigError, match=r"data\.options\.patch_sise: .* — did you mean 'patch_size'\?"):
        build_modalities(load_config(None, ["data.options.patch_sise=4"]))


def test_a_flow_mapping_without_a_space_after_the_colon_is_explained():
    """YAML reads {kind:flow_matching} as one key with no value."""
    with pytest.raises(ConfigError, match=r"objective\.kind:flow_matching: unknown key \(value None\) — YAML needs a "
                                          r"space after a key's colon: write 'kind: flow_matching', not "
                                          r"'kind:flow_matching'"):
        load_config(None, ["objective={kind:flow_matching}"])


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


@pytest.mark.parametrize(("section", "key", "value"), [
    ("train", "steps", -5), ("optim", "lr", 0), ("sample", "steps", 0), ("objective", "gamma", -1),
    ("data", "pin_memory", "sometimes")])
def test_assigning_an_invalid_value_in_python_is_refused_as_in_a_file(section, key, value):
    cfg = load_config(None)
    with pytest.raises(ValidationError, match=key):
        setattr(getattr(cfg, section), key, value)
    with pytest.raises(ValidationError, match="relative path"):
        cfg.name = "../escape"
    cfg.train.steps = 7  # a valid one is kept
    assert cfg.train.steps == 7


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


def test_batch_size_is_bounded_per_rank():
    assert load_config(None, ["train.batch_size=65536"]).train.batch_size == 65536
    with pytest.raises(ConfigError, match=r"train\.batch_size.*less than or equal to 65536.*1000000"):
        load_config(None, ["train.batch_size=1000000"])
    with pytest.raises(ConfigError, match=r"data\.mixture\.0\.batch_size.*less than or equal to 65536"):
        load_config(None, ["data.mixture=[{modality: image, batch_size: 100000}]"])


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "'inf'"])
def test_config_floats_must_be_finite(value):
    with pytest.raises(ConfigError, match=r"optim\.lr: (must be a finite number|Input should be)"):
        load_config(None, [f"optim.lr={value}"])


def test_nonfinite_floats_are_named_anywhere_in_a_file(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("ema:\n  decay: 0.9\ndata:\n  options:\n    noise: .nan\n")
    with pytest.raises(ConfigError, match=rf"{p.name}:\n  data\.options\.noise: must be a finite number \(got nan\)"):
        load_config(p)


def test_unreadable_config_files_are_config_errors_naming_the_file(tmp_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(ConfigError, match=r"model\.bin is not UTF-8 text \(byte 0x89 at offset 0\)"):
        load_config(binary)
    with pytest.raises(ConfigError, match=r"is a directory"):
        load_config(tmp_path)
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")))
    with pytest.raises(ConfigError, match=r"bomb\.yaml expands to more than"):
        load_config(bomb)
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError, match=r"deep\.yaml nests too deeply"):
        load_config(deep)
    with pytest.raises(ConfigError, match=r"override train\.steps is not valid YAML"):
        load_config(None, ["train.steps=[1"])


def test_errors_never_echo_a_huge_value():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.nope=" + "x" * 100_000])
    assert len(str(e.value)) < 1000 and "100002 characters" in str(e.value)


def test_resume_conflicts_name_fixed_keys_only():
    from selfflow.core.config import resume_conflicts

    stored = {"model": {"depth": 2}, "train": {"steps": 5},
              "data": {"mixture": [{"modality": "image", "options": {"root": "a"}}]}}
    current = {"model": {"depth": 3, "new_field": 1}, "train": {"steps": 9},
               "data": {"mixture": [{"modality": "image", "options": {"root": "b", "size": 8},
                                     "sample": {"steps": 50}}]}}  # a sampler setting never conflicts
    assert resume_conflicts(stored, current) == [
        "model.depth (checkpoint 2, now 3)",
        "data.mixture.0.options.root (checkpoint 'a', now 'b')",
        "data.mixture.0.options.size (checkpoint (unset), now 8)",
    ]
    assert resume_conflicts(stored, stored) == []


def test_where_the_data_lies_may_change_on_a_resume():
    """The keys of a modality's data-location options, in a single-modality config and in a mixture, are the
    ones a resume lets change (the data moved; the stream's state checks it is the same data)."""
    from selfflow.core.config import location_keys, resume_conflicts

    single = {"data": {"modality": "image", "options": {"shards": "/a", "codec": "sd_vae"}}}
    assert location_keys(single, {"image": ["shards"], "audio": ["shards"]}) == {"data.options.shards"}
    mixed = {"data": {"mixture": [{"modality": "image", "options": {"shards": "/a"}},
                                  {"modality": "audio", "options": {"shards": "/b"}}]}}
    keys = location_keys(mixed, {"audio": ["shards"]})
    assert keys == {"data.mixture.1.options.shards"}
    moved = {"data": {"mixture": [{"modality": "image", "options": {"shards": "/c"}},
                                  {"modality": "audio", "options": {"shards": "/d"}}]}}
    assert resume_conflicts(mixed, moved, movable=keys) == [
        "data.mixture.0.options.shards (checkpoint '/a', now '/c')"]  # image's shards were not declared movable


def test_resume_may_change_pin_memory():
    from selfflow.core.config import resume_conflicts

    stored = {"data": {"modality": "image", "pin_memory": "auto"}}
    assert resume_conflicts(stored, {"data": {"modality": "image", "pin_memory": False}}) == []
    assert resume_conflicts(stored, {"data": {"modality": "video", "pin_memory": False}}) == [
        "data.modality (checkpoint 'image', now 'video')"]


class _Modality:
    """Stands in for a registered modality: RunConfig.sampler reads only ``name`` and ``default_sampler``."""

    def __init__(self, name, **defaults):
        from selfflow.core.sampler import SamplerSettings

        self.name, self.default_sampler = name, SamplerSettings(**defaults)


def test_sampler_precedence_entry_over_run_over_modality_defaults(tmp_path):
    p = tmp_path / "mixed.yaml"
    p.write_text("data:\n  mixture:\n"
                 "    - {modality: image, sample: {cfg_scale: 3.5}}\n"
                 "    - {modality: video, sample: {steps: 7}}\n"
                 "sample: {steps: 50, cfg_scale: 5.0}\n")
    cfg = load_config(p)
    image, video = cfg.sampler(_Modality("image")), cfg.sampler(_Modality("video", shift=3.0, steps=9))
    assert (image.cfg_scale, image.steps, image.shift) == (3.5, 50, 1.0)  # entry > run; SamplerConfig's shift
    assert (video.cfg_scale, video.steps, video.shift) == (5.0, 7, 3.0)  # run > defaults; entry > run
    assert load_config(p, ["sample.shift=2"]).sampler(_Modality("video", shift=3.0)).shift == 2.0  # run > defaults


def test_single_modality_run_sampler_and_defaults():
    cfg = load_config(None, ["sample.cfg_scale=2"])
    got = cfg.sampler(_Modality("image", shift=4.0, cfg_scale=9.0))
    assert (got.cfg_scale, got.shift, got.solver, got.steps) == (2.0, 4.0, "euler", 50)
    assert cfg.eval.cfg_scale == 1.0  # online metrics default to no guidance


def test_bad_entry_sampler_value_names_its_key():
    with pytest.raises(ConfigError, match=r"data\.mixture\.0\.sample\.steps"):
        load_config(None, ["data.mixture=[{modality: image, sample: {steps: 0}}]"])


def test_sampler_settings_wrong_together_are_config_errors():
    with pytest.raises(ConfigError, match=r"sample\.guidance_interval.*needs 0 <= low <= high <= 1"):
        load_config(None, ["sample.guidance_interval=[0.7, 0.0]"])
    cfg = load_config(None, ["sample.solver=sde", "sample.steps=1"])  # each valid alone: found when resolved
    with pytest.raises(ConfigError, match=r"sample settings of 'image': .*sde solver needs at least 2 model calls"):
        cfg.sampler(_Modality("image"))


def test_a_saved_config_says_which_model_fields_the_build_fills_in_and_reads_back_unchanged(tmp_path):
    cfg = load_config(None, ["model.preset=tiny"])
    save_config(cfg, tmp_path / "config.yaml")
    head = (tmp_path / "config.yaml").read_text().split("\nname:")[0]
    assert "num_classes, modalities and context_dim are taken from the data" in head
    assert "model_config in pretrained/config.json" in head
    assert load_config(tmp_path / "config.yaml") == cfg  # what a resume compares: the values asked for


def test_switching_the_arch_by_one_key_names_the_whole_section_override(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model:\n  preset: tiny\n  class_token: true\n")  # class_token: an MMDiT key, not a DiT one
    with pytest.raises(ConfigError, match=r"model\.class_token: unknown key.*\n.*replace the whole section instead: "
                       r"--set 'model=\{arch: dit, …\}'"):
        load_config(p, ["model.arch=dit"])
    assert load_config(p, ["model={arch: dit, preset: tiny}"]).model.arch == "dit"
    with pytest.raises(ConfigError) as e:  # a typo in the file's own arch gets no such hint
        load_config(p, ["model.hidden_sise=3"])
    assert "whole section" not in str(e.value)
