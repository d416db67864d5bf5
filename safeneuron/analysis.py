"""Where safety neurons sit, what harm categories share, and how separable each layer is.

Three analyses, each a pure function on artifacts or tensors plus one stage that
writes them:

* **Layer-wise distribution** (:func:`layer_distribution`): the share of each
  layer's neurons selected as safety neurons, read from identification manifests
  (``identify.json``), on a normalised depth axis so models of different depth (or
  the rounds of an alignment) line up.
* **Per-category overlap** (:func:`category_composition`, :func:`overlap_curve`):
  from ``identify --by-category`` sets, the layer-wise composition by category and
  the *overlap ratio* ``|S_1 & ... & S_k| / mean(|S_1|, ..., |S_k|)`` as categories
  are added, averaged over random category orders: does a stable shared core remain?
* **Layer-wise separability** (:func:`probe_accuracy`, :func:`layer_separability`): a
  logistic-regression probe per layer, harmful vs harmless, on the residual stream
  and on the MLP neuron activations, for the base model and aligned models; and on
  the safety neurons only vs as many random neurons per layer.

:func:`analyze` writes, in ``out/`` (a contract)::

    layer_distribution.json   categories.json   separability.json   analysis.json
    layer_distribution.png    category_composition.png  category_overlap.png  separability.png

``analysis.json`` is written last (settings, sources, timings, versions).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from safeneuron.activations import POSITIONS, iter_batches, model_device, neuron_hooks, pool_tokens
from safeneuron.arch import find_mlps
from safeneuron.artifacts import ArtifactError, read_json, sha256_file, sha256_text, write_json
from safeneuron.config import ConfigError
from safeneuron.data.prompts import PromptSet, load_prompts
from safeneuron.masks import SafetyNeuronMask

logger = logging.getLogger(__name__)

__all__ = [
    "AnalyzeConfig",
    "Analysis",
    "analyze",
    "find_identifications",
    "layer_fractions",
    "layer_distribution",
    "load_category_masks",
    "category_composition",
    "overlap_ratios",
    "overlap_curve",
    "stratified_split",
    "fit_logistic",
    "probe_accuracy",
    "collect_features",
    "layer_separability",
    "register_cli",
]

#: Files :func:`analyze` writes (JSON, then figures).
ARTIFACTS = ("layer_distribution.json", "categories.json", "separability.json", "analysis.json")
FIGURES = ("layer_distribution.png", "category_composition.png", "category_overlap.png", "separability.png")


# --------------------------------------------------------------------------- config
@dataclass
class AnalyzeConfig:
    """Settings of the analysis stage."""

    model: str | None = None
    """Base model for the separability probes: hub id or local directory; None = the identified model
    (identify.json's ``model``), else the embedded default."""
    compare: list[str] = field(default_factory=list)
    """Further models to probe, e.g. aligned ones: ``name=path`` or a path (named after its directory)."""
    identify: list[str] = field(default_factory=list)
    """Identification directories (``name=dir`` or a dir). The first gives the safety neurons for the
    probes and the per-category sets; all of them enter the layer-distribution heatmap."""
    set: str = "union"
    """Which safety-neuron set to analyse: ``union``, ``es`` or ``sas``."""
    separability: bool = True
    """Run the probes (needs the models); off = only the analyses of identification artifacts."""
    harmful: str | None = None
    """Harmful prompts for the probes (default: the identification's source, else built-in)."""
    harmless: str | None = None
    """Harmless prompts for the probes (default: the identification's source, else built-in)."""
    prompt_column: str | None = None
    max_prompts: int = 128
    """Prompts per class for the probes (seeded sample; both classes get the same number)."""
    held_out: bool = True
    """Probe on prompts not used by the identification when enough remain."""
    position: str | None = None
    """Token pooling for the probes: ``max``, ``last`` or ``mean``; None = the identification's."""
    test_frac: float = 0.3
    """Held-out share of the prompts for measuring probe accuracy (stratified split)."""
    n_splits: int = 3
    """Probe accuracy is the mean over this many seeded train/test splits."""
    l2: float = 1e-2
    """L2 penalty of the logistic probe (on standardised features, mean loss)."""
    probe_max_iter: int = 100
    """L-BFGS iterations per probe."""
    n_orders: int = 200
    """Random category orders for the overlap curve (all orders when there are fewer)."""
    band: list[float] = field(default_factory=lambda: [10.0, 90.0])
    """Percentiles of the overlap curve's band over category orders."""
    figures: bool = True
    """Also write PNG figures beside the JSON."""
    seed: int = 0
    batch_size: int = 16
    max_length: int = 512
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False

    def validate(self) -> None:
        if self.set not in ("union", "es", "sas"):
            raise ConfigError(f"set must be union, es or sas, got {self.set!r}")
        if self.position is not None and self.position not in POSITIONS:
            raise ConfigError(f"position must be one of {', '.join(POSITIONS)}, got {self.position!r}")
        if not 0 < self.test_frac < 1:
            raise ConfigError(f"test_frac must be in (0, 1), got {self.test_frac}")
        if self.max_prompts < 4:
            raise ConfigError(f"max_prompts must be >= 4 (the probe needs train and test prompts of both classes), "
                              f"got {self.max_prompts}")
        if self.n_splits < 1 or self.n_orders < 1 or self.probe_max_iter < 1:
            raise ConfigError("n_splits, n_orders and probe_max_iter must be >= 1")
        if self.l2 < 0:
            raise ConfigError(f"l2 must be >= 0, got {self.l2}")
        if len(self.band) != 2 or not 0 <= float(self.band[0]) < float(self.band[1]) <= 100:
            raise ConfigError(f"band must be two percentiles 0 <= low < high <= 100, got {self.band}")
        if self.batch_size < 1 or self.max_length < 1:
            raise ConfigError("batch_size and max_length must be >= 1")


def _named(entries: Sequence[str], default_first: str | None = None) -> dict[str, str]:
    """``["name=path", "path"]`` -> ``{name: path}`` (a bare path is named after its directory)."""
    out: dict[str, str] = {}
    for i, entry in enumerate(entries):
        name, sep, path = str(entry).partition("=")
        if not sep:
            path = name
            name = default_first if (i == 0 and default_first) else (Path(path).name or path)
        if name in out:
            raise ConfigError(f"name {name!r} given twice ({out[name]} and {path}); use name=path to tell them apart")
        out[name] = path
    return out


# --------------------------------------------------------------------------- 1. layer distribution
def find_identifications(run_dir: str | Path) -> dict[str, Path]:
    """Identification directories of a main-job directory, in order.

    ``DIR/identify`` is ``base``; ``DIR/align/<mode>/round_<r>/identify`` is
    ``<mode> round <r>``. Only finished ones (with ``identify.json``) are listed.
    """
    run_dir = Path(run_dir)
    found: dict[str, Path] = {}
    if (run_dir / "identify" / "identify.json").is_file():
        found["base"] = run_dir / "identify"
    align = run_dir / "align"
    if align.is_dir():
        for mode_dir in sorted(p for p in align.iterdir() if p.is_dir()):
            rounds = []
            for r in mode_dir.glob("round_*"):
                suffix = r.name.split("_", 1)[1]
                if suffix.isdigit() and (r / "identify" / "identify.json").is_file():
                    rounds.append((int(suffix), r / "identify"))
            for number, path in sorted(rounds):
                found[f"{mode_dir.name} round {number}"] = path
    return found


def _manifest(source: str | Path | Mapping) -> tuple[dict, str]:
    if isinstance(source, Mapping):
        return dict(source), str(source.get("model", "?"))
    path = Path(source)
    if path.is_dir():
        path = path / "identify.json"
    return read_json(path), str(path.parent)


def layer_fractions(manifest: Mapping, set: str = "union") -> list[float]:
    """Share of each layer's neurons in ``set``, in layer order, from an ``identify.json``.

    Raises:
        ArtifactError: the manifest has no such set or lacks the per-layer counts.
    """
    per_layer = manifest.get("selected_per_layer")
    d_ff = manifest.get("d_ff")
    if not per_layer or not d_ff:
        raise ArtifactError("identify.json lacks selected_per_layer or d_ff: not an identification manifest?")
    if set not in manifest.get("sets", [set]):
        raise ArtifactError(f"identification has no {set!r} set (sets: {', '.join(manifest.get('sets', []))})")
    return [counts.get(set, 0) / d_ff for counts in per_layer.values()]


def layer_distribution(sources: Mapping[str, str | Path | Mapping], set: str = "union") -> dict:
    """Layer-wise share of safety neurons for several identifications.

    Args:
        sources: row name -> identification directory, ``identify.json`` path or manifest.
        set: ``union``, ``es`` or ``sas``.

    Returns:
        ``{"set", "rows": [{"name", "source", "model", "n_layers", "d_ff", "layers",
        "selected", "fraction", "depth_edges"}]}``; ``fraction[i]`` is the share of
        layer i's neurons selected, and layer i spans ``depth_edges[i]..depth_edges[i+1]``
        of the normalised depth 0 (first layer) .. 1 (last layer's end).
    """
    rows = []
    for name, source in sources.items():
        manifest, where = _manifest(source)
        fractions = layer_fractions(manifest, set)
        n_layers = len(fractions)
        rows.append({
            "name": name,
            "source": where,
            "model": manifest.get("model"),
            "n_layers": n_layers,
            "d_ff": manifest.get("d_ff"),
            "layers": list(manifest["selected_per_layer"]),
            "selected": [counts.get(set, 0) for counts in manifest["selected_per_layer"].values()],
            "fraction": fractions,
            "depth_edges": [i / n_layers for i in range(n_layers + 1)],
        })
    return {"set": set, "rows": rows}


# --------------------------------------------------------------------------- 2. categories
def load_category_masks(identify_dir: str | Path, set: str = "union") -> dict[str, SafetyNeuronMask]:
    """Per-category safety-neuron sets of an ``identify --by-category`` run (``{}`` when none)."""
    identify_dir = Path(identify_dir)
    manifest = read_json(identify_dir / "identify.json")
    return {category: SafetyNeuronMask.load(identify_dir / info["file"], set=set)
            for category, info in sorted((manifest.get("categories") or {}).items())}


def category_composition(masks: Mapping[str, SafetyNeuronMask]) -> dict:
    """Neurons selected per layer for each category.

    Returns:
        ``{"categories", "layers", "d_ff": [width per layer], "counts": {category: [per layer]},
        "sizes": {category: total}, "shared_all": [per layer, neurons in every category's set]}``.
    """
    if not masks:
        raise ValueError("no category masks")
    categories = list(masks)
    layers = list(next(iter(masks.values())).masks)
    for c in categories:
        if list(masks[c].masks) != layers:
            raise ArtifactError(f"category {c!r} covers other MLPs than {categories[0]!r}: masks of different models?")
    shared = None
    for m in masks.values():
        shared = m if shared is None else shared & m
    return {
        "categories": categories,
        "layers": layers,
        "d_ff": [int(masks[categories[0]].masks[l].numel()) for l in layers],
        "counts": {c: [int(masks[c].masks[l].sum()) for l in layers] for c in categories},
        "sizes": {c: masks[c].count() for c in categories},
        "shared_all": [int(shared.masks[l].sum()) for l in layers],
    }


def _stack_sets(sets: Sequence[SafetyNeuronMask | torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Sets as one bool tensor [K, N] (masks flattened in their key order)."""
    if isinstance(sets, torch.Tensor):
        stacked = sets
    else:
        rows = []
        for s in sets:
            rows.append(torch.cat([m.flatten() for m in s.masks.values()]) if isinstance(s, SafetyNeuronMask)
                        else s.flatten())
        if len({r.numel() for r in rows}) > 1:
            raise ValueError(f"sets cover different numbers of neurons: {sorted({r.numel() for r in rows})}")
        stacked = torch.stack(rows)
    if stacked.dim() != 2:
        raise ValueError(f"expected sets as [K, N], got shape {tuple(stacked.shape)}")
    return stacked.to(torch.bool)


def overlap_ratios(sets: Sequence[SafetyNeuronMask | torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Overlap ratio for k = 1..K categories, in the given order.

    ``ratio[k-1] = |S_1 & ... & S_k| / mean(|S_1|, ..., |S_k|)`` (1 at k = 1 for a
    non-empty set; NaN where the first k sets are all empty). Returns float64 [K].
    """
    stacked = _stack_sets(sets)
    # Running intersection: cummin over the category axis of 0/1 values, [K, N].
    inter = torch.cummin(stacked.to(torch.uint8), dim=0).values.sum(1).double()
    sizes = stacked.sum(1).double()
    mean_size = sizes.cumsum(0) / torch.arange(1, len(sizes) + 1, dtype=torch.float64)
    return torch.where(mean_size > 0, inter / mean_size.clamp_min(1e-300), torch.full_like(mean_size, math.nan))


def overlap_curve(
    sets: Sequence[SafetyNeuronMask | torch.Tensor] | torch.Tensor,
    *,
    n_orders: int = 200,
    seed: int = 0,
    band: Sequence[float] = (10.0, 90.0),
) -> dict:
    """Overlap ratio against the number of categories, averaged over category orders.

    All K! orders are used when K! <= ``n_orders`` (then the curve is exact);
    otherwise ``n_orders`` seeded random permutations.

    Returns:
        ``{"k": [1..K], "mean", "std", "low", "high": [K floats, NaN -> None],
        "band_percentiles": [low, high], "n_orders", "exhaustive", "seed",
        "sizes": [|S_i|], "shared_all": |S_1 & ... & S_K|}``.
    """
    stacked = _stack_sets(sets)
    k = stacked.shape[0]
    if k == 0:
        raise ValueError("no sets")
    exhaustive = math.factorial(k) <= n_orders
    if exhaustive:
        orders = [list(p) for p in itertools.permutations(range(k))]
    else:
        g = torch.Generator().manual_seed(seed)
        orders = [torch.randperm(k, generator=g).tolist() for _ in range(n_orders)]
    curves = np.stack([overlap_ratios(stacked[order]).numpy() for order in orders])  # [orders, K]
    with np.errstate(all="ignore"), _quiet_nan_warnings():
        mean = np.nanmean(curves, 0)
        std = np.nanstd(curves, 0)
        low, high = np.nanpercentile(curves, list(band), axis=0)
    shared = int(stacked.all(0).sum())

    def clean(a):
        return [None if not np.isfinite(v) else float(v) for v in a]

    return {
        "k": list(range(1, k + 1)),
        "mean": clean(mean),
        "std": clean(std),
        "low": clean(low),
        "high": clean(high),
        "band_percentiles": [float(band[0]), float(band[1])],
        "n_orders": len(orders),
        "exhaustive": exhaustive,
        "seed": seed,
        "sizes": [int(s) for s in stacked.sum(1)],
        "shared_all": shared,
    }


class _quiet_nan_warnings:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# --------------------------------------------------------------------------- 3. probes
def stratified_split(labels: torch.Tensor, test_frac: float = 0.3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded train/test indices with each class split in the same proportion.

    Every class keeps at least one example on each side. Returns two int64 index tensors.
    """
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for cls in torch.unique(labels):
        idx = torch.nonzero(labels == cls).flatten()
        if idx.numel() < 2:
            raise ValueError(f"class {cls.item()} has {idx.numel()} example(s); a split needs 2 per class")
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_test = min(max(1, round(test_frac * idx.numel())), idx.numel() - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def fit_logistic(x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-2, max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression by full-batch L-BFGS (float64).

    Minimises ``mean BCE(x @ w + b, y) + l2 / 2 * |w|^2`` (the bias is not penalised).

    Args:
        x: features [n, d]; y: labels [n] in {0, 1}.

    Returns:
        ``(w [d], b [])`` float64.
    """
    x = x.double()
    y = y.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-5, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def probe_accuracy(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    test_frac: float = 0.3,
    seed: int = 0,
    n_splits: int = 1,
    l2: float = 1e-2,
    max_iter: int = 100,
) -> float:
    """Held-out accuracy of a logistic probe, mean over ``n_splits`` seeded stratified splits.

    Features are standardised with the training part's mean and deviation. ``x``
    [n, d] (d may be 0: then the probe predicts the training majority); ``y`` [n] in {0, 1}.
    Returns the accuracy in [0, 1].
    """
    return float(np.mean(_probe_accuracies(x, y, test_frac=test_frac, seed=seed, n_splits=n_splits, l2=l2,
                                           max_iter=max_iter)))


@contextlib.contextmanager
def _one_thread():
    """Probes are small: one thread avoids the heavy oversubscription cost seen on busy 2-core CPUs
    (a 126 x 4864 probe took 2.1 s with 2 threads, 8 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _probe_accuracies(x, y, *, test_frac, seed, n_splits, l2, max_iter) -> list[float]:
    with _one_thread():
        return _probe_runs(x, y, test_frac=test_frac, seed=seed, n_splits=n_splits, l2=l2, max_iter=max_iter)


def _probe_runs(x, y, *, test_frac, seed, n_splits, l2, max_iter) -> list[float]:
    x = x.double()
    y = y.double()
    out = []
    for split in range(n_splits):
        train, test = stratified_split(y, test_frac, seed + split)
        if x.shape[1] == 0:
            majority = float(y[train].mean() >= 0.5)
            out.append(float((y[test] == majority).double().mean()))
            continue
        mean = x[train].mean(0)
        std = x[train].std(0).clamp_min(1e-8)
        xt = (x[train] - mean) / std
        w, b = fit_logistic(xt, y[train], l2=l2, max_iter=max_iter)
        pred = (((x[test] - mean) / std) @ w + b > 0).double()
        out.append(float((pred == y[test]).double().mean()))
    return out


def _forward_hidden(model: nn.Module, inputs: dict[str, torch.Tensor]):
    kwargs = dict(inputs, use_cache=False, output_hidden_states=True)
    try:
        return model(**kwargs, logits_to_keep=1)  # only the hidden states matter
    except TypeError:
        return model(**kwargs)


def collect_features(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    position: str = "max",
    batch_size: int = 16,
    max_length: int = 512,
    progress: bool = True,
    processor=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pooled residual stream and MLP neuron activations of every layer, in one forward pass.

    With ``processor`` (a VLM's), ``prompts`` are image+text
    :class:`~safeneuron.vlm.MultimodalPrompt` s batched by it (image tokens included in
    the pooling, nothing truncated); ``tokenizer`` is then unused.

    Returns:
        ``residual`` [n_layers, n_prompts, d_model]: the hidden state after each decoder
        layer (``output_hidden_states[1:]``; in most transformers models the last one
        is after the final norm), pooled over each prompt's tokens; and ``neurons``
        ``{mlp name: [n_prompts, d_ff]}``, the neuron activations (input of the down
        projection), pooled the same way. Prompt order is kept; float32 on the CPU.
    """
    from tqdm.auto import tqdm

    sites = find_mlps(model)
    n = len(prompts)
    neurons: dict[str, torch.Tensor] = {}
    residual: torch.Tensor | None = None
    state: dict = {}

    def record(site, acts: torch.Tensor) -> None:
        pooled = pool_tokens(acts.detach(), state["mask"], position).cpu()
        if site.name not in neurons:
            neurons[site.name] = torch.empty(n, pooled.shape[-1], dtype=torch.float32)
        neurons[site.name][state["idx"]] = pooled
        return None

    was_training = model.training
    model.eval()
    try:
        with neuron_hooks(model, record, sites), torch.no_grad():
            if processor is not None:
                from safeneuron.vlm import multimodal_batches

                batches = multimodal_batches(processor, prompts, batch_size, model)
            else:
                batches = iter_batches(tokenizer, prompts, batch_size, max_length, model_device(model))
            for batch in tqdm(batches, desc="features", unit="batch", disable=not progress):
                state["mask"] = batch.inputs["attention_mask"]
                state["idx"] = torch.tensor(batch.indices)
                hidden = _forward_hidden(model, batch.inputs).hidden_states[1:]
                if residual is None:
                    residual = torch.empty(len(hidden), n, hidden[0].shape[-1], dtype=torch.float32)
                for layer, h in enumerate(hidden):
                    residual[layer, state["idx"]] = pool_tokens(h, state["mask"], position).cpu()
    finally:
        model.train(was_training)
    assert residual is not None, "no prompts"
    return residual, neurons


def layer_separability(
    residual: torch.Tensor | None,
    neurons: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    *,
    mask: SafetyNeuronMask | None = None,
    random_mask: SafetyNeuronMask | None = None,
    test_frac: float = 0.3,
    seed: int = 0,
    n_splits: int = 3,
    l2: float = 1e-2,
    max_iter: int = 100,
) -> dict:
    """Probe accuracy per layer on each kind of feature.

    Args:
        residual: [n_layers, n, d_model] or None; neurons: ``{mlp: [n, d_ff]}`` in layer order.
        labels: [n], 1 = harmful, 0 = harmless.
        mask, random_mask: safety neurons and a same-size random control; each layer is
            probed on its selected columns (None where a layer has none).

    Returns:
        ``{"layers", "residual", "neurons", "safety_neurons", "random_neurons": [acc per layer],
        "*_std": [std over splits], "n_safety": [count per layer], "all_layers": {"safety_neurons",
        "random_neurons", "n": total} (one probe on every layer's selected neurons together)}``.
    """
    layers = list(neurons)
    kw = dict(test_frac=test_frac, seed=seed, n_splits=n_splits, l2=l2, max_iter=max_iter)
    out: dict = {"layers": layers}

    def per_layer(name: str, features: Sequence[torch.Tensor | None]) -> None:
        accs, stds = [], []
        for f in features:
            if f is None:
                accs.append(None)
                stds.append(None)
                continue
            runs = _probe_accuracies(f, labels, **kw)
            accs.append(float(np.mean(runs)))
            stds.append(float(np.std(runs)))
        out[name], out[f"{name}_std"] = accs, stds

    if residual is not None:
        per_layer("residual", list(residual))
    per_layer("neurons", [neurons[l] for l in layers])
    if mask is not None:
        for kind, m in (("safety_neurons", mask), ("random_neurons", random_mask)):
            if m is None:
                continue
            per_layer(kind, [neurons[l][:, m.masks[l]] if m.masks[l].any() else None for l in layers])
        out["n_safety"] = [int(mask.masks[l].sum()) for l in layers]
        together = {}
        for kind, m in (("safety_neurons", mask), ("random_neurons", random_mask)):
            if m is None:
                continue
            x = torch.cat([neurons[l][:, m.masks[l]] for l in layers], 1)
            together[kind] = probe_accuracy(x, labels, **kw) if x.shape[1] else None
        together["n"] = mask.count()
        out["all_layers"] = together
    return out


# --------------------------------------------------------------------------- the stage
@dataclass
class Analysis:
    """What :func:`analyze` wrote (each part None when it was not produced)."""

    layer_distribution: dict | None
    categories: dict | None
    separability: dict | None
    manifest: dict

    @classmethod
    def load(cls, out: str | Path) -> "Analysis":
        out = Path(out)

        def maybe(name):
            return read_json(out / name) if (out / name).is_file() else None

        return cls(maybe("layer_distribution.json"), maybe("categories.json"), maybe("separability.json"),
                   maybe("analysis.json") or {})


def _probe_prompts(config: AnalyzeConfig, manifest: dict | None) -> tuple[PromptSet, PromptSet, bool]:
    """Balanced harmful/harmless prompts for the probes, held out from identification when possible.

    The identification's own prompts are rebuilt from its settings (same source, limit
    and seed) and left out when at least 8 others remain per class.
    """
    settings = (manifest or {}).get("settings", {})
    sets, held = [], []
    for label in ("harmful", "harmless"):
        given = getattr(config, label)
        column = config.prompt_column or settings.get("prompt_column")
        full = load_prompts(given or settings.get(label), default=label, column=column)
        held_out = False
        if config.held_out and manifest is not None and given in (None, settings.get(label)):
            used = set(load_prompts(settings.get(label), default=label, column=settings.get("prompt_column"),
                                    limit=settings.get("max_prompts"), seed=settings.get("seed", 0)).prompts)
            rest = [i for i, p in enumerate(full.prompts) if p not in used]
            if len(rest) >= 8:
                full = full.subset(rest, f"{full.source} minus identification prompts")
                held_out = True
            else:
                logger.info("%s prompts: only %d not used by the identification; probing on all", label, len(rest))
        sets.append(full)
        held.append(held_out)
    harmful, harmless = sets
    n = min(config.max_prompts, len(harmful), len(harmless))
    if n < 4:
        raise ConfigError(f"the probes need >= 4 prompts per class; have {len(harmful)} harmful, {len(harmless)} harmless")
    return harmful.limit(n, config.seed), harmless.limit(n, config.seed), all(held)


def _load(model: str | None, config: AnalyzeConfig):
    from safeneuron.models import load_model

    return load_model(model, dtype=config.dtype, device=config.device, trust_remote_code=config.trust_remote_code)


def analyze(
    config: AnalyzeConfig | None = None,
    out: str | Path = "analysis",
    *,
    loaded=None,
    compare: Mapping[str, object] | None = None,
    identifications: Mapping[str, str | Path] | None = None,
    progress: bool = True,
) -> Analysis:
    """Run the analyses and write their artifacts to ``out`` (the analysis directory).

    Args:
        config: settings (defaults: :class:`AnalyzeConfig`).
        out: directory receiving the JSON files and figures (``DIR/analysis`` in a main job).
        loaded: the base model already in memory (a :class:`~safeneuron.models.LoadedModel`);
            otherwise ``config.model`` is loaded.
        compare: name -> path or LoadedModel of further models to probe (overrides ``config.compare``).
        identifications: name -> identification dir (overrides ``config.identify``); the first
            gives the safety neurons and the categories.

    Separability results are kept per model with a key of the settings, weights and
    mask, so a rerun (or a resumed run) skips the models already probed.
    """
    config = config or AnalyzeConfig()
    config.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    idents = {k: Path(v) for k, v in (identifications or _named(config.identify, "base")).items()}
    for name, path in idents.items():
        if not (path / "identify.json").is_file():
            raise ArtifactError(f"{path}: no identify.json; run `safeneuron identify --out {path}` first ({name})")
    primary = next(iter(idents.values()), None)
    primary_manifest = read_json(primary / "identify.json") if primary else None
    written: list[str] = []
    from safeneuron.report import figures

    # 1. layer distribution
    distribution = None
    if idents:
        distribution = layer_distribution(idents, set=config.set)
        write_json(out / "layer_distribution.json", distribution)
        written.append("layer_distribution.json")
        if config.figures:
            figures.save(figures.plot_layer_distribution(distribution), out / "layer_distribution.png")

    # 2. categories
    categories = None
    with_categories = [p for p in idents.values() if read_json(p / "identify.json").get("categories")]
    if with_categories:
        masks = load_category_masks(with_categories[0], set=config.set)
        if len(masks) >= 2:
            categories = category_composition(masks)
            categories.update(source=str(with_categories[0]), set=config.set,
                              overlap=overlap_curve([masks[c] for c in categories["categories"]],
                                                    n_orders=config.n_orders, seed=config.seed, band=[float(b) for b in config.band]))
            write_json(out / "categories.json", categories)
            written.append("categories.json")
            if config.figures:
                figures.save(figures.plot_category_composition(categories), out / "category_composition.png")
                figures.save(figures.plot_category_overlap(categories), out / "category_overlap.png")
        else:
            logger.warning("%s: %d category set(s); the overlap analysis needs 2 or more", with_categories[0], len(masks))
    elif idents:
        logger.info("no per-category identification (run identify with --by-category); category analysis skipped")
    timings["artifacts_s"] = time.perf_counter() - t_start

    # 3. separability
    separability = None
    if config.separability:
        t0 = time.perf_counter()
        separability = _separability(config, out, primary, primary_manifest, loaded, compare, progress)
        written.append("separability.json")
        if config.figures:
            figures.save(figures.plot_separability(separability), out / "separability.png")
        timings["separability_s"] = time.perf_counter() - t0

    from safeneuron.identify import versions

    timings["wall_s"] = time.perf_counter() - t_start
    manifest = {
        "settings": asdict(config),
        "identifications": {k: str(v) for k, v in idents.items()},
        "files": written + [f for f in FIGURES if (out / f).is_file()],
        "timings": timings,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(out / "analysis.json", manifest)  # written last: marks the stage complete
    return Analysis(distribution, categories, separability, manifest)


def _separability(config: AnalyzeConfig, out: Path, primary: Path | None, primary_manifest: dict | None,
                  loaded, compare, progress: bool) -> dict:
    from safeneuron.models import LoadedModel, is_vlm_checkpoint, resolve_model, weights_hash
    from safeneuron.vlm import is_vlm, processor_of, typographic_prompts

    position = config.position or (primary_manifest or {}).get("position") or "max"
    mask = SafetyNeuronMask.load(primary / "safety_neurons.safetensors", set=config.set) if primary else None
    mask_hash = sha256_file(primary / "safety_neurons.safetensors") if primary else None
    harmful, harmless, held_out = _probe_prompts(config, primary_manifest)
    prompts = harmful.prompts + harmless.prompts
    labels = torch.tensor([1.0] * len(harmful) + [0.0] * len(harmless))
    settings_key = sha256_text(position, config.set, str(mask_hash), harmful.sha256, harmless.sha256,
                               *(str(getattr(config, k)) for k in ("test_frac", "n_splits", "l2", "probe_max_iter",
                                                                    "seed", "max_length")))
    base = config.model or (primary_manifest or {}).get("model")  # default: the identified model
    models: dict[str, object] = {"base": loaded if loaded is not None else base}
    models.update(compare if compare is not None else _named(config.compare))
    path = out / "separability.json"
    previous = {}
    if path.is_file():
        try:
            previous = {m["name"]: m for m in read_json(path).get("models", []) if m.get("key")}
        except (ArtifactError, AttributeError):
            previous = {}
    result = {
        "position": position,
        "set": config.set,
        "mask": str(primary) if primary else None,
        "n_harmful": len(harmful),
        "n_harmless": len(harmless),
        "prompts": {"harmful": harmful.source, "harmless": harmless.source},
        "held_out_from_identification": held_out,
        "test_frac": config.test_frac,
        "n_splits": config.n_splits,
        "l2": config.l2,
        "seed": config.seed,
        "inputs": "text",
        "models": [],
    }
    for name, spec in models.items():
        t0 = time.perf_counter()
        lm = spec if isinstance(spec, LoadedModel) else None
        model_path = lm.path if lm is not None else resolve_model(None if spec is None else str(spec))[1]
        whash = weights_hash(model_path)
        # a VLM is probed on the prompts typeset as images (as its identification saw them)
        multimodal = is_vlm(lm.model) if lm is not None else is_vlm_checkpoint(model_path)
        key = sha256_text(settings_key, str(whash), "image+text" if multimodal else "")[:16] if whash else None
        if key and previous.get(name, {}).get("key") == key:
            logger.info("separability of %s already computed; reusing it", name)
            result["models"].append(previous[name])
            if previous[name].get("inputs") == "image+text":
                result["inputs"] = "image+text"
            continue
        owned = lm is None
        if owned:
            lm = _load(model_path, config)
        sites = find_mlps(lm.model)
        if mask is not None:
            mask.check(sites)
        random_mask = SafetyNeuronMask.random(sites, like=mask, seed=config.seed) if mask is not None else None
        vlm = is_vlm(lm.model)
        if vlm:
            logger.info("%s is a vision-language model: probing on the prompts typeset as images", name)
            result["inputs"] = "image+text"
        residual, neurons = collect_features(lm.model, lm.tokenizer,
                                             typographic_prompts(harmful) + typographic_prompts(harmless) if vlm
                                             else prompts, position=position, batch_size=config.batch_size,
                                             max_length=config.max_length, progress=progress,
                                             processor=processor_of(lm) if vlm else None)
        entry = {"name": name, "model": lm.name, "path": lm.path, "key": key, "n_layers": len(sites),
                 "inputs": "image+text" if vlm else "text"}
        entry.update(layer_separability(residual, neurons, labels, mask=mask, random_mask=random_mask,
                                        test_frac=config.test_frac, seed=config.seed, n_splits=config.n_splits,
                                        l2=config.l2, max_iter=config.probe_max_iter))
        entry["time_s"] = time.perf_counter() - t0
        result["models"].append(entry)
        write_json(path, result)  # after every model: a resumed run skips the finished ones
        del residual, neurons
        if owned:
            del lm
            gc.collect()
    write_json(path, result)
    return result


# --------------------------------------------------------------------------- CLI
def cmd_analyze(args) -> int:
    from safeneuron.cli import config_from_args

    config = config_from_args(AnalyzeConfig, args)
    result = analyze(config, args.out, progress=not args.no_progress)
    print(analysis_summary(result))
    print(f"\nartifacts: {Path(args.out).resolve()}")
    return 0


def analysis_summary(result: Analysis) -> str:
    """A short text summary of an analysis."""
    lines = []
    if result.layer_distribution:
        for row in result.layer_distribution["rows"]:
            fr = row["fraction"]
            peak = int(np.argmax(fr)) if fr else 0
            lines.append(f"{row['name']}: {row['n_layers']} layers, {sum(row['selected'])} safety neurons "
                         f"({result.layer_distribution['set']}); densest layer {peak} ({fr[peak]:.2%} of its neurons)")
    if result.categories:
        ov = result.categories["overlap"]
        lines.append(f"categories: {len(result.categories['categories'])}; overlap ratio at k=2: "
                     f"{_fmt(ov['mean'][1])}, at k={ov['k'][-1]}: {_fmt(ov['mean'][-1])}; "
                     f"{ov['shared_all']} neurons shared by all")
    if result.separability:
        sep = result.separability
        lines.append(f"probe accuracy (held-out, {sep['n_harmful']}+{sep['n_harmless']} prompts, "
                     f"pooling {sep['position']}):")
        lines.append(f"{'model':<16}{'best residual':>16}{'best neurons':>14}{'safety (all)':>14}{'random (all)':>14}")
        for m in sep["models"]:
            both = m.get("all_layers", {})
            lines.append(f"{m['name']:<16}{_fmt(_best(m.get('residual'))):>16}{_fmt(_best(m.get('neurons'))):>14}"
                         f"{_fmt(both.get('safety_neurons')):>14}{_fmt(both.get('random_neurons')):>14}")
    return "\n".join(lines) or "nothing to analyse: give --identify DIR and/or a model"


def _best(values) -> float | None:
    values = [v for v in (values or []) if v is not None]
    return max(values) if values else None


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def register_cli(subparsers) -> None:
    """Add ``safeneuron analyze``."""
    from safeneuron.cli import add_config_flags

    p = subparsers.add_parser("analyze", help="layer distribution, category overlap and layer-wise separability")
    add_config_flags(p, AnalyzeConfig)
    p.add_argument("--out", default="analysis", help="output directory (default: analysis)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_analyze)
