"""Recording MLP neuron activations (text and image+text prompts alike) into streaming statistics.

The neuron activation of an MLP is the input of its down projection,
``act(gate(x)) * up(x)``, shape [batch, seq, d_ff], read by a scoped hook
(:func:`safeneuron.hooks.neuron_hooks`) on batches from
:func:`safeneuron.inputs.prompt_batches`. Each prompt is pooled over its non-padding
tokens (``max``, ``last`` or ``mean``) to one [d_ff] vector, and the vectors are folded
into per-neuron count / mean / M2 accumulators in float64 (Welford updates, Chan
merges). Memory is O(layers x d_ff) whatever the number of prompts; statistics from
separate runs or processes merge exactly.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Collection, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from safeneuron.arch import MLPSite, find_mlps
from safeneuron.data.images import MultimodalPrompt, as_image_text, is_image_text
from safeneuron.data.prompts import PromptSet
from safeneuron.hooks import neuron_hooks
from safeneuron.inputs import SPANS, forward_without_logits, iter_batches, model_device, prompt_batches
from safeneuron.models import is_vlm

logger = logging.getLogger(__name__)

__all__ = [
    "POSITIONS",
    "NeuronStats",
    "ActivationStats",
    "pool_tokens",
    "record_activations",
    "collect_activations",
]

POSITIONS = ("max", "last", "mean")


# --------------------------------------------------------------------------- statistics
@dataclass
class NeuronStats:
    """Streaming count, mean and M2 (sum of squared deviations) per neuron, float64.

    ``mean`` and ``m2`` have shape [d_ff]; ``var`` is the unbiased variance.
    """

    count: int
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def empty(cls, d_ff: int, device: torch.device | str = "cpu") -> "NeuronStats":
        zeros = torch.zeros(d_ff, dtype=torch.float64, device=device)
        return cls(0, zeros, zeros.clone())

    def to(self, device: torch.device | str) -> "NeuronStats":
        return NeuronStats(self.count, self.mean.to(device), self.m2.to(device))

    @classmethod
    def of(cls, x: torch.Tensor) -> "NeuronStats":
        """Statistics of a batch ``x`` [n, d_ff]."""
        x = x.to(torch.float64)
        mean = x.mean(0)
        return cls(int(x.shape[0]), mean, ((x - mean) ** 2).sum(0))

    def merge(self, other: "NeuronStats") -> "NeuronStats":
        """Chan et al.'s parallel merge: exact for count/mean/M2 up to float64 rounding."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return NeuronStats(n, mean, m2)

    def update(self, x: torch.Tensor) -> "NeuronStats":
        """Fold a batch ``x`` [n, d_ff] in; returns the merged statistics."""
        return self.merge(NeuronStats.of(x)) if x.shape[0] else self

    @property
    def var(self) -> torch.Tensor:
        """Unbiased variance [d_ff] (NaN-free: zero when count < 2)."""
        if self.count < 2:
            return torch.zeros_like(self.m2)
        return self.m2 / (self.count - 1)


