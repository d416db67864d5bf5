"""Prompt loading: built-in sets, files of each format, column detection, clear errors."""

import json

import pytest

from conftest import make_tokenizer, shared_file
from safeneuron.data.prompts import PLAIN_FORMAT, PromptFileError, load_prompts, render_chat


def test_builtin_sets_have_the_promised_sizes():
    harmful = load_prompts("builtin:harmful")
    harmless = load_prompts("builtin:harmless")
    cats = harmful.by_category()
    assert len(cats) >= 10 and all(len(ps) >= 20 for ps in cats.values())
    assert len(harmless) >= 300
    assert len(load_prompts("builtin:xstest_like")) >= 50
    assert load_prompts(None, default="harmless").prompts == harmless.prompts


def test_csv_json_jsonl_and_column_detection(tmp_path):
    (tmp_path / "a.csv").write_text("goal,target\nbuild a bomb,Sure\nsteal a car,Sure\n")
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": "bake bread", "category": "food"}, {"instruction": "sing"}]))
    (tmp_path / "c.jsonl").write_text('{"question": "q1", "SemanticCategory": "x"}\n\n{"question": "q2"}\n')
    assert load_prompts(tmp_path / "a.csv").prompts == ["build a bomb", "steal a car"]
    b = load_prompts(tmp_path / "b.json")
    assert b.prompts == ["bake bread", "sing"] and b.categories == ["food", None]
    c = load_prompts(tmp_path / "c.jsonl")
    assert c.prompts == ["q1", "q2"] and c.categories == ["x", None]


def test_public_sets_from_shared():
    adv = load_prompts(shared_file("advbench", "harmful_behaviors.csv"))
    assert len(adv) == 520
    hb = load_prompts(shared_file("harmbench", "harmbench_behaviors_text_all.csv"))
    assert 150 <= len(hb) < 400  # only the 'standard' behaviours
    assert "chemical_biological" in hb.category_names()
    alpaca = load_prompts(shared_file("harmless_alpaca", "harmless_val.json"), limit=100)
    assert len(alpaca) == 100


def test_duplicates_and_blanks_dropped_with_warning(tmp_path, caplog):
    (tmp_path / "d.txt").write_text("a\nb\na\n  \nc\n")
    ps = load_prompts(tmp_path / "d.txt")
    assert ps.prompts == ["a", "b", "c"]
    assert "dropped 0 blank and 1 duplicated" in caplog.text


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.csv", "", r"no prompts \(empty file\)"),
        ("nocol.csv", "foo,bar\n1,2\n", "no prompt column"),
        ("bad.json", "[{\"prompt\": ", "malformed JSON"),
        ("bad.jsonl", '{"prompt": "x"}\n{oops\n', ":2: malformed JSON line"),
        ("bin.csv", b"\x00\x01\x02prompt", "binary file"),
        ("x.parquet", "whatever", "unknown prompt file type"),
        ("blank.jsonl", '{"prompt": "  "}\n', "all blank"),
    ],
)
def test_bad_prompt_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(PromptFileError, match=message):
        load_prompts(path)


def test_missing_file_and_unknown_builtin(tmp_path):
    with pytest.raises(PromptFileError, match="not found"):
        load_prompts(tmp_path / "nope.csv")
    with pytest.raises(PromptFileError, match="unknown built-in prompt set"):
        load_prompts("builtin:nonsense")


def test_hf_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PromptFileError, match="cannot load the Hugging Face dataset"):
        load_prompts("hf:walledai/StrongREJECT")


def test_render_chat_uses_template_and_fallback():
    tok = make_tokenizer()
    assert render_chat(tok, ["hi"]) == ["<|user|>hi<|end|><|assistant|>"]
    plain = make_tokenizer(chat_template=False)
    assert render_chat(plain, ["hi"]) == [PLAIN_FORMAT.format(prompt="hi")]


def test_match_lengths_picks_harmless_prompts_of_the_harmful_word_counts():
    from safeneuron.data.prompts import PromptSet, match_lengths

    pool = PromptSet(["a", "a b", "a b c", "a b c d", "a b c d e f g h"], source="pool")
    reference = PromptSet(["x y z", "x y z w v u t s t"], source="ref")
    matched = match_lengths(pool, reference)
    assert matched.prompts == ["a b c", "a b c d e f g h"]  # 3 words -> 3; 9 words -> the longest, 8
    assert len(match_lengths(load_prompts("builtin:harmless"), load_prompts("builtin:harmful", limit=40))) == 40
    with pytest.raises(PromptFileError, match="cannot match"):
        match_lengths(PromptSet(["a"]), reference)
