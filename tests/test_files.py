"""The one record reader: every file type, its errors, and what splitlines() would break."""

import json

import pytest

from safeneuron.data.files import read_records
from safeneuron.data.prompts import PromptFileError, load_prompts
from safeneuron.errors import SafeneuronError


def test_each_file_type_gives_its_records(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "x"}\n\n{"prompt": "y"}\n')
    (tmp_path / "a.json").write_text('{"train": [{"prompt": "x"}]}')
    (tmp_path / "a.csv").write_text('prompt,category\n"line one\nline two",c\n')
    (tmp_path / "a.tsv").write_text("prompt\tcategory\nx\tc\n")
    (tmp_path / "a.txt").write_text("  x \n\ny\n")
    assert read_records(tmp_path / "a.jsonl") == [{"prompt": "x"}, {"prompt": "y"}]
    assert read_records(tmp_path / "a.json") == [{"prompt": "x"}]
    assert read_records(tmp_path / "a.csv") == [{"prompt": "line one\nline two", "category": "c"}]  # quoted newline
    assert read_records(tmp_path / "a.tsv") == [{"prompt": "x", "category": "c"}]
    assert read_records(tmp_path / "a.txt") == ["x", "y"]
    assert read_records(tmp_path / "a.txt", fmt=".csv") == [{"  x ": "y"}]  # read as the type asked for


def test_jsonl_lines_end_in_newline_only(tmp_path):
    text = "first\u2028second\x85third"  # line breaks to splitlines(), plain characters to JSON
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_records(tmp_path / "p.jsonl") == [{"prompt": text}]
    assert load_prompts(tmp_path / "p.jsonl").prompts == [text]


@pytest.mark.parametrize("name, content, message", [
    ("missing.csv", None, "prompt file not found"),
    ("bin.csv", b"\x00\x01prompt", "binary file"),
    ("latin.csv", "prompt\ncaf\xe9\n".encode("latin-1"), "not UTF-8 text"),
    ("bad.jsonl", b'{"prompt": "a"}\n{oops\n', "bad.jsonl:2: malformed JSON line"),
    ("bad.json", b'{"a": [1], "b": [2]}', r"expected a JSON list of prompts \(or an object holding one list\)"),
    ("p.xml", b"<prompts/>", "unknown prompt file type '.xml'"),
])
def test_errors_name_the_file_and_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PromptFileError, match=message):
        read_records(path, error=PromptFileError, what="prompt file", items="prompts")
    with pytest.raises(SafeneuronError):  # the default error class is the base of every user error
        read_records(path)
