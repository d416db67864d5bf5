"""The main job: config handling, a full run on a tiny model, kill-and-resume, and the
real quick run on the embedded model (slow, kept in CI)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import keep_tiny_run_sizes, write_tiny_run_config
from safeneuron.config import ConfigError
from safeneuron.pipeline import DEFAULT_CONFIG, QUICK, load_run_config

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_file_is_current_and_valid():
    sys.path.insert(0, str(ROOT / "scripts"))
    from gen_default_config import render

    assert DEFAULT_CONFIG.read_text() == render(), "run scripts/gen_default_config.py"
    config = load_run_config()
    config.validate()
    assert config.stage_config("identify").by_category is True
    # only the evaluation (generation) runs in "fast"; identification and training stay float32 on a CPU
    assert config.stage_config("evaluate").dtype == "fast" == load_run_config(quick=True).stage_config("evaluate").dtype
    assert config.stage_config("identify").dtype == config.stage_config("align").dtype == "auto"


def test_quick_profile_and_unknown_keys(tmp_path):
    quick = load_run_config(quick=True)
    assert quick.stage_config("evaluate").n_harmful == QUICK["evaluate"]["n_harmful"]
    assert quick.stage_config("align").rounds == 1
    bad = tmp_path / "bad.toml"
    bad.write_text('[align]\nlearnig_rate = 1e-5\n')
    with pytest.raises(ConfigError, match="unknown key 'learnig_rate'; did you mean 'learning_rate'"):
        load_run_config(bad).validate()
    bad.write_text('modez = ["dpo"]\n')
    with pytest.raises(ConfigError, match="did you mean 'modes'"):
        load_run_config(bad)


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "safeneuron.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})))


def test_run_on_a_tiny_model_writes_every_artifact(tmp_path, tiny_dir, monkeypatch):
    from safeneuron import pipeline

    keep_tiny_run_sizes(monkeypatch)
    config = load_run_config(write_tiny_run_config(tmp_path, tiny_dir), out=str(tmp_path / "run"))
    record = pipeline.run(config, progress=False)
    out = tmp_path / "run"
    for path in ("identify/identify.json", "prefs.jsonl", "align/safeneuron/align.json", "align/dpo/align.json",
                 "align/safeneuron/model/config.json", "evaluate/results.json", "analysis/analysis.json",
                 "report.html", "summary.md", "run.json"):
        assert (out / path).exists(), path
    results = json.loads((out / "evaluate" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["base", "safeneuron", "dpo"]
    for m in results["models"]:
        for rate in list(m["asr"].values()) + [m["over_refusal"]]:
            assert rate is None or 0.0 <= rate <= 1.0
    assert set(record["stages"]) == {"identify", "prefs", "align/safeneuron", "align/dpo", "evaluate", "analyze",
                                     "report"}
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["quick"] is True and run_json["wall_time_s"] > 0
    # each aligned model's card names its base model and carries its evaluation
    sn = results["models"][1]
    card = (out / "align" / "safeneuron" / "model" / "README.md").read_text()
    assert f'base_model: "{tiny_dir}"' in card and "## Evaluation" in card
    assert f"On {sn['n_harmful']} held-out harmful prompts" in card
    assert f"| {100 * sn['asr']['ori']:.1f} % |" in card
    from safeneuron.cli.summaries import run_summary

    summary = run_summary(out)
    assert "base" in summary and "report:" in summary
    # A second run with the same settings redoes nothing: identification is reused.
    stamp = (out / "identify" / "identify.json").stat().st_mtime_ns
    pipeline.run(config, progress=False)
    assert (out / "identify" / "identify.json").stat().st_mtime_ns == stamp


def test_run_refuses_a_directory_of_other_settings(tmp_path, tiny_dir):
    from safeneuron.errors import SafeneuronError
    from safeneuron import pipeline

    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"settings_hash": "something-else", "stages": {
        "identify": {"settings_hash": "x", "config_key": "another", "status": "done"}}}))
    config = load_run_config(write_tiny_run_config(tmp_path, tiny_dir), out=str(out))
    with pytest.raises(SafeneuronError, match="holds a run with other settings: the finished stage.s. identify"):
        pipeline.run(config, progress=False)


def test_kill_during_alignment_then_resume(tmp_path, tiny_dir):
    cfg = write_tiny_run_config(tmp_path, tiny_dir)
    out = tmp_path / "run"
    args = [sys.executable, "-m", "safeneuron.cli", "run", "--config", str(cfg), "--out", str(out), "--no-progress",
            "--stages", "identify,prefs,align"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marker = out / "align" / "safeneuron" / "round_1" / "round.json"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[0][-3000:] if proc.poll() is not None else "alignment never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "align" / "safeneuron" / "align.json").exists()
    stamp = (out / "identify" / "identify.json").stat().st_mtime_ns
    res = subprocess.run(args, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "identify" / "identify.json").stat().st_mtime_ns == stamp  # identification not redone
    assert "identification already complete" in res.stderr
    assert (out / "align" / "safeneuron" / "align.json").exists() and (out / "align" / "dpo" / "align.json").exists()


@pytest.mark.slow
@pytest.mark.ci
def test_quick_main_job_on_the_embedded_model(tmp_path):
    out = tmp_path / "main"
    t0 = time.time()
    res = cli("run", "--quick", "--out", str(out), "--no-progress")
    wall = time.time() - t0
    assert res.returncode == 0, res.stderr[-4000:]
    print(res.stdout)
    print(f"quick main job: {wall / 60:.1f} min")
    results = json.loads((out / "evaluate" / "results.json").read_text())
    names = [m["name"] for m in results["models"]]
    assert names == ["base", "safeneuron", "dpo"]
    for m in results["models"]:
        assert m["n_harmful"] >= 16
        assert 0.0 <= m["asr"]["ori"] <= 1.0 and 0.0 <= m["asr"]["full"] <= 1.0
        assert m["pruned_counts"]["full"] > 0
    check_the_base_models_safety_neurons(out, results["models"][0])
    assert (out / "report.html").stat().st_size > 10_000 and (out / "summary.md").exists()
    assert json.loads((out / "run.json").read_text())["quick"] is True


def check_the_base_models_safety_neurons(out: Path, base: dict) -> None:
    """Real behaviour on the quick run's few prompts (20 evaluation, 12 held out for the causal check), so
    directions, not effect sizes (bench_pooling.py measures those on 96 prompts): the embedded model refuses
    some harmful prompts; pruning its safety neurons takes most refusals away and does not lower the ASR;
    the identification's causal check sees the same; as many random neurons do not do better."""
    verdicts = base["asr_verdicts"]
    assert verdicts["ori"].get("refusal", 0) >= 2  # the embedded model refuses some harmful prompts
    assert verdicts["full"].get("refusal", 0) <= verdicts["ori"]["refusal"] / 2  # pruning takes refusal away
    assert base["asr"]["full"] >= base["asr"]["ori"]
    check = json.loads((out / "identify" / "identify.json").read_text())["verification"]
    assert check["pruned"]["refusal_rate"] < check["plain"]["refusal_rate"]  # the defender's own set, held out
    assert check["pruned"]["rate"] >= check["random"]["rate"]
    assert_pruning_beats_random_neurons(out, base)


