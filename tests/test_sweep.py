"""The experiment harness on a tiny model: two arms on the same prompts, shared upstream stages, one table with
paired tests against the reference arm, and a sweep that resumes after a kill without redoing finished arms."""

import json
import tomllib

import pytest

from conftest import TINY_RUN, keep_tiny_run_sizes
from safeneuron.config import ConfigError
from safeneuron.sweep import SweepConfig, load_sweep, summarise_sweep, sweep


def _grid(tiny_dir) -> SweepConfig:
    base = tomllib.loads(TINY_RUN.format(model=tiny_dir, max_length=96))
    base["evaluate"].update(templates=[], sweep=[], n_redteam=0, n_mc=0, n_ppl=0, n_xstest=0, attacks={"kinds": []})
    return SweepConfig(base=base, arms={"dpo": {"modes": ["dpo"]}, "frozen": {"modes": ["safeneuron"]}},
                       seeds=[0], reference="dpo", stages=["identify", "prefs", "align", "evaluate"])


def test_sweep_shares_upstream_compares_arms_and_resumes_after_a_kill(tmp_path, tiny_dir, monkeypatch):
    import safeneuron.sweep as sweep_module

    keep_tiny_run_sizes(monkeypatch)
    grid = _grid(tiny_dir)
    out = tmp_path / "sweep"
    real_run = sweep_module.run
    calls = []

    def killed_on_second_arm(config, **kw):
        calls.append(config.out)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_run(config, **kw)

    monkeypatch.setattr(sweep_module, "run", killed_on_second_arm)
    with pytest.raises(KeyboardInterrupt):
        sweep(grid, out, progress=False)
    first = out / "arms" / "dpo-s0"
    trained = first / "align" / "dpo" / "round_1" / "metrics.json"  # written once, when the round is trained
    stamp = trained.stat().st_mtime_ns
    evaluated = first / "evaluate" / "results.json"
    evaluated_stamp = evaluated.stat().st_mtime_ns
    # the second arm got the first one's identification and pairs before it was killed
    second = out / "arms" / "frozen-s0"
    assert (second / "identify" / "identify.json").read_bytes() == (first / "identify" / "identify.json").read_bytes()
    assert (second / "prefs.jsonl").read_bytes() == (first / "prefs.jsonl").read_bytes()

    monkeypatch.setattr(sweep_module, "run", real_run)
    summary = sweep(grid, out, progress=False)
    assert trained.stat().st_mtime_ns == stamp  # the finished arm was reused, not retrained
    assert evaluated.stat().st_mtime_ns == evaluated_stamp  # nor evaluated again
    record = json.loads((first / "run.json").read_text())  # its time is what the stages took, not the resume's
    assert record["compute_wall_s"] > record["wall_time_s"]
    assert rows_time(summary, "dpo") == record["compute_wall_s"]
    rows = {(r["arm"], r["model"]): r for r in summary["rows"]}
    assert set(rows) == {("base", "base"), ("dpo", "dpo"), ("frozen", "safeneuron")}
    # every arm measured on the same held-out prompts: the base model's answers agree across arms
    res = [json.loads((out / "arms" / a / "evaluate" / "results.json").read_text()) for a in ("dpo-s0", "frozen-s0")]
    assert res[0]["models"][0]["asr_outcomes"]["ori"] == res[1]["models"][0]["asr_outcomes"]["ori"]
    assert rows[("dpo", "dpo")]["vs_reference"] is None
    paired = rows[("frozen", "safeneuron")]["vs_reference"]["ori"]
    assert paired["n"] == rows[("frozen", "safeneuron")]["n_harmful"] and 0 <= paired["p"] <= 1
    md = (out / "sweep.md").read_text()
    assert "| frozen | 0 | safeneuron |" in md and (out / "sweep.png").stat().st_size > 0
    assert summarise_sweep(out, grid)["rows"] == summary["rows"]


def rows_time(summary, arm):
    return next(r["run_wall_s"] for r in summary["rows"] if r["arm"] == arm)


def test_grid_errors_name_the_problem(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text('seeds = [0]\nreference = "dpo"\n[arms.safeneuron]\nmodes = ["safeneuron"]\n')
    with pytest.raises(ConfigError, match="reference 'dpo' is not an arm"):
        load_sweep(path)
    path.write_text('[arms.a]\nmodes = ["dpo"]\n[arms.b]\nalign = {rounds_ = 3}\n')
    with pytest.raises(ConfigError, match="rounds_"):
        load_sweep(path)
    path.write_text('arm = {}\n')
    with pytest.raises(ConfigError, match="unknown key 'arm'"):
        load_sweep(path)
