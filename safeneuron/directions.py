"""Directions in the residual stream: record it, project directions out of it, or out of the weights.

The residual stream of a decoder is what every layer reads and adds to: the token
embeddings, plus each layer's attention and MLP outputs. A refusal direction
(Arditi et al. 2024, refusal_direction) is a unit vector in it, [d_model]; a subspace is
``k`` orthonormal rows [k, d_model]. The pieces, small and explicit:

* :func:`residual_layers`      each decoder layer with the modules that write into the stream;
* :func:`residual_activations` the stream entering every layer at the last ``positions``
                               tokens of each prompt (the post-instruction positions),
                               [n_prompts, n_layers, positions, d_model];
* :func:`orthonormal`          rows of a matrix made orthonormal (a basis of their span);
* :func:`ablate_directions`    a scoped hook set removing the subspace from the stream
                               everywhere (every layer's input and every write into it);
* :func:`orthogonalize_weights` the same edit in the weights (embeddings and every output
                               projection), so a saved model behaves as the hooks do.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from safeneuron.arch import find_mlps
from safeneuron.errors import SafeneuronError
from safeneuron.inputs import prompt_batches

__all__ = ["ResidualLayer", "residual_layers", "residual_activations", "orthonormal", "ablate_directions",
           "orthogonalize_weights", "stream_writing_parameters", "DirectionError"]

_ATTENTION = ("self_attn", "attn", "attention", "self_attention")
_OUT_PROJ = ("o_proj", "out_proj", "c_proj", "dense")


class DirectionError(SafeneuronError):
    """A direction edit cannot be applied to this model."""


@dataclass
class ResidualLayer:
    """One decoder layer: its index and name, the module, and the modules whose outputs are added to the
    residual stream (``writers``: attention, MLP; a sandwich-norm layer's post norms) with the linear
    output projections behind them (``out_projs``; empty where a norm sits between)."""

    index: int
    name: str
    module: nn.Module
    writers: tuple[nn.Module, ...]
    out_projs: tuple[nn.Module, ...]


def _child(module: nn.Module, names: Sequence[str]) -> nn.Module | None:
    return next((getattr(module, n) for n in names if isinstance(getattr(module, n, None), nn.Module)), None)


def residual_layers(model: nn.Module) -> list[ResidualLayer]:
    """The decoder layers of the (language) model in order, found from its MLPs (:func:`find_mlps`)."""
    layers = []
    for site in find_mlps(model):
        name = site.name.rsplit(".", 1)[0]
        layer = model.get_submodule(name)
        attn = _child(layer, _ATTENTION)
        if attn is None:
            raise DirectionError(f"{name}: no attention module ({'/'.join(_ATTENTION)}) found; "
                                 "direction edits support decoder layers of attention + MLP")
        if hasattr(layer, "post_feedforward_layernorm"):  # Gemma 2/3: norms sit between the projections and the stream
            writers = (layer.post_attention_layernorm, layer.post_feedforward_layernorm)
            out_projs: tuple[nn.Module, ...] = ()
        else:
            writers = (attn, site.module)
            proj = _child(attn, _OUT_PROJ)
            out_projs = (proj, site.down) if proj is not None else ()
        layers.append(ResidualLayer(site.layer, name, layer, writers, out_projs))
    return layers


@torch.no_grad()
def residual_activations(model: nn.Module, processing, prompts: Sequence, *, positions: int = 5,
                         batch_size: int = 16, max_length: int = 512) -> torch.Tensor:
    """The residual stream entering every decoder layer at each prompt's last ``positions`` tokens
    (position ``-positions`` .. ``-1`` of the rendered chat: the end-of-turn marker and generation
    prompt), float32 [n_prompts, n_layers, positions, d_model], in input order."""
    prompts = list(prompts)
    n_layers = len(residual_layers(model))
    out: list[torch.Tensor | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for batch in prompt_batches(processing, prompts, batch_size, max_length=max_length, model=model):
            if batch.inputs["input_ids"].shape[1] < positions:
                raise DirectionError(f"prompts are shorter than {positions} tokens; ask for fewer positions")
            try:
                res = model(**batch.inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
            except TypeError:
                res = model(**batch.inputs, use_cache=False, output_hidden_states=True)
            states = res.hidden_states[:n_layers]  # n_layers x [batch, seq, d]; entry l enters layer l
            stacked = torch.stack([h[:, -positions:].float() for h in states], dim=1).cpu()
            for row, i in enumerate(batch.indices):
                out[i] = stacked[row]
    finally:
        model.train(was_training)
    return torch.stack(out)


def orthonormal(directions: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis [k, d] of the span of ``directions`` ([d] or [k, d], float64 QR; rows
    that add nothing to the span are dropped)."""
    d = directions.reshape(-1, directions.shape[-1]).double()
    q, r = torch.linalg.qr(d.T)  # d.T [dim, k] -> q [dim, k]
    keep = r.diagonal().abs() > 1e-8 * max(1.0, float(r.diagonal().abs().max()))
    if not keep.any():
        raise DirectionError("the directions are zero; nothing to project out")
    return q[:, keep].T.contiguous()


def _projector(basis: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return basis.to(device=like.device, dtype=like.dtype)


def _project_out(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``x - (x Q^T) Q`` along the last dim: x [..., d], Q [k, d] orthonormal."""
    q = _projector(basis, x)
    return x - (x @ q.T) @ q


@contextlib.contextmanager
def ablate_directions(model: nn.Module, directions: torch.Tensor) -> Iterator[torch.Tensor]:
    """Remove the span of ``directions`` ([d] or [k, d]) from the residual stream inside the ``with``
    block: every decoder layer's input and every writer's output are projected onto its orthogonal
    complement (refusal_direction's directional ablation). Yields the orthonormal basis; the hooks are
    always removed on exit."""
    basis = orthonormal(directions)
    handles = []

    def layer_pre_hook(module, args, kwargs):
        if args:
            return (_project_out(args[0], basis), *args[1:]), kwargs
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": _project_out(kwargs["hidden_states"], basis)}
        return None

    def writer_hook(module, args, output):
        if isinstance(output, torch.Tensor):
            return _project_out(output, basis)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (_project_out(output[0], basis), *output[1:])
        return None

    try:
        for layer in residual_layers(model):
            handles.append(layer.module.register_forward_pre_hook(layer_pre_hook, with_kwargs=True))
            for writer in layer.writers:
                handles.append(writer.register_forward_hook(writer_hook))
        yield basis
    finally:
        for h in handles:
            h.remove()


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # GPT-2's transposed linear: weight [in, out]


def _embedding_rows(model: nn.Module) -> list[torch.Tensor]:
    """The embedding tables that write the residual stream: the input embeddings and learned position
    embeddings, [rows, d_model] each."""
    embed = model.get_input_embeddings()
    rows = [embed.weight]
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and module is not embed and name.endswith(("wpe", "embed_positions")):
            rows.append(module.weight)
    return rows


def stream_writing_parameters(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor :func:`orthogonalize_weights` edits: the embedding tables and each layer's output
    projections (weights and biases), e.g. to back them up and restore them."""
    out = list(_embedding_rows(model))
    for layer in residual_layers(model):
        for proj in layer.out_projs:
            out.append(proj.weight)
            if getattr(proj, "bias", None) is not None:
                out.append(proj.bias)
    return out


@torch.no_grad()
def orthogonalize_weights(model: nn.Module, directions: torch.Tensor) -> torch.Tensor:
    """Edit the weights in place so that nothing writes the span of ``directions`` into the residual
    stream: the input (and position) embeddings and every attention and MLP output projection,
    biases included. The outputs then equal :func:`ablate_directions`'s. Tied input and output
    embeddings are untied first (the output head keeps its weights). Returns the orthonormal basis."""
    layers = residual_layers(model)
    if any(not layer.out_projs for layer in layers):
        raise DirectionError("this architecture has norms between its output projections and the residual "
                             "stream (e.g. Gemma 2); use the hooks (no --save)")
    basis = orthonormal(directions)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None and head.weight is embed.weight:
        head.weight = nn.Parameter(embed.weight.detach().clone())
        for config in (model.config, getattr(model.config, "text_config", None)):
            if config is not None and hasattr(config, "tie_word_embeddings"):
                config.tie_word_embeddings = False
    for w in _embedding_rows(model):  # [vocab, d]
        w.copy_(_project_out(w, basis))
    for layer in layers:
        for proj in layer.out_projs:
            q = _projector(basis, proj.weight)
            if _is_conv1d(proj):  # weight [in, d]
                proj.weight.copy_(proj.weight - (proj.weight @ q.T) @ q)
            else:  # Linear weight [d, in]
                proj.weight.copy_(proj.weight - q.T @ (q @ proj.weight))
            if getattr(proj, "bias", None) is not None:
                proj.bias.copy_(_project_out(proj.bias, basis))
    return basis
