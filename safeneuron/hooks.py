"""Hooks on MLP neuron activations: record them, or zero some of them.

A neuron activation is the input of an MLP's down projection, [batch, seq, d_ff]
(see :mod:`safeneuron.arch`). Every hook here is a forward pre-hook on the down
projections, scoped by a context manager and always removed on exit:

* :func:`neuron_hooks`  run ``fn(site, acts)`` on every MLP (record, or return a
  replacement tensor);
* :func:`zero_neurons`  the one zeroing hook: multiply the masked channels by 0,
  optionally only when ``when(site)`` holds. Pruning (every forward pass) and the
  freezer's training ablation (training passes only) are both this hook;
* :func:`prune_neurons` pruning: :func:`zero_neurons` in every forward pass;
* :func:`prune_weights` the same edit in the weights (down-projection columns of the
  masked neurons set to zero), for saving a pruned model. Both give the same outputs.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from safeneuron.arch import MLPSite, find_mlps
from safeneuron.masks import SafetyNeuronMask

__all__ = ["neuron_hooks", "zero_neurons", "prune_neurons", "prune_weights"]


@contextlib.contextmanager
def neuron_hooks(
    model: nn.Module,
    fn: Callable[[MLPSite, torch.Tensor], torch.Tensor | None],
    sites: Sequence[MLPSite] | None = None,
) -> Iterator[list[MLPSite]]:
    """Run ``fn(site, acts)`` on every MLP's neuron activations [batch, seq, d_ff].

    ``fn`` may return a replacement tensor (to prune or ablate) or None (to record).
    The hooks are forward pre-hooks on the down projections and are always removed
    on exit.
    """
    sites = list(sites) if sites is not None else find_mlps(model)
    handles = []

    def make(site: MLPSite):
        def pre_hook(module, args, kwargs):
            new = fn(site, args[0])
            if new is None:
                return None
            return (new, *args[1:]), kwargs

        return pre_hook

    try:
        for site in sites:
            handles.append(site.down.register_forward_pre_hook(make(site), with_kwargs=True))
        yield sites
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def zero_neurons(
    model: nn.Module,
    mask: SafetyNeuronMask,
    *,
    when: Callable[[MLPSite], bool] | None = None,
    sites: Sequence[MLPSite] | None = None,
    live: bool = False,
) -> Iterator[SafetyNeuronMask]:
    """Zero the masked neurons' activations in forward passes inside the ``with`` block.

    Args:
        mask: the neurons to zero (checked against the model's MLPs).
        when: zero only in passes where ``when(site)`` is true (e.g. training passes);
            None = always.
        sites: the model's MLP sites (found when None; pass the unwrapped model's for a
            peft model).
        live: read ``mask`` at every pass (a mask changed in place between passes, e.g. stochastic
            ablation's resampled subset), instead of once on entry.

    Outputs are bit-exactly restored on exit (the hooks are removed; no weight
    changes). Hooks nest: zeroing inside zeroing zeroes the union.
    """
    sites = list(sites) if sites is not None else find_mlps(model)
    mask.check(sites)
    keep = {} if live else {s.name: (~mask.masks[s.name]).to(device=s.down.weight.device) for s in sites}
    active = {s.name for s in sites} if live else {name for name, k in keep.items() if not k.all()}

    def zero(site: MLPSite, acts: torch.Tensor) -> torch.Tensor | None:
        if site.name not in active or (when is not None and not when(site)):
            return None
        k = (~mask.masks[site.name]).to(device=acts.device) if live else keep[site.name]
        return acts * k.to(acts.dtype)  # [batch, seq, d_ff] * [d_ff]

    with neuron_hooks(model, zero, sites):
        yield mask


def prune_neurons(model: nn.Module, mask: SafetyNeuronMask):
    """Zero the masked neurons in every forward pass inside the ``with`` block (the pruning attack).

    A context manager yielding ``mask``; see :func:`zero_neurons`.
    """
    return zero_neurons(model, mask)


@torch.no_grad()
def prune_weights(model: nn.Module, mask: SafetyNeuronMask) -> int:
    """Zero the down-projection weights that read the masked neurons (in place).

    Equivalent to :func:`prune_neurons` for the model's outputs. Returns the number
    of neurons pruned.
    """
    sites = find_mlps(model)
    mask.check(sites)
    for s in sites:
        idx = mask.indices(s.name).to(s.down.weight.device)
        if idx.numel() == 0:
            continue
        down_slice = s.slices[-1]  # the down projection's slice: columns (Linear) or rows (Conv1D)
        s.down.weight.index_fill_(down_slice.dim, idx, 0.0)
    return mask.count()
