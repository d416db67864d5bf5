"""The one zeroing hook: pruning (every pass) and training ablation (only where ``when`` holds) zero
exactly the masked channels of the down projection's input, and nothing is left behind."""

import torch

from conftest import tiny_model
from safeneuron.arch import find_mlps
from safeneuron.hooks import neuron_hooks, zero_neurons
from safeneuron.masks import SafetyNeuronMask


def down_inputs(model, ids):
    """The neuron activations [batch, seq, d_ff] each down projection receives, per MLP."""
    seen = {}

    def record(site, acts):
        seen[site.name] = acts.detach().clone()

    with neuron_hooks(model, lambda site, acts: None):  # an outer hook must not change what the inner ones see
        handles = [s.down.register_forward_pre_hook(lambda m, a, s=s: record(s, a[0])) for s in find_mlps(model)]
        try:
            with torch.no_grad():
                model(ids)
        finally:
            for h in handles:
                h.remove()
    return seen


def test_zero_neurons_zeroes_exactly_the_mask_and_only_when_asked():
    torch.manual_seed(0)
    model = tiny_model("llama").eval()
    ids = torch.randint(0, 100, (2, 5))
    mask = SafetyNeuronMask.random(model, frac=0.25, seed=1)
    plain = down_inputs(model, ids)
    with zero_neurons(model, mask):
        zeroed = down_inputs(model, ids)
    with zero_neurons(model, mask, when=lambda site: site.down.training):  # an eval pass: not ablated
        untouched = down_inputs(model, ids)
    after = down_inputs(model, ids)
    first = next(iter(plain))
    # the first MLP's input is the same with or without zeroing (nothing before it changed)
    m = mask.masks[first]
    assert torch.equal(zeroed[first][..., m], torch.zeros_like(zeroed[first][..., m]))
    assert torch.equal(zeroed[first][..., ~m], plain[first][..., ~m])
    assert plain[first][..., m].abs().sum() > 0  # the masked channels were not zero to begin with
    assert all(torch.equal(untouched[k], plain[k]) and torch.equal(after[k], plain[k]) for k in plain)
