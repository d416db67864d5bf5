"""Where each architecture keeps its MLP neurons.

This is the one place that knows model internals. A *neuron* is one channel of the
MLP's intermediate activation, the input of the down projection:
``act(gate(x)) * up(x)`` (width ``d_ff``). Everything else in safeneuron asks this
module for:

* the MLP modules of the language model, named as in ``model.named_modules()``
  (e.g. ``model.layers.3.mlp``), in layer order;
* the down-projection module, whose *input* is the neuron activation (recording,
  pruning and ablation are forward pre-hooks on it);
* the parameter slices that belong to neuron ``j`` (rows of gate/up, columns of
  down, ...), so freezing can keep them bit-exact.

To support a new architecture, add its ``model_type`` to :data:`ARCHITECTURES`
(mapping to an existing :class:`MLPLayout`, or a new one).
"""

from __future__ import annotations

from safeneuron.errors import SafeneuronError

import re
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "MLPLayout",
    "NeuronSlice",
    "MLPSite",
    "ARCHITECTURES",
    "UnsupportedArchitectureError",
    "find_mlps",
    "model_type_of",
    "backbone_model_type",
]


class UnsupportedArchitectureError(SafeneuronError):
    """The model's architecture has no MLP layout registered."""


@dataclass(frozen=True)
class MLPLayout:
    """Names of an MLP's projections and how neuron ``j`` maps onto their weights.

    ``up`` are the modules producing the pre-activation (gate and up, or a fused
    gate_up, or GPT-2's ``c_fc``); ``down`` consumes the neuron activation.
    ``fused`` is how many d_ff-wide blocks an up module stacks (2 for Phi-3's
    gate_up_proj: neuron j is rows j and d_ff + j). ``conv1d`` marks GPT-2's
    transposed ``Conv1D`` weights ([in, out] instead of Linear's [out, in]).
    """

    up: tuple[str, ...]
    down: str
    fused: int = 1
    conv1d: bool = False


GATED = MLPLayout(up=("gate_proj", "up_proj"), down="down_proj")
FUSED_GATE_UP = MLPLayout(up=("gate_up_proj",), down="down_proj", fused=2)
GPT2_STYLE = MLPLayout(up=("c_fc",), down="c_proj", conv1d=True)

#: model_type -> layout. Add an entry here to support a new architecture.
ARCHITECTURES: dict[str, MLPLayout] = {
    "llama": GATED,
    "mistral": GATED,
    "qwen2": GATED,
    "qwen3": GATED,
    "gemma": GATED,
    "gemma2": GATED,
    "gemma3": GATED,
    "gemma3_text": GATED,
    "phi3": FUSED_GATE_UP,
    "gpt2": GPT2_STYLE,
    # Language backbones of VLMs whose text config has its own model_type (LLaVA, LLaVA-Next,
    # Idefics3/SmolVLM and Gemma 3 use llama/mistral/qwen2/gemma3_text above). The bare VLM
    # types cover hub config.json files that keep the text settings at the top level.
    "qwen2_vl": GATED,
    "qwen2_vl_text": GATED,
    "qwen2_5_vl": GATED,
    "qwen2_5_vl_text": GATED,
}

# Submodule names that belong to a vision tower, never to the language backbone.
_VISION_PARTS = re.compile(r"(^|\.)(visual|vision_tower|vision_model|vision|image_encoder)(\.|$)")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class NeuronSlice:
    """Neuron ``j`` of an MLP owns ``param.select(dim, offset + j)`` (a row or column)."""

    param_name: str  # full name in model.named_parameters()
    dim: int
    offset: int


@dataclass
class MLPSite:
    """One MLP of the language model.

    Attributes:
        name: module name in the model, e.g. ``model.layers.3.mlp`` (artifact key).
        layer: decoder layer index.
        d_ff: number of neurons (intermediate width).
        module: the MLP module.
        down: the down projection; its input [batch, seq, d_ff] is the neuron activation.
        ups: the up-side modules (gate, up / gate_up / c_fc), in layout order.
        slices: parameter slices owned by each neuron (weights and biases).
    """

    name: str
    layer: int
    d_ff: int
    module: nn.Module
    down: nn.Module
    ups: tuple[nn.Module, ...]
    up_names: tuple[str, ...]
    slices: tuple[NeuronSlice, ...]


