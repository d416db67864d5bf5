"""Bad input across the CLI and the library: each answered by one line that names the
problem, exit code 2, no traceback, and no partial artifact that looks complete."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_tokenizer, tiny_config
from safeneuron.cli import main


@pytest.fixture(scope="module")
def other_mask(tmp_path_factory):
    """A mask of a 4-layer model (the tiny model has 3)."""
    from safeneuron.masks import SafetyNeuronMask
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.num_hidden_layers = 4
    path = tmp_path_factory.mktemp("mask") / "other.safetensors"
    SafetyNeuronMask.random(AutoModelForCausalLM.from_config(cfg), frac=0.1).save(path, suffix=".union")
    return path


def run(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line(code: int, err: str, *fragments: str) -> None:
    assert code == 2, (code, err)
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("safeneuron "), last
    for fragment in fragments:
        assert fragment in last, (fragment, last)


def write(path: Path, content) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# ------------------------------------------------------------------ prompt files
@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("missing.csv", None, "prompt file not found"),
        ("empty.csv", "", "no prompts (empty file)"),
        ("empty.jsonl", "\n\n", "no prompts (empty file)"),
        ("binary.csv", b"\x89PNG\r\n\x1a\n\x00\x00", "binary file"),
        ("latin1.csv", "prompt\ncaf\xe9\n".encode("latin-1"), "not UTF-8 text"),
        ("broken.json", '[{"prompt": "a"', "malformed JSON"),
        ("broken.jsonl", '{"prompt": "a"}\n{"prompt": \n', ":2: malformed JSON line"),
        ("nocolumn.csv", "text_a,text_b\nx,y\n", "no prompt column"),
        ("nocolumn.jsonl", '{"foo": "x"}\n', "no prompt column"),
        ("numbers.json", "[1, 2, 3]", "expected a list of strings or of objects"),
        ("one.txt", "a single prompt\n", "at least 2 per class"),
        ("blank.csv", "prompt\n\"  \"\n\"\"\n", "all blank"),
        ("table.xlsx", "x", "unknown prompt file type"),
    ],
)
def test_bad_prompt_file(tmp_path, capsys, tiny_dir, name, content, fragment):
    path = tmp_path / name
    if content is not None:
        write(path, content)
    out = tmp_path / "out"
    code, err = run(capsys, "identify", "--model", tiny_dir, "--harmful", path, "--out", out)
    assert_one_line(code, err, fragment, name)
    assert not (out / "identify.json").exists()


def test_duplicates_and_blanks_are_dropped_with_a_warning(tmp_path, caplog):
    from safeneuron.data.prompts import load_prompts

    path = write(tmp_path / "dups.csv", "prompt\nsame\nsame\n\"\"\nother\n")
    with caplog.at_level(logging.WARNING):
        ps = load_prompts(path)
    assert ps.prompts == ["same", "other"]
    assert "dropped 1 blank and 1 duplicated prompts" in caplog.text


def test_category_with_one_prompt_is_skipped_with_a_warning(tmp_path, caplog, tiny_dir):
    from safeneuron.config import IdentifyConfig
    from safeneuron.stages.identify import identify
    from safeneuron.models import load_model

    harmful = write(tmp_path / "h.jsonl", "".join(
        json.dumps({"prompt": f"bad thing {i}", "category": "big" if i else "lonely"}) + "\n" for i in range(6)))
    with caplog.at_level(logging.WARNING):
        result = identify(IdentifyConfig(harmful=str(harmful), max_prompts=12, by_category=True, tau_es=0.5),
                          tmp_path / "id", loaded=load_model(str(tiny_dir)), progress=False)
    assert "category 'lonely' has 1 prompt(s); skipped" in caplog.text
    assert list(result.manifest["categories"]) == ["big"]


def test_long_prompts_are_truncated_with_a_warning(caplog):
    from safeneuron.inputs import iter_batches

    with caplog.at_level(logging.WARNING):
        batches = iter_batches(make_tokenizer(), ["x" * 300, "short"], batch_size=2, max_length=64)
    assert batches[0].inputs["input_ids"].shape[1] == 64
    assert "1 prompts are longer than max_length=64 tokens and were truncated" in caplog.text


def test_tokenizer_without_chat_template_falls_back_with_a_warning(caplog):
    from safeneuron.data.prompts import render_chat

    with caplog.at_level(logging.WARNING):
        assert render_chat(make_tokenizer(chat_template=False), ["hi"]) == ["User: hi\nAssistant:"]
    assert "no chat template" in caplog.text


# ------------------------------------------------------------------ models
def test_unknown_architecture(tmp_path, capsys):
    d = tmp_path / "opt"
    d.mkdir()
    write(d / "config.json", json.dumps({"model_type": "opt"}))
    save_file({"w": torch.zeros(1)}, str(d / "model.safetensors"))
    code, err = run(capsys, "identify", "--model", d, "--out", tmp_path / "o")
    assert_one_line(code, err, "unsupported architecture 'opt'", "safeneuron/arch.py")


def test_dtype_choices(tmp_path, capsys, tiny_dir, monkeypatch):
    from safeneuron import models
    from safeneuron.models import load_model, pick_dtype

    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    assert pick_dtype("fast", cpu) == torch.bfloat16  # a CPU with native bf16 matmul
    assert next(load_model(str(tiny_dir), dtype="fast").model.parameters()).dtype == torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    assert pick_dtype("fast", cpu) == torch.float32  # emulated bf16 would be slower than float32
    code, err = run(capsys, "identify", "--model", tiny_dir, "--dtype", "fp8", "--out", tmp_path / "o")
    assert_one_line(code, err, "unknown dtype 'fp8'; choose auto, fast, bf16")


def test_model_dir_without_weights(tmp_path, capsys):
    d = tmp_path / "empty_model"
    d.mkdir()
    write(d / "config.json", json.dumps({"model_type": "llama"}))
    code, err = run(capsys, "identify", "--model", d, "--out", tmp_path / "o")
    assert_one_line(code, err, "model directory has no weights")


def test_remote_code_model_needs_the_flag(tmp_path, capsys):
    d = tmp_path / "remote"
    d.mkdir()
    write(d / "config.json", json.dumps({"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    save_file({"w": torch.zeros(1)}, str(d / "model.safetensors"))
    code, err = run(capsys, "identify", "--model", d, "--out", tmp_path / "o")
    assert_one_line(code, err, "ships its own code", "--trust-remote-code")


def test_unknown_model_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run(capsys, "identify", "--model", "no-such-org/no-such-model", "--out", tmp_path / "o")
    assert_one_line(code, err, "cannot load model 'no-such-org/no-such-model'")


# ------------------------------------------------------------------ masks
def test_mask_from_another_model(tmp_path, capsys, tiny_dir, other_mask):
    code, err = run(capsys, "attack", "--model", tiny_dir, "--mask", other_mask, "--out", tmp_path / "a",
                    "--limit", 2, "--max-new-tokens", 2)
    assert_one_line(code, err, "mask has 4 layers, model has 3")
    assert not (tmp_path / "a" / "attack.json").exists()


def test_mask_of_another_width(tmp_path, capsys, tiny_dir):
    path = tmp_path / "wide.safetensors"
    save_file({f"model.layers.{i}.mlp.union": torch.zeros(64, dtype=torch.bool) for i in range(3)}, str(path))
    code, err = run(capsys, "attack", "--model", tiny_dir, "--mask", path, "--out", tmp_path / "a", "--limit", 2)
    assert_one_line(code, err, "width 64, model MLP has d_ff=48")


def test_mask_file_not_safetensors(tmp_path, capsys, tiny_dir):
    path = write(tmp_path / "mask.safetensors", "this is text")
    code, err = run(capsys, "attack", "--model", tiny_dir, "--mask", path, "--out", tmp_path / "a", "--limit", 2)
    assert_one_line(code, err, "not a safetensors file")


def test_mask_with_wrong_dtype(tmp_path, capsys, tiny_dir):
    path = tmp_path / "float.safetensors"
    save_file({f"model.layers.{i}.mlp.union": torch.zeros(48) for i in range(3)}, str(path))
    code, err = run(capsys, "attack", "--model", tiny_dir, "--mask", path, "--out", tmp_path / "a", "--limit", 2)
    assert_one_line(code, err, "expected bool")


# ------------------------------------------------------------------ settings
@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--tau-es", "-1"], "tau_es must be > 0"),
        (["--tau-sas", "0"], "tau_sas must be > 0"),
        (["--alpha", "1.5"], "alpha must be in (0, 1)"),
        (["--top-frac", "2"], "top_frac must be in (0, 1]"),
        (["--position", "first"], "position must be one of 'max', 'last', 'mean'"),
        (["--method", "magic"], "method must be one of 'stats', 'neurostrike'"),
        (["--max-prompts", "1"], "max_prompts must be >= 2"),
    ],
)
def test_identify_settings_out_of_range(tmp_path, capsys, flags, fragment):
    code, err = run(capsys, "identify", *flags, "--out", tmp_path / "o")
    assert_one_line(code, err, fragment)


def test_rounds_must_be_positive(tmp_path, capsys, tiny_dir):
    code, err = run(capsys, "align", "--model", tiny_dir, "--rounds", "0", "--out", tmp_path / "al")
    assert_one_line(code, err, "rounds must be >= 1")


def test_preference_file_without_chosen_rejected(tmp_path, capsys, tiny_dir):
    prefs = write(tmp_path / "p.jsonl", '{"prompt": "a", "answer": "b"}\n')
    code, err = run(capsys, "align", "--model", tiny_dir, "--prefs", prefs, "--out", tmp_path / "al")
    assert_one_line(code, err, "chosen")
    assert not (tmp_path / "al" / "align.json").exists()


def test_pairs_with_chosen_equal_rejected(tmp_path, capsys, tiny_dir):
    prefs = write(tmp_path / "p.jsonl", '{"prompt": "a", "chosen": "same", "rejected": "same"}\n')
    code, err = run(capsys, "align", "--model", tiny_dir, "--prefs", prefs, "--out", tmp_path / "al")
    assert_one_line(code, err, "chosen")


def test_every_command_prints_its_help(capsys):
    from safeneuron.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"identify", "prefs", "align", "attack", "evaluate", "analyze", "report", "run"} <= set(commands)
    for command in commands:  # help texts hold "%" (fractions); argparse must not choke on them
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0, command
        assert capsys.readouterr().out.startswith(f"usage: safeneuron {command}")


def test_config_file_with_unknown_key(tmp_path, capsys):
    cfg = write(tmp_path / "run.toml", "[identify]\ntau_ess = 3\n")
    code, err = run(capsys, "run", "--config", cfg, "--out", tmp_path / "r")
    assert_one_line(code, err, "unknown key 'tau_ess'", "did you mean 'tau_es'")
    assert not (tmp_path / "r" / "run.json").exists()


def test_config_file_malformed(tmp_path, capsys):
    cfg = write(tmp_path / "run.toml", "[identify\n")
    code, err = run(capsys, "run", "--config", cfg, "--out", tmp_path / "r")
    assert_one_line(code, err, "invalid TOML")


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["identify", "--batch-size", "many"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["no-such-stage"])
    assert exc.value.code == 2


# ------------------------------------------------------------------ output directories
def test_output_dir_of_another_run_is_refused(tmp_path, capsys, tiny_dir):
    out = tmp_path / "id"
    args = ["identify", "--model", tiny_dir, "--max-prompts", "8", "--out", out, "--no-progress"]
    assert run(capsys, *args, "--tau-es", "0.5")[0] == 0
    code, err = run(capsys, *args, "--tau-es", "0.9")
    assert_one_line(code, err, "other settings", "--overwrite")
    assert json.loads((out / "identify.json").read_text())["tau_es"] == 0.5  # the first run's artifacts are kept
    assert run(capsys, *args, "--tau-es", "0.9", "--overwrite")[0] == 0


@pytest.mark.parametrize("code_, text", [(errno.ENOSPC, "No space left on device"),
                                         (errno.EROFS, "Read-only file system")])
def test_full_or_read_only_disk(tmp_path, capsys, tiny_dir, monkeypatch, code_, text):
    import safeneuron.artifacts as artifacts

    def fail(*args, **kwargs):
        raise OSError(code_, text, str(tmp_path / "id" / "scores.safetensors"))

    monkeypatch.setattr(artifacts, "save_file", fail)
    code, err = run(capsys, "identify", "--model", tiny_dir, "--max-prompts", "8", "--out", tmp_path / "id",
                    "--no-progress")
    assert_one_line(code, err, "cannot write", text)
    assert not (tmp_path / "id" / "identify.json").exists()


def test_report_of_an_empty_directory(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    code, err = run(capsys, "report", tmp_path / "nothing")
    assert_one_line(code, err)