@dataclass
class ActivationStats:
    """Per-group, per-MLP neuron statistics.

    ``groups[group][mlp_name]`` is a :class:`NeuronStats`; groups are ``harmful``,
    ``harmless`` and, with categories, ``harmful/<category>``. ``position`` is the
    token pooling that produced them (statistics of different poolings never merge).
    """

    position: str
    groups: dict[str, dict[str, NeuronStats]] = field(default_factory=dict)

    def add(self, group: str, mlp: str, x: torch.Tensor) -> None:
        per_mlp = self.groups.setdefault(group, {})
        current = per_mlp.get(mlp) or NeuronStats.empty(x.shape[-1], x.device)
        per_mlp[mlp] = current.update(x)

    def to(self, device: torch.device | str) -> "ActivationStats":
        """The same statistics with their tensors on ``device``."""
        return ActivationStats(self.position, {g: {m: s.to(device) for m, s in per.items()}
                                               for g, per in self.groups.items()})

    def count(self, group: str) -> int:
        per_mlp = self.groups.get(group, {})
        return next(iter(per_mlp.values())).count if per_mlp else 0

    def merge(self, other: "ActivationStats") -> "ActivationStats":
        if other.position != self.position:
            raise ValueError(f"cannot merge statistics pooled by {self.position!r} with {other.position!r}")
        out = ActivationStats(self.position, {g: dict(m) for g, m in self.groups.items()})
        for group, per_mlp in other.groups.items():
            target = out.groups.setdefault(group, {})
            for mlp, stats in per_mlp.items():
                target[mlp] = target[mlp].merge(stats) if mlp in target else stats
        return out

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat dict for safetensors: ``<group>|<mlp>.{count,mean,m2}``."""
        out = {}
        for group, per_mlp in self.groups.items():
            for mlp, s in per_mlp.items():
                out[f"{group}|{mlp}.count"] = torch.tensor([s.count], dtype=torch.int64)
                out[f"{group}|{mlp}.mean"] = s.mean
                out[f"{group}|{mlp}.m2"] = s.m2
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], position: str) -> "ActivationStats":
        out = cls(position)
        for key in tensors:
            if not key.endswith(".count"):
                continue
            stem = key[: -len(".count")]
            group, mlp = stem.rsplit("|", 1)  # a category name may hold "|"; a module name does not
            out.groups.setdefault(group, {})[mlp] = NeuronStats(
                int(tensors[key][0]), tensors[f"{stem}.mean"].to(torch.float64), tensors[f"{stem}.m2"].to(torch.float64)
            )
        return out


# --------------------------------------------------------------------------- pooling
def pool_tokens(x: torch.Tensor, attention_mask: torch.Tensor, position: str,
                span: torch.Tensor | None = None) -> torch.Tensor:
    """Pool activations [batch, seq, d] over non-padding tokens to [batch, d] float32.

    ``max``: maximum over the prompt's tokens; ``last``: the final non-padding token
    (the end of the generation prompt); ``mean``: average over the prompt's tokens.
    Padding positions (``attention_mask == 0``) never enter. ``span`` [batch, seq] (bool)
    restricts ``max`` and ``mean`` to those tokens (a row with an empty span uses all of
    its tokens); ``last`` is always the final token.
    """
    mask = attention_mask.to(device=x.device, dtype=torch.bool)
    if span is not None and position != "last":
        span = span.to(device=x.device, dtype=torch.bool) & mask
        mask = torch.where(span.any(1, keepdim=True), span, mask)
    if position == "max":
        return x.masked_fill(~mask[..., None], float("-inf")).amax(1).float()
    if position == "last":
        positions = torch.arange(mask.shape[1], device=x.device)
        last = (positions * mask).argmax(1)  # index of the last real token, any padding side
        return x[torch.arange(x.shape[0], device=x.device), last].float()
    if position == "mean":
        total = x.float().masked_fill(~mask[..., None], 0.0).sum(1)
        return total / mask.sum(1, keepdim=True).clamp_min(1).float()
    raise ValueError(f"unknown position {position!r}; choose one of {', '.join(POSITIONS)}")


# --------------------------------------------------------------------------- recording
def record_activations(
    model: nn.Module,
    processing,
    prompt_sets: Mapping[str, PromptSet | Sequence[MultimodalPrompt]],
    *,
    position: str = "max",
    span: str = "prompt",
    batch_size: int = 16,
    max_length: int = 512,
    by_category: bool | Collection[str] = False,
    stats: ActivationStats | None = None,
    skip_batches: int = 0,
    on_batch: Callable[[int, ActivationStats], None] | None = None,
    progress: bool = True,
    sites: Sequence[MLPSite] | None = None,
    stats_device: str = "cpu",
) -> ActivationStats:
    """Stream neuron statistics for each labelled prompt set, in one pass.

    Text and image+text prompts go the same way (:func:`safeneuron.inputs.prompt_batches`).
    For a vision-language model (``processing`` is then its processor) every prompt is
    image+text: a text :class:`PromptSet` is typeset as images
    (:func:`~safeneuron.data.images.typographic_prompts`), and the pooled vector is taken
    from the language model's MLP inputs at all positions, image tokens included
    (``last`` is the end of the generation prompt, after the image).

    Args:
        processing: the tokenizer (text model) or the processor (VLM).
        prompt_sets: label -> prompts, e.g. ``{"harmful": ..., "harmless": ...}``.
        position: token pooling, one of :data:`POSITIONS`.
        span: the tokens ``max``/``mean`` pool over, one of :data:`~safeneuron.inputs.SPANS`: ``prompt``
            (every token), ``content`` (the user's text only) or ``post`` (after it); image+text prompts
            always pool over the whole prompt.
        max_length: text prompts are truncated from the left at this many tokens;
            image+text prompts are never cut (a longer batch only warns).
        by_category: also keep statistics per ``<label>/<category>`` (True: for every
            label; a collection of labels: for those only).
        stats: statistics to continue from (resume); ``skip_batches`` batches of the
            deterministic batch order are then skipped.
        on_batch: called as ``on_batch(batches_done, stats)`` after every batch
            (checkpointing).
        stats_device: where the float64 accumulators live: ``cpu`` (offloaded, the
            default; O(layers x d_ff) host memory) or ``model`` (on the model's device,
            no per-layer transfer: faster on a GPU).

    Returns:
        The statistics, groups ``<label>`` (and ``<label>/<category>``); nothing of size
        [prompts, layers, d_ff] is ever held.
    """
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; choose one of {', '.join(POSITIONS)}")
    if span not in SPANS:
        raise ValueError(f"unknown span {span!r}; choose one of {', '.join(SPANS)}")
    stats = stats if stats is not None else ActivationStats(position)
    image_text = is_vlm(model) or any(is_image_text(ps) for ps in prompt_sets.values())
    prompts: list = []
    groups: list[list[str]] = []
    for label, ps in prompt_sets.items():
        split = by_category is True or (not isinstance(by_category, bool) and label in by_category)
        items = as_image_text(ps) if image_text else list(zip(ps.prompts, ps.categories))
        for item in items:
            prompt, category = (item, item.category) if image_text else item
            prompts.append(prompt)
            groups.append([label] + ([f"{label}/{category}"] if split and category is not None else []))

    acc_device = model_device(model) if stats_device == "model" else torch.device("cpu")
    stats = stats.to(acc_device)
    state: dict = {}

    def record(site: MLPSite, acts: torch.Tensor) -> None:
        mask = state["mask"]
        if acts.shape[:2] != mask.shape:
            raise RuntimeError(f"{site.name}: activations {tuple(acts.shape)} do not align with the attention mask "
                               f"{tuple(mask.shape)}; this model changes the sequence inside the model")
        pooled = pool_tokens(acts.detach(), mask, position, state["span"]).to(acc_device)
        for group, rows in state["rows"].items():
            stats.add(group, site.name, pooled[rows] if len(rows) < pooled.shape[0] else pooled)
        return None

    was_training = model.training
    model.eval()
    try:
        with neuron_hooks(model, record, sites), torch.no_grad():
            bar = tqdm(total=len(prompts), desc="recording (image+text)" if image_text else "recording",
                       unit="prompt", disable=not progress)
            bar.update(min(len(prompts), skip_batches * batch_size))
            batches = prompt_batches(processing, prompts, batch_size, max_length=max_length, model=model,
                                     skip=skip_batches, spans=span != "prompt")
            for b, batch in enumerate(batches, start=skip_batches):
                rows: dict[str, list[int]] = {}
                for r, i in enumerate(batch.indices):
                    for g in groups[i]:
                        rows.setdefault(g, []).append(r)
                state["mask"] = batch.inputs["attention_mask"]
                state["span"] = batch.spans.get(span)  # None for "prompt" and for image+text prompts
                if image_text and state["mask"].shape[1] > max_length:
                    logger.warning("batch %d: %d tokens (image tokens included) > max_length=%d; not truncated",
                                   b + 1, state["mask"].shape[1], max_length)
                state["rows"] = {g: torch.tensor(r, device=acc_device) for g, r in rows.items()}
                forward_without_logits(model, batch.inputs)
                bar.update(len(batch.indices))
                if on_batch is not None:
                    on_batch(b + 1, stats)
            bar.close()
    finally:
        model.train(was_training)
    return stats


def collect_activations(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    position: str = "max",
    span: str = "prompt",
    point: str = "neurons",
    batch_size: int = 16,
    max_length: int = 512,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Materialise pooled activations [n_prompts, d] per module (input order kept), pooled by ``position``
    over the ``span``'s tokens (as :func:`record_activations`).

    ``point="neurons"`` records the neuron activations (keys: MLP names);
    ``point="up_outputs"`` records the outputs of the up-side projections as
    NeuroStrike does (keys ``<mlp>.gate_proj``, ``<mlp>.up_proj``; a fused gate_up is
    split into its gate and up halves). Memory grows with the prompts: this is for
    probes, tests and baselines, not for the default identification path.
    """
    sites = find_mlps(model)
    n = len(prompts)
    store: dict[str, torch.Tensor] = {}
    state: dict = {}

    def put(key: str, pooled: torch.Tensor) -> None:
        if key not in store:
            store[key] = torch.empty(n, pooled.shape[-1], dtype=torch.float32)
        store[key][state["idx"]] = pooled.cpu()

    handles = []
    if point == "neurons":
        ctx = neuron_hooks(model, lambda site, acts: put(site.name, pool_tokens(acts, state["mask"], position,
                                                                                state["span"])), sites)
    elif point == "up_outputs":
        for site in sites:
            for up_name, up in zip(site.up_names, site.ups):

                def hook(module, args, out, site=site, up_name=up_name):
                    if up_name == "gate_up_proj":  # Phi-3: [gate | up]
                        gate, upv = out.chunk(2, dim=-1)
                        put(f"{site.name}.gate_proj", pool_tokens(gate, state["mask"], position))
                        put(f"{site.name}.up_proj", pool_tokens(upv, state["mask"], position))
                    else:
                        put(f"{site.name}.{up_name}", pool_tokens(out, state["mask"], position))

                handles.append(up.register_forward_hook(hook))
        ctx = contextlib.nullcontext()
    else:
        raise ValueError(f"unknown recording point {point!r}; choose 'neurons' or 'up_outputs'")

    was_training = model.training
    model.eval()
    try:
        with ctx, torch.no_grad():
            for batch in tqdm(iter_batches(tokenizer, prompts, batch_size, max_length, model_device(model),
                                           spans=span != "prompt"),
                              desc="collecting", unit="batch", disable=not progress):
                state["mask"] = batch.inputs["attention_mask"]
                state["span"] = batch.spans.get(span)
                state["idx"] = torch.tensor(batch.indices)
                forward_without_logits(model, batch.inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return store
