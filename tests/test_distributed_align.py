"""Masked DPO on two processes (torchrun, gloo): DDP matches one process with the same global batch and keeps
the frozen entries bit-exact; the FSDP2-sharded freezer does too; FSDP1 and ZeRO-3 are refused; align writes
its artifacts once.

One torchrun launch runs every distributed task of tests/ddp_worker.py; the single-process references run
in this process. Comparisons are to float32 rounding: the two-process gradient is the gloo average of two
per-pair gradients, the one-process gradient a batched backward over both pairs (padded to the longer one),
so sums run in another order (~1e-6 after four AdamW steps at lr 1e-3).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ddp_worker
from conftest import tiny_model
from safeneuron.arch import find_mlps
from safeneuron.distributed import DistributedFreezeCallback, bind_freezer, parallelism
from safeneuron.freezing import FreezeError, NeuronFreezer
from safeneuron.masks import SafetyNeuronMask

HERE = Path(__file__).parent
WEIGHT_TOL = 2e-5  # measured: 4e-6 (DDP), 3e-6 (FSDP2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(two-process outputs, one-process outputs)."""
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if exe is None:
        pytest.skip("torchrun not installed")
    root = tmp_path_factory.mktemp("dist_align")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    env.pop("WORLD_SIZE", None)
    # --standalone: rendezvous on a free local port (tests/test_distributed.py uses 29517)
    res = subprocess.run([exe, "--standalone", "--nproc_per_node", "2", str(HERE / "ddp_worker.py"), str(root / "two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ddp_worker.dpo(root / "one" / "dpo", batch=2)
        ddp_worker.fsdp2(root / "one" / "fsdp2", sharded=False)
    finally:
        torch.set_num_threads(threads)
    return root / "two", root / "one"


def ranks(d: Path) -> list[dict]:
    return [json.loads((d / f"rank{r}.json").read_text()) for r in (0, 1)]


def frozen_equal_start(state: dict, mask: SafetyNeuronMask) -> bool:
    """Every row/column of the masked neurons equals the seed-0 model's."""
    start = tiny_model("llama", seed=0)
    for site in find_mlps(start):
        idx = mask.indices(site.name)
        for s in site.slices:
            a = state[s.param_name].index_select(s.dim, idx + s.offset)
            b = start.get_parameter(s.param_name).detach().index_select(s.dim, idx + s.offset)
            if not torch.equal(a, b):
                return False
    return True


def mask() -> SafetyNeuronMask:
    return SafetyNeuronMask.random(tiny_model("llama"), frac=ddp_worker.MASK_FRAC, seed=0)


def close_weights(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_ddp_masked_dpo_is_exact_and_matches_one_process(runs):
    two, one = runs
    r0, r1 = ranks(two / "dpo")
    single = json.loads((one / "dpo" / "rank0.json").read_text())
    assert r0["ddp"] == r1["ddp"] == "DistributedDataParallel"
    # same global batches: step k is pairs 2k, 2k+1 of the one seeded permutation in both runs
    assert [[a, b] for a, b in zip(r0["batches"], r1["batches"])] == \
        [single["batches"][i:i + 2] for i in range(0, len(single["batches"]), 2)]
    assert len(r0["log"]) == len(single["log"]) == ddp_worker.STEPS
    for a, b in zip(r0["log"], single["log"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    # frozen entries bit-exact on every rank; the gradient masks acted before the all-reduce (AdamW never saw them)
    assert r0["exact"] and r1["exact"] and single["exact"]
    assert r0["moments_untouched"] and r1["moments_untouched"]
    assert r0["state_sha256"] == r1["state_sha256"]  # restore on every rank: replicas stay identical
    dist, ref = load_file(two / "dpo" / "model.safetensors"), load_file(one / "dpo" / "model.safetensors")
    assert frozen_equal_start(dist, mask()) and frozen_equal_start(ref, mask())
    assert close_weights(dist, ref) < WEIGHT_TOL
    start = tiny_model("llama").state_dict()
    assert sum(not torch.equal(dist[k], start[k]) for k in start) > 10  # it trained


def test_fsdp2_sharded_freezing_is_exact_and_matches_one_process(runs):
    two, one = runs
    r0, r1 = ranks(two / "fsdp2")
    single = json.loads((one / "fsdp2" / "rank0.json").read_text())
    assert r0["parallelism"] == r1["parallelism"] == "fsdp2" and single["parallelism"] == "none"
    # every frozen entry moved to its DTensor shard; each rank holds part of the frozen rows, all frozen columns
    assert r0["sharded_entries"] == r1["sharded_entries"] == 9
    assert 0 < r0["local_frozen"] < single["local_frozen"] and 0 < r1["local_frozen"] < single["local_frozen"]
    assert r0["exact"] and r1["exact"] and single["exact"]
    assert r0["moments_untouched"] and r1["moments_untouched"] and single["moments_untouched"]
    assert r0["state_sha256"] == r1["state_sha256"]
    for a, b, s in zip(r0["losses"], r1["losses"], single["losses"]):  # each rank: half of the global batch
        assert (a + b) / 2 == pytest.approx(s, abs=1e-5)
    dist, ref = load_file(two / "fsdp2" / "model.safetensors"), load_file(one / "fsdp2" / "model.safetensors")
    assert frozen_equal_start(dist, mask())
    assert close_weights(dist, ref) < WEIGHT_TOL


def test_fsdp1_is_refused_with_a_clear_error(runs):
    two, _ = runs
    for r in ranks(two / "fsdp1"):
        assert r["error"] and "does not support FSDP1" in r["error"] and "fsdp_version: 2" in r["error"]


def test_align_under_ddp_writes_artifacts_once_and_keeps_frozen_exact(runs):
    two, _ = runs
    r0, r1 = ranks(two / "align")
    assert r0["exact"] and r1["exact"] and r0["state_sha256"] == r1["state_sha256"]
    run = two / "align" / "run"
    metrics = json.loads((run / "round_1" / "metrics.json").read_text())
    assert metrics["freezing"]["exact"] and metrics["ablate"] and metrics["training"]["steps_logged"] == 2
    assert json.loads((run / "align.json").read_text())["summary"][0]["frozen_exact"]
    assert not list(run.rglob(".*"))  # no temporary directory left by a concurrent writer
    saved = load_file(run / "model" / "model.safetensors")
    assert frozen_equal_start(saved, SafetyNeuronMask.load(run / "round_1" / "frozen.safetensors", neuron_set=None))
    final = load_file(two / "align" / "model.safetensors")
    assert all(torch.equal(saved[k], final[k]) for k in saved)


def test_bind_on_one_process_and_refusals():
    model = tiny_model("llama")
    freezer = NeuronFreezer(model, mask(), ablate=False).install()
    entries = list(freezer.entries)
    assert parallelism(model) == "none"
    assert bind_freezer(freezer, model).entries == entries  # unwrapped: nothing moves
    with pytest.raises(FreezeError, match="not a parameter of the prepared model"):
        bind_freezer(freezer, tiny_model("gpt2"))

    class Args:
        class deepspeed_plugin:
            zero_stage = 3

    with pytest.raises(FreezeError, match="DeepSpeed ZeRO-3"):
        DistributedFreezeCallback(freezer).on_train_begin(Args(), None, None, model=model)
    freezer.remove()
