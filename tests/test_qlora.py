"""QLoRA: LoRA adapters trained on a 4-bit NF4 copy of the model (bitsandbytes, which also
runs on the CPU), merged into the full-precision weights with safety neurons bit-exact."""

import importlib.util

import pytest
import torch

from conftest import make_tokenizer, tiny_config
from safeneuron.arch import find_mlps
from safeneuron.config import AlignConfig, ConfigError
from safeneuron.masks import SafetyNeuronMask
from safeneuron.models import ModelLoadError, load_model
from safeneuron.stages.align import align

PAIRS = [{"prompt": f"Tell me how to do harmful thing number {i}.", "chosen": "I can't help with that.",
          "rejected": f"Sure! Step {i}: first you do it."} for i in range(8)]

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


@pytest.fixture
def model_dir(tmp_path):
    """A tiny llama whose widths are multiples of the 4-bit block size (64)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size, config.head_dim = 128, 256, 32
    torch.manual_seed(0)
    path = tmp_path / "tiny"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@needs_bnb
def test_qlora_rounds_keep_safety_neurons_bit_exact_and_train_the_rest(tmp_path, model_dir):
    torch.set_num_threads(1)
    start = load_model(str(model_dir), device="cpu").model
    loaded = load_model(str(model_dir), device="cpu", load_in_4bit=True)
    assert loaded.model.is_loaded_in_4bit
    assert [s.d_ff for s in find_mlps(loaded.model)] == [256] * 3  # width from the packed 4-bit layer
    config = AlignConfig(rounds=2, lora=True, load_in_4bit=True, lora_r=4, max_steps=2, learning_rate=1e-2,
                         max_prompts=8, tau_es=0.3, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                         device="cpu")
    result = align(config, PAIRS, tmp_path / "q", loaded=loaded, progress=False)
    assert [m["load_in_4bit"] for m in result.rounds] == [True, True]
    assert all(m["freezing"]["exact"] for m in result.rounds)
    previous = start
    for r in (1, 2):
        from transformers import AutoModelForCausalLM

        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "q" / f"round_{r}" / "model", dtype=torch.float32)
        assert not getattr(merged, "is_loaded_in_4bit", False)  # saved in full precision
        frozen = SafetyNeuronMask.load(tmp_path / "q" / f"round_{r}" / "frozen.safetensors", neuron_set=None)
        assert frozen.count() > 0
        ref = dict(previous.named_parameters())
        changed = 0
        for site in find_mlps(merged):
            neurons = frozen.indices(site.name)
            for s in site.slices:
                a = merged.get_parameter(s.param_name).detach()
                b = ref[s.param_name].detach()
                assert torch.equal(a.index_select(s.dim, neurons + s.offset),
                                   b.index_select(s.dim, neurons + s.offset)), f"round {r}: {s.param_name}"
                changed += int(not torch.equal(a, b))
        assert changed > 0, f"round {r}: the adapter changed nothing"
        previous = merged


def test_qlora_needs_lora_and_bitsandbytes(tmp_path, model_dir, monkeypatch):
    with pytest.raises(ConfigError, match="load_in_4bit .* set lora"):
        AlignConfig(load_in_4bit=True).validate()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ModelLoadError, match="load_in_4bit needs bitsandbytes, which is not installed"):
        load_model(str(model_dir), device="cpu", load_in_4bit=True)
