"""Bad input, second pass (issue 20): non-finite settings, unreadable judge verdicts, mangled data, config errors
caught before the work, runs that cannot collide. Each input is answered by one line naming the problem (exit 2,
no traceback) or by correct behaviour, and nothing already computed is lost."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_tokenizer, tiny_model
from safeneuron.cli import main
from test_bad_input import assert_one_line, run, write

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

#: evaluate flags that keep one measurement (the plain ASR on 2 prompts, 2 tokens each) and switch the rest off
CHEAP_EVAL = ["--n-harmful", 2, "--n-harmless", 2, "--no-attack", "--templates", "none", "--sweep", "none",
              "--xstest", "", "--mc-file", "", "--n-ppl", 0, "--redteam", "", "--max-new-tokens", 2,
              "--identify-prompts", 4, "--no-progress"]


def pairs_file(path: Path, n: int = 4) -> Path:
    rows = [{"prompt": f"question {i}?", "chosen": f"I cannot help with {i}.", "rejected": f"Sure, here is {i}."}
            for i in range(n)]
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


# ================================================================== 1. non-finite and out-of-range settings
@pytest.mark.parametrize("command, flags, fragment", [
    ("align", ["--weight-decay", "nan"], "weight_decay must be a finite number, got nan"),
    ("align", ["--learning-rate", "inf"], "learning_rate must be a finite number, got inf"),
    ("align", ["--beta", "inf"], "beta must be a finite number, got inf"),
    ("align", ["--num-train-epochs", "inf"], "num_train_epochs must be a finite number, got inf"),
    ("align", ["--max-grad-norm", "-1"], "max_grad_norm must be >= 0"),
    ("align", ["--lora-dropout", "1.5"], "lora_dropout must be in [0, 1)"),
    ("identify", ["--tau-sas", "nan"], "tau_sas must be a finite number, got nan"),
    ("identify", ["--neurostrike-z=-inf"], "neurostrike_z must be a finite number"),
    ("analyze", ["--l2", "nan"], "l2 must be a finite number, got nan"),
    ("attack", ["--attacks.probe-z", "inf"], "probe_z must be a finite number, got inf"),
])
def test_non_finite_or_out_of_range_settings(tmp_path, capsys, tiny_dir, command, flags, fragment):
    out = tmp_path / "o"
    code, err = run(capsys, command, "--model", tiny_dir, *flags, "--out", out)
    assert_one_line(code, err, fragment)
    assert not out.exists()  # refused before any work


def test_a_trained_model_with_nan_weights_is_an_error_not_a_result(tmp_path, capsys, tiny_dir, monkeypatch):
    from safeneuron.stages import align as align_stage

    real = align_stage._trained_model

    def diverged(trainer, config):
        model = real(trainer, config)
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")
        return model

    monkeypatch.setattr(align_stage, "_trained_model", diverged)
    out = tmp_path / "al"
    code, err = run(capsys, "align", "--model", tiny_dir, "--prefs", pairs_file(tmp_path / "p.jsonl"), "--mode", "dpo",
                    "--rounds", 1, "--max-steps", 1, "--per-device-train-batch-size", 2,
                    "--gradient-accumulation-steps", 1, "--max-length", 64, "--out", out, "--no-progress")
    assert_one_line(code, err, "round 1: training left non-finite (NaN/inf) weights", "the round is not saved")
    assert not (out / "round_1" / "metrics.json").exists() and not (out / "align.json").exists()
    assert not (out / "round_1" / "model").exists()


# ================================================================== 2. judge verdicts that cannot be read
def _guard(monkeypatch, verdicts):
    import safeneuron.generation as generation
    from safeneuron.evaluation.judges import ClassifierJudge

    monkeypatch.setattr(generation, "complete_texts", lambda m, t, texts, **kw: list(verdicts)[: len(texts)])
    return ClassifierJudge(tiny_model("llama"), make_tokenizer(), "guard", "stub/guard")


COMPLIANT = "Sure. First gather copper wire, batteries and tape, then connect them carefully in series."


def test_unreadable_verdicts_above_a_small_share_are_an_error(monkeypatch):
    from safeneuron.evaluation.judges import JudgeError

    judge = _guard(monkeypatch, ["I think the answer is"] * 10)
    with pytest.raises(JudgeError, match="10 of 10 verdicts are unreadable.*not a guard safety classifier"):
        judge.verdicts(["how to x"] * 10, [COMPLIANT] * 10)


def test_a_few_unreadable_verdicts_are_counted_never_compliant(monkeypatch):
    from safeneuron.evaluation.measure import Judged

    judge = _guard(monkeypatch, ["unsafe"] * 19 + ["??"])
    verdicts = judge.verdicts(["how to x"] * 20, [COMPLIANT] * 20)
    assert verdicts.count("unreadable") == 1 and verdicts.count("compliant") == 19
    assert judge.unparsed == 1
    judged = Judged([COMPLIANT] * 20, [v == "compliant" for v in verdicts], verdicts)
    assert judged.verdict_counts()["unreadable"] == 1 and judged.k == 19


def test_evaluate_with_a_model_that_is_not_a_classifier_exits_2_and_keeps_the_answers(tmp_path, capsys, tiny_dir):
    out = tmp_path / "ev"
    code, err = run(capsys, "evaluate", "--model", tiny_dir, "--judge", f"guard:{tiny_dir}", *CHEAP_EVAL,
                    "--out", out)
    assert_one_line(code, err, "verdicts are unreadable", "--judge")
    assert not (out / "results.json").exists()  # no ASR of 0.0
    cached = list((out / "generations").rglob("harmful.jsonl"))
    assert cached and cached[0].read_text().count("\n") == 2  # the answers are kept for the next try


def test_results_json_counts_the_unreadable_verdicts(tmp_path, tiny_dir, monkeypatch):
    from safeneuron.cli.flags import config_from_args
    from safeneuron.cli import build_parser
    from safeneuron.config import EvalConfig
    from safeneuron.stages import evaluate as evaluate_stage

    judge = _guard(monkeypatch, ["unsafe", "no idea"])  # one of the two verdicts cannot be read
    monkeypatch.setattr(evaluate_stage, "load_judge", lambda *a, **k: judge)
    args = build_parser().parse_args(["evaluate", *map(str, CHEAP_EVAL)])
    evaluate_stage.evaluate_models([str(tiny_dir)], config_from_args(EvalConfig, args), tmp_path / "ev",
                                   progress=False)
    entry = json.loads((tmp_path / "ev" / "results.json").read_text())["models"][0]
    assert entry["unreadable_verdicts"] == 1 and sum(entry["asr_verdicts"]["ori"].values()) == 2
    assert entry["asr_verdicts"]["ori"].get("compliant", 0) <= 1  # the unreadable one never counts as a success


# ================================================================== 3. multiple choice with a blank option
def test_a_blank_option_keeps_the_answer_on_the_option_its_letter_names(tmp_path, caplog):
    from safeneuron.evaluation.capability import load_mc

    path = write(tmp_path / "mc.csv", "question,A,B,C,D,answer\nWhat is 2+2?,,3,4,5,C\nWhat is 1+1?,2,3,,,A\n")
    with caplog.at_level(logging.WARNING):
        first, second = load_mc(path)
    assert first.options[first.answer] == "4" and first.options == ("3", "4", "5")
    assert second.options[second.answer] == "2"
    assert "1 question(s) have a blank option" in caplog.text


def test_an_answer_naming_a_blank_option_is_an_error(tmp_path):
    from safeneuron.evaluation.capability import MCFileError, load_mc

    path = write(tmp_path / "mc.csv", "question,A,B,C,D,answer\nX?,1,,3,4,B\n")
    with pytest.raises(MCFileError, match=r"mc.csv:2: answer 'B' names a blank option"):
        load_mc(path)


# ================================================================== 4. JSONL split on "\n" only
def test_prefs_round_trips_line_separators(tmp_path, capsys):
    from safeneuron.data.preferences import load_preferences

    chosen = "I can't help.\u2028Really.\u2029Sorry\x85."
    src = write(tmp_path / "in.jsonl", json.dumps({"prompt": "p\u2028q", "chosen": chosen, "rejected": "Sure."},
                                                  ensure_ascii=False) + "\n")
    out = tmp_path / "out.jsonl"
    code, _ = run(capsys, "prefs", "--source", src, "--out", out)
    assert code == 0
    text = out.read_text(encoding="utf-8")
    assert "\u2028" not in text and "\u2029" not in text and len(text.splitlines()) == 1  # any reader sees one line
    pair = load_preferences(out).pairs[0]
    assert pair["chosen"] == chosen and pair["prompt"] == "p\u2028q"


def test_raw_line_separators_inside_jsonl_strings_are_read(tmp_path):
    from safeneuron.data.prompts import load_prompts

    path = write(tmp_path / "p.jsonl", '{"prompt": "one\u2028two"}\n{"prompt": "three"}\r\n')
    assert load_prompts(path).prompts == ["one\u2028two", "three"]


def test_generation_cache_answers_with_line_separators(tmp_path):
    from safeneuron.artifacts import jsonl_line
    from safeneuron.generation import read_cache

    path = write(tmp_path / "c.jsonl", json.dumps({"key": "k1", "response": "a\u2028b"}, ensure_ascii=False) + "\n"
                 + jsonl_line({"key": "k2", "response": "c\u2029d"}) + '{"key": "torn')
    assert read_cache(path) == {"k1": "a\u2028b", "k2": "c\u2029d"}


# ================================================================== 5. category file names
def test_categories_map_to_unique_safe_file_names(tmp_path, tiny_dir):
    from safeneuron.config import IdentifyConfig
    from safeneuron.models import load_model
    from safeneuron.stages.identify import identify

    names = ["a b", "a_b", "a/b", "a?b", "x" * 300]
    rows = [{"prompt": f"harmful request number {i} of {c[:5]}", "category": c} for c in names for i in range(3)]
    harmful = write(tmp_path / "h.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    result = identify(IdentifyConfig(harmful=str(harmful), max_prompts=15, by_category=True, tau_es=0.5),
                      tmp_path / "id", loaded=load_model(str(tiny_dir)), progress=False)
    categories = result.manifest["categories"]
    assert set(categories) == set(names)
    files = [info["file"] for info in categories.values()]
    assert len(set(files)) == 5 and all((tmp_path / "id" / f).is_file() for f in files)
    assert categories["a_b"]["file"] == "categories/a_b.safetensors"  # a safe name is kept as it is
    assert all(len(Path(f).name) < 100 for f in files)
    recorded = json.loads((tmp_path / "id" / "identify.json").read_text())["categories"]
    assert {c: i["file"] for c, i in recorded.items()} == {c: i["file"] for c, i in categories.items()}


def test_safe_file_names_never_collide_even_by_case():
    from safeneuron.artifacts import safe_file_names

    names = ["Cyber", "cyber", "a|b", "a_b", ".hidden", "..", ""]
    stems = safe_file_names(names)
    assert len({s.lower() for s in stems.values()}) == len(names)
    assert stems["Cyber"] == "Cyber" and all("/" not in s and not s.startswith(".") for s in stems.values())


# ================================================================== 6. preference and prompt data
@pytest.mark.parametrize("record, fragment", [
    ({"prompt": 5, "chosen": "no", "rejected": "yes"}, "record 1: prompt is a number"),
    ({"prompt": ["a", "b"], "chosen": "no", "rejected": "yes"}, "record 1: prompt is a list of str"),
    ({"prompt": "p", "chosen": {"text": "no"}, "rejected": "yes"}, "record 1: chosen is an object"),
    ({"chosen": [{"role": "human", "content": "hi"}, {"role": "bot", "content": "no"}],
      "rejected": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "yes"}]},
     "record 1: chosen has a message of role 'bot'"),
])
def test_preference_values_of_the_wrong_kind(tmp_path, capsys, record, fragment):
    src = write(tmp_path / "p.jsonl", json.dumps(record) + "\n")
    out = tmp_path / "out.jsonl"
    code, err = run(capsys, "prefs", "--source", src, "--out", out)
    assert_one_line(code, err, fragment, "p.jsonl")
    assert not out.exists()


def test_sharegpt_roles_and_keys_are_read_as_user_and_assistant(tmp_path):
    from safeneuron.data.preferences import load_preferences

    chosen = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "I can't."}]
    rejected = [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "Sure."}]
    src = write(tmp_path / "sg.jsonl", json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")
    pair = load_preferences(src).pairs[0]
    assert (pair["prompt"], pair["chosen"], pair["rejected"]) == ("hi", "I can't.", "Sure.")


def test_latin1_preference_file_is_refused(tmp_path, capsys):
    src = write(tmp_path / "l1.csv", "prompt,chosen,rejected\ncaf\xe9,no,yes\n".encode("latin-1"))
    code, err = run(capsys, "prefs", "--source", src, "--out", tmp_path / "o.jsonl")
    assert_one_line(code, err, "not UTF-8 text")


@pytest.mark.parametrize("value, kind", [(["a", "b"], "a list"), ({"x": 1}, "a dict"), (7, "a number")])
def test_prompt_values_that_are_not_text(tmp_path, value, kind):
    from safeneuron.data.prompts import PromptFileError, load_prompts

    path = write(tmp_path / "p.jsonl", json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"prompt": value}) + "\n")
    with pytest.raises(PromptFileError, match=f"record 2: prompt is {kind}"):
        load_prompts(path)


def test_a_quoted_multi_line_csv_prompt_keeps_its_newline(tmp_path):
    from safeneuron.data.prompts import load_prompts

    path = write(tmp_path / "p.csv", 'prompt\n"line one\nline two"\r\n"one\r\ntwo"\nlast\n')
    assert load_prompts(path).prompts == ["line one\nline two", "one\r\ntwo", "last"]


# ================================================================== 7. config errors before any work, resuming
@pytest.mark.parametrize("name, content, fragment", [
    ("tmpl.toml", '[evaluate]\ntemplates = ["rol_play"]\n', "unknown jailbreak template 'rol_play'; did you mean 'role_play'"),
    ("list.toml", '[evaluate]\ntemplates = "role_play"\n', "[evaluate] templates must be a list"),
    ("tau.toml", '[identify]\ntau_es = "high"\n', "[identify] tau_es must be a finite number, got 'high'"),
    ("sweep.toml", "[evaluate]\nsweep = 0.01\n", "[evaluate] sweep must be a list"),
    ("ident.toml", "identify = 3\n", "[identify] must be a table of settings"),
    ("top.yaml", "- identify\n- align\n", "expected a table of settings at the top, got list"),
    ("sched.toml", '[align]\nlr_scheduler_type = "cosin"\n', "unknown schedule 'cosin'; did you mean 'cosine'"),
    ("kinds.toml", '[evaluate.attacks]\nkinds = "transfer"\n', "kinds must be a list"),
    ("judge.toml", '[evaluate]\njudge = "llama-guard"\n', "judge 'llama-guard' is neither 'refusal'"),
    ("mc.toml", '[evaluate]\nmc_file = "no/such/mc.csv"\n', "multiple-choice file not found"),
    ("latin1.toml", b'model = "caf\xe9"\n', "not UTF-8 text"),
])
def test_run_config_errors_before_any_work(tmp_path, capsys, name, content, fragment):
    cfg = write(tmp_path / name, content)
    out = tmp_path / "r"
    code, err = run(capsys, "run", "--config", cfg, "--out", out)
    assert_one_line(code, err, fragment)
    assert not out.exists()


def _job_config(tmp_path, tiny_dir, **evaluate):
    from conftest import write_tiny_run_config
    from safeneuron.config import load_run_config

    cfg = write_tiny_run_config(tmp_path, tiny_dir)
    if evaluate:
        cfg.write_text(cfg.read_text().replace("[evaluate]\n", "[evaluate]\n" + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in evaluate.items()), 1))
    return load_run_config(cfg, out=str(tmp_path / "run"))


def _record(out: Path, config, done: tuple[str, ...]) -> None:
    from safeneuron.pipeline import stage_keys

    keys = stage_keys(config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"settings_hash": "the failed run's", "stages": {
        name: {"settings_hash": "x", "config_key": keys[name], "status": "done"} for name in done}}))


def test_a_corrected_config_resumes_the_stages_whose_settings_did_not_change(tmp_path, tiny_dir):
    from safeneuron.pipeline import _start

    failed = _job_config(tmp_path, tiny_dir, redteam_max_new_tokens=6)
    done = ("identify", "prefs", "align/safeneuron", "align/dpo")  # evaluate failed
    _record(tmp_path / "run", failed, done)
    fixed = _job_config(tmp_path, tiny_dir, redteam_max_new_tokens=5)  # only [evaluate] changed
    job = _start(fixed, ("identify", "prefs", "align", "evaluate"), progress=False)
    assert job.redo == set()
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert set(record["stages"]) == set(done)  # the finished stages stay recorded, to be reused


def test_a_changed_finished_stage_is_refused_or_redone_with_overwrite(tmp_path, capsys, tiny_dir):
    from safeneuron.errors import SafeneuronError
    from safeneuron.pipeline import _start

    config = _job_config(tmp_path, tiny_dir, redteam_max_new_tokens=6)
    _record(tmp_path / "run", config, ("identify", "prefs", "align/safeneuron", "align/dpo", "evaluate"))
    changed = _job_config(tmp_path, tiny_dir, redteam_max_new_tokens=5)
    with pytest.raises(SafeneuronError, match=r"finished stage\(s\) evaluate would change; run with --overwrite"):
        _start(changed, ("evaluate",), progress=False)
    job = _start(changed, ("evaluate",), progress=False, overwrite=True)
    assert job.redo == {"evaluate", "analyze", "report"}  # the stage and those after it; identify..align kept


# ================================================================== 8. run keys hash content, not path spellings
def test_align_run_key_is_the_same_for_relative_and_absolute_paths(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from safeneuron.config import AlignConfig
    from safeneuron.data.preferences import PreferenceSet
    from safeneuron.stages.align import _run_key

    (tmp_path / "run" / "identify").mkdir(parents=True)
    save_file({"model.layers.0.mlp.union": torch.zeros(4, dtype=torch.bool)},
              str(tmp_path / "run" / "identify" / "safety_neurons.safetensors"))
    write(tmp_path / "run" / "h.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n')
    monkeypatch.chdir(tmp_path)
    pairs = PreferenceSet([{"prompt": "p", "chosen": "c", "rejected": "r"}])
    loaded = SimpleNamespace(path=str(tmp_path / "model"))

    def key(out: str) -> str:
        config = AlignConfig(model=f"{out}/../model", mask=f"{out}/identify/safety_neurons.safetensors",
                             harmful=f"{out}/h.jsonl")
        return _run_key(config, pairs, "weights-hash", loaded)

    assert key("run") == key(str(tmp_path / "run")) == key("./run/../run")
    other = AlignConfig(mask="run/identify/safety_neurons.safetensors", harmful="run/h.jsonl", learning_rate=1e-4)
    assert _run_key(other, pairs, "weights-hash", loaded) != key("run")  # settings still count


def test_a_finished_run_resumes_with_out_spelt_absolute(tmp_path, tiny_dir, monkeypatch):
    from conftest import keep_tiny_run_sizes, write_tiny_run_config
    from safeneuron import pipeline
    from safeneuron.config import load_run_config

    keep_tiny_run_sizes(monkeypatch)
    monkeypatch.chdir(tmp_path)
    cfg = write_tiny_run_config(tmp_path, tiny_dir)
    stages = ("identify", "prefs", "align")
    pipeline.run(load_run_config(cfg, out="run"), stages=stages, progress=False)
    rounds = sorted((tmp_path / "run" / "align").glob("*/round_*/metrics.json"))
    stamps = [f.stat().st_mtime_ns for f in rounds]
    record = pipeline.run(load_run_config(cfg, out=str(tmp_path / "run")), stages=stages, progress=False)
    assert rounds and [f.stat().st_mtime_ns for f in rounds] == stamps  # every round reused, not refused or redone
    assert record["stages"]["align/safeneuron"]["status"] == "done"


def test_evaluation_settings_key_hashes_file_contents(tmp_path, monkeypatch):
    from safeneuron.config import EvalConfig
    from safeneuron.stages.evaluate import settings_key

    write(tmp_path / "u.jsonl", '{"prompt": "seen"}\n')
    monkeypatch.chdir(tmp_path)
    rel, absolute = EvalConfig(upstream=["u.jsonl"]), EvalConfig(upstream=[str(tmp_path / "u.jsonl")])
    before = settings_key(rel)
    assert before == settings_key(absolute)
    write(tmp_path / "u.jsonl", '{"prompt": "other"}\n')  # same path, other content: another key
    assert settings_key(rel) != before
    assert settings_key(EvalConfig(upstream=["u.jsonl"])) != settings_key(EvalConfig())


def test_run_takes_overwrite(capsys):
    from safeneuron.cli import build_parser

    args = build_parser().parse_args(["run", "--overwrite", "--out", "x"])
    assert args.overwrite is True and build_parser().parse_args(["run"]).overwrite is False


# ================================================================== 9. one process per stage directory
HOLD = """
import sys, time
from safeneuron.artifacts import stage_lock
with stage_lock(sys.argv[1], "a test"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_identify_into_the_same_out_is_refused(tmp_path, capsys, tiny_dir):
    out = tmp_path / "id"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = run(capsys, "identify", "--model", tiny_dir, "--max-prompts", 8, "--out", out, "--no-progress")
        assert_one_line(code, err, f"is in use by process {holder.pid}")
        assert not (out / "identify.json").exists()
    finally:
        holder.kill()
        holder.wait()
    code, _ = run(capsys, "identify", "--model", tiny_dir, "--max-prompts", 8, "--tau-es", 0.5, "--out", out,
                  "--no-progress")  # the lock died with its process
    assert code == 0 and (out / "identify.json").exists() and not (out / ".safeneuron.lock").exists()


def test_a_second_main_job_into_the_same_run_directory_is_refused(tmp_path, capsys, tiny_dir):
    from conftest import write_tiny_run_config

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = run(capsys, "run", "--config", write_tiny_run_config(tmp_path, tiny_dir), "--out", out)
        assert_one_line(code, err, f"{out} is in use by process {holder.pid}")
        assert not (out / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_file_of_a_dead_process_does_not_block(tmp_path):
    from safeneuron.artifacts import stage_lock

    write(tmp_path / ".safeneuron.lock", "999999999\n")
    with stage_lock(tmp_path, "a test"):
        assert (tmp_path / ".safeneuron.lock").read_text().strip() == str(os.getpid())
        with stage_lock(tmp_path, "a nested stage"):  # the same process may nest its own stages
            pass
    assert not (tmp_path / ".safeneuron.lock").exists()


# ================================================================== 10. evaluations into the same --out
def test_a_second_evaluation_is_merged_and_other_settings_are_refused(tmp_path, capsys, tiny_dir):
    out = tmp_path / "ev"
    assert run(capsys, "evaluate", "--model", tiny_dir, *CHEAP_EVAL, "--out", out)[0] == 0
    copy = tmp_path / "copy" / tiny_dir.name  # another path with the same folder name
    copy.parent.mkdir()
    copy.symlink_to(tiny_dir, target_is_directory=True)
    assert run(capsys, "evaluate", "--model", copy, *CHEAP_EVAL, "--out", out)[0] == 0
    results = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == [str(tiny_dir), str(copy)]  # merged, not replaced
    assert len({m["slug"] for m in results["models"]}) == 2
    code, err = run(capsys, "evaluate", "--model", tiny_dir, *CHEAP_EVAL[:-1], "--n-harmful", 3, "--no-progress",
                    "--out", out)
    assert_one_line(code, err, "holds an evaluation with other settings", "--overwrite")
    assert len(json.loads((out / "results.json").read_text())["models"]) == 2  # kept
    assert run(capsys, "evaluate", "--model", tiny_dir, *CHEAP_EVAL[:-1], "--n-harmful", 3, "--no-progress",
               "--out", out, "--overwrite")[0] == 0
    assert len(json.loads((out / "results.json").read_text())["models"]) == 1


def test_model_folder_names_are_unique():
    from safeneuron.stages.evaluate import _unique_slug, model_slug

    taken = {model_slug("a/model"): "a/model"}
    assert model_slug("a_model") == model_slug("a/model")
    assert _unique_slug("a_model", taken) != _unique_slug("a/model", taken) == "a_model"
    long_a, long_b = "/x/" + "d" * 90 + "/model", "/y/" + "d" * 90 + "/model"
    assert _unique_slug(long_b, {model_slug(long_a): long_a}) != model_slug(long_a)


# ================================================================== 11. tracebacks that are now messages
def test_checkpoint_every_zero(tmp_path, capsys, tiny_dir):
    code, err = run(capsys, "identify", "--model", tiny_dir, "--checkpoint-every", 0, "--out", tmp_path / "o")
    assert_one_line(code, err, "checkpoint_every must be >= 1", "--checkpoint-every")


def test_device_gpu(tmp_path, capsys, tiny_dir):
    code, err = run(capsys, "identify", "--model", tiny_dir, "--device", "gpu", "--out", tmp_path / "o")
    assert_one_line(code, err, "got 'gpu'; did you mean 'cuda'?")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_device_cuda_without_a_gpu(tmp_path, capsys, tiny_dir):
    code, err = run(capsys, "identify", "--model", tiny_dir, "--device", "cuda", "--max-prompts", 4,
                    "--out", tmp_path / "o")
    assert_one_line(code, err, "device 'cuda' is not available (0 CUDA GPU(s) visible)")


def test_attack_save_onto_an_existing_file_is_refused_before_the_work(tmp_path, capsys, tiny_dir):
    target = write(tmp_path / "pruned", "a file")
    out = tmp_path / "a"
    code, err = run(capsys, "attack", "--model", tiny_dir, "--save", target, "--limit", 2, "--out", out)
    assert_one_line(code, err, "pruned: is a file; the save directory must be a directory", "--save")
    assert not (out / "generations").exists() and target.read_text() == "a file"


def test_model_config_json_that_is_a_list(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    write(d / "config.json", "[1, 2]")
    save_file({"w": torch.zeros(1)}, str(d / "model.safetensors"))
    code, err = run(capsys, "identify", "--model", d, "--out", tmp_path / "o")
    assert_one_line(code, err, "config.json: expected a JSON object of model settings, got a list")


@pytest.mark.parametrize("name", ["run.json", "evaluate/results.json"])
def test_report_on_a_manifest_that_is_a_list(tmp_path, capsys, name):
    (tmp_path / "r" / "evaluate").mkdir(parents=True)
    write(tmp_path / "r" / "run.json", '{"settings_hash": "x", "stages": {}}')
    write(tmp_path / "r" / name, "[]")
    code, err = run(capsys, "report", tmp_path / "r")
    assert code == 0 and "Traceback" not in err  # the report is built; the broken manifest is named in it
    page = (tmp_path / "r" / "report.html").read_text()
    assert f"{name}: expected a JSON object (a safeneuron manifest), got a list" in page


def test_negative_top_is_refused_before_the_artifacts_are_written(tmp_path, capsys, tiny_dir):
    out = tmp_path / "o"
    code, err = run(capsys, "identify", "--model", tiny_dir, "--top", -1, "--out", out)
    assert_one_line(code, err, "--top is a number of neurons >= 0, got -1")
    assert not (out / "identify.json").exists()


@pytest.mark.parametrize("make, fragment", [
    (lambda p: write(p, "x"), "is a file; the output directory must be a directory"),
    (lambda p: p.symlink_to(p), "a symlink loop"),
])
def test_out_that_is_a_file_or_a_symlink_loop(tmp_path, capsys, tiny_dir, make, fragment):
    out = tmp_path / "o"
    make(out)
    code, err = run(capsys, "identify", "--model", tiny_dir, "--max-prompts", 4, "--out", out)
    assert_one_line(code, err, fragment)


def test_prefs_out_that_is_a_directory(tmp_path, capsys):
    src = pairs_file(tmp_path / "p.jsonl")
    code, err = run(capsys, "prefs", "--source", src, "--out", tmp_path)
    assert_one_line(code, err, "is a directory; prefs writes a JSONL file")


def test_a_decompression_bomb_image_is_refused(tmp_path, monkeypatch):
    from PIL import Image

    from safeneuron.data import images
    from safeneuron.data.images import MultimodalPromptError, open_image

    Image.new("1", (4000, 3000)).save(tmp_path / "big.png")  # 12 megapixels, a few kB on disk
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 10_000_000)
    with pytest.raises(MultimodalPromptError, match="4000 x 3000 pixels, above safeneuron's limit of 10,000,000"):
        open_image(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 10 ** 9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # Pillow's own guard: above twice this is a bomb
    with pytest.raises(MultimodalPromptError, match="refused as a decompression bomb"):
        open_image(tmp_path / "big.png")


def test_pickle_only_checkpoint_is_refused_without_suggesting_weights_only(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SAFENEURON_ALLOW_PICKLE", raising=False)
    d = tmp_path / "pickled"
    d.mkdir()
    write(d / "config.json", json.dumps({"model_type": "llama"}))
    write(d / "pytorch_model.bin", b"\x80\x04not really a pickle")
    code, err = run(capsys, "identify", "--model", d, "--out", tmp_path / "o")
    assert_one_line(code, err, "pickle files only (pytorch_model.bin)", "SAFENEURON_ALLOW_PICKLE=1")
    assert "weights_only" not in err


# ================================================================== 12. where images may come from; safetensors
def _image_rows(tmp_path: Path, image: str) -> Path:
    from PIL import Image

    (tmp_path / "data").mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "inside.png")
    return write(tmp_path / "data" / "set.jsonl", json.dumps({"image": image, "text": "what is this?"}) + "\n")


@pytest.mark.parametrize("image", ["../outside.png", "OUTSIDE_ABS"])
def test_image_paths_outside_the_files_folder_are_refused(tmp_path, image):
    from safeneuron.data.images import MultimodalPromptError, load_multimodal_prompts

    path = _image_rows(tmp_path, str(tmp_path / "outside.png") if image == "OUTSIDE_ABS" else image)
    with pytest.raises(MultimodalPromptError, match="set.jsonl:1: image .* is outside .*SAFENEURON_IMAGE_DIRS"):
        load_multimodal_prompts(path)


def test_image_paths_inside_or_in_an_allowed_folder_are_read(tmp_path, monkeypatch):
    from safeneuron.data.images import load_multimodal_prompts

    assert load_multimodal_prompts(_image_rows(tmp_path, "inside.png"))[0].load_image().size == (8, 8)
    monkeypatch.setenv("SAFENEURON_IMAGE_DIRS", str(tmp_path))
    assert len(load_multimodal_prompts(_image_rows(tmp_path, "../outside.png"))) == 1


def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    from safeneuron.data.images import MultimodalPromptError, load_multimodal_prompts

    path = _image_rows(tmp_path, "link.png")
    (tmp_path / "data" / "link.png").symlink_to(tmp_path / "outside.png")
    with pytest.raises(MultimodalPromptError, match="is outside"):
        load_multimodal_prompts(path)


def test_preference_pair_images_outside_the_file_are_refused(tmp_path):
    from safeneuron.data.images import MultimodalPromptError, resolve_pair_images

    _image_rows(tmp_path, "inside.png")
    pairs = [{"prompt": "p", "chosen": "c", "rejected": "r", "image": "../outside.png"}]
    with pytest.raises(MultimodalPromptError, match="pair 0: image '../outside.png' is outside"):
        resolve_pair_images(pairs, tmp_path / "data")
    resolve_pair_images(pairs, tmp_path / "data", confine=False)  # pairs built in memory are the caller's own
    assert Path(pairs[0]["image"]).resolve() == (tmp_path / "outside.png").resolve()


def test_weights_load_with_use_safetensors_unless_pickles_are_allowed(tiny_dir, monkeypatch):
    from safeneuron.models import safetensors_kwargs

    monkeypatch.delenv("SAFENEURON_ALLOW_PICKLE", raising=False)
    assert safetensors_kwargs(str(tiny_dir)) == {"use_safetensors": True}
    assert safetensors_kwargs("org/hub-model") == {"use_safetensors": True}
    monkeypatch.setenv("SAFENEURON_ALLOW_PICKLE", "1")
    assert safetensors_kwargs("org/hub-model") == {}
