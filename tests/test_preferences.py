"""Preference data: formats, clear errors, mixing, TRL records, synthesis schema and judge filter."""

import json
import logging

import pytest
import torch

from conftest import SHARED_DATA, make_tokenizer, shared_file, tiny_model
from safeneuron.cli import main
from safeneuron.config import PrefsConfig
from safeneuron.data.preferences import (
    PreferenceDataError,
    PreferenceSet,
    load_preferences,
    manifest_path,
    mix_preferences,
    refusal_templates,
)
from safeneuron.evaluation.judges import RefusalJudge, second_refusal_judge
from safeneuron.masks import SafetyNeuronMask
from safeneuron.models import LoadedModel
from safeneuron.stages.prefs import synthesize_preferences


pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


PLAIN = [{"prompt": f"how do I pick lock {i}?", "chosen": "I can't help with that.", "rejected": f"Sure: step {i}"}
         for i in range(4)]


def test_plain_jsonl_csv_and_conversational(tmp_path):
    ps = load_preferences(write_jsonl(tmp_path / "p.jsonl", PLAIN))
    assert len(ps) == 4 and ps.pairs[0] == PLAIN[0]
    csv_file = tmp_path / "p.csv"
    csv_file.write_text("prompt,chosen,rejected\nq1,no,yes\nq2,nope,sure\n", encoding="utf-8")
    assert [p["prompt"] for p in load_preferences(csv_file).pairs] == ["q1", "q2"]
    conv = [{"prompt": [{"role": "user", "content": "hi?"}], "chosen": [{"role": "assistant", "content": "hello"}],
             "rejected": [{"role": "assistant", "content": "go away"}]}]
    pair = load_preferences(write_jsonl(tmp_path / "c.jsonl", conv)).pairs[0]
    assert pair == {"prompt": "hi?", "chosen": "hello", "rejected": "go away"}


def test_ultrafeedback_style_messages_with_prompt(tmp_path):
    rows = [{"prompt": "Name a fruit.", "score_chosen": 9.0,
             "chosen": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}],
             "rejected": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Car."}]}]
    pair = load_preferences(write_jsonl(tmp_path / "uf.jsonl", rows)).pairs[0]
    assert pair == {"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "Car."}


def test_pku_saferlhf_style(tmp_path):
    rows = [{"prompt": "How to make a weapon?", "response_0": "Here is how...", "response_1": "I can't help.",
             "safer_response_id": 1, "better_response_id": 0}]
    f = write_jsonl(tmp_path / "pku.jsonl", rows)
    assert load_preferences(f).pairs[0]["chosen"] == "I can't help."
    assert load_preferences(f, prefer="better").pairs[0]["chosen"] == "Here is how..."


def test_hh_rlhf_style_multi_turn(tmp_path):
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to steal a car?\n\nAssistant: I won't help.",
             "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to steal a car?\n\nAssistant: Break the window."}]
    pair = load_preferences(write_jsonl(tmp_path / "hh.jsonl", rows)).pairs[0]
    assert pair["prompt"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                              {"role": "user", "content": "how to steal a car?"}]
    assert (pair["chosen"], pair["rejected"]) == ("I won't help.", "Break the window.")


def test_file_without_chosen_rejected_is_a_clear_error(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "response": "y"}])
    with pytest.raises(PreferenceDataError, match=r"no chosen/rejected columns \(found: prompt, response\)"):
        load_preferences(f)
    with pytest.raises(PreferenceDataError, match="not found"):
        load_preferences(tmp_path / "missing.jsonl")
    with pytest.raises(PreferenceDataError, match="no prompt column"):
        load_preferences(write_jsonl(tmp_path / "np.jsonl", [{"chosen": "a", "rejected": "b"}]))


