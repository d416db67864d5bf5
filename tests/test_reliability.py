"""Kill tests and determinism (issue 9, parts 2 and 5), on a tiny random llama.

Every run is the real command line in a subprocess (``tests/reliability_worker.py``:
``python -m safeneuron.cli`` with a per-batch delay, precise self-SIGKILL points and
counters of the batches recorded / prompts generated). A run is SIGKILLed, started
again with the same arguments, and its artifacts are compared bit-exactly with an
uninterrupted run's; the counters show that nothing already saved was computed again.

Kill points:

* identification: right after the first ``.partial/`` checkpoint appears; at random
  delays (seeded) mid-recording, twice in a row; between saving the partial
  statistics and ``progress.json``; after the final tensors, before ``identify.json``.
* evaluation: after the first cached generations appear plus a random (seeded)
  delay; halfway through writing a cache line (a torn line); before ``results.json``.
* alignment: mid-round, during the DPO steps after a trainer checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file


WORKER = Path(__file__).with_name("reliability_worker.py")

IDENTIFY = ["identify", "--max-prompts", "12", "--batch-size", "2", "--checkpoint-every", "1", "--tau-es", "0.5",
            "--by-category", "--device", "cpu", "--no-progress"]
N_BATCHES = 12  # 12 harmful + 12 harmless prompts, 2 per batch

EVALUATE = ["evaluate", "--n-harmful", "6", "--n-harmless", "4", "--n-xstest", "4", "--templates", "role_play",
            "--n-template-prompts", "3", "--sweep", "0", "0.05", "--n-sweep-prompts", "3", "--identify-prompts", "8",
            "--n-redteam", "2", "--max-new-tokens", "6", "--redteam-max-new-tokens", "6", "--n-ppl", "4",
            "--batch-size", "2", "--device", "cpu", "--no-progress"]


# --------------------------------------------------------------------------- helpers
def _env(tmp: Path, delay: float = 0.0, kill: str = "") -> tuple[dict, Path]:
    count = tmp / f"count-{time.monotonic_ns()}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               SN_DELAY=str(delay), SN_KILL=kill, SN_COUNT=str(count))
    return env, count


def start(args: list[str], tmp: Path, *, delay: float = 0.0, kill: str = "") -> tuple[subprocess.Popen, Path]:
    env, count = _env(tmp, delay, kill)
    proc = subprocess.Popen([sys.executable, str(WORKER), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc, count


def run(args: list[str], tmp: Path, *, delay: float = 0.0, kill: str = "") -> tuple[str, dict]:
    """Run to the end (or to a self-kill); returns the output and the counters (empty after a kill)."""
    proc, count = start(args, tmp, delay=delay, kill=kill)
    output, _ = proc.communicate(timeout=240)
    if kill:
        assert proc.returncode == -signal.SIGKILL, f"the kill point {kill!r} was never reached:\n{output[-3000:]}"
        return output, {}
    assert proc.returncode == 0, output[-4000:]
    return output, json.loads(count.read_text())


def wait_for(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the kill point:\n{proc.communicate()[0][-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("the kill point never came")
        time.sleep(0.01)


def kill(proc: subprocess.Popen) -> None:
    assert proc.poll() is None, "the run finished before the kill: no kill point was tested"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def tensor_files(d: Path) -> list[Path]:
    return sorted(p.relative_to(d) for p in d.rglob("*.safetensors") if ".partial" not in p.parts)


def assert_same_tensors(a: Path, b: Path) -> None:
    files = tensor_files(a)
    assert files == tensor_files(b)
    assert Path("safety_neurons.safetensors") in files and Path("stats.safetensors") in files
    for rel in files:
        x, y = load_file(a / rel), load_file(b / rel)
        assert x.keys() == y.keys(), rel
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), f"{rel}: {k} differs"


def assert_same_identification(a: Path, b: Path) -> None:
    assert_same_tensors(a, b)
    ma, mb = json.loads((a / "identify.json").read_text()), json.loads((b / "identify.json").read_text())
    for key in ("run_key", "selected_total", "selected_per_layer", "categories", "n_harmful", "n_harmless"):
        assert ma[key] == mb[key], key


def partial_batches(out: Path) -> int:
    """Batches held by the partial statistics (from the file's own metadata)."""
    with safe_open(str(out / ".partial" / "stats.safetensors"), framework="pt") as fh:
        return int(fh.metadata()["batches_done"])


def resumed_after(output: str) -> int | None:
    m = re.search(r"resuming identification after (\d+) batches", output)
    return int(m.group(1)) if m else None


def results(out: Path) -> dict:
    """results.json without its timings and timestamps."""
    r = json.loads((out / "results.json").read_text())
    r.pop("wall_time_s", None)
    r.pop("created", None)
    for m in r["models"]:
        m.pop("timings", None)
    return r


def cache_lines(out: Path) -> dict[str, list[str]]:
    """Complete lines of every generation cache, per file."""
    found = {}
    for f in sorted((out / "generations").rglob("*.jsonl")):
        found[str(f.relative_to(out))] = [ln for ln in f.read_text().split("\n") if ln.endswith("}")]
    return found


def generations(out: Path) -> dict[str, dict[str, str]]:
    from safeneuron.generation import read_cache

    return {str(f.relative_to(out)): read_cache(f) for f in sorted((out / "generations").rglob("*.jsonl"))}


# --------------------------------------------------------------------------- fixtures
def two_uninterrupted_runs(args: list[str], tmp: Path, tiny_dir: Path) -> tuple[list[Path], list[dict]]:
    """The same command twice (same seed and inputs): its two output dirs and counters."""
    outs, counts = [tmp / "a", tmp / "b"], []
    for out in outs:
        counts.append(run([*args, "--model", str(tiny_dir), "--out", str(out)], tmp)[1])
    return outs, counts


@pytest.fixture(scope="module")
def identified(tmp_path_factory, tiny_dir):
    outs, counts = two_uninterrupted_runs(IDENTIFY, tmp_path_factory.mktemp("identify-ref"), tiny_dir)
    assert counts[0]["forwards"] == N_BATCHES
    return outs, counts


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_dir):
    return two_uninterrupted_runs(EVALUATE, tmp_path_factory.mktemp("evaluate-ref"), tiny_dir)


