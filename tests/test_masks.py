"""SafetyNeuronMask: construction, set algebra, save/load round trip."""

import pytest
import torch

from conftest import tiny_model
from safeneuron.artifacts import ArtifactError
from safeneuron.masks import SafetyNeuronMask


def test_random_masks_and_counts():
    model = tiny_model("llama")
    m = SafetyNeuronMask.random(model, frac=0.1, seed=1)
    assert m.per_layer() == {f"model.layers.{i}.mlp": 5 for i in range(3)}
    assert torch.equal(m.masks["model.layers.0.mlp"], SafetyNeuronMask.random(model, frac=0.1, seed=1).masks["model.layers.0.mlp"])
    like = SafetyNeuronMask.from_indices(model, {"model.layers.1.mlp": [1, 2, 3]})
    r = SafetyNeuronMask.random(model, like=like, seed=0)
    assert r.per_layer() == like.per_layer()
    assert (m | like).count() <= m.count() + 3 and (m & like).count() <= 3


def test_top_frac_is_global():
    scores = {"a": torch.tensor([0.0, 5.0, 1.0, 0.0]), "b": torch.tensor([4.0, 0.0, 0.0, 3.0])}
    m = SafetyNeuronMask.top_frac(scores, 0.25)
    assert m.masks["a"].tolist() == [False, True, False, False] and m.masks["b"].tolist() == [True, False, False, False]


def test_save_load_sets(tmp_path):
    model = tiny_model("gpt2")
    m = SafetyNeuronMask.random(model, frac=0.2)
    m.save(tmp_path / "frozen.safetensors")
    assert SafetyNeuronMask.load(tmp_path / "frozen.safetensors").masks.keys() == m.masks.keys()
    m.save(tmp_path / "sets.safetensors", suffix=".es")
    loaded = SafetyNeuronMask.load(tmp_path / "sets.safetensors", neuron_set="es")
    assert all(torch.equal(loaded.masks[k], v) for k, v in m.masks.items())
    with pytest.raises(ArtifactError, match="no 'sas' set"):
        SafetyNeuronMask.load(tmp_path / "sets.safetensors", neuron_set="sas")
    with pytest.raises(ArtifactError, match="1-D bool"):
        SafetyNeuronMask({"x": torch.zeros(3)})
