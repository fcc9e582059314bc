import shutil

from selfflow.core import model_folders
from selfflow.core.model_folders import files_fingerprint


def test_a_folder_keeps_its_fingerprint_where_it_lies_and_loses_it_with_any_other_file(tmp_path, monkeypatch):
    """Which files a folder holds, not where: the same files copied elsewhere give the same digest; a changed
    byte, size or name, or one more file, another. Notes (``*.md``) and hidden files (``.cache/``) do not count.
    Large files are hashed by their ends (a byte in the middle of one is not seen: the ends of two trainings'
    weights differ anyway)."""
    monkeypatch.setattr(model_folders, "WHOLE_BYTES", 64)
    monkeypatch.setattr(model_folders, "END_BYTES", 16)
    model = tmp_path / "model"
    (model / "vae").mkdir(parents=True)
    (model / "config.json").write_text('{"width": 8}')
    (model / "vae" / "weights.bin").write_bytes(bytes(range(200)))
    first = files_fingerprint(model)
    assert len(first) == 16
    shutil.copytree(model, tmp_path / "elsewhere")
    assert files_fingerprint(tmp_path / "elsewhere") == first
    (model / "README.md").write_text("notes")
    (model / ".cache").mkdir()
    (model / ".cache" / "lock").write_text("x")
    assert files_fingerprint(model) == first

    def changed(edit) -> str:
        shutil.rmtree(tmp_path / "edit", ignore_errors=True)
        shutil.copytree(tmp_path / "elsewhere", tmp_path / "edit")
        edit(tmp_path / "edit")
        return files_fingerprint(tmp_path / "edit")

    weights = bytes(range(200))
    assert changed(lambda d: (d / "config.json").write_text('{"width": 9}')) != first
    assert changed(lambda d: (d / "vae" / "weights.bin").write_bytes(weights[:-1] + b"\0")) != first  # last byte
    assert changed(lambda d: (d / "vae" / "weights.bin").write_bytes(weights + b"\0")) != first  # size
    assert changed(lambda d: (d / "vae" / "weights.bin").rename(d / "vae" / "w.bin")) != first  # name
    assert changed(lambda d: (d / "extra.json").write_text("{}")) != first
    middle = bytearray(weights)
    middle[100] ^= 1
    assert changed(lambda d: (d / "vae" / "weights.bin").write_bytes(bytes(middle))) == first


def test_model_folders_fingerprints_the_folders_that_exist_and_skips_what_it_cannot_read(tmp_path, monkeypatch,
                                                                                        caplog):
    """Only a location naming an existing folder is fingerprinted — not an unset or empty one (``""`` would be
    the working directory), not ``toy``, in a mixture by its entry's key; an unreadable folder is skipped with a
    warning instead of stopping the run (its loader decides)."""
    from selfflow.core.model_folders import ModelFolders

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    locations = {"image": ["vae_path", "repa_encoder", "text.model_dir"], "audio": ["vae_dir"]}
    config = {"data": {"mixture": [
        {"modality": "image", "options": {"vae_path": str(tmp_path / "vae"), "repa_encoder": "toy",
                                          "text": {"model_dir": ""}}},
        {"modality": "audio", "options": {"vae_dir": None}}]}}
    folders = ModelFolders(config, locations)
    assert list(folders.files) == ["data.mixture.0.options.vae_path"]
    assert folders.record() is not None and ModelFolders({"data": {}}, locations).record() is None

    def unreadable(_folder):
        raise PermissionError("permission denied: weights.bin")

    monkeypatch.setattr(model_folders, "files_fingerprint", unreadable)
    assert ModelFolders(config, locations).files == {}
    assert "cannot fingerprint data.mixture.0.options.vae_path" in caplog.text
