"""SafetyNeuronMask: which neurons of each MLP are safety neurons.

A mask is a mapping ``mlp module name -> bool tensor [d_ff]`` (e.g.
``model.layers.3.mlp``). On disk it is a safetensors file; an identification's
``safety_neurons.safetensors`` holds several named sets (``<mlp>.es``,
``<mlp>.sas``, ``<mlp>.union``) and :meth:`SafetyNeuronMask.load` picks one.
"""

from __future__ import annotations

from safeneuron.errors import SafeneuronError

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from safeneuron.arch import MLPSite, find_mlps
from safeneuron.artifacts import ArtifactError, load_tensors, save_tensors

__all__ = ["SafetyNeuronMask", "MaskMismatchError", "MASK_FILES", "mask_file"]


class MaskMismatchError(SafeneuronError):
    """A mask does not fit the model it is applied to."""


@dataclass
class SafetyNeuronMask:
    """Per-MLP boolean masks, in layer order.

    Attributes:
        masks: ``{mlp_name: bool tensor [d_ff]}``; True marks a safety neuron.
    """

    masks: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        for name, m in self.masks.items():
            if m.dtype != torch.bool or m.dim() != 1:
                raise ArtifactError(f"mask {name!r} must be a 1-D bool tensor, got {m.dtype} of shape {tuple(m.shape)}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty_like(cls, model_or_sites) -> "SafetyNeuronMask":
        sites = _sites(model_or_sites)
        return cls({s.name: torch.zeros(s.d_ff, dtype=torch.bool) for s in sites})

    @classmethod
    def from_indices(cls, model_or_sites, indices: Mapping[str, Iterable[int]]) -> "SafetyNeuronMask":
        mask = cls.empty_like(model_or_sites)
        for name, idx in indices.items():
            if name not in mask.masks:
                raise MaskMismatchError(f"no MLP named {name!r} in the model")
            mask.masks[name][torch.as_tensor(list(idx), dtype=torch.long)] = True
        return mask

    @classmethod
    def random(cls, model_or_sites, frac: float | None = None, count: int | None = None, seed: int = 0,
               like: "SafetyNeuronMask | None" = None) -> "SafetyNeuronMask":
        """Random neurons: a fraction of every layer, ``count`` in total, or as many per layer as ``like``."""
        g = torch.Generator().manual_seed(seed)
        sites = _sites(model_or_sites)
        out = cls.empty_like(sites)
        total = sum(s.d_ff for s in sites)
        for s in sites:
            if like is not None:
                k = int(like.masks[s.name].sum())
            elif count is not None:
                k = round(count * s.d_ff / total)
            else:
                k = math.ceil((frac or 0.0) * s.d_ff) if frac else 0
            if k:
                out.masks[s.name][torch.randperm(s.d_ff, generator=g)[:k]] = True
        return out

    @classmethod
    def top_frac(cls, scores: Mapping[str, torch.Tensor], frac: float) -> "SafetyNeuronMask":
        """The top ``frac`` of all neurons by score, ranked globally across layers."""
        names = list(scores)
        flat = torch.cat([scores[n].double().flatten() for n in names])
        k = round(frac * flat.numel())
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        if k:
            chosen[torch.topk(flat, k).indices] = True
        out, start = {}, 0
        for n in names:
            width = scores[n].numel()
            out[n] = chosen[start : start + width].clone()
            start += width
        return cls(out)

    # ------------------------------------------------------------------ io
    def save(self, path: str | Path, suffix: str = "", metadata: dict[str, str] | None = None) -> None:
        """Write as safetensors; keys ``<mlp><suffix>`` (e.g. suffix ``.union``)."""
        save_tensors(path, {f"{k}{suffix}": v for k, v in self.masks.items()}, metadata)

    @classmethod
    def from_pretrained(cls, source: str | Path, neuron_set: str | None = "union", *,
                        revision: str | None = None) -> "SafetyNeuronMask":
        """A mask from a mask file, a directory holding one (an identification's ``safety_neurons.safetensors``,
        an align run's last round's or one round's ``frozen.safetensors``, a pruned model's
        ``pruned_neurons.safetensors``) or a hub repository holding ``safety_neurons.safetensors``."""
        path = mask_file(source)
        if path is None:
            try:
                from huggingface_hub import hf_hub_download

                path = Path(hf_hub_download(str(source), MASK_FILES[0], revision=revision))
            except Exception as err:  # offline, no such repository, no such file: one line names the problem
                raise ArtifactError(f"{source}: no mask file or directory here, and the hub has none "
                                    f"({type(err).__name__})") from None
        return cls.load(path, neuron_set=neuron_set if path.name == MASK_FILES[0] else None)

    @staticmethod
    def file_metadata(path: str | Path) -> dict[str, str]:
        """A mask file's ``__metadata__`` (model, weights sha256, thresholds, pooling, prompt counts, ...)."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})

    @staticmethod
    def sets_in(path: str | Path) -> list[str]:
        """Names of the sets in a mask file (``es``, ``sas``, ``union``, ... or ``""``)."""
        keys = load_tensors(path).keys()
        return sorted({k.rsplit(".", 1)[1] if k.rsplit(".", 1)[-1] in _SET_NAMES else "" for k in keys})

    @classmethod
    def load(cls, path: str | Path, neuron_set: str | None = "union") -> "SafetyNeuronMask":
        """Load a mask file. ``neuron_set`` picks ``<mlp>.<neuron_set>`` keys from an identification's
        ``safety_neurons.safetensors``; plain ``<mlp>`` keys (a frozen-set file) load as is."""
        tensors = load_tensors(path)
        if not tensors:
            raise ArtifactError(f"{path}: mask file holds no tensors")
        suffix = f".{neuron_set}" if neuron_set else ""
        picked = {k[: -len(suffix)]: v for k, v in tensors.items() if suffix and k.endswith(suffix)}
        if not picked:
            plain = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] not in _SET_NAMES}
            if not plain:
                raise ArtifactError(f"{path}: no '{neuron_set}' set in the mask file (sets: {', '.join(cls.sets_in(path))})")
            picked = plain
        for k, v in picked.items():
            if v.dtype != torch.bool:
                raise ArtifactError(f"{path}: mask {k!r} has dtype {v.dtype}, expected bool")
        return cls(picked)

    # ------------------------------------------------------------------ checks and views
    def check(self, model_or_sites) -> None:
        """Raise :class:`MaskMismatchError` unless the mask fits the model's MLPs exactly."""
        sites = _sites(model_or_sites)
        if len(self.masks) != len(sites):
            raise MaskMismatchError(f"mask has {len(self.masks)} layers, model has {len(sites)}: mask from another model?")
        for s in sites:
            m = self.masks.get(s.name)
            if m is None:
                raise MaskMismatchError(f"mask has no entry for {s.name!r} (its keys start with {next(iter(self.masks))!r}): mask from another model?")
            if m.numel() != s.d_ff:
                raise MaskMismatchError(f"mask for {s.name} has width {m.numel()}, model MLP has d_ff={s.d_ff}: mask from another model?")

    def digest(self) -> str:
        """Short content hash of the mask (MLP names and bits): cache keys, directory names, provenance."""
        h = hashlib.sha256()
        for name in sorted(self.masks):
            h.update(name.encode())
            h.update(self.masks[name].to(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def indices(self, name: str) -> torch.Tensor:
        return torch.nonzero(self.masks[name]).flatten()

    def count(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    def total(self) -> int:
        return int(sum(m.numel() for m in self.masks.values()))

    def per_layer(self) -> dict[str, int]:
        return {k: int(v.sum()) for k, v in self.masks.items()}

    def __or__(self, other: "SafetyNeuronMask") -> "SafetyNeuronMask":
        _same_keys(self, other)
        return SafetyNeuronMask({k: v | other.masks[k] for k, v in self.masks.items()})

    def __and__(self, other: "SafetyNeuronMask") -> "SafetyNeuronMask":
        _same_keys(self, other)
        return SafetyNeuronMask({k: v & other.masks[k] for k, v in self.masks.items()})

    def __len__(self) -> int:
        return len(self.masks)


_SET_NAMES = {"es", "sas", "union", "t", "probe_gate", "probe_up"}

#: The mask files the stages write, in the order a directory is searched.
MASK_FILES = ("safety_neurons.safetensors", "frozen.safetensors", "pruned_neurons.safetensors")


def mask_file(source: str | Path) -> Path | None:
    """The mask file ``source`` names locally (itself, or the first of :data:`MASK_FILES` in it, or an align run's
    last ``round_<r>/frozen.safetensors``); None when there is none here."""
    path = Path(source)
    if path.is_file():
        return path
    if not path.is_dir():
        return None
    for name in MASK_FILES:
        if (path / name).is_file():
            return path / name
    rounds = sorted((int(p.parent.name.split("_")[1]), p) for p in path.glob("round_*/frozen.safetensors")
                    if p.parent.name.split("_")[1].isdigit())
    return rounds[-1][1] if rounds else None


def _sites(model_or_sites) -> list[MLPSite]:
    if isinstance(model_or_sites, list):
        return model_or_sites
    return find_mlps(model_or_sites)


def _same_keys(a: SafetyNeuronMask, b: SafetyNeuronMask) -> None:
    if a.masks.keys() != b.masks.keys() or any(a.masks[k].shape != b.masks[k].shape for k in a.masks):
        raise MaskMismatchError("masks cover different MLPs or widths")
