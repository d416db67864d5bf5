"""Identification on the embedded real model (slow; kept in CI)."""

import pytest
from safeneuron.activations import record_activations
from safeneuron.config import IdentifyConfig
from safeneuron.data.prompts import load_prompts
from safeneuron.stages.identify import Identification, identify, score_stats, select_safety_neurons
from safeneuron.models import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qwen():
    return load_model(None, dtype="float32", device="cpu")


def jaccard(a, b):
    inter = (a & b).count()
    union = (a | b).count()
    return inter / union if union else 1.0


def test_embedded_model_selection_is_nonempty_stable_and_reloads(qwen, tmp_path):
    harmful = load_prompts(None, default="harmful", limit=64, seed=0)
    harmless = load_prompts(None, default="harmless", limit=64, seed=0)
    h1, h2 = harmful.split(0.5, seed=0)
    s1, s2 = harmless.split(0.5, seed=0)
    halves = [record_activations(qwen.model, qwen.tokenizer, {"harmful": h, "harmless": s}, batch_size=16,
                                 progress=False) for h, s in ((h1, s1), (h2, s2))]
    sets = [select_safety_neurons(score_stats(st), 32, 32, tau_es=3.0, tau_sas=2.0) for st in halves]
    a, b = sets[0]["union"], sets[1]["union"]
    overlap = jaccard(a, b)
    top_a = a.count()
    print(f"\nunion sizes {a.count()} / {b.count()}, Jaccard overlap of two random halves {overlap:.3f}")
    assert a.count() > 0 and b.count() > 0
    # Two disjoint halves of 32+32 prompts agree far beyond chance (random sets of this size overlap ~1-2%).
    chance = top_a / a.total()
    assert overlap > 5 * chance, (overlap, chance)
    # The merged halves are the full identification; artifacts written by identify reload.
    merged = halves[0].merge(halves[1])
    full = select_safety_neurons(score_stats(merged), 64, 64, tau_es=3.0, tau_sas=2.0)["union"]
    assert full.count() > 0
    harmful_file = tmp_path / "harmful.txt"
    harmful_file.write_text("\n".join(harmful.prompts[:24]))
    harmless_file = tmp_path / "harmless.txt"
    harmless_file.write_text("\n".join(harmless.prompts[:24]))
    result = identify(IdentifyConfig(harmful=str(harmful_file), harmless=str(harmless_file)), tmp_path / "id",
                      loaded=qwen, progress=False)
    again = Identification.load(tmp_path / "id")
    assert again.manifest["model_type"] == "qwen2" and again.manifest["tau_es"] == 3.0
    assert again.union.count() == result.union.count() > 0
    again.union.check(qwen.model)