def model_type_of(model: nn.Module) -> str:
    """The ``config.model_type`` of a transformers model (``"?"`` when absent)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", "?")


def _text_model_types(model: nn.Module) -> list[str]:
    config = getattr(model, "config", None)
    types = [model_type_of(model)]
    for sub in ("text_config", "language_config", "llm_config"):
        sub_config = getattr(config, sub, None)
        if sub_config is not None and getattr(sub_config, "model_type", None):
            types.append(sub_config.model_type)
    return types


def backbone_model_type(model: nn.Module) -> str:
    """The ``model_type`` of the language model: a VLM's text config's (``qwen2``, ``llama``, ...), else the model's."""
    return _text_model_types(model)[-1]


def layout_for(model: nn.Module) -> MLPLayout:
    """The MLP layout of ``model`` (its language backbone for a VLM)."""
    types = _text_model_types(model)
    for model_type in reversed(types):  # the text backbone's type wins for VLMs
        if model_type in ARCHITECTURES:
            return ARCHITECTURES[model_type]
    raise UnsupportedArchitectureError(
        f"unsupported architecture {types[0]!r}: supported model types are "
        f"{', '.join(sorted(ARCHITECTURES))}; add an adapter in safeneuron/arch.py (ARCHITECTURES)"
    )


def _neuron_slices(name: str, layout: MLPLayout, d_ff: int, module: nn.Module) -> tuple[NeuronSlice, ...]:
    slices = []
    for up_name in layout.up:
        up = getattr(module, up_name)
        for block in range(layout.fused):
            # Linear weight [fused*d_ff, d_model]: rows; Conv1D weight [d_model, d_ff]: columns.
            slices.append(NeuronSlice(f"{name}.{up_name}.weight", 1 if layout.conv1d else 0, block * d_ff))
            if getattr(up, "bias", None) is not None:
                slices.append(NeuronSlice(f"{name}.{up_name}.bias", 0, block * d_ff))
    # Linear down weight [d_model, d_ff]: columns; Conv1D c_proj weight [d_ff, d_model]: rows.
    slices.append(NeuronSlice(f"{name}.{layout.down}.weight", 0 if layout.conv1d else 1, 0))
    return tuple(slices)


def _d_ff(layout: MLPLayout, down: nn.Module) -> int:
    if not layout.conv1d and getattr(down, "in_features", None):  # also a 4-bit Linear (packed weight)
        return int(down.in_features)
    weight = down.weight
    return int(weight.shape[0] if layout.conv1d else weight.shape[1])


def find_mlps(model: nn.Module) -> list[MLPSite]:
    """All MLPs of the (language) model in layer order.

    For a VLM these are the language backbone's MLPs, under their own names (e.g.
    ``model.language_model.layers.3.mlp``, Idefics3's ``model.text_model.layers.3.mlp``);
    modules under a vision tower (:data:`_VISION_PARTS`) and projectors are never MLP sites.

    Raises:
        UnsupportedArchitectureError: no layout for the model type, or no MLP found.
    """
    layout = layout_for(model)
    sites = []
    for name, module in model.named_modules():
        if _VISION_PARTS.search(name):
            continue
        if not (hasattr(module, layout.down) and all(hasattr(module, u) for u in layout.up)):
            continue
        down = getattr(module, layout.down)
        if not hasattr(down, "weight"):
            continue
        match = _LAYER_INDEX.findall(f".{name}.")
        layer = int(match[-1]) if match else len(sites)
        d_ff = _d_ff(layout, down)
        sites.append(
            MLPSite(
                name=name,
                layer=layer,
                d_ff=d_ff,
                module=module,
                down=down,
                ups=tuple(getattr(module, u) for u in layout.up),
                up_names=layout.up,
                slices=_neuron_slices(name, layout, d_ff, module),
            )
        )
    if not sites:
        raise UnsupportedArchitectureError(
            f"no MLP with {'/'.join(layout.up)} -> {layout.down} found in a {model_type_of(model)!r} model; "
            "check the adapter in safeneuron/arch.py (ARCHITECTURES)"
        )
    sites.sort(key=lambda s: s.layer)
    return sites


def neuron_index(site: MLPSite, s: NeuronSlice, neurons: torch.Tensor) -> torch.Tensor:
    """Indices along ``s.dim`` of ``s.param_name`` owned by the given neuron indices."""
    return neurons + s.offset
