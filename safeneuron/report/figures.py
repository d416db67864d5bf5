"""Figures of the analyses and the evaluation, drawn with matplotlib's Agg canvas.

Every ``plot_*`` function takes the JSON an artifact holds (``identify.json``,
``analysis/*.json``, ``evaluate/results.json``, align metrics) and returns a
:class:`matplotlib.figure.Figure`; :func:`save` writes it as a PNG atomically and
:func:`png_bytes` renders it in memory. Figures are built without pyplot, so no
global state or display backend is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from safeneuron.artifacts import atomic_path
from safeneuron.evaluation.metrics import curve_area

__all__ = [
    "save",
    "png_bytes",
    "model_color",
    "plot_layer_counts",
    "plot_layer_distribution",
    "plot_category_composition",
    "plot_category_overlap",
    "plot_separability",
    "plot_robustness",
    "plot_asr_protocol",
    "plot_refusal_capability",
    "plot_align_metrics",
]

DPI = 110
CHANCE_COLOR = "#999999"
STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "legend.fontsize": 9,
    "legend.frameon": False,
}
#: Colours for the usual model names; others cycle through a qualitative palette.
_NAMED_COLORS = (("safeneuron", "#d1495b"), ("sn-tune", "#8f5db7"), ("sn_tune", "#8f5db7"), ("dpo", "#2e6fba"),
                 ("base", "#6c6c6c"), ("original", "#6c6c6c"))
_PALETTE = ["#2a9d8f", "#e9a23b", "#5c8001", "#9c6644", "#577590", "#f28482", "#84a59d", "#b5838d"]
_CATEGORY_PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
                     "#9c755f", "#bab0ac", "#1b9e77", "#7570b3", "#66a61e", "#e6ab02", "#a6761d", "#666666"]


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1, **kw):
    """A figure (inches) with an Agg canvas and a 2-D array of axes."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def _styled(fn):
    """Draw under the report's rc style (read when artists are made, so the whole function runs in it)."""
    import functools
    import matplotlib

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (atomically); returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def png_bytes(fig: Figure) -> bytes:
    """The PNG encoding of ``fig``."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def model_color(name: str, index: int = 0) -> str:
    """A stable colour per model: base grey, plain DPO blue, safeneuron red, others cycled."""
    low = name.lower()
    for key, color in _NAMED_COLORS:
        if key in low:
            return color
    return _PALETTE[index % len(_PALETTE)]


def pretty(name: str) -> str:
    """A label from an identifier: ``weapons_explosives`` -> ``weapons explosives``, ``time_s`` -> ``time (s)``."""
    if name.endswith("_s"):
        return name[:-2].replace("_", " ").strip() + " (s)"
    return name.replace("_", " ").strip()


def _no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#777777")
    ax.set_xticks([])
    ax.set_yticks([])


# --------------------------------------------------------------------------- identification
@_styled
def plot_layer_counts(manifest: Mapping, sets: Sequence[str] = ("es", "sas", "union")) -> Figure:
    """Safety neurons per layer (% of the layer's neurons) for each selected set, from ``identify.json``."""
    per_layer = manifest["selected_per_layer"]
    d_ff = manifest["d_ff"]
    sets = [s for s in sets if s in manifest.get("sets", sets)]
    n = len(per_layer)
    fig, axes = _figure(max(6.0, min(12.0, 0.32 * n + 3)), 3.4)
    ax = axes[0, 0]
    x = np.arange(n)
    width = 0.8 / max(1, len(sets))
    colors = {"es": "#4e79a7", "sas": "#f28e2b", "union": "#59a14f", "probe_gate": "#4e79a7", "probe_up": "#f28e2b"}
    labels = {"es": "ES (effect size)", "sas": "SAS (activation shift)", "union": "union (safety neurons)"}
    for i, s in enumerate(sets):
        values = [100.0 * counts.get(s, 0) / d_ff for counts in per_layer.values()]
        ax.bar(x + (i - (len(sets) - 1) / 2) * width, values, width, label=labels.get(s, s), color=colors.get(s))
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons selected (% of layer)")
    ax.set_xticks(x[:: max(1, n // 16)])
    ax.set_xlim(-0.6, n - 0.4)
    top = max([100.0 * c.get(s, 0) / d_ff for c in per_layer.values() for s in sets] + [1.0])
    ax.set_ylim(0, 1.3 * top)  # room for the legend
    ax.legend(loc="upper right", ncols=len(sets))
    ax.set_title(f"Safety neurons per layer ({manifest.get('model', '?')}, {d_ff} neurons per layer)")
    return fig


@_styled
def plot_layer_distribution(distribution: Mapping) -> Figure:
    """Heatmap: rows are models or rounds, columns the normalised depth 0..1; colour = % of a layer selected."""
    rows = distribution["rows"]
    height = 1.2 + 0.42 * max(1, len(rows))
    fig, axes = _figure(9.0, max(2.4, height))
    ax = axes[0, 0]
    if not rows:
        _no_data(ax)
        return fig
    vmax = max([100.0 * max(r["fraction"] or [0]) for r in rows] + [1e-9])
    cmap = LinearSegmentedColormap.from_list("safeneuron", ["#f7f7f7", "#fdd49e", "#ef6548", "#7f0000"])
    mesh = None
    for i, row in enumerate(rows):
        values = 100.0 * np.asarray(row["fraction"], dtype=float)[None, :]
        mesh = ax.pcolormesh(row["depth_edges"], [i - 0.45, i + 0.45], values, cmap=cmap, vmin=0, vmax=vmax,
                             edgecolors="white", linewidth=0.3)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r['name']} ({r['n_layers']} layers)" for r in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, 1)
    ax.grid(False)
    ax.spines[["top", "right"]].set_visible(True)
    ax.set_xlabel("normalised depth (0 = first layer, 1 = last layer)")
    cbar = fig.colorbar(mesh, ax=ax, pad=0.01)
    cbar.set_label(f"{distribution.get('set', 'union')} neurons (% of layer)")
    ax.set_title("Where the safety neurons sit")
    return fig


# --------------------------------------------------------------------------- categories
@_styled
def plot_category_composition(categories: Mapping) -> Figure:
    """Stacked bars: safety neurons per layer, split by harm category (``categories.json``)."""
    cats = categories["categories"]
    n = len(categories["layers"])
    fig, axes = _figure(max(7.0, min(13.0, 0.3 * n + 5)), 3.8)
    ax = axes[0, 0]
    x = np.arange(n)
    bottom = np.zeros(n)
    for i, c in enumerate(cats):
        values = np.asarray(categories["counts"][c], dtype=float)
        ax.bar(x, values, 0.8, bottom=bottom, label=pretty(c), color=_CATEGORY_PALETTE[i % len(_CATEGORY_PALETTE)])
        bottom += values
    if "shared_all" in categories:
        ax.plot(x, categories["shared_all"], "k_", markersize=12, markeredgewidth=2, label="shared by all categories")
    ax.set_xlabel("layer")
    ax.set_ylabel("safety neurons (count)")
    ax.set_xticks(x[:: max(1, n // 16)])
    ax.set_xlim(-0.6, n - 0.4)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Safety neurons per layer by harm category")
    return fig


@_styled
def plot_category_overlap(categories: Mapping) -> Figure:
    """Overlap ratio of shared safety neurons against the number of categories, with its band."""
    ov = categories["overlap"]
    fig, axes = _figure(6.4, 3.8)
    ax = axes[0, 0]
    k = np.asarray(ov["k"], dtype=float)

    def arr(key):
        return np.asarray([np.nan if v is None else v for v in ov[key]], dtype=float)

    lo, hi = ov.get("band_percentiles", [10, 90])
    ax.fill_between(k, arr("low"), arr("high"), color="#d1495b", alpha=0.2, linewidth=0,
                    label=f"{lo:g}-{hi:g} percentile over {ov['n_orders']} category orders")
    ax.plot(k, arr("mean"), "o-", color="#d1495b", label="mean over orders")
    last = ov["mean"][-1]
    if last is not None:
        shared = ov["shared_all"]
        ax.text(0.98, 0.74, f"at k = {int(k[-1])}: {last:.2f}\n{shared} neuron{'s' if shared != 1 else ''} "
                f"shared by all categories", transform=ax.transAxes, ha="right", va="top", fontsize=9)
    ax.set_xlabel("number of harm categories k")
    ax.set_ylabel("|shared by first k| / mean set size")
    ax.set_xticks(k)
    ax.set_ylim(0, 1.08)
    ax.legend(loc="upper right")
    ax.set_title("Overlap ratio of shared safety neurons")
    return fig


# --------------------------------------------------------------------------- separability
@_styled
def plot_separability(separability: Mapping) -> Figure:
    """Probe accuracy per layer: residual stream, all MLP neurons, safety vs random neurons."""
    models = separability.get("models", [])
    has_mask = any("safety_neurons" in m for m in models)
    panels = [("residual", "residual stream"), ("neurons", "all MLP neurons")]
    if has_mask:
        panels.append(("safety_neurons", "safety neurons vs as many random ones"))
    fig, axes = _figure(4.3 * len(panels), 3.6, ncols=len(panels), sharey=True)
    for ax, (key, title) in zip(axes[0], panels):
        drawn = False
        for i, m in enumerate(models):
            color = model_color(m["name"], i)
            values = m.get(key)
            if values is None:
                continue
            y = np.asarray([np.nan if v is None else 100.0 * v for v in values], dtype=float)
            ax.plot(np.arange(len(y)), y, "-", marker="o", markersize=3, color=color, label=m["name"])
            drawn = True
            if key == "safety_neurons" and m.get("random_neurons") is not None:
                r = np.asarray([np.nan if v is None else 100.0 * v for v in m["random_neurons"]], dtype=float)
                ax.plot(np.arange(len(r)), r, ":", marker=".", markersize=3, color=color)
        ax.axhline(50, color=CHANCE_COLOR, linestyle="--", linewidth=1)
        ax.text(0.01, 50.8, "chance", color=CHANCE_COLOR, fontsize=8, transform=ax.get_yaxis_transform())
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not drawn:
            _no_data(ax)
    axes[0, 0].set_ylabel("held-out probe accuracy (%)")
    lowest = min([100.0 * v for m in models for key, _ in panels for v in (m.get(key) or []) if v is not None]
                 + [100.0 * v for m in models for v in (m.get("random_neurons") or []) if v is not None] + [40.0])
    axes[0, 0].set_ylim(max(0.0, min(40.0, 10 * np.floor(lowest / 10))), 102)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if has_mask:
        from matplotlib.lines import Line2D

        handles += [Line2D([], [], color="#444444", linestyle="-"), Line2D([], [], color="#444444", linestyle=":")]
        labels += ["safety neurons (right panel)", "as many random neurons (right panel)"]
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 5))
    fig.suptitle(f"Harmful vs harmless: linear separability per layer "
                 f"({separability.get('n_harmful', '?')} + {separability.get('n_harmless', '?')} prompts, "
                 f"{int(round(100 * separability.get('test_frac', 0.3)))}% held out)")
    return fig


# --------------------------------------------------------------------------- evaluation
def _curve_percent(curve: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Curve points ``[frac, asr]`` (fractions in [0, 1]) as percentages, sorted by fraction."""
    pts = sorted((float(f), float(a)) for f, a in curve if f is not None and a is not None)
    if not pts:
        return np.zeros(0), np.zeros(0)
    f, a = np.asarray(pts).T
    return 100.0 * f, 100.0 * a


@_styled
def plot_robustness(results: Mapping) -> Figure:
    """ASR against the share of MLP neurons pruned (one line per model) from ``results.json``."""
    fig, axes = _figure(6.8, 4.3)
    ax = axes[0, 0]
    drawn = False
    for i, m in enumerate(results.get("models", [])):
        f, a = _curve_percent(m.get("curve") or [])
        if not len(f):
            continue
        area = m["curve_area"] if m.get("curve_area") is not None else curve_area(m["curve"])
        label = m["name"] + (f" (mean ASR {100 * area:.0f}%)" if area is not None else "")
        ax.plot(f, a, "o-", color=model_color(m["name"], i), label=label)
        drawn = True
    if not drawn:
        _no_data(ax, "no pruning curve in results.json")
        return fig
    ax.set_xscale("symlog", linthresh=0.1, linscale=0.5)
    ticks = sorted({float(t) for m in results["models"] for t in _curve_percent(m.get("curve") or [])[0]})
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_ylim(-3, 103)
    score = next((m.get("curve_score") for m in results["models"] if m.get("curve_score")), None)
    ax.set_xlabel(f"MLP neurons pruned by the attacker (% of all, top by {score or 'safety score'})")
    ax.set_ylabel("attack success rate (%)")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=3)
    ax.set_title("Robustness to the neuron-pruning attack (lower is safer)")
    return fig


@_styled
def plot_attack_profile(results: Mapping) -> Figure:
    """The attack profile: one panel per attack (ASR against its budget, 95 % intervals as bars), one line per
    model, from ``results.json`` ``attacks``; each model's plain ASR as a dotted line of its colour."""
    models = results.get("models", [])
    kinds = list(dict.fromkeys(k for m in models for k, r in (m.get("attacks") or {}).items() if r.get("points")))
    if not kinds:
        fig, axes = _figure(6.8, 3.0)
        _no_data(axes[0, 0], "no attack profile in results.json")
        return fig
    ncols = min(3, len(kinds))
    nrows = -(-len(kinds) // ncols)
    fig, axes = _figure(3.0 * ncols + 0.6, 2.7 * nrows + 0.8, ncols=ncols, nrows=nrows)
    for idx, kind in enumerate(kinds):
        ax = axes[idx // ncols, idx % ncols]
        labels: list[str] = []
        for i, m in enumerate(models):
            res = (m.get("attacks") or {}).get(kind) or {}
            pts = res.get("points") or []
            if not pts:
                continue
            for p in pts:
                if p["label"] not in labels:
                    labels.append(p["label"])
            x = [labels.index(p["label"]) for p in pts]
            y = [100 * p["asr"] for p in pts]
            err = [[100 * (p["asr"] - p["ci95"][0]) if p.get("ci95") else 0 for p in pts],
                   [100 * (p["ci95"][1] - p["asr"]) if p.get("ci95") else 0 for p in pts]]
            color = model_color(m["name"], i)
            ax.errorbar(x, y, yerr=err, fmt="o-", color=color, capsize=2, label=m["name"])
            plain = (m.get("asr") or {}).get("ori")
            if plain is not None:
                ax.axhline(100 * plain, color=color, linestyle=":", linewidth=1)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([lab.replace(", ", "\n") for lab in labels], fontsize=7)
        ax.set_ylim(-3, 103)
        ax.set_title(kind.replace("_", " "), fontsize=9)
        ax.set_ylabel("ASR (%)" if idx % ncols == 0 else "")
    for idx in range(len(kinds), nrows * ncols):
        axes[idx // ncols, idx % ncols].set_visible(False)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=max(1, len(names)))
    fig.suptitle("Attack profile: ASR against each attack's budget (dotted: plain ASR; lower is safer)", fontsize=10)
    return fig


@_styled
def plot_sweep(summary: Mapping) -> Figure:
    """The sweep's arms side by side (``sweep.json`` rows): plain, FULL-pruned and iterative ASR with 95 %
    intervals where known, and over-refusal, one group of markers per arm and seed."""
    rows = summary.get("rows", [])
    fig, axes = _figure(max(6.8, 0.9 * len(rows) + 2.5), 4.2)
    ax = axes[0, 0]
    if not rows:
        _no_data(ax, "no finished arm")
        return fig
    series = (("asr", "asr_ci95", "plain ASR", "o"), ("asr_full", "asr_full_ci95", "FULL-pruned ASR", "s"),
              ("asr_iterative", None, "iterative ASR", "^"), ("over_refusal", None, "over-refusal", "x"))
    for j, (key, ci_key, label, marker) in enumerate(series):
        xs, ys, lo, hi = [], [], [], []
        for i, r in enumerate(rows):
            if r.get(key) is None:
                continue
            xs.append(i + (j - 1.5) * 0.15)
            ys.append(100 * r[key])
            ci = r.get(ci_key) if ci_key else None
            lo.append(100 * (r[key] - ci[0]) if ci else 0)
            hi.append(100 * (ci[1] - r[key]) if ci else 0)
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt=marker, capsize=2, label=label)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['arm']}\n{r['model']} s{r['seed']}" if r["arm"] != "base" else "base" for r in rows],
                       fontsize=7)
    ax.set_ylim(-3, 103)
    ax.set_ylabel("rate (%)")
    ax.set_title("Sweep: arms on the same held-out prompts (lower ASR is safer)")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=4)
    return fig


_ASR_COLUMNS = (("ori", "original\n(no pruning)"), ("es", "ES set\npruned"), ("sas", "SAS set\npruned"),
                ("full", "union (FULL)\npruned"))


@_styled
def plot_asr_protocol(results: Mapping) -> Figure:
    """ASR on the original model and after pruning the ES, SAS and union sets, per model, with 95% CIs."""
    models = [m for m in results.get("models", []) if any((m.get("asr") or {}).get(k) is not None for k, _ in _ASR_COLUMNS)]
    fig, axes = _figure(6.8, 4.1)
    ax = axes[0, 0]
    if not models:
        _no_data(ax, "no ASR in results.json")
        return fig
    x = np.arange(len(_ASR_COLUMNS))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        asr = m.get("asr") or {}
        ci = m.get("asr_ci95") or {}
        values = np.asarray([np.nan if asr.get(k) is None else 100.0 * asr[k] for k, _ in _ASR_COLUMNS])
        err = np.zeros((2, len(_ASR_COLUMNS)))
        for j, (k, _) in enumerate(_ASR_COLUMNS):
            bounds = ci.get(k)
            if bounds and asr.get(k) is not None and len(bounds) == 2 and None not in bounds:
                err[:, j] = [max(0.0, 100 * (asr[k] - bounds[0])), max(0.0, 100 * (bounds[1] - asr[k]))]
        ax.bar(x + (i - (len(models) - 1) / 2) * width, values, width, yerr=err, capsize=3,
               color=model_color(m["name"], i), label=m["name"], error_kw={"elinewidth": 1, "ecolor": "#333333"})
    ax.set_xticks(x)
    ax.set_xticklabels([label for _, label in _ASR_COLUMNS])
    ax.set_ylabel("attack success rate (%)")
    ax.set_ylim(0, 105)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=min(4, len(models)))
    ax.set_title("Pruning the identified safety neurons (error bars: 95% CI)")
    return fig


_CAPABILITY_PANELS = (
    ("over_refusal", "over-refusal (%)", "refused harmless prompts, lower is better", 100.0),
    ("mc_accuracy", "multiple-choice accuracy (%)", "higher is better", 100.0),
    ("perplexity", "perplexity", "on harmless text, lower is better", 1.0),
    ("redteam_compliance", "red-team compliance (%)", "writes attack prompts, lower is better", 100.0),
)


@_styled
def plot_refusal_capability(results: Mapping) -> Figure:
    """Bars per model for over-refusal, MC accuracy, perplexity and red-team compliance (those measured)."""
    models = results.get("models", [])
    panels = [p for p in _CAPABILITY_PANELS if any(m.get(p[0]) is not None for m in models)]
    fig, axes = _figure(max(4.0, 3.3 * max(1, len(panels))), 3.5, ncols=max(1, len(panels)))
    if not panels:
        _no_data(axes[0, 0], "no over-refusal or capability numbers in results.json")
        return fig
    for ax, (key, label, note, scale) in zip(axes[0], panels):
        names = [m["name"] for m in models]
        values = [np.nan if m.get(key) is None else scale * m[key] for m in models]
        bars = ax.bar(range(len(models)), values, 0.7, color=[model_color(n, i) for i, n in enumerate(names)])
        for rect, v in zip(bars, values):
            if np.isfinite(v):
                ax.annotate(f"{v:.1f}" if scale == 100.0 else f"{v:.2f}", (rect.get_x() + rect.get_width() / 2, v),
                            ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
            else:
                ax.annotate("n/a", (rect.get_x() + rect.get_width() / 2, 0), ha="center", va="bottom", fontsize=8,
                            color="#777777")
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(names, rotation=20 if len(models) > 3 else 0, ha="right" if len(models) > 3 else "center")
        ax.set_title(f"{label}\n{note}", fontsize=10)
        finite = [v for v in values if np.isfinite(v)]
        if scale == 100.0:
            ax.set_ylim(0, max(100.0 if key == "mc_accuracy" else 10.0, 1.15 * max(finite or [0])))
        else:
            ax.set_ylim(0, 1.15 * max(finite or [1]))
    return fig


# --------------------------------------------------------------------------- alignment
def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _numeric_keys(rounds: Sequence[Mapping]) -> list[str]:
    keys: dict[str, None] = {}
    for r in rounds:
        for k, v in r.items():
            if _is_number(v) and k != "round":
                keys[k] = None
    return list(keys)


def pick_metric_keys(rounds_by_mode: Mapping[str, Sequence[Mapping]], limit: int = 4) -> list[str]:
    """The flat metrics worth plotting: losses, margins, accuracies, neurons frozen, time (in that order)."""
    keys = list(dict.fromkeys(k for rounds in rounds_by_mode.values() for k in _numeric_keys(rounds)))
    order = ("loss", "margin", "accurac", "frozen", "_s")
    ranked = [k for word in order for k in keys if word in k.lower()]
    return list(dict.fromkeys(ranked))[:limit]


def _step_series(rounds: Sequence[Mapping], key: str) -> tuple[list[float], list[float], list[float]]:
    """``key`` from each round's trainer ``log_history`` on one step axis; also the round boundaries."""
    xs, ys, bounds, offset = [], [], [], 0.0
    for r in rounds:
        steps = [h for h in (r.get("log_history") or []) if _is_number(h.get(key))]
        last = offset
        for i, h in enumerate(steps):
            x = offset + float(h.get("step", i + 1))
            xs.append(x)
            ys.append(float(h[key]))
            last = max(last, x)
        if steps:
            bounds.append(last)
        offset = last
    return xs, ys, bounds[:-1]


@_styled
def plot_align_metrics(rounds_by_mode: Mapping[str, Sequence[Mapping]], keys: Sequence[str] | None = None) -> Figure:
    """Training per mode (``safeneuron``, ``dpo``, ...) from ``round_*/metrics.json``.

    With trainer logs (``log_history``): DPO loss and reward margin against the training
    step over all rounds (dashed lines: round boundaries), plus neurons frozen per round.
    Otherwise one panel per flat numeric metric (``keys``, or picked), against the round.
    """
    has_logs = any(r.get("log_history") for rounds in rounds_by_mode.values() for r in rounds)
    if has_logs and keys is None:
        panels = [("loss", "DPO loss"), ("rewards/margins", "reward margin (chosen - rejected)")]
        frozen = any(_is_number(r.get("neurons_frozen")) and r["neurons_frozen"] > 0
                     for rounds in rounds_by_mode.values() for r in rounds)
        fig, axes = _figure(3.6 * (len(panels) + frozen), 3.2, ncols=len(panels) + frozen)
        for ax, (key, title) in zip(axes[0], panels):
            for i, (mode, rounds) in enumerate(rounds_by_mode.items()):
                xs, ys, bounds = _step_series(rounds, key)
                if xs:
                    ax.plot(xs, ys, "-", color=model_color(mode, i), label=mode, linewidth=1.4)
                    for b in bounds:
                        ax.axvline(b, color=model_color(mode, i), linestyle="--", linewidth=0.8, alpha=0.6)
            ax.set_title(title)
            ax.set_xlabel("training step (all rounds)")
        if frozen:
            ax = axes[0, -1]
            modes = list(rounds_by_mode)
            n_rounds = max(len(r) for r in rounds_by_mode.values())
            width = 0.8 / max(1, len(modes))
            for i, mode in enumerate(modes):
                rounds = rounds_by_mode[mode]
                x = np.asarray([r.get("round", j + 1) for j, r in enumerate(rounds)], dtype=float)
                y = [r.get("neurons_frozen") or 0 for r in rounds]
                ax.bar(x + (i - (len(modes) - 1) / 2) * width, y, width, color=model_color(mode, i), label=mode)
            ax.set_title("safety neurons frozen")
            ax.set_xlabel("round")
            ax.set_xticks(range(1, n_rounds + 1))
        axes[0, 0].legend(loc="best")
        return fig
    keys = list(keys) if keys is not None else pick_metric_keys(rounds_by_mode)
    fig, axes = _figure(max(4.0, 3.3 * max(1, len(keys))), 3.2, ncols=max(1, len(keys)))
    if not keys:
        _no_data(axes[0, 0], "no numeric round metrics")
        return fig
    for ax, key in zip(axes[0], keys):
        for i, (mode, rounds) in enumerate(rounds_by_mode.items()):
            pts = [(r.get("round", j + 1), r[key]) for j, r in enumerate(rounds) if _is_number(r.get(key))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, "o-", color=model_color(mode, i), label=mode)
        ax.set_title(pretty(key))
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].legend(loc="best")
    return fig
