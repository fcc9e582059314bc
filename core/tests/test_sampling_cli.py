"""``selfflow sample`` with prompts, labels in the ADM npz, the evaluation hint and argument validation."""

import json

import numpy as np
import pytest
import soundfile as sf

from selfflow.core.cli import main

from .test_pretrained import TEXT, make_run_dir

FAST = ["--steps", "1", "--device", "cpu", "--no-progress"]
AUDIO_TEXT = ("data.mixture=[{modality: image, options: {image_size: 16, patch_size: 4, conditioning: text, "
              "text: {kind: tiny, dim: 16}}}, {modality: audio, options: {sample_rate: 8000, num_samples: 1024, "
              "patch: 64, conditioning: text, text: {kind: tiny, dim: 16}}}]")


def test_a_grid_from_prompts_writes_its_captions_beside_it(tmp_path, capsys):
    run_dir, _ = make_run_dir(tmp_path, *TEXT)
    assert main(["sample", "--run", str(run_dir), "--prompt", "a red circle", "--prompt", "a blue square",
                 "--num", "3", "--out", str(tmp_path / "grid"), *FAST]) == 0
    assert (tmp_path / "grid.png").is_file()
    assert (tmp_path / "grid.prompts.txt").read_text().splitlines() == ["a red circle", "a blue square",
                                                                        "a red circle"]
    capsys.readouterr()
    # without prompts the captions come from the run's data: the modality's own grid.txt, not a second copy
    assert main(["sample", "--run", str(run_dir), "--num", "2", "--out", str(tmp_path / "data"), *FAST]) == 0
    assert (tmp_path / "data.txt").is_file() and not (tmp_path / "data.prompts.txt").exists()
    # what the modality wrote beside its grid is named (a video's .gif beside its .mp4 went unmentioned)
    assert f"wrote {tmp_path / 'data.png'} (and data.txt beside it)" in capsys.readouterr().out
    assert main(["sample", "--run", str(run_dir), "--num", "2", "--out", str(tmp_path / "data"), *FAST]) == 0
    assert "beside it" in capsys.readouterr().out  # rewritten, so named again


def test_out_names_a_grid_or_an_existing_folder_and_says_when_the_suffix_changes(tmp_path, capsys):
    run_dir, _ = make_run_dir(tmp_path)
    folder = tmp_path / "grids"
    folder.mkdir()
    assert main(["sample", "--run", str(run_dir), "--num", "2", "--seed", "4", "--out", str(folder), *FAST]) == 0
    assert (folder / "sample_seed4.png").is_file()  # it used to write grids.png beside the folder
    assert not (tmp_path / "grids.png").exists()
    capsys.readouterr()
    assert main(["sample", "--run", str(run_dir), "--num", "2", "--out", str(tmp_path / "g.jpg"), *FAST]) == 0
    assert (tmp_path / "g.png").is_file()
    assert "note: image grids are written as .png (--out" in capsys.readouterr().err
    assert main(["sample", "--run", str(run_dir), "--num", "2", "--out", str(tmp_path / "h.png"), *FAST]) == 0
    assert "note:" not in capsys.readouterr().err


def test_a_prompt_file_drives_an_out_dir_and_is_recorded(tmp_path, capsys):
    run_dir, _ = make_run_dir(tmp_path, *TEXT)
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"caption": "a red circle"}\n{"caption": "a green triangle"}\n{"prompt": "a square"}\n')
    out = tmp_path / "out"
    assert main(["sample", "--run", str(run_dir), "--prompts", str(captions), "--out-dir", str(out),
                 "--batch-size", "2", *FAST]) == 0
    records = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [(r["file"], r["prompt"]) for r in records] == [
        ("000000.png", "a red circle"), ("000001.png", "a green triangle"), ("000002.png", "a square")]
    z = np.load(out / "samples_3.npz")
    assert z["arr_0"].shape == (3, 16, 16, 3) and z["prompts"].tolist() == [r["prompt"] for r in records]
    assert "arr_1" not in z.files
    # prompted samples: the t2i command, not the probe (which makes its own samples and reads no prompts)
    assert f"selfflow eval t2i --images {out}" in (printed := capsys.readouterr().out) and "eval probe" not in printed


