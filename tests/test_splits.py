"""Disjoint prompt splits by construction: every stage of a main job draws from its own part, and
evaluation refuses a prompt any upstream stage saw."""

import json

import pytest

from conftest import make_tokenizer, tiny_model
from safeneuron.config import RunConfig
from safeneuron.data.prompts import PromptFileError, PromptSet, load_prompts
from safeneuron.data.splits import overlap, split_prompts
from safeneuron.errors import SafeneuronError
from safeneuron.models import LoadedModel


def test_split_parts_are_disjoint_sized_and_seeded(tmp_path):
    pool = PromptSet([f"prompt {i}" for i in range(20)], [f"c{i % 3}" for i in range(20)], "pool")
    split = split_prompts(pool, {"a": 5, "b": None, "c": 3}, seed=1, out=tmp_path, stem="harmful")
    sizes = {k: len(v) for k, v in split.parts.items()}
    assert sizes == {"a": 5, "b": 12, "c": 3}
    seen = [p for ps in split.parts.values() for p in ps.prompts]
    assert sorted(seen) == sorted(pool.prompts)  # a partition: disjoint and complete
    assert load_prompts(split.files["c"]).prompts == split.parts["c"].prompts  # written as its stage reads it
    assert split_prompts(pool, {"a": 5, "b": None, "c": 3}, seed=1).parts["a"].prompts == split.parts["a"].prompts
    assert split.manifest()["parts"]["b"]["n"] == 12
    with pytest.raises(PromptFileError, match="20 prompts cannot be split into disjoint parts"):
        split_prompts(pool, {"a": 15, "b": 10})


@pytest.mark.parametrize("attacker", ["defender", "own"])
def test_a_main_jobs_stages_never_share_a_prompt_with_evaluation(tmp_path, attacker):
    """Sizes that differ (prefs 96 harmful, identification 64, evaluation 40): disjoint whatever they are."""
    from safeneuron import pipeline
    from safeneuron.stages.attack import attacker_config, attacker_prompts

    config = RunConfig(out=str(tmp_path / "run"), attacker_prompts=attacker, identify={"max_prompts": 64},
                       prefs={"n_harmful": 96, "n_harmless": 30},
                       evaluate={"n_harmful": 40, "n_harmless": 20, "identify": {"max_prompts": 24}})
    job = pipeline._start(config, pipeline.STAGES, progress=False)
    pipeline._split_prompts(job)
    ident, prefs, evaluate = (job.stage_config(s) for s in ("identify", "prefs", "evaluate"))
    upstream = {
        "defender": set(load_prompts(ident.harmful, limit=ident.max_prompts).prompts),
        "prefs": set(load_prompts(prefs.harmful, limit=prefs.n_harmful).prompts),
        "attacker": set(attacker_prompts(attacker_config(LoadedModel(None, None, "m", "m"), evaluate.identify))[0].prompts),
        "align rounds": set(load_prompts(job.stage_config("align").identify.harmful).prompts),
    }
    evaluation = set(load_prompts(evaluate.harmful, limit=evaluate.n_harmful).prompts)
    assert len(evaluation) == 40 and len(upstream["prefs"]) == 96 and len(upstream["defender"]) == 64
    assert all(not evaluation & seen for seen in upstream.values())
    assert not upstream["prefs"] & upstream["defender"]
    assert (upstream["attacker"] <= upstream["defender"]) == (attacker == "defender")
    assert overlap(evaluation, evaluate.upstream) == []
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["splits"]["harmful"]["parts"]["evaluation"]["n"] == 40


def test_evaluate_refuses_prompts_an_upstream_stage_saw(tmp_path):
    from safeneuron.config import EvalConfig
    from safeneuron.stages.evaluate import evaluate_model

    seen = tmp_path / "seen.jsonl"
    seen.write_text("".join(json.dumps({"prompt": f"describe a made-up harmful plan number {i}"}) + "\n"
                            for i in range(10)))
    config = EvalConfig(harmful=str(seen), upstream=[str(seen)], n_harmful=4, n_harmless=2, attack=False,
                        templates=[], sweep=[], n_mc=0, n_ppl=0, n_redteam=0, xstest="", max_new_tokens=2)
    loaded = LoadedModel(tiny_model("llama"), make_tokenizer(), "tiny", "tiny")
    with pytest.raises(SafeneuronError, match=r"evaluation prompt\(s\) were used upstream") as err:
        evaluate_model(loaded, config, tmp_path / "eval", progress=False)
    assert err.value.fields == ("harmful", "harmless", "upstream")


def test_the_attacker_can_take_the_defenders_identification_settings(tmp_path):
    from safeneuron import pipeline

    config = RunConfig(out=str(tmp_path / "run"), attacker_settings="defender",
                       identify={"max_prompts": 64, "position": "mean", "span": "content", "tau_es": 1.5},
                       evaluate={"identify": {"max_prompts": 24, "position": "max"}})
    job = pipeline._start(config, pipeline.STAGES, progress=False)
    attacker = job.stage_config("evaluate").identify
    assert (attacker.position, attacker.span, attacker.tau_es) == ("mean", "content", 1.5)  # the defender's
    assert attacker.max_prompts == 24 and not attacker.verify  # its own prompt count, no causal check
    own = pipeline._start(RunConfig(out=str(tmp_path / "own"), attacker_settings="own",
                                    evaluate={"identify": {"position": "max"}}), pipeline.STAGES, progress=False)
    assert own.stage_config("evaluate").identify.position == "max"
