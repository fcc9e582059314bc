import pytest

from selfflow.core.config import ConfigError
from selfflow.core.prompts import (
    gather_prompts,
    read_prompt_file,
    read_prompt_records,
    write_prompt_records,
)


def test_txt_and_jsonl_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\n\n  a blue square \n")
    assert read_prompt_file(txt) == ["a red circle", "a blue square"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "one"}\n\n{"caption": "two", "video": "x.mp4"}\n')
    assert read_prompt_file(jsonl) == ["one", "two"]
    assert gather_prompts(["zero"], jsonl) == ["zero", "one", "two"]
    assert gather_prompts(None, None) is None


def test_bad_prompt_files_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        read_prompt_file(tmp_path / "none.txt")
    with pytest.raises(ValueError, match=r"is a directory: give a \.txt or \.jsonl file"):
        read_prompt_file(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: needs a string field"):
        read_prompt_file(bad)
    bad.write_text("not json\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: not a JSON object"):
        read_prompt_file(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match="holds no prompts"):
        read_prompt_file(empty)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok\n\xf0\x28\x8c\x28")  # was a bare codec error naming no file
    with pytest.raises(ConfigError, match=r"prompt file .*bin\.txt is not UTF-8 text \(byte 3: invalid"):
        read_prompt_file(binary)


def test_prompt_records_round_trip(tmp_path):
    path = write_prompt_records(tmp_path, ["000000.png", "000001.png"], ["a", "b é"])
    assert read_prompt_records(path) == [{"index": 0, "file": "000000.png", "prompt": "a"},
                                         {"index": 1, "file": "000001.png", "prompt": "b é"}]