def test_a_mixed_run_samples_the_chosen_modality_with_prompts(tmp_path, capsys):
    run_dir, _ = make_run_dir(tmp_path, AUDIO_TEXT)
    out = tmp_path / "audio"
    assert main(["sample", "--run", str(run_dir), "--modality", "audio", "--prompt", "a low hum", "--num", "2",
                 "--out-dir", str(out), *FAST]) == 0
    records = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == ["000000.wav", "000001.wav"]
    assert sf.info(out / "000001.wav").frames == 1024  # the sample alone, as FAD must read it
    assert {r["prompt"] for r in records} == {"a low hum"}
    printed = capsys.readouterr().out
    assert "selfflow eval fad --fake" in printed and "imagenet" not in printed.lower()
    assert main(["sample", "--run", str(run_dir), "--modality", "audio", "--num", "2", "--no-png",
                 "--out-dir", str(tmp_path / "none"), *FAST]) == 2
    assert "--no-png: 'audio' samples have no array format" in capsys.readouterr().err
    # a grid of a mixed run goes to the modality's own folder, as the training previews do (one modality's grid
    # used to overwrite the other's in samples/)
    for name in ("audio", "image"):
        assert main(["sample", "--run", str(run_dir), "--modality", name, "--prompt", "x", "--num", "2", *FAST]) == 0
    assert (run_dir / "samples/audio/sample_seed0.wav").is_file()
    assert (run_dir / "samples/image/sample_seed0.png").is_file()
    assert (run_dir / "samples/image/sample_seed0.prompts.txt").read_text() == "x\nx\n"


def test_class_conditional_runs_refuse_prompts_and_store_labels_as_arr_1(tmp_path, capsys):
    run_dir, _ = make_run_dir(tmp_path)
    assert main(["sample", "--run", str(run_dir), "--prompt", "a cat", *FAST]) == 2
    assert "prompts need a text-conditioned run" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main(["sample", "--run", str(run_dir), "--num", "12", "--labels", "balanced", "--out-dir", str(out),
                 "--batch-size", "5", *FAST]) == 0
    z = np.load(out / "samples_12.npz")
    assert z["arr_1"].tolist() == [i % 10 for i in range(12)] and "prompts" not in z.files
    assert not (out / "prompts.jsonl").exists()
    printed = capsys.readouterr().out
    assert "selfflow eval probe --run" in printed and "VIRTUAL_imagenet256" not in printed


def test_guided_samples_for_metrics_are_noted_against_the_evaluations_scale(tmp_path, capsys):
    """The run's preview CFG was used silently for an --out-dir meant for FID, which the online evaluation
    and the paper compute without guidance."""
    run_dir, _ = make_run_dir(tmp_path, "sample.cfg_scale=3")
    assert main(["sample", "--run", str(run_dir), "--num", "2", "--out-dir", str(tmp_path / "a"), *FAST]) == 0
    assert ("note: sampling with the run's CFG scale 3 (sample.cfg_scale); its online evaluation and the paper's "
            "metrics use 1 (eval.cfg_scale): add --cfg-scale 1") in capsys.readouterr().err
    for flags in (["--cfg-scale", "3"], ["--cfg-scale", "1"]):  # chosen: not noted
        assert main(["sample", "--run", str(run_dir), "--num", "2", "--out-dir", str(tmp_path / flags[1]),
                     *flags, *FAST]) == 0
        assert "note: sampling with" not in capsys.readouterr().err


@pytest.mark.parametrize(("args", "says"), [
    (["--batch-size", "0", "--out-dir", "x"], "argument --batch-size: must be an integer ≥ 1, got '0'"),
    (["--steps", "0"], "argument --steps: must be an integer ≥ 1, got '0'"),
    (["--cfg-scale", "nan"], "argument --cfg-scale: must be a finite number, got 'nan'"),
    (["--num", "-5"], "argument --num/--num-samples: must be an integer ≥ 1, got '-5'"),
    (["--device", "gpu"], "argument --device: must be auto, cpu, cuda or cuda:N, got 'gpu'"),
])
def test_bad_sample_arguments_exit_2_naming_option_and_value(args, says, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["sample", "--run", "r", *args])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and says in err and "Traceback" not in err


