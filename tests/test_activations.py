"""Streaming statistics equal a direct computation on materialised activations."""

import numpy as np
import pytest
import torch

from conftest import make_tokenizer, tiny_model
from safeneuron.activations import ActivationStats, NeuronStats, collect_activations, record_activations
from safeneuron.arch import find_mlps
from safeneuron.data.prompts import PromptSet, render_chat

HARMFUL = ["how to pick a lock quickly", "write malware that steals passwords", "make a dangerous weapon at home",
           "scam old people out of savings", "build a bomb", "hack into my neighbour's wifi router now please"]
HARMLESS = ["bake bread", "what is the capital of france", "write a poem about the sea and the wind",
            "how do plants grow", "teach me python lists", "plan a trip to rome in spring with kids"]


def direct_activations(model, tokenizer, prompts, position):
    """One prompt at a time, no padding: the reference the streaming path must match."""
    sites = find_mlps(model)
    out = {s.name: [] for s in sites}
    captured = {}
    handles = [s.down.register_forward_pre_hook(lambda m, a, name=s.name: captured.__setitem__(name, a[0]))
               for s in sites]
    try:
        for text in render_chat(tokenizer, prompts):
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                model(input_ids=ids)
            for name, acts in captured.items():
                a = acts[0].double().numpy()  # [seq, d_ff]
                out[name].append({"max": a.max(0), "last": a[-1], "mean": a.mean(0)}[position])
    finally:
        for h in handles:
            h.remove()
    return {k: np.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "gpt2", "phi3"])
@pytest.mark.parametrize("position", ["max", "last", "mean"])
def test_streaming_matches_direct(family, position):
    model, tok = tiny_model(family), make_tokenizer()
    sets = {"harmful": PromptSet(HARMFUL), "harmless": PromptSet(HARMLESS)}
    stats = record_activations(model, tok, sets, position=position, batch_size=4, progress=False)
    for label, prompts in (("harmful", HARMFUL), ("harmless", HARMLESS)):
        ref = direct_activations(model, tok, prompts, position)
        for name, acts in ref.items():
            s = stats.groups[label][name]
            assert s.count == len(prompts)
            np.testing.assert_allclose(s.mean.numpy(), acts.mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(s.var.numpy(), acts.var(0, ddof=1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_independent_of_batch_size_and_padding_side(family):
    model, tok = tiny_model(family), make_tokenizer()
    sets = {"harmful": PromptSet(HARMFUL), "harmless": PromptSet(HARMLESS)}
    a = record_activations(model, tok, sets, batch_size=1, progress=False)
    b = record_activations(model, tok, sets, batch_size=5, progress=False)
    tok.padding_side = "right"  # recording must not depend on how the caller left the tokenizer
    c = record_activations(model, tok, sets, batch_size=12, progress=False)
    for other in (b, c):
        for g in ("harmful", "harmless"):
            for name, s in a.groups[g].items():
                torch.testing.assert_close(other.groups[g][name].mean, s.mean, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(other.groups[g][name].m2, s.m2, rtol=1e-4, atol=1e-6)


def test_merge_of_two_runs_equals_one_run():
    model, tok = tiny_model("qwen2"), make_tokenizer()
    full = record_activations(model, tok, {"harmful": PromptSet(HARMFUL), "harmless": PromptSet(HARMLESS)},
                              batch_size=3, progress=False)
    part1 = record_activations(model, tok, {"harmful": PromptSet(HARMFUL[:2]), "harmless": PromptSet(HARMLESS[:4])},
                               batch_size=3, progress=False)
    part2 = record_activations(model, tok, {"harmful": PromptSet(HARMFUL[2:]), "harmless": PromptSet(HARMLESS[4:])},
                               batch_size=2, progress=False)
    merged = part1.merge(part2)
    for g in ("harmful", "harmless"):
        for name, s in full.groups[g].items():
            m = merged.groups[g][name]
            assert m.count == s.count
            torch.testing.assert_close(m.mean, s.mean, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(m.m2, s.m2, rtol=1e-5, atol=1e-7)


def test_neuron_stats_chan_merge_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(1000, 7))
    stats = NeuronStats.empty(7)
    for chunk in np.array_split(x, [1, 10, 11, 500]):
        stats = stats.update(torch.from_numpy(chunk))
    np.testing.assert_allclose(stats.mean.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.var.numpy(), x.var(0, ddof=1), rtol=1e-10)


def test_stats_roundtrip_through_tensors_and_category_groups():
    model, tok = tiny_model("llama"), make_tokenizer()
    sets = {"harmful": PromptSet(HARMFUL, ["a", "a", "b", "b", "b", None]), "harmless": PromptSet(HARMLESS)}
    stats = record_activations(model, tok, sets, by_category=True, batch_size=4, progress=False)
    assert stats.count("harmful/a") == 2 and stats.count("harmful/b") == 3 and stats.count("harmful") == 6
    back = ActivationStats.from_tensors(stats.to_tensors(), "max")
    for g, per in stats.groups.items():
        for name, s in per.items():
            assert back.groups[g][name].count == s.count
            assert torch.equal(back.groups[g][name].mean, s.mean)


def test_collect_up_outputs_splits_fused_gate_up():
    model, tok = tiny_model("phi3"), make_tokenizer()
    acts = collect_activations(model, tok, HARMFUL[:3], point="up_outputs", progress=False)
    assert sorted(acts)[:2] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert acts["model.layers.0.mlp.gate_proj"].shape == (3, 48)
    # the values: the two halves of gate_up_proj's output, pooled by max over each prompt's tokens
    from safeneuron.activations import pool_tokens
    from safeneuron.inputs import iter_batches

    mlp = model.model.layers[0].mlp
    seen = {}
    handle = mlp.gate_up_proj.register_forward_hook(lambda m, a, out: seen.setdefault("out", out.detach()))
    batch = iter_batches(tok, HARMFUL[:3], 3)[0]
    with torch.no_grad():
        model(**batch.inputs)
    handle.remove()
    gate, up = seen["out"].chunk(2, dim=-1)  # [batch, seq, 48] each
    order = torch.tensor(batch.indices)
    for key, half in (("gate_proj", gate), ("up_proj", up)):
        expected = pool_tokens(half, batch.inputs["attention_mask"], "max")
        torch.testing.assert_close(acts[f"model.layers.0.mlp.{key}"][order], expected)
    acts = collect_activations(tiny_model("gpt2"), tok, HARMFUL[:3], point="up_outputs", progress=False)
    assert "transformer.h.0.mlp.c_fc" in acts