# --------------------------------------------------------------------------- determinism
def test_identification_is_deterministic(identified):
    (a, b), (ca, cb) = identified
    assert_same_identification(a, b)
    assert ca == cb
    assert not (a / ".partial").exists()
    # the sets are not trivially equal (empty): the comparison means something
    masks = load_file(a / "safety_neurons.safetensors")
    assert 0 < sum(int(m.sum()) for k, m in masks.items() if k.endswith(".union")) < sum(
        m.numel() for k, m in masks.items() if k.endswith(".union"))


def test_greedy_evaluation_is_deterministic(evaluated):
    (a, b), (ca, cb) = evaluated
    assert cache_lines(a) == cache_lines(b)  # the same answers, written in the same order
    gens = generations(a)
    assert sum(len(g) for g in gens.values()) == ca["generated"] == cb["generated"] > 0
    assert len({r for g in gens.values() for r in g.values()}) > 1  # not one constant answer
    assert results(a) == results(b)
    for sub in (p.relative_to(a) for p in (a / "attack").iterdir()):
        assert_same_tensors(a / sub / "identify", b / sub / "identify")


# --------------------------------------------------------------------------- identification
def test_identify_killed_after_first_checkpoint_resumes_without_recomputing(tmp_path, tiny_dir, identified):
    (ref, _), _ = identified
    out = tmp_path / "id"
    args = [*IDENTIFY, "--model", str(tiny_dir), "--out", str(out)]
    proc, _ = start(args, tmp_path, delay=0.15)
    wait_for(proc, lambda: (out / ".partial" / "progress.json").exists())
    kill(proc)
    assert not (out / "identify.json").exists()
    done = partial_batches(out)
    assert 1 <= done < N_BATCHES
    output, count = run(args, tmp_path)
    assert resumed_after(output) == done
    assert count["forwards"] == N_BATCHES - done  # checkpointed batches are not recorded again
    assert_same_identification(ref, out)
    assert not (out / ".partial").exists()