@pytest.mark.parametrize(("args", "says"), [
    (["--guidance-low", "0.8", "--guidance-high", "0.2"],
     "sampler setting guidance_interval: Value error, needs 0 <= low <= high <= 1 (low above high would turn "
     "guidance off) (got (0.8, 0.2))"),
    (["--solver", "sde", "--steps", "1"], "sampler settings: Value error, steps: the sde solver needs at least 2"),
])
def test_sampler_settings_wrong_together_exit_2_naming_them(tmp_path, args, says, capsys):
    run_dir, _ = make_run_dir(tmp_path)
    assert main(["sample", "--run", str(run_dir), *args, "--num", "2", "--out", str(tmp_path / "g"), *FAST]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and not (tmp_path / "g.png").exists()


def test_cuda_on_a_machine_without_cuda_is_an_argument_error(monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        main(["sample", "--run", "r", "--device", "cuda"])
    assert stop.value.code == 2 and "argument --device: 'cuda' asked for, but no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "says"), [
    (["--out", "g", "--out-dir", "d"], "--out names a grid; with --out-dir / --official-ckpt"),
    (["--official-ckpt", "c.pt"], "give --run RUN or --official-ckpt PATH, not both"),
    (["--vae", "v"], "--vae applies to --official-ckpt only"),
    (["--labels", "balanced", "--no-npz"], "--labels balanced, --no-npz: for many samples only (add --out-dir DIR)"),
    (["--out-dir", "d", "--no-png", "--no-npz"], "--no-png with --no-npz would write no samples"),
])
def test_flags_that_cannot_apply_are_errors_not_ignored(tmp_path, args, says, capsys):
    # each of these used to be accepted and silently ignored (or, for --no-png --no-npz, sample and write nothing)
    run_dir, _ = make_run_dir(tmp_path)
    assert main(["sample", "--run", str(run_dir), *args, "--num", "2", *FAST]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and not (tmp_path / "d").exists()


def test_the_ema_file_cannot_be_sampled_as_the_model(tmp_path, capsys):
    run_dir, _ = make_run_dir(tmp_path)
    assert main(["sample", "--run", str(run_dir / "ema.safetensors"), "--weights", "model", "--num", "2",
                 "--out", str(tmp_path / "g"), *FAST]) == 2
    assert "ema.safetensors holds the EMA weights, not weights='model'" in capsys.readouterr().err


def test_the_evaluation_hint_is_the_modalitys_own(tmp_path, capsys):
    """The hint used to be guessed from file suffixes: a plug-in modality writing .npy files was told to run
    FVD. Now each modality says which command scores it (none by default)."""
    from selfflow.core.modality import Modality
    from selfflow.core.pretrained import load_model
    from selfflow.core.sampling_cli import eval_hint

    run_dir, _ = make_run_dir(tmp_path)
    out = tmp_path / "out"
    assert main(["sample", "--run", str(run_dir), "--num", "2", "--out-dir", str(out), *FAST]) == 0
    assert "selfflow eval probe --run" in capsys.readouterr().out  # a run on built-in labelled data
    modality = load_model(run_dir, "cpu").modality
    hint = eval_hint(modality, None, out, out / "samples_2.npz")  # e.g. an official checkpoint: no probe
    assert "selfflow eval stats REAL_IMAGES" in hint and "16x16" in hint
    (out / "000000.npy").write_bytes(b"")
    assert Modality.evaluation_hint(modality, out, None, False) is None  # the default: no suggestion


def test_a_grid_refuses_several_ranks_and_names_what_shards(monkeypatch, capsys):
    """Under torchrun every rank used to sample the whole grid and write the same file."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sample", "--run", "r", "--num", "4"]) == 2
    assert "selfflow sample without --out-dir (one grid) runs in one process (--out-dir DIR shares" in \
        capsys.readouterr().err


def test_guidance_flags_on_an_unconditional_model_are_noted(capsys):
    """They used to be ignored without a word: an unconditional model has nothing to guide by."""
    import argparse
    from types import SimpleNamespace

    from selfflow.core.sampler import SamplerConfig
    from selfflow.core.sampling_cli import _sampler

    flags = {"steps": None, "solver": None, "shift": None, "precision": None, "guidance_low": None,
             "guidance_high": None}
    plain = SimpleNamespace(name="waves", num_classes=0, context_dim=0)
    _sampler(SamplerConfig(), argparse.Namespace(**flags, cfg_scale=None, labels="random"), plain)
    assert capsys.readouterr().err == ""
    sampler = _sampler(SamplerConfig(), argparse.Namespace(**flags, cfg_scale=4.0, labels="balanced"), plain)
    assert sampler.cfg_scale == 4.0 and capsys.readouterr().err == (
        "note: --cfg-scale, --labels: no effect on an unconditional model ('waves' has no classes or captions to "
        "guide by)\n")
    _sampler(SamplerConfig(), argparse.Namespace(**flags, cfg_scale=4.0), SimpleNamespace(name="i", num_classes=3,
                                                                                            context_dim=0))
    assert capsys.readouterr().err == ""
