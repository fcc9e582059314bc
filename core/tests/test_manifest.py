"""Listing captioned media: a caption that is not UTF-8 spoils its item only, when the item is processed."""

import json

import pytest

from selfflow.core.data.manifest import list_media, preview_captions
from selfflow.core.data.shard_writer import write_shards


@pytest.fixture
def folder(tmp_path):
    for name, caption in (("a", "a cat\n"), ("b", None), ("c", "a dog")):
        (tmp_path / f"{name}.png").write_bytes(b"png")
        if caption:
            (tmp_path / f"{name}.txt").write_text(caption)
    (tmp_path / "bad.png").write_bytes(b"png")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1 \xff")
    return tmp_path


def test_folder_captions_are_read_lazily_and_a_non_utf8_one_names_its_file(folder):
    items = list_media(folder, (".png",))
    assert [i.path.name for i in items] == ["a.png", "b.png", "bad.png", "c.png"]
    assert [items[0].caption, items[1].caption, items[3].caption] == ["a cat", None, "a dog"]
    with pytest.raises(ValueError, match=r"caption .*bad\.txt is not UTF-8"):
        items[2].caption  # noqa: B018 - the property reads the file
    assert preview_captions(items, 8) == ["a cat", "a dog"] and preview_captions(items, 1) == ["a cat"]


def test_the_shard_writer_skips_and_lists_the_item_with_a_bad_caption(folder, tmp_path):
    items = list_media(folder, (".png",))
    report = write_shards(items, lambda it: {"caption": it.caption or "", "info": {}}, tmp_path / "out",
                          key=lambda it: it.path.name, members=lambda s: {"txt": s["caption"]})
    assert report["written"] == 3 and report["skipped"] == 1
    skipped = json.loads((tmp_path / "out" / "shard-000000.json").read_text())["skipped"]
    assert skipped[0]["item"] == "bad.png" and "bad.txt is not UTF-8" in skipped[0]["error"]


def test_manifest_rows_and_errors_name_the_file(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"file_name": "x.png", "caption": "an x", "label": 2}\n\n{"path": "/abs/y.png"}\n')
    items = list_media(manifest, (".png",))
    assert [(str(i.path), i.caption, i.label) for i in items] == [
        (str(tmp_path / "x.png"), "an x", 2), ("/abs/y.png", None, None)]
    manifest.write_bytes(b'{"path": "x.png", "caption": "\xff"}\n')
    with pytest.raises(ValueError, match=r"manifest .*m\.jsonl is not UTF-8"):
        list_media(manifest, (".png",))
    manifest.write_text('{"caption": "no path"}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:1: expected"):
        list_media(manifest, (".png",))