def assert_pruning_beats_random_neurons(out: Path, base: dict) -> None:
    """The base model's FULL set (found by the run's adaptive attacker) raises the ASR on the
    run's harmful prompts at least as much as pruning as many random neurons per layer, and
    evaluate's own random control is that measurement."""
    from safeneuron.evaluation.judges import RefusalJudge
    from safeneuron.evaluation.measure import GenerationSettings, judged_responses
    from safeneuron.stages.identify import Identification
    from safeneuron.masks import SafetyNeuronMask
    from safeneuron.models import load_model

    rows = [json.loads(line) for line in (out / "evaluate" / "generations" / "base" / "harmful.jsonl").open()]
    prompts = list(dict.fromkeys(r["prompt"] for r in rows if "|prune" not in r["tag"]))
    assert len(prompts) == base["n_harmful"]
    loaded = load_model(None, dtype=load_run_config(quick=True).stage_config("evaluate").dtype)  # as evaluated
    full = Identification.load(out / "evaluate" / "attack" / "base" / "identify").sets["union"]
    assert full.count() == base["pruned_counts"]["full"]
    control = SafetyNeuronMask.random(loaded.model, like=full, seed=0)
    settings = GenerationSettings(max_new_tokens=load_run_config(quick=True).stage_config("evaluate").max_new_tokens,
                                  batch_size=32)
    rand = judged_responses(loaded, prompts, RefusalJudge(), mask=control, settings=settings, progress=False)
    print(f"base: ASR {base['asr']['ori']:.3f}, FULL pruned ({full.count()} neurons) {base['asr']['full']:.3f}, "
          f"as many random neurons pruned {rand.rate:.3f} (n = {rand.n})")
    assert base["asr"]["full"] >= rand.rate
    assert base["asr_random_control"] == rand.rate  # evaluate's own control: the same random neurons, same answers