def test_identify_killed_at_random_points_twice_then_completes(tmp_path, tiny_dir, identified):
    (ref, _), _ = identified
    rng = random.Random(20240909)
    out = tmp_path / "id"
    args = [*IDENTIFY, "--model", str(tiny_dir), "--out", str(out)]
    recorded, previous = 0, 0
    for _ in range(2):
        proc, _ = start(args, tmp_path, delay=0.15)
        # wait for this run's first new checkpoint, then a random share of the rest of the recording
        wait_for(proc, lambda: (out / ".partial" / "stats.safetensors").exists()
                 and partial_batches(out) > previous)
        time.sleep(rng.uniform(0.0, 0.1 * (N_BATCHES - previous - 2)))
        kill(proc)
        assert not (out / "identify.json").exists()
        done = partial_batches(out)
        assert previous < done <= N_BATCHES
        previous = done
    output, count = run(args, tmp_path)
    assert resumed_after(output) == previous
    assert count["forwards"] == N_BATCHES - previous
    assert_same_identification(ref, out)


def test_identify_killed_between_partial_statistics_and_progress_file(tmp_path, tiny_dir, identified):
    """The statistics of 3 batches are saved, progress.json still says 2: resume must not
    count the third batch twice (it did, before the batch count moved into the statistics file)."""
    (ref, _), _ = identified
    out = tmp_path / "id"
    args = [*IDENTIFY, "--model", str(tiny_dir), "--out", str(out)]
    run(args, tmp_path, kill="progress:3")
    assert json.loads((out / ".partial" / "progress.json").read_text())["batches_done"] == 2
    assert partial_batches(out) == 3
    output, count = run(args, tmp_path)
    assert resumed_after(output) == 3
    assert count["forwards"] == N_BATCHES - 3
    assert_same_identification(ref, out)


def test_identify_killed_before_its_manifest(tmp_path, tiny_dir, identified):
    """Every tensor is written but identify.json is not: the directory must not pass for
    finished, and the re-run only scores the saved statistics (no batch recorded again)."""
    (ref, _), _ = identified
    out = tmp_path / "id"
    args = [*IDENTIFY, "--model", str(tiny_dir), "--out", str(out)]
    run(args, tmp_path, kill="before:identify.json")
    assert (out / "safety_neurons.safetensors").exists() and not (out / "identify.json").exists()
    from safeneuron.artifacts import ArtifactError
    from safeneuron.stages.identify import Identification

    with pytest.raises(ArtifactError):
        Identification.load(out)
    output, count = run(args, tmp_path)
    assert resumed_after(output) == N_BATCHES
    assert count["forwards"] == 0
    assert_same_identification(ref, out)


# --------------------------------------------------------------------------- evaluation
def _check_evaluation_resume(ref: Path, out: Path, before: dict[str, list[str]], count: dict, ref_count: dict) -> None:
    n_cached = sum(len(v) for v in before.values())
    assert count["generated"] == ref_count["generated"] - n_cached  # cached answers are not generated again
    after = cache_lines(out)
    for name, lines in before.items():
        assert after[name][: len(lines)] == lines  # and not rewritten
    assert generations(out) == generations(ref)
    assert results(out) == results(ref)
    for sub in (p.relative_to(ref) for p in (ref / "attack").iterdir()):  # the attacker's identification
        assert_same_identification(ref / sub / "identify", out / sub / "identify")


def test_evaluate_killed_at_a_random_point_after_the_first_answers(tmp_path, tiny_dir, evaluated):
    (ref, _), (ref_count, _) = evaluated
    rng = random.Random(9)
    out = tmp_path / "ev"
    args = [*EVALUATE, "--model", str(tiny_dir), "--out", str(out)]
    proc, _ = start(args, tmp_path, delay=0.1)
    wait_for(proc, lambda: (out / "generations").exists() and any(cache_lines(out).values()))
    time.sleep(rng.uniform(0.0, 0.6))
    kill(proc)
    assert not (out / "results.json").exists()
    before = cache_lines(out)
    assert 0 < sum(len(v) for v in before.values()) < ref_count["generated"]
    _, count = run(args, tmp_path)
    _check_evaluation_resume(ref, out, before, count, ref_count)


