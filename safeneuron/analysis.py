"""Where safety neurons sit, what harm categories share, and how separable each layer is.

Three analyses, each a pure function on artifacts or tensors (the ``analyze`` stage,
:mod:`safeneuron.stages.analyze`, runs them and writes their artifacts):

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

"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from safeneuron.activations import pool_tokens
from safeneuron.arch import find_mlps
from safeneuron.artifacts import ArtifactError, read_json
from safeneuron.hooks import neuron_hooks
from safeneuron.inputs import forward_without_logits, prompt_batches
from safeneuron.masks import SafetyNeuronMask

logger = logging.getLogger(__name__)

__all__ = [
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
]

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


def layer_fractions(manifest: Mapping, neuron_set: str = "union") -> list[float]:
    """Share of each layer's neurons in ``neuron_set``, in layer order, from an ``identify.json``.

    Raises:
        ArtifactError: the manifest has no such set or lacks the per-layer counts.
    """
    per_layer = manifest.get("selected_per_layer")
    d_ff = manifest.get("d_ff")
    if not per_layer or not d_ff:
        raise ArtifactError("identify.json lacks selected_per_layer or d_ff: not an identification manifest?")
    if neuron_set not in manifest.get("sets", [neuron_set]):
        raise ArtifactError(f"identification has no {neuron_set!r} set (sets: {', '.join(manifest.get('sets', []))})")
    return [counts.get(neuron_set, 0) / d_ff for counts in per_layer.values()]


def layer_distribution(sources: Mapping[str, str | Path | Mapping], neuron_set: str = "union") -> dict:
    """Layer-wise share of safety neurons for several identifications.

    Args:
        sources: row name -> identification directory, ``identify.json`` path or manifest.
        neuron_set: ``union``, ``es`` or ``sas``.

    Returns:
        ``{"set", "rows": [{"name", "source", "model", "n_layers", "d_ff", "layers",
        "selected", "fraction", "depth_edges"}]}``; ``fraction[i]`` is the share of
        layer i's neurons selected, and layer i spans ``depth_edges[i]..depth_edges[i+1]``
        of the normalised depth 0 (first layer) .. 1 (last layer's end).
    """
    rows = []
    for name, source in sources.items():
        manifest, where = _manifest(source)
        fractions = layer_fractions(manifest, neuron_set)
        n_layers = len(fractions)
        rows.append({
            "name": name,
            "source": where,
            "model": manifest.get("model"),
            "n_layers": n_layers,
            "d_ff": manifest.get("d_ff"),
            "layers": list(manifest["selected_per_layer"]),
            "selected": [counts.get(neuron_set, 0) for counts in manifest["selected_per_layer"].values()],
            "fraction": fractions,
            "depth_edges": [i / n_layers for i in range(n_layers + 1)],
        })
    return {"set": neuron_set, "rows": rows}


# --------------------------------------------------------------------------- 2. categories
def load_category_masks(identify_dir: str | Path, neuron_set: str = "union") -> dict[str, SafetyNeuronMask]:
    """Per-category safety-neuron sets of an ``identify --by-category`` run (``{}`` when none)."""
    identify_dir = Path(identify_dir)
    manifest = read_json(identify_dir / "identify.json")
    return {category: SafetyNeuronMask.load(identify_dir / info["file"], neuron_set=neuron_set)
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


def collect_features(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    position: str = "max",
    span: str = "prompt",
    batch_size: int = 16,
    max_length: int = 512,
    progress: bool = True,
    processor=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pooled residual stream and MLP neuron activations of every layer, in one forward pass.

    With ``processor`` (a VLM's), ``prompts`` are image+text
    :class:`~safeneuron.data.images.MultimodalPrompt` s batched by it (image tokens included in
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
        pooled = pool_tokens(acts.detach(), state["mask"], position, state["span"]).cpu()
        if site.name not in neurons:
            neurons[site.name] = torch.empty(n, pooled.shape[-1], dtype=torch.float32)
        neurons[site.name][state["idx"]] = pooled
        return None

    was_training = model.training
    model.eval()
    try:
        with neuron_hooks(model, record, sites), torch.no_grad():
            batches = prompt_batches(processor if processor is not None else tokenizer, prompts, batch_size,
                                     max_length=max_length, model=model, spans=span != "prompt")
            for batch in tqdm(batches, desc="features", unit="batch", disable=not progress):
                state["mask"] = batch.inputs["attention_mask"]
                state["span"] = batch.spans.get(span)  # None for "prompt" and for image+text prompts
                state["idx"] = torch.tensor(batch.indices)
                hidden = forward_without_logits(model, batch.inputs, output_hidden_states=True).hidden_states[1:]
                if residual is None:
                    residual = torch.empty(len(hidden), n, hidden[0].shape[-1], dtype=torch.float32)
                for layer, h in enumerate(hidden):
                    residual[layer, state["idx"]] = pool_tokens(h, state["mask"], position, state["span"]).cpu()
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
