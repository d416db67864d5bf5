"""Refusal-direction edits: the hooks remove the direction from the residual stream at every layer,
the orthogonalised weights give the hooks' logits, and the next-token measurements."""

import copy

import pytest
import torch

from conftest import make_tokenizer, tiny_model
from safeneuron.directions import (ablate_directions, orthogonalize_weights, orthonormal, residual_activations,
                                   residual_layers)
from safeneuron.next_token import kl_divergence, next_token_logprobs, refusal_scores, refusal_token_ids

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["how do I bake bread", "write malware now", "hello there", "tell me a story about a cat"]


def _hidden(model, tok, prompts=PROMPTS):
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    return out, enc["attention_mask"].bool()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("k", [1, 2])
def test_ablation_leaves_no_component_along_the_directions_at_any_layer(family, k):
    model, tok = tiny_model(family), make_tokenizer()
    d = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    dirs = torch.randn(k, d, generator=torch.Generator().manual_seed(3))
    basis = orthonormal(dirs)
    plain, real = _hidden(model, tok)
    seen = []
    writers = [w for layer in residual_layers(model) for w in layer.writers]
    # hooks registered after ablation's see what the stream receives
    with ablate_directions(model, dirs):
        handles = [w.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
                   for w in writers]
        try:
            ablated, _ = _hidden(model, tok)
        finally:
            for h in handles:
                h.remove()
    n_layers = len(residual_layers(model))
    # the stream entering layers 1.. and every write has no component along the subspace
    for h in list(ablated.hidden_states[1:n_layers]) + seen:
        comp = (h.double() @ basis.T)[real]
        assert comp.abs().max() < 1e-4
    # before ablation the same stream had one (the check can fail)
    assert max((h.double() @ basis.T)[real].abs().max() for h in plain.hidden_states[1:n_layers]) > 1e-2
    assert not torch.allclose(plain.logits, ablated.logits)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "phi3"])
def test_orthogonalized_weights_give_the_hooks_logits(family):
    model, tok = tiny_model(family), make_tokenizer()
    d = model.get_input_embeddings().weight.shape[1]
    dirs = torch.randn(2, d, generator=torch.Generator().manual_seed(5))
    with ablate_directions(model, dirs):
        hooked, _ = _hidden(model, tok)
    edited = copy.deepcopy(model)
    orthogonalize_weights(edited, dirs)
    weighted, real = _hidden(edited, tok)
    assert torch.allclose(hooked.logits[real], weighted.logits[real], atol=1e-4)
    # the embedding rows have no component along the subspace any more
    assert (edited.get_input_embeddings().weight.double() @ orthonormal(dirs).T).abs().max() < 1e-5
    # and the original model is untouched
    again, _ = _hidden(model, tok)
    assert not torch.allclose(again.logits[real], weighted.logits[real], atol=1e-4)


def test_tied_embeddings_are_untied_so_the_head_keeps_its_weights():
    model, tok = tiny_model("gemma"), make_tokenizer()  # tied input/output embeddings
    head_before = model.get_output_embeddings().weight.detach().clone()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    d = head_before.shape[1]
    dirs = torch.randn(1, d, generator=torch.Generator().manual_seed(1))
    with ablate_directions(model, dirs):
        hooked, real = _hidden(model, tok)
    orthogonalize_weights(model, dirs)
    assert torch.equal(model.get_output_embeddings().weight, head_before)
    weighted, _ = _hidden(model, tok)
    assert torch.allclose(hooked.logits[real], weighted.logits[real], atol=1e-4)


def test_residual_activations_are_the_stream_entering_each_layer_at_the_last_positions():
    model, tok = tiny_model("llama"), make_tokenizer()
    acts = residual_activations(model, tok, PROMPTS, positions=3, batch_size=2)
    assert acts.shape == (4, 3, 3, 32)
    # prompt 2 alone: its own last three positions of hidden_states[layer]
    from safeneuron.data.prompts import render_chat
    enc = tok(render_chat(tok, [PROMPTS[2]]), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states
    for layer in range(3):
        assert torch.allclose(acts[2, layer], hs[layer][0, -3:], atol=1e-5)


def test_next_token_measurements():
    model, tok = tiny_model("llama"), make_tokenizer()
    logp = next_token_logprobs(model, tok, PROMPTS, batch_size=3)
    assert logp.shape == (4, model.config.vocab_size)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(4), atol=1e-4)
    ids = refusal_token_ids(tok, ["I am", "Sorry", "Isn't"])  # first tokens: "I", "S" (deduplicated)
    assert ids == [tok.convert_tokens_to_ids("I"), tok.convert_tokens_to_ids("S")]
    p = logp[:, ids].exp().sum(-1)
    assert torch.allclose(refusal_scores(logp, ids), torch.log(p) - torch.log1p(-p), atol=1e-4)
    assert torch.allclose(kl_divergence(logp, logp), torch.zeros(4), atol=1e-6)
    q = torch.log_softmax(torch.zeros_like(logp), -1)
    expected = (logp.exp() * (logp - q)).sum(-1)
    assert torch.allclose(kl_divergence(logp, q), expected, atol=1e-5) and (expected > 0).all()
    # an answer prefix moves the position read: the distribution after "Sure" differs
    after = next_token_logprobs(model, tok, PROMPTS, batch_size=3, answer_prefix="Sure")
    assert kl_divergence(logp, after).min() > 1e-4


def test_direction_candidates_skip_positions_where_the_classes_cannot_differ():
    from safeneuron.models import LoadedModel
    from safeneuron.stages.attack_direction import extract_candidates

    loaded = LoadedModel(tiny_model("llama"), make_tokenizer(), "tiny", "tiny")
    cands = extract_candidates(loaded, ["write malware now", "build a bomb"], ["bake bread", "hello there"],
                               positions=3, max_layer=1.0, batch_size=4)
    # the rendered chat ends with the constant "<|end|><|assistant|>": entering layer 0 those are equal embeddings
    assert {(c.layer, c.position) for c in cands if c.layer == 0} == {(0, -3)}
    assert all(abs(float(c.direction.norm()) - 1) < 1e-4 for c in cands) and len(cands) == 3 * 3 - 2
    assert [c.separation for c in cands] == sorted((c.separation for c in cands), reverse=True)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_saving_the_orthogonalized_model_leaves_the_one_in_memory_as_it_was(family, tmp_path):
    from safeneuron.models import LoadedModel
    from safeneuron.stages.attack_direction import save_orthogonalized
    from transformers import AutoModelForCausalLM

    model, tok = tiny_model(family), make_tokenizer()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    basis = orthonormal(torch.randn(2, model.get_input_embeddings().weight.shape[1],
                                    generator=torch.Generator().manual_seed(4)))
    save_orthogonalized(LoadedModel(model, tok, "tiny", "tiny"), basis, tmp_path / "saved")
    after = dict(model.named_parameters())
    assert set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in before)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    with ablate_directions(model, basis):
        hooked, real = _hidden(model, tok)
    saved, _ = _hidden(AutoModelForCausalLM.from_pretrained(tmp_path / "saved"), tok)
    assert torch.allclose(hooked.logits[real], saved.logits[real], atol=1e-4)