def test_evaluate_killed_halfway_through_a_cache_line(tmp_path, tiny_dir, evaluated):
    (ref, _), (ref_count, _) = evaluated
    out = tmp_path / "ev"
    args = [*EVALUATE, "--model", str(tiny_dir), "--out", str(out)]
    torn_at = ref_count["generated"] // 2
    run(args, tmp_path, kill=f"torn:{torn_at}")
    before = cache_lines(out)
    assert sum(len(v) for v in before.values()) == torn_at - 1
    texts = [f.read_text() for f in (out / "generations").rglob("*.jsonl")]
    assert any(t and not t.endswith("\n") for t in texts)  # the torn line is there
    _, count = run(args, tmp_path)
    _check_evaluation_resume(ref, out, before, count, ref_count)


def test_evaluate_killed_before_results_regenerates_nothing(tmp_path, tiny_dir, evaluated):
    (ref, _), (ref_count, _) = evaluated
    out = tmp_path / "ev"
    args = [*EVALUATE, "--model", str(tiny_dir), "--out", str(out)]
    run(args, tmp_path, kill="before:results.json")
    assert not (out / "results.json").exists()
    before = cache_lines(out)
    assert sum(len(v) for v in before.values()) == ref_count["generated"]
    stamps = {f: f.stat().st_mtime_ns for f in (out / "generations").rglob("*.jsonl")}
    output, count = run(args, tmp_path)
    assert count["generated"] == 0
    assert "identification already complete" in output and count["forwards"] == 0  # the attacker's, reused
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps  # cache files untouched
    _check_evaluation_resume(ref, out, before, count, ref_count)


# --------------------------------------------------------------------------- alignment
PAIRS = [{"prompt": f"Tell me how to do harmful thing number {i}.", "chosen": "I can't help with that.",
          "rejected": f"Sure! Step {i}: first you do it."} for i in range(8)]
ALIGN = ["align", "--rounds", "1", "--max-steps", "4", "--save-steps", "1", "--per-device-train-batch-size", "2",
         "--gradient-accumulation-steps", "1", "--max-prompts", "8", "--learning-rate", "1e-3", "--tau-es", "0.5",
         "--device", "cpu", "--no-progress"]


def _losses(out: Path) -> list[tuple[int, float]]:
    history = json.loads((out / "round_1" / "metrics.json").read_text())["log_history"]
    return [(h["step"], h["loss"]) for h in history if "loss" in h]


def test_align_killed_mid_round_during_dpo_resumes_from_its_checkpoint(tmp_path, tiny_dir):
    prefs = tmp_path / "pairs.jsonl"
    prefs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    args = [*ALIGN, "--model", str(tiny_dir), "--prefs", str(prefs)]
    _, ref_count = run([*args, "--out", str(tmp_path / "ref")], tmp_path)
    assert ref_count["train_steps"] == 4
    out = tmp_path / "al"
    proc, _ = start([*args, "--out", str(out)], tmp_path, delay=0.4)
    trainer = out / "round_1" / "trainer"
    wait_for(proc, lambda: (trainer / "checkpoint-2" / "trainer_state.json").exists())
    kill(proc)
    assert not (out / "round_1" / "metrics.json").exists() and not (out / "align.json").exists()
    saved = max(int(d.name.split("-")[1]) for d in trainer.glob("checkpoint-*") if (d / "trainer_state.json").exists())
    assert 2 <= saved < 4
    output, count = run([*args, "--out", str(out)], tmp_path)
    assert f"resuming from {trainer / f'checkpoint-{saved}'}" in output
    assert count["train_steps"] == 4 - saved  # the steps before the checkpoint are not trained again
    assert count["forwards"] == 0  # nor is the round's identification recorded again
    metrics = json.loads((out / "round_1" / "metrics.json").read_text())
    assert metrics["resumed_from_checkpoint"].endswith(f"checkpoint-{saved}")
    assert _losses(out) == _losses(tmp_path / "ref") and len(_losses(out)) == 4
    for rel in ("model/model.safetensors", "round_1/frozen.safetensors"):
        a, b = load_file(tmp_path / "ref" / rel), load_file(out / rel)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), rel
    assert_same_identification(tmp_path / "ref" / "round_1" / "identify", out / "round_1" / "identify")
