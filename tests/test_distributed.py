"""Two processes (torchrun, gloo) give the single-process identification."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tokenizer, tiny_model
from safeneuron.artifacts import load_tensors, read_json
from safeneuron.config import IdentifyConfig
from safeneuron.stages.identify import identify
from safeneuron.models import LoadedModel

HERE = Path(__file__).parent


def torchrun(*args, timeout=300):
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if exe is None:
        pytest.skip("torchrun not installed")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    return subprocess.run([exe, "--nproc_per_node", "2", "--master_port", "29517", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_two_process_identification_equals_single_process(tmp_path):
    res = torchrun(str(HERE / "dist_worker.py"), "identify", str(tmp_path / "dist"))
    assert res.returncode == 0, res.stderr[-3000:]
    lm = LoadedModel(tiny_model("llama"), make_tokenizer(), "tiny-llama", "<memory>")
    single = identify(IdentifyConfig(max_prompts=30, batch_size=4, tau_es=0.5, by_category=True), tmp_path / "one",
                      loaded=lm, progress=False)
    assert read_json(tmp_path / "dist" / "identify.json")["processes"] == 2
    dist_stats = load_tensors(tmp_path / "dist" / "stats.safetensors")
    one_stats = load_tensors(tmp_path / "one" / "stats.safetensors")
    assert dist_stats.keys() == one_stats.keys()
    for key, value in one_stats.items():
        if key.endswith(".count"):
            assert torch.equal(dist_stats[key], value), key
        else:
            # float32 forward passes over differently composed batches: agreement to ~1e-6 relative
            torch.testing.assert_close(dist_stats[key], value, rtol=1e-5, atol=1e-8)
    dist_sets = load_tensors(tmp_path / "dist" / "safety_neurons.safetensors")
    one_sets = load_tensors(tmp_path / "one" / "safety_neurons.safetensors")
    assert all(torch.equal(dist_sets[k], v) for k, v in one_sets.items())
    assert single.union.count() > 0
    assert sorted(p.name for p in (tmp_path / "dist" / "categories").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one" / "categories").iterdir())
