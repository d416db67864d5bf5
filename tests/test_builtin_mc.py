"""The built-in multiple-choice set (builtin:general_mc) and load_mc's JSON/JSONL reading."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from safeneuron.config import EvalConfig
from safeneuron.evaluation.capability import BUILTIN_MC, MCFileError, load_mc


def test_general_mc_loads_balanced_and_unique():
    qs = load_mc("builtin:general_mc")
    assert len(qs) == 120
    assert len({q.question for q in qs}) == 120
    assert all(len(q.options) == 4 and len(set(q.options)) == 4 for q in qs)
    assert all(q.options[q.answer].strip() for q in qs)
    letters = Counter("ABCD"[q.answer] for q in qs)
    assert set(letters) == set("ABCD") and all(20 <= c <= 40 for c in letters.values()), letters
    assert all(q.subject for q in qs)  # the category field
    assert len({q.subject for q in qs}) >= 5


def test_general_mc_is_the_default_and_samples():
    assert EvalConfig().mc_file == "builtin:general_mc"
    a, b = load_mc("builtin:general_mc", n=10, seed=0), load_mc("builtin:general_mc", n=10, seed=0)
    assert len(a) == 10 and a == b


def test_unknown_builtin_mc_is_a_one_line_error():
    with pytest.raises(MCFileError) as err:
        load_mc("builtin:nope")
    message = str(err.value)
    assert "\n" not in message and "nope" in message
    for name in BUILTIN_MC:
        assert name in message


def test_mc_jsonl_and_json(tmp_path):
    records = [{"question": "2+2?", "A": "3", "B": "4", "C": "5", "D": "6", "answer": "B", "category": "math"},
               {"question": "sky colour?", "A": "red", "B": "blue", "C": "green", "D": "black", "answer": 1}]
    jl = tmp_path / "mc.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    qs = load_mc(jl)
    assert [q.answer for q in qs] == [1, 1] and qs[0].subject == "math" and qs[1].options[1] == "blue"
    js = tmp_path / "mc.json"
    js.write_text(json.dumps(records))
    assert load_mc(js) == qs
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**records[0], "answer": "Z"}) + "\n")
    with pytest.raises(MCFileError, match=r"bad.jsonl:1: answer"):
        load_mc(bad)
    bad.write_text("{not json\n")
    with pytest.raises(MCFileError, match="malformed JSON"):
        load_mc(bad)