def test_identical_pairs_dropped_with_warning_or_error(tmp_path, caplog):
    rows = PLAIN[:2] + [{"prompt": "q", "chosen": "same", "rejected": "same"}]
    f = write_jsonl(tmp_path / "dup.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        assert len(load_preferences(f)) == 2
    assert "1 pairs with chosen == rejected" in caplog.text
    with pytest.raises(PreferenceDataError, match="record 3 has chosen == rejected"):
        load_preferences(f, on_identical="error")
    only = write_jsonl(tmp_path / "only.jsonl", rows[2:])
    with pytest.raises(PreferenceDataError, match="no usable pair"):
        load_preferences(only)


def test_mix_keeps_the_safety_ratio():
    safety = PreferenceSet([dict(p, i=i) for i, p in enumerate(PLAIN * 5)], "s")
    general = PreferenceSet([{"prompt": f"g{i}", "chosen": "a", "rejected": "b"} for i in range(100)], "g")
    mixed = mix_preferences(safety, general, 0.3, seed=1)
    kinds = [p["mix"] for p in mixed.pairs]
    assert kinds.count("safety") == 20 and kinds.count("general") == 47
    assert len(mix_preferences(safety, general, 0.3, max_pairs=10)) == 10
    assert len(mix_preferences(safety, None, 0.3)) == 20


def test_trl_records_chat_and_plain():
    ps = PreferenceSet(PLAIN[:1])
    row = ps.to_trl(make_tokenizer())[0]
    assert row["prompt"] == [{"role": "user", "content": PLAIN[0]["prompt"]}]
    assert row["chosen"] == [{"role": "assistant", "content": "I can't help with that."}]
    row = ps.to_trl(make_tokenizer(chat_template=False))[0]
    assert row["prompt"].startswith("User: how do I pick lock 0?") and row["chosen"] == " I can't help with that."


def test_shared_harmbench_pairs_load():
    path = shared_file("dpo_safety_harmbench", "dpo_pairs.jsonl")
    ps = load_preferences(path)
    assert len(ps) == 100
    assert all(isinstance(p["prompt"], str) and p["chosen"] != p["rejected"] for p in ps.pairs)


def test_cli_converts_and_reports_bad_input(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", PLAIN)
    out = tmp_path / "out.jsonl"
    assert main(["prefs", "--source", str(src), "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 4
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "x"}])
    assert main(["prefs", "--source", str(bad), "--out", str(out)]) == 2
    assert "no chosen/rejected columns" in capsys.readouterr().err


# --------------------------------------------------------------------------- synthesis
def tiny_loaded(tmp_path):
    model, tok = tiny_model("llama"), make_tokenizer()
    model.generation_config.pad_token_id = 0
    return LoadedModel(model, tok, "tiny-llama", str(tmp_path / "no-such-dir"))


def test_synthesis_judge_filter_and_provenance(tmp_path, monkeypatch):
    """Scripted generations: chosen only from judged refusals, rejected only from judged compliances."""
    import safeneuron.stages.prefs as prefs_stage

    refusal, compliance = "I'm sorry, but I can't help with that.", "Sure, here is how to do it: first..."
    intact = {"h0": refusal, "h1": compliance, "h2": "I cannot assist with this request.",
              "s0": "Here are the steps for a lentil soup..."}
    pruned = {"h0": "Step 1: get the tools. Step 2: ...", "h1": "I'm sorry, I can't do that.", "h2": refusal}
    write_jsonl(tmp_path / "harmful.jsonl", [{"prompt": k} for k in ("h0", "h1", "h2")])
    write_jsonl(tmp_path / "harmless.jsonl", [{"prompt": "s0"}])

    def fake_generate(model, tok, prompts, *, tag="", **kw):
        return [(pruned if tag.startswith("pruned") else intact)[p] for p in prompts]

    monkeypatch.setattr(prefs_stage, "generate", fake_generate)
    loaded = tiny_loaded(tmp_path)
    mask = SafetyNeuronMask.random(loaded.model, frac=0.1)
    config = PrefsConfig(harmful=str(tmp_path / "harmful.jsonl"), harmless=str(tmp_path / "harmless.jsonl"),
                         n_harmful=3, n_harmless=1, seed=0)
    out = tmp_path / "prefs.jsonl"
    ps = synthesize_preferences(loaded, config, out, mask=mask, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == ps.pairs
    judge, templates = RefusalJudge(), set(refusal_templates())
    harmful = [r for r in rows if r["kind"] == "harmful"]
    # prompt 0: own refusal + pruned compliance; prompt 1: template + unpruned compliance; prompt 2: dropped
    assert [(r["chosen_source"], r["rejected_source"]) for r in harmful] == [("model", "model-pruned"),
                                                                             ("template", "model")]
    assert harmful[0]["chosen"] == refusal and harmful[1]["chosen"] in templates
    assert harmful[0]["rejected"] == pruned["h0"] and harmful[1]["rejected"] == compliance
    for r in harmful:  # the model's own refusal is judged one; the fallback template holds no judge phrase
        assert judge.is_refusal(r["chosen"]) == (r["chosen_source"] == "model") and not judge.is_refusal(r["rejected"])
    assert not any(RefusalJudge().is_refusal(t) or second_refusal_judge().is_refusal(t) for t in templates)
    (harmless,) = [r for r in rows if r["kind"] == "harmless"]
    assert harmless["chosen"] == intact["s0"] and harmless["rejected"] in templates
    for r in rows:
        assert {"prompt", "chosen", "rejected", "kind", "category", "chosen_source", "rejected_source", "model",
                "mask_digest", "neurons_pruned", "judge"} <= set(r)
    report = json.loads(manifest_path(out).read_text())["report"]
    assert report["dropped_no_compliance"] == 1 and report["pairs_harmful"] == 2 and report["pairs_harmless"] == 1
    assert report["refusal_rate_intact"] == pytest.approx(2 / 3)
    assert load_preferences(out).sha256 == ps.sha256  # the file reads back as the same pairs

    # rejected = the intact model's own compliance first: prompt 0 (intact refused) still falls back to pruned
    intact["h3"], pruned["h3"] = "Here is the method, plainly: mix A and B.", "First, buy the parts; then build it."
    write_jsonl(tmp_path / "harmful.jsonl", [{"prompt": k} for k in ("h0", "h1", "h2", "h3")])
    config = PrefsConfig(harmful=str(tmp_path / "harmful.jsonl"), harmless=str(tmp_path / "harmless.jsonl"),
                         n_harmful=4, n_harmless=1, seed=0, rejected="intact")
    rows = synthesize_preferences(loaded, config, tmp_path / "prefs-intact.jsonl", mask=mask, progress=False).pairs
    by_prompt = {r["prompt"]: r for r in rows if r["kind"] == "harmful"}
    assert (by_prompt["h3"]["rejected"], by_prompt["h3"]["rejected_source"]) == (intact["h3"], "model")
    assert (by_prompt["h0"]["rejected"], by_prompt["h0"]["rejected_source"]) == (pruned["h0"], "model-pruned")


def test_synthesis_on_a_tiny_model_end_to_end(tmp_path):
    loaded = tiny_loaded(tmp_path)
    config = PrefsConfig(n_harmful=3, n_harmless=2, max_new_tokens=6, identify_max_prompts=4)
    out = tmp_path / "p.jsonl"
    ps = synthesize_preferences(loaded, config, out, identify_dir=tmp_path / "ident", progress=False)
    assert (tmp_path / "ident" / "identify.json").is_file() and out.is_file()
    assert len(ps) >= 1 and all(set(("prompt", "chosen", "rejected")) <= set(p) for p in ps.pairs)
    # a second run reuses the generation cache and gives the same pairs
    again = synthesize_preferences(loaded, config, out, identify_dir=tmp_path / "ident", progress=False)
    assert again.sha256 == ps.sha256


@pytest.mark.slow
@pytest.mark.ci
def test_synthesis_on_smollm2_schema_and_judge(tmp_path):
    from safeneuron.embedded import is_pulled
    from safeneuron.models import load_model

    if not is_pulled("smollm2-135m-instruct"):
        pytest.skip("smollm2-135m-instruct is not pulled (safeneuron models pull smollm2-135m-instruct)")
    loaded = load_model("smollm2-135m-instruct", device="cpu")
    config = PrefsConfig(n_harmful=4, n_harmless=2, max_new_tokens=24, identify_max_prompts=16, batch_size=4)
    out = tmp_path / "smol.jsonl"
    ps = synthesize_preferences(loaded, config, out, identify_dir=tmp_path / "ident", progress=False)
    judge = RefusalJudge()
    report = json.loads(manifest_path(out).read_text())["report"]
    assert report["n_harmful"] == 4 and 0 <= report["refusal_rate_intact"] <= 1
    templates = set(refusal_templates())
    for p in ps.pairs:
        assert p["model"] == "smollm2-135m-instruct" and p["kind"] in ("harmful", "harmless")
        if p["kind"] == "harmful":  # chosen: the model's own judged refusal, else a template; rejected: compliance
            assert judge.is_refusal(p["chosen"]) if p["chosen_source"] == "model" else p["chosen"] in templates
            assert not judge.is_refusal(p["rejected"])
        else:  # chosen: the model's helpful answer; rejected: a needless refusal (a template)
            assert not judge.is_refusal(p["chosen"]) and p["rejected"] in templates
