"""Keep safety neurons bit-exactly unchanged while the rest of the model trains.

Given a :class:`~safeneuron.masks.SafetyNeuronMask`, :class:`NeuronFreezer` combines
three mechanisms, all derived from :func:`safeneuron.arch.find_mlps` (neuron ``j`` of
an MLP owns ``param.select(s.dim, s.offset + j)`` for each of the site's
``slices``; nothing here knows gate/up/down names):

* **ablation** (the method's Algorithm 1): the masked neurons' activations are
  zeroed in *training* forward passes (``module.training`` is True), so the rest of
  the network must learn to refuse without them. Evaluation, generation and the
  DPO reference pass see the intact neurons.
* **gradient masks**: a hook on each owning parameter zeroes the gradient entries
  of the frozen rows/columns, so they never enter AdamW's moments.
* **restore after every optimizer step**: the frozen entries are snapshotted at
  install time and copied back after each step, so weight decay (or anything else
  the optimizer does) cannot move them. Use :meth:`NeuronFreezer.callback` with a
  transformers ``Trainer`` or :meth:`NeuronFreezer.attach` with a plain optimizer.

With LoRA (peft), the base weights are not trained; the adapter's contribution to
a frozen neuron is made exactly zero and kept zero: for an up-side module (output
features are neurons) the ``lora_B`` rows, for the down projection (input features
are neurons) the ``lora_A`` columns. Merged weights of the frozen neurons then equal
the originals.

``invert=True`` trains *only* the masked neurons (SN-Tune): every other parameter is
frozen and the complement of the neurons' entries is kept fixed.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from safeneuron.arch import MLPSite, find_mlps
from safeneuron.errors import SafeneuronError
from safeneuron.hooks import zero_neurons
from safeneuron.masks import SafetyNeuronMask

logger = logging.getLogger(__name__)

__all__ = ["NeuronFreezer", "FrozenEntries", "FreezeError", "RestoreFrozenCallback", "ReidentifyCallback", "unwrap_peft"]


class FreezeError(SafeneuronError):
    """Freezing cannot be applied as asked (unsupported adapter, nothing to train, ...)."""


@dataclass
class FrozenEntries:
    """Entries of one parameter kept at fixed values: ``index`` along ``dim``.

    Attributes:
        name: parameter name in the model given to :class:`NeuronFreezer`.
        param: the parameter.
        dim: dimension the index runs along (0: rows, 1: columns).
        index: long [k], the frozen rows/columns.
        snapshot: ``param.index_select(dim, index)`` at install time (zeros for LoRA factors).
    """

    name: str
    param: nn.Parameter
    dim: int
    index: torch.Tensor
    snapshot: torch.Tensor

    def restore(self) -> None:
        self.param.data.index_copy_(self.dim, self.index, self.snapshot)

    def unchanged(self) -> bool:
        return torch.equal(self.param.detach().index_select(self.dim, self.index), self.snapshot)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft ``PeftModel`` (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def _is_tuner_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(module, BaseTunerLayer)


class NeuronFreezer:
    """Freeze (and by default ablate) the neurons of ``mask`` in ``model``.

    Args:
        model: a transformers causal LM, or a peft model wrapping one.
        mask: the neurons to freeze; keys are MLP module names of the unwrapped model.
        ablate: zero the masked neurons' activations in training forward passes;
            None = yes unless ``invert`` (the two exclude each other).
        invert: train only the masked neurons (SN-Tune); everything else is frozen.
        freeze_embeddings / freeze_attention / freeze_layers: also freeze these whole
            modules (``requires_grad = False``; restored by :meth:`remove`).
        adapter_name: the peft adapter being trained.
        ablate_reference: also zero them in TRL's PEFT reference pass (the adapter-free model), so policy and
            reference differ only by what training changed (``ref_ablated``).
        ablate_fraction: stochastic ablation: each optimizer step zeroes a fresh random subset of this share of
            the masked neurons (per MLP, seeded by ``seed`` and the step); all of them stay frozen. None = zero
            every masked neuron.

    Use as a context manager or call :meth:`install` / :meth:`remove`.
    """

    def __init__(
        self,
        model: nn.Module,
        mask: SafetyNeuronMask,
        *,
        ablate: bool | None = None,
        invert: bool = False,
        freeze_embeddings: bool = False,
        freeze_attention: bool = False,
        freeze_layers: Sequence[int] = (),
        adapter_name: str = "default",
        ablate_reference: bool = False,
        ablate_fraction: float | None = None,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.ablate_reference = ablate_reference
        if ablate_fraction is not None and not 0 < ablate_fraction <= 1:
            raise FreezeError(f"ablate_fraction is a share in (0, 1], got {ablate_fraction}")
        self.ablate_fraction = ablate_fraction
        self.seed = seed
        self.ablated: SafetyNeuronMask | None = None  # the neurons zeroed now (a resampled subset, stochastic)
        self._suspended = False
        self.base = unwrap_peft(model)
        self.sites: list[MLPSite] = find_mlps(self.base)
        mask.check(self.sites)
        self.mask = mask
        if ablate and invert:
            raise FreezeError("ablating the neurons that are the only ones trained (invert) leaves nothing to learn")
        self.ablate = (not invert) if ablate is None else ablate
        self.invert = invert
        self.freeze_embeddings = freeze_embeddings
        self.freeze_attention = freeze_attention
        self.freeze_layers = tuple(freeze_layers)
        self.adapter_name = adapter_name
        self.entries: list[FrozenEntries] = []
        self._handles: list = []
        self._entry_handles: list = []
        self.history: list[dict] = []  # dynamic re-identification: what each retarget changed
        self._stack: contextlib.ExitStack | None = None
        self._requires_grad: dict[int, tuple[str, nn.Parameter, bool]] = {}
        self._partners: set[int] = set()
        self._probe = next((m for m in model.modules() if _is_tuner_layer(m)), None)
        if invert and mask.count() == 0:
            raise FreezeError("sn-tune trains only the safety neurons, but the mask selects none")

    # ------------------------------------------------------------------ what is frozen
    def _owned(self) -> dict[int, tuple[str, nn.Parameter, int, set[int], bool]]:
        """Per parameter: (name, param, dim, indices owned by the masked neurons along ``dim``, is a LoRA factor)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        owned: dict[int, tuple[str, nn.Parameter, int, set[int], bool]] = {}

        def add(param: nn.Parameter, dim: int, idx: torch.Tensor, lora: bool = False) -> None:
            key = id(param)
            if key not in owned:
                owned[key] = (names.get(key, "?"), param, dim, set(), lora)
            elif owned[key][2] != dim:  # pragma: no cover - no layout slices one parameter two ways
                raise FreezeError(f"{owned[key][0]}: neurons own both rows and columns")
            owned[key][3].update(idx.tolist())

        for site in self.sites:
            neurons = self.mask.indices(site.name)
            for s in site.slices:
                module_path, attr = s.param_name.rsplit(".", 1)
                module = self.base.get_submodule(module_path)
                if _is_tuner_layer(module):
                    base_param = getattr(module.get_base_layer(), attr)
                    if base_param is not None and base_param.requires_grad:
                        add(base_param, s.dim, neurons + s.offset)
                    if attr == "weight":
                        factor, dim = self._lora_factor(module, s.dim)
                        if factor is not None:
                            add(factor, dim, neurons + s.offset, lora=True)
                else:
                    add(self.base.get_parameter(s.param_name), s.dim, neurons + s.offset)
        return owned

    def _lora_factor(self, module: nn.Module, dim: int) -> tuple[nn.Parameter | None, int]:
        """The LoRA factor entries of neuron rows/columns: ``lora_B`` rows for output features,
        ``lora_A`` columns for input features (``delta W = B @ A``, transposed for Conv1D)."""
        name = self.adapter_name
        if name not in getattr(module, "lora_A", {}):
            return None, 0
        if getattr(module, "use_dora", {}).get(name, False):
            raise FreezeError("DoRA adapters rescale whole weight rows; neuron freezing supports plain LoRA only")
        out_dim = 1 if getattr(module, "fan_in_fan_out", False) else 0
        a, b = module.lora_A[name].weight, module.lora_B[name].weight
        self._partners.update((id(a), id(b)))  # sn-tune trains both factors of these modules
        if dim == out_dim:
            return b, 0
        return a, 1

    def _module_params(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters of the whole modules frozen by config (embeddings, attention, layers)."""
        prefixes: list[str] = []
        if self.freeze_attention:
            prefixes += [n for n, m in self.base.named_modules() if type(m).__name__.endswith("Attention")]
        if self.freeze_layers:
            by_layer = {s.layer: s.name.rsplit(".", 1)[0] for s in self.sites}
            missing = [i for i in self.freeze_layers if i not in by_layer]
            if missing:
                raise FreezeError(f"freeze_layers {missing}: the model has layers 0..{max(by_layer)}")
            prefixes += [by_layer[i] for i in self.freeze_layers]
        out = [(n, p) for n, p in self.base.named_parameters() if any(n.startswith(pre + ".") for pre in prefixes)]
        if self.freeze_embeddings:
            emb = self.base.get_input_embeddings()
            out += [(f"embeddings.{n}", p) for n, p in emb.named_parameters()]
        return out

    # ------------------------------------------------------------------ install / remove
    def _freeze_entries(self, owned: dict) -> None:
        """Snapshot the entries the neurons own (LoRA factors zeroed first) and mask their gradients."""
        for name, param, dim, idx, lora in owned.values():
            if not param.requires_grad:
                continue
            index = torch.tensor(sorted(idx), dtype=torch.long)
            if self.invert:  # keep everything but the neurons' entries
                keep = torch.ones(param.shape[dim], dtype=torch.bool)
                keep[index] = False
                index = torch.nonzero(keep).flatten()
            if index.numel() == 0:
                continue
            index = index.to(param.device)
            with torch.no_grad():
                if lora:  # the adapter adds exactly nothing to these neurons
                    param.index_fill_(dim, index, 0.0)
                snapshot = param.detach().index_select(dim, index).clone()
            entry = FrozenEntries(name, param, dim, index, snapshot)
            self.entries.append(entry)
            self._entry_handles.append(param.register_hook(_grad_mask(dim, index)))

    def install(self) -> "NeuronFreezer":
        """Zero the LoRA entries, snapshot, add gradient hooks and (with ``ablate``) the ablation hooks."""
        if self._stack is not None:
            return self
        self.entries = []
        owned = self._owned()
        for name, param in self._module_params():
            self._set_requires_grad(name, param, False)
        if self.invert:
            for name, param in self.model.named_parameters():
                if id(param) not in owned and id(param) not in self._partners:
                    self._set_requires_grad(name, param, False)
        self._freeze_entries(owned)
        if self.invert and not any(p.requires_grad for p in self.model.parameters()):
            raise FreezeError("sn-tune: no trainable parameter owns a safety neuron")
        self._stack = contextlib.ExitStack()
        if self.ablate and self.mask.count():
            # a copy read at every pass: stochastic ablation resamples it, re-identification retargets it
            self.ablated = SafetyNeuronMask({k: v.clone() for k, v in self.mask.masks.items()})
            if self.ablate_fraction is not None:
                self.resample(0)
            self._stack.enter_context(zero_neurons(self.model, self.ablated, when=self._training_pass,
                                                   sites=self.sites, live=True))
        logger.info("freezing %d neurons (%d entries in %d parameters)%s%s", self.mask.count(),
                    sum(e.index.numel() for e in self.entries), len(self.entries),
                    ", ablated in training" if self.ablate else "", ", inverted (sn-tune)" if self.invert else "")
        return self

    def retarget(self, mask: SafetyNeuronMask, step: int = 0) -> dict:
        """Dynamic re-identification: from now on freeze (and ablate) ``mask`` instead of the current set.

        The current set's entries must still be bit-exact (they were frozen until now: checked); the new set's
        are snapshot now (LoRA factors of newly frozen neurons zeroed, as at install). Returns and records in
        :attr:`history` the counts kept, added and released."""
        if self.invert:
            raise FreezeError("sn-tune trains its set; re-identification retargets a frozen set")
        mask.check(self.sites)
        changed = self.changed()
        if changed:
            raise FreezeError(f"frozen entries changed before re-identification: {', '.join(changed[:5])}")
        old = self.mask
        for h in self._entry_handles:
            h.remove()
        self._entry_handles.clear()
        self.entries = []
        self.mask = mask
        self._freeze_entries(self._owned())
        if self.ablated is not None:
            for name, chosen in self.ablated.masks.items():
                chosen.copy_(mask.masks[name].to(chosen.device))
            self.resample(step)
        record = {"step": step, "kept": (old & mask).count(), "added": mask.count() - (old & mask).count(),
                  "released": old.count() - (old & mask).count(), "frozen": mask.count()}
        self.history.append(record)
        logger.info("re-identified at step %d: %d kept, %d added, %d released", step, record["kept"],
                    record["added"], record["released"])
        return record

    def remove(self) -> None:
        """Remove every hook and give back ``requires_grad`` as it was; snapshots are kept."""
        for h in self._handles + self._entry_handles:
            h.remove()
        self._handles.clear()
        self._entry_handles.clear()
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        for _, param, flag in self._requires_grad.values():
            param.requires_grad_(flag)
        self._requires_grad.clear()

    @property
    def installed(self) -> bool:
        return self._stack is not None

    def __enter__(self) -> "NeuronFreezer":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _set_requires_grad(self, name: str, param: nn.Parameter, flag: bool) -> None:
        if param.requires_grad != flag:
            self._requires_grad.setdefault(id(param), (name, param, param.requires_grad))
            param.requires_grad_(flag)

    # ------------------------------------------------------------------ ablation
    def _reference_pass(self) -> bool:
        """True inside TRL's PEFT reference forward (adapters disabled or another adapter active)."""
        probe = self._probe
        if probe is None:
            return False
        return bool(probe.disable_adapters) or self.adapter_name not in probe.active_adapters

    def _training_pass(self, site: MLPSite) -> bool:
        """Ablate in training forward passes of the policy only (not evaluation; TRL's reference pass only with
        ``ablate_reference``)."""
        if self._suspended:
            return False
        return site.down.training and (self.ablate_reference or not self._reference_pass())

    @contextlib.contextmanager
    def intact(self):
        """Inside the block, training passes are not ablated (the intact model, e.g. for a consistency target)."""
        before, self._suspended = self._suspended, True
        try:
            yield
        finally:
            self._suspended = before

    def resample(self, step: int) -> None:
        """Stochastic ablation: draw the subset zeroed from now on (``ablate_fraction`` of each MLP's masked
        neurons, at least one where it has any), seeded by ``seed`` and ``step``; a no-op without it."""
        if self.ablate_fraction is None or self.ablated is None:
            return
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        for name, candidates in self.mask.masks.items():
            idx = torch.nonzero(candidates.cpu()).flatten()
            chosen = self.ablated.masks[name]
            chosen.zero_()
            if idx.numel():
                k = max(1, round(self.ablate_fraction * idx.numel()))
                chosen[idx[torch.randperm(idx.numel(), generator=g)[:k]].to(chosen.device)] = True

    # ------------------------------------------------------------------ restore and checks
    @torch.no_grad()
    def restore(self) -> None:
        """Copy the snapshots back into the frozen entries (after an optimizer step); a no-op once removed."""
        if not self.installed:
            return
        for e in self.entries:
            e.restore()

    def attach(self, optimizer: torch.optim.Optimizer):
        """Restore after every ``optimizer.step()``; returns the hook handle."""
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        handle = inner.register_step_post_hook(lambda *_: self.restore())
        self._handles.append(handle)
        return handle

    def callback(self) -> "RestoreFrozenCallback":
        """A transformers ``TrainerCallback`` that restores after every optimizer step."""
        return RestoreFrozenCallback(self)

    def changed(self) -> list[str]:
        """Names of the parameters whose frozen entries differ from the snapshot (empty = bit-exact)."""
        return [e.name for e in self.entries if not e.unchanged()]

    def summary(self) -> dict:
        """Counts for metrics: neurons frozen (total, per MLP), frozen entries, modules frozen."""
        return {
            "neurons_frozen": 0 if self.invert else self.mask.count(),
            "neurons_trained": self.mask.count() if self.invert else None,
            "neurons_total": self.mask.total(),
            "per_mlp": self.mask.per_layer(),
            "frozen_entries": int(sum(e.index.numel() for e in self.entries)),
            "parameters_with_frozen_entries": len(self.entries),
            "ablate": self.ablate,
            "ablate_fraction": self.ablate_fraction,
            "ablate_reference": self.ablate_reference,
            "reidentified": list(self.history),
            "invert": self.invert,
            "parameters_frozen_whole": len(self._requires_grad),
        }


def _grad_mask(dim: int, index: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad.index_fill(dim, index.to(grad.device), 0.0)

    return hook


try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a dependency
    TrainerCallback = object  # type: ignore[assignment,misc]


class RestoreFrozenCallback(TrainerCallback):
    """Restore the frozen entries after every optimizer step of a transformers ``Trainer``."""

    def __init__(self, freezer: NeuronFreezer) -> None:
        self.freezer = freezer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.freezer.restore()
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        self.freezer.resample(state.global_step)  # stochastic ablation: a new subset each step
        return control


class ReidentifyCallback(TrainerCallback):
    """Dynamic re-identification inside a round: every ``every`` optimizer steps, ``identify(model)`` (the current
    policy, in eval mode: no dropout, no ablation) gives the safety neurons of the model as it is now, and the
    freezer freezes and ablates them from then on (:meth:`NeuronFreezer.retarget`)."""

    def __init__(self, freezer: NeuronFreezer, every: int, identify) -> None:
        if every < 1:
            raise FreezeError(f"re-identification every {every} steps: give a number >= 1")
        self.freezer, self.every, self.identify = freezer, every, identify

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every or state.global_step >= state.max_steps:
            return control
        net = model if model is not None else self.freezer.model
        was_training = net.training
        net.eval()
        try:
            mask = self.identify(net)
        finally:
            net.train(was_training)
        self.freezer.retarget(mask, state.global_step)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        changed = self.freezer.changed() if self.freezer.installed else []
        if changed:  # pragma: no cover - would be a bug
            raise FreezeError(f"frozen entries changed during training: {', '.join(changed[:5])}")
        return control

