"""Build the HTML report and the markdown summary from whatever artifacts a directory holds.

Layout read (the main job's; every part optional)::

    DIR/run.json                 settings, stage timings, versions, quick flag
    DIR/identify/identify.json   safety neurons per layer (+ categories/)
    DIR/evaluate/results.json    the comparison (ASR, pruning curve, over-refusal, capability)
    DIR/analysis/*.json          layer distribution, category overlap, separability
    DIR/align/<mode>/align.json, round_<r>/metrics.json, round_<r>/identify/

A directory of a single stage works too (``identify.json``, ``results.json``,
``analysis.json`` or ``align.json`` directly inside it). Each section is skipped
when its artifact is missing; an unreadable artifact becomes a note in the report,
never a crash. Figures are PNGs embedded as base64, so ``report.html`` is one file.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from safeneuron import __version__
from safeneuron.analysis import category_composition, find_identifications, layer_distribution, load_category_masks, \
    overlap_curve
from safeneuron.artifacts import ArtifactError, read_json, read_jsonl, write_text
from safeneuron.errors import SafeneuronError
from safeneuron.evaluation.metrics import curve_area
from safeneuron.report import figures

logger = logging.getLogger(__name__)

__all__ = ["build_report", "ReportError", "RunArtifacts", "locate"]

TEMPLATE = Path(__file__).with_name("template.html")


class ReportError(SafeneuronError):
    """The report cannot be built (no such directory, nothing to report)."""


def read_object(path: Path) -> dict:
    """A JSON manifest that must be an object (``run.json``, ``results.json``, ...): anything else is an
    :class:`ArtifactError` the report lists among the artifacts it could not read."""
    data = read_json(path)
    if not isinstance(data, Mapping):
        raise ArtifactError(f"{path}: expected a JSON object (a safeneuron manifest), got a {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- locating artifacts
@dataclass
class RunArtifacts:
    """Paths of the artifacts found in a directory (None / empty when absent)."""

    root: Path
    run_json: Path | None = None
    identify: Path | None = None
    results: Path | None = None
    analysis: Path | None = None
    align: dict[str, Path] = field(default_factory=dict)
    identifications: dict[str, Path] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.run_json or self.identify or self.results or self.analysis or self.align)


def locate(run_dir: str | Path) -> RunArtifacts:
    """Find the artifacts of a main-job directory, or of a single stage's directory."""
    root = Path(run_dir)
    found = RunArtifacts(root)

    def first(*candidates: Path) -> Path | None:
        return next((c for c in candidates if c.is_file()), None)

    found.run_json = first(root / "run.json")
    ident = first(root / "identify" / "identify.json", root / "identify.json")
    found.identify = ident.parent if ident else None
    found.results = first(root / "evaluate" / "results.json", root / "results.json")
    analysis_dir = root / "analysis" if (root / "analysis").is_dir() else root
    if any((analysis_dir / name).is_file() for name in ("layer_distribution.json", "categories.json",
                                                         "separability.json", "analysis.json")):
        found.analysis = analysis_dir
    if (root / "align").is_dir():
        order = {"safeneuron": 0, "dpo": 1, "sn-tune": 2}
        for mode in sorted((p for p in (root / "align").iterdir() if p.is_dir()), key=lambda p: (order.get(p.name, 9), p.name)):
            if (mode / "align.json").is_file() or any(mode.glob("round_*/metrics.json")):
                found.align[mode.name] = mode
    elif (root / "align.json").is_file() or any(root.glob("round_*/metrics.json")):
        found.align[root.name or "align"] = root
    found.identifications = find_identifications(root)
    if found.identify is not None and not found.identifications:
        found.identifications = {"base": found.identify}
    return found


# --------------------------------------------------------------------------- formatting
def _esc(value) -> str:
    return html.escape(str(value))


def _pct(value, digits: int = 1) -> str:
    return "–" if value is None else f"{100.0 * value:.{digits}f}%"


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _ci(bounds) -> str:
    if not bounds or len(bounds) != 2 or None in bounds:
        return ""
    return f"[{100 * bounds[0]:.1f}, {100 * bounds[1]:.1f}]"


def _cell(text: str, extra: str = "", cls: str = "") -> str:
    inner = _esc(text) if text != "–" else '<span class="na">–</span>'
    if extra:
        inner += f' <span class="ci">{_esc(extra)}</span>'
    return f'<td class="{cls}">{inner}</td>' if cls else f"<td>{inner}</td>"


def _html_table(headers: Sequence[str], rows: Iterable[Sequence], text_cols: int = 1) -> str:
    """Rows of plain strings or ``(text, ci)`` pairs; the first ``text_cols`` columns are left-aligned."""
    head = "".join(f'<th class="text">{_esc(h)}</th>' if i < text_cols else f"<th>{_esc(h)}</th>"
                   for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            text, extra = value if isinstance(value, tuple) else (value, "")
            cells.append(_cell(str(text), extra, "text" if i < text_cols else ""))
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _md_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
    def text(value):
        t, extra = value if isinstance(value, tuple) else (value, "")
        return (f"{t} {extra}" if extra else str(t)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|"]
    lines += ["| " + " | ".join(text(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _img(fig, caption: str) -> str:
    """Embed a figure as a base64 PNG with a caption."""
    data = base64.b64encode(figures.png_bytes(fig)).decode("ascii")
    alt = _esc(caption.split(".")[0])
    return (f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _flatten(obj, prefix: str = "") -> dict[str, object]:
    """Nested dicts as ``{"a.b.c": value}`` (lists kept as JSON text)."""
    out: dict[str, object] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)):
        out[prefix[:-1]] = json.dumps(obj)
    else:
        out[prefix[:-1]] = obj
    return out


# --------------------------------------------------------------------------- sections
@dataclass
class Section:
    """One part of the report: an anchor, a title, HTML and markdown bodies."""

    anchor: str
    title: str
    html: str
    md: str


def _section_settings(art: RunArtifacts) -> Section | None:
    if art.run_json is None:
        return None
    run = read_object(art.run_json)
    parts_html, parts_md = [], []
    top = {k: v for k, v in run.items() if not isinstance(v, (Mapping, list))}
    if top:
        rows = [(k, _num(v)) for k, v in top.items()]
        parts_html.append(_html_table(["setting", "value"], rows, text_cols=2))
        parts_md.append(_md_table(["setting", "value"], rows))
    timings = run.get("timings") or run.get("stage_timings") or run.get("stages")
    if isinstance(timings, Mapping) and timings:
        rows = []
        for stage, t in timings.items():
            seconds = t.get("wall_s", t.get("seconds", t.get("time_s"))) if isinstance(t, Mapping) else t
            status = t.get("status", "") if isinstance(t, Mapping) else ""
            rows.append((stage, "–" if seconds is None else f"{float(seconds):.1f} s", status or ""))
        parts_html.append("<h3>Stage timings</h3>" + _html_table(["stage", "wall time", "status"], rows))
        parts_md.append("Stage timings:\n\n" + _md_table(["stage", "wall time", "status"], rows))
    for key in ("settings", "config", "versions"):
        value = run.get(key)
        if isinstance(value, Mapping) and value:
            rows = [(k, _num(v)) for k, v in _flatten(value).items()]
            parts_html.append(f"<details><summary>{_esc(key)} ({_plural(len(rows), 'value')})</summary>"
                              + _html_table(["key", "value"], rows, text_cols=2) + "</details>")
    return Section("settings", "Settings", "\n".join(parts_html), "\n\n".join(parts_md))


def _section_neurons(art: RunArtifacts) -> Section | None:
    if art.identify is None and len(art.identifications) < 2:
        return None
    parts_html, parts_md = [], []
    if art.identify is not None:
        m = read_object(art.identify / "identify.json")
        sets = m.get("sets", [])
        intro = (f"Model <code>{_esc(m.get('model'))}</code> ({_esc(m.get('model_type'))}), method "
                 f"<b>{_esc(m.get('method'))}</b>, {_num(m.get('n_harmful'))} harmful and {_num(m.get('n_harmless'))} "
                 f"harmless prompts, token pooling <b>{_esc(m.get('position'))}</b>, thresholds "
                 f"τ<sub>ES</sub> = {_num(m.get('tau_es'))}, τ<sub>SAS</sub> = {_num(m.get('tau_sas'))}; "
                 f"{_num(m.get('n_layers'))} MLP layers × {_num(m.get('d_ff'))} neurons = {_num(m.get('n_neurons'))} neurons.")
        parts_html.append(f"<p>{intro}</p>")
        rows = [(s, _num(m.get("selected_total", {}).get(s)), _pct(m.get("selected_fraction", {}).get(s), 2))
                for s in sets]
        parts_html.append(_html_table(["set", "neurons selected", "share of all neurons"], rows))
        parts_md.append(f"Model `{m.get('model')}`, {m.get('method')}, {m.get('n_harmful')} harmful / "
                        f"{m.get('n_harmless')} harmless prompts, pooling {m.get('position')}, "
                        f"tau_ES={m.get('tau_es')}, tau_SAS={m.get('tau_sas')}.\n\n"
                        + _md_table(["set", "neurons selected", "share of all neurons"], rows))
        if m.get("expected_false_selections") is not None:
            expected = m["expected_false_selections"]
            shown = "< 0.001" if expected < 1e-3 else f"{expected:.3g}"
            note = (f"Expected false selections by the ES threshold under no real difference: at most "
                    f"{shown} neurons (bound n·(1−Φ(τ<sub>T</sub>)), "
                    f"τ<sub>T</sub> = {m.get('tau_t', 0):.2f}).")
            parts_html.append(f'<p class="note">{note}</p>')
        if m.get("verification"):
            html, md = _verification(m["verification"])
            parts_html.append(html)
            parts_md.append(md)
        if m.get("selected_per_layer") and m.get("d_ff"):
            parts_html.append(_img(figures.plot_layer_counts(m),
                                   "Share of each layer's MLP neurons selected by the effect-size (ES) criterion, "
                                   "the activation-shift (SAS) criterion and their union (the safety neurons)."))
    # The run's own identifications (base and every round) first; else what the analysis stage compared.
    distribution = None
    if len(art.identifications) >= 2:
        distribution = layer_distribution(art.identifications)
    elif art.analysis is not None and (art.analysis / "layer_distribution.json").is_file():
        distribution = read_json(art.analysis / "layer_distribution.json")
    if distribution and len(distribution.get("rows", [])) >= 2:
        parts_html.append(_img(figures.plot_layer_distribution(distribution),
                               "Share of each layer's neurons selected, per model or alignment round, on a "
                               "normalised depth axis so that models of different depth line up."))
        rows = [(r["name"], _num(r["n_layers"]), _num(sum(r["selected"])),
                 f"{r['depth_edges'][max(range(len(r['fraction'])), key=r['fraction'].__getitem__)]:.2f}")
                for r in distribution["rows"]]
        parts_md.append("Layer distribution:\n\n" + _md_table(["identification", "layers", "safety neurons",
                                                                "depth of densest layer"], rows))
    return Section("neurons", "Safety neurons per layer", "\n".join(parts_html), "\n\n".join(parts_md))


def _verification(v: Mapping) -> tuple[str, str]:
    """The causal check of the identification: ASR plain, with the union pruned, with random neurons pruned."""
    rows = [(label, _num(v[key].get("pruned")), f"{_pct(v[key].get('rate'))} {_ci(v[key].get('ci95'))}",
             "" if key == "plain" else f"{v.get('mcnemar_p', {}).get(key, float('nan')):.3g}")
            for key, label in (("plain", "plain"), ("pruned", f"{v.get('neuron_set', 'union')} pruned"),
                               ("random", "as many random neurons pruned"))]
    headers = ["condition", "neurons pruned", "ASR [95 % CI]", "McNemar p vs plain"]
    intro = (f"Causal check on {v['harmful']['n']} held-out harmful prompts ({_esc(v['harmful']['source'])}), judge "
             f"{_esc(v.get('judge'))}: safety neurons raise the ASR when pruned, random neurons barely move it.")
    return (f"<p>{intro}</p>" + _html_table(headers, rows), intro + "\n\n" + _md_table(headers, rows))


def _asr_cell(m: Mapping, key: str):
    asr = (m.get("asr") or {}).get(key)
    return (_pct(asr), _ci((m.get("asr_ci95") or {}).get(key)))


def _worst_template(m: Mapping):
    templates = {k: v for k, v in (m.get("asr_templates") or {}).items() if v is not None}
    if not templates:
        return "–"
    name = max(templates, key=templates.get)
    return (_pct(templates[name]), name)


def _area(m: Mapping) -> float | None:
    """The robustness curve's mean ASR: results.json's ``curve_area`` when given, else computed."""
    return m["curve_area"] if m.get("curve_area") is not None else curve_area(m.get("curve") or [])


def _attacker(m: Mapping) -> str:
    att = m.get("attacker")
    if not isinstance(att, Mapping):
        return "–"
    mode = str(att.get("mode", "–"))
    if mode == "adaptive" and att.get("method"):
        return f"adaptive ({att['method']})"
    if mode == "given mask" and att.get("mask"):
        return f"given mask ({Path(str(att['mask'])).name})"
    return mode


def _comparison(results: Mapping) -> tuple[list[str], list[list], list[str], list[list]]:
    safety_headers = ["model", "judge", "attacker", "prompts (harmful / harmless)", "ASR original", "ASR, ES pruned",
                      "ASR, SAS pruned", "ASR, FULL pruned", "worst template ASR", "pruning curve mean ASR"]
    other_headers = ["model", "over-refusal", "MC accuracy", "perplexity", "red-team compliance",
                     "neurons pruned (ES / SAS / FULL)"]
    safety, other = [], []
    for m in results.get("models", []):
        counts = m.get("pruned_counts") or {}
        area = _area(m)
        safety.append([m.get("name", "?"), m.get("judge") or "–", _attacker(m),
                       f"{_num(m.get('n_harmful'))} / {_num(m.get('n_harmless'))}",
                       _asr_cell(m, "ori"), _asr_cell(m, "es"), _asr_cell(m, "sas"), _asr_cell(m, "full"),
                       _worst_template(m), _pct(area)])
        other.append([m.get("name", "?"), _pct(m.get("over_refusal")), _pct(m.get("mc_accuracy")),
                      _num(m.get("perplexity")), _pct(m.get("redteam_compliance")),
                      " / ".join(_num(counts.get(k)) for k in ("es", "sas", "full")) if counts else "–"])
    return safety_headers, safety, other_headers, other


def _section_comparison(art: RunArtifacts) -> Section | None:
    if art.results is None:
        return None
    results = read_object(art.results)
    if not isinstance(results, Mapping) or not isinstance(results.get("models"), list):
        raise ArtifactError(f"{art.results}: expected {{\"models\": [...]}}")
    sh, srows, oh, orows = _comparison(results)
    notes = []
    if results.get("wall_time_s") is not None:
        notes.append(f"evaluation wall time {float(results['wall_time_s']):.0f} s")
    notes += [f"{k}: {v}" for k, v in results.items()
              if k not in ("models", "wall_time_s") and not isinstance(v, (Mapping, list))]
    notes = "; ".join(notes)
    parts_html = [
        '<p class="explain">ASR (attack success rate) is the share of harmful prompts whose answer the judge '
        "rates as compliant. <i>Original</i> is the unmodified model; <i>ES / SAS / FULL pruned</i> are the same "
        "model after zeroing the neurons selected by effect size, by activation shift, or both. Attacker: "
        "<i>adaptive</i> identifies the neurons on the model under attack (the honest test); <i>given mask</i> "
        "reuses a fixed set. Small grey brackets: 95% confidence intervals. "
        "Worst template: the highest ASR over the jailbreak templates (its name beside it).</p>",
        "<h3>Safety</h3>", _html_table(sh, srows, text_cols=4),
        "<h3>Over-refusal and capability</h3>",
        '<p class="explain">Over-refusal: share of harmless (or safe-but-scary) prompts refused. MC accuracy: '
        "multiple-choice accuracy by log-likelihood. Perplexity on harmless text (lower is better). Red-team "
        "compliance: share of requests to write attack prompts that the model fulfils.</p>",
        _html_table(oh, orows),
    ]
    if notes:
        parts_html.append(f'<p class="note">{_esc(notes)}</p>')
    if isinstance(results.get("settings"), Mapping):
        flat = _flatten(results["settings"])
        parts_html.append(f"<details><summary>evaluation settings ({_plural(len(flat), 'value')})</summary>"
                          + _html_table(["key", "value"], [(k, _num(v)) for k, v in flat.items()], text_cols=2)
                          + "</details>")
    md = "Safety:\n\n" + _md_table(sh, srows) + "\n\nOver-refusal and capability:\n\n" + _md_table(oh, orows)
    return Section("comparison", "Comparison", "\n".join(parts_html), md)


def _section_multimodal(art: RunArtifacts) -> Section | None:
    """ASR and over-refusal on image+text inputs (results.json's ``*_multimodal`` keys, VLMs only)."""
    if art.results is None:
        return None
    models = read_object(art.results).get("models", [])
    shown = [m for m in models if m.get("asr_multimodal") or m.get("over_refusal_multimodal") is not None]
    if not shown:
        return None
    headers = ["model", "prompts (harmful / harmless)", "ASR original", "ASR, ES pruned", "ASR, SAS pruned",
               "ASR, FULL pruned", "over-refusal", "ASR original, text prompts"]
    rows = []
    for m in shown:
        asr, ci = m.get("asr_multimodal") or {}, m.get("asr_multimodal_ci95") or {}
        rows.append([m.get("name", "?"),
                     f"{_num(m.get('n_harmful_multimodal'))} / {_num(m.get('n_harmless_multimodal'))}",
                     *((_pct(asr.get(k)), _ci(ci.get(k))) for k in ("ori", "es", "sas", "full")),
                     (_pct(m.get("over_refusal_multimodal")), _ci(m.get("over_refusal_multimodal_ci95"))),
                     _asr_cell(m, "ori")])
    html_text = (
        '<p class="explain">The same measurements with an image in the prompt (vision-language models). Harmful: '
        "each harmful request typeset as an image of text, sent with a benign request to fill in the list it ends "
        "with (a FigStep-style typographic attack); the pruned columns zero the same ES / SAS / FULL sets as the "
        "text attack. Over-refusal: share of drawn scenes and charts with a harmless question that the model "
        "refuses. Small grey brackets: 95% confidence intervals.</p>" + _html_table(headers, rows, text_cols=2))
    return Section("multimodal", "Image+text inputs", html_text, _md_table(headers, rows))


def _section_robustness(art: RunArtifacts) -> Section | None:
    if art.results is None:
        return None
    results = read_object(art.results)
    models = results.get("models", [])
    has_curve = any(m.get("curve") for m in models)
    has_asr = any(any(v is not None for v in (m.get("asr") or {}).values()) for m in models)
    if not (has_curve or has_asr):
        return None
    parts = []
    if has_curve:
        parts.append(_img(figures.plot_robustness(results),
                          "Attack success rate after pruning the top x% of MLP neurons by safety score (x on a "
                          "log-like axis). A flat, low line means safety no longer hinges on a few neurons. The "
                          "legend gives the mean ASR over the pruned range (the curve's normalised area)."))
    if has_asr:
        parts.append(_img(figures.plot_asr_protocol(results),
                          "ASR on the original model and after pruning the ES set, the SAS set and their union "
                          "(FULL), with 95% confidence intervals."))
    md_rows = [(m.get("name", "?"), _pct(_area(m)),
                ", ".join(f"{100 * f:g}%: {_pct(a)}" for f, a in sorted(m.get("curve") or []) if a is not None) or "–")
               for m in models]
    md = _md_table(["model", "mean ASR over curve", "ASR by fraction pruned"], md_rows) if has_curve else ""
    return Section("robustness", "Robustness to neuron pruning", "\n".join(parts), md)


def _section_attacks(art: RunArtifacts) -> Section | None:
    """The attack profile: every attack of ``[evaluate.attacks]`` against its budget, per model."""
    if art.results is None:
        return None
    results = read_object(art.results)
    models = results.get("models", [])
    if not any(m.get("attacks") for m in models):
        return None
    html = _img(figures.plot_attack_profile(results),
                "Each panel is one attack, its budget on the x axis (neurons pruned, direction rank, prefill "
                "attempts, fine-tuning examples and epochs); 95% intervals as bars; dotted lines: each model's plain "
                "ASR. The table gives the utility each attack costs (KL of the harmless next-token distribution "
                "against the unattacked model, in nats; perplexity on harmless text).")
    rows = []
    for m in models:
        for kind, res in (m.get("attacks") or {}).items():
            if res.get("skipped"):
                rows.append((m["name"], kind, "skipped", res["skipped"], "–", "–"))
                continue
            for p in res.get("points", []):
                kl = "–" if p.get("kl") is None else f"{p['kl']:.3f}"
                ppl = "–" if p.get("perplexity") is None else f"{p['perplexity']:.2f}"
                rows.append((m["name"], kind, p["label"], f"{_pct(p['asr'])} (n={p['n']})", kl, ppl))
    md = _md_table(["model", "attack", "budget", "ASR", "KL (nats)", "perplexity"], rows)
    return Section("attacks", "Attack profile", html + _html_table(["model", "attack", "budget", "ASR", "KL (nats)",
                                                                   "perplexity"], rows, text_cols=3), md)


def _section_capability(art: RunArtifacts) -> Section | None:
    if art.results is None:
        return None
    results = read_object(art.results)
    keys = ("over_refusal", "mc_accuracy", "perplexity", "redteam_compliance")
    if not any(m.get(k) is not None for m in results.get("models", []) for k in keys):
        return None
    return Section("capability", "Over-refusal and capability",
                   _img(figures.plot_refusal_capability(results),
                        "Measured per model (n/a: not measured). Alignment should lower ASR without raising "
                        "over-refusal or perplexity, or lowering accuracy."), "")


#: Measurements whose samples the report shows, in this order, and how many answers of each.
SAMPLED = ("asr_ori", "asr_full", "iterative_round", "attack_", "template_", "over_refusal", "xstest")
SAMPLES_SHOWN = 2


def _section_samples(art: RunArtifacts) -> Section | None:
    """A few answers per model and measurement from ``samples/<model>/`` (the judged answers behind each rate):
    the counted ones first, so what the rate counts can be read."""
    if art.results is None:
        return None
    rows = []
    for m in read_object(art.results).get("models", []):
        folder = art.results.parent / (m.get("samples") or {}).get("dir", "-")
        if not (folder / "index.json").is_file():
            continue
        index = read_json(folder / "index.json")
        names = [n for prefix in SAMPLED for n in index if n.startswith(prefix)]
        for name in dict.fromkeys(names):
            records = read_jsonl(folder / index[name]["file"])
            records.sort(key=lambda r: not r["counted"])
            for r in records[:SAMPLES_SHOWN]:
                rows.append([m["name"], f"{name} ({index[name]['k']}/{index[name]['n']})", r["prompt"][:160],
                             r["response"][:240], r["verdict"]])
    if not rows:
        return None
    headers = ["model", "measurement (counted/n)", "request", "answer", "verdict"]
    note = ("<p>Sampled answers: up to two per measurement, counted ones first. Every answer, with its verdict and "
            "judge, is in <code>evaluate/samples/&lt;model&gt;/&lt;measurement&gt;.jsonl</code>.</p>")
    return Section("samples", "Sampled answers", note + _html_table(headers, rows, text_cols=5),
                   _md_table(headers, [[c.replace("|", "\\|").replace("\n", " ") for c in row] for row in rows]))


def _section_categories(art: RunArtifacts) -> Section | None:
    categories = None
    if art.analysis is not None and (art.analysis / "categories.json").is_file():
        categories = read_json(art.analysis / "categories.json")
    elif art.identify is not None and read_object(art.identify / "identify.json").get("categories"):
        masks = load_category_masks(art.identify)
        if len(masks) >= 2:
            categories = category_composition(masks)
            categories["overlap"] = overlap_curve([masks[c] for c in categories["categories"]])
    if not categories:
        return None
    ov = categories["overlap"]
    k2 = ov["mean"][1] if len(ov["mean"]) > 1 else None
    text = (f"{len(categories['categories'])} harm categories, identified separately (each category's harmful "
            f"prompts against all harmless prompts). Overlap ratio = neurons shared by the first k categories ÷ "
            f"their mean set size, averaged over {ov['n_orders']} category orders: "
            f"{_num(k2)} at k = 2, {_num(ov['mean'][-1])} at k = {ov['k'][-1]}; "
            f"{_num(ov['shared_all'])} neurons are shared by all categories. A curve that levels off above zero "
            f"shows a stable shared core of safety neurons.")
    parts = [f'<p class="explain">{_esc(text)}</p>',
             _img(figures.plot_category_composition(categories),
                  "Safety neurons per layer split by harm category; the black marks count the neurons every "
                  "category selects."),
             _img(figures.plot_category_overlap(categories),
                  "Overlap ratio as categories are added (line: mean over category orders; band: its spread).")]
    rows = [(c, _num(categories["sizes"][c])) for c in categories["categories"]]
    md = text + "\n\n" + _md_table(["category", "safety neurons"], rows)
    return Section("categories", "Harm categories", "\n".join(parts), md)


def _section_separability(art: RunArtifacts) -> Section | None:
    if art.analysis is None or not (art.analysis / "separability.json").is_file():
        return None
    sep = read_json(art.analysis / "separability.json")
    if not sep.get("models"):
        return None

    def best(values):
        pairs = [(v, i) for i, v in enumerate(values or []) if v is not None]
        return max(pairs) if pairs else (None, None)

    rows = []
    for m in sep["models"]:
        r, rl = best(m.get("residual"))
        n, nl = best(m.get("neurons"))
        both = m.get("all_layers") or {}
        rows.append([m["name"], (_pct(r), "" if rl is None else f"layer {rl}"), (_pct(n), "" if nl is None else f"layer {nl}"),
                     _pct(both.get("safety_neurons")), _pct(both.get("random_neurons")), _num(both.get("n"))])
    headers = ["model", "best residual-stream accuracy", "best MLP-neuron accuracy", "safety neurons (all layers)",
               "as many random neurons", "neurons"]
    held = "held out from identification" if sep.get("held_out_from_identification") else \
        "overlapping the identification prompts"
    text = (f"A logistic-regression probe per layer separates harmful from harmless prompts "
            f"({sep.get('n_harmful')} + {sep.get('n_harmless')} prompts, {held}; accuracy on a "
            f"{100 * sep.get('test_frac', 0.3):.0f}% held-out split, mean of {sep.get('n_splits', 1)} splits; "
            f"token pooling {sep.get('position')}). Chance is 50%.")
    parts = [f'<p class="explain">{_esc(text)}</p>',
             _img(figures.plot_separability(sep),
                  "Held-out probe accuracy per layer on the residual stream, on all MLP neuron activations, "
                  "and on the safety neurons only against as many random neurons of the same layers."),
             _html_table(headers, rows)]
    return Section("separability", "Layer-wise separability", "\n".join(parts), text + "\n\n" + _md_table(headers, rows))


def _round_metrics(mode_dir: Path) -> list[dict]:
    """Each finished round's ``metrics.json`` (with ``round`` set), in round order."""
    rounds = []
    for d in mode_dir.glob("round_*"):
        suffix = d.name.split("_", 1)[1]
        if suffix.isdigit() and (d / "metrics.json").is_file():
            metrics = read_json(d / "metrics.json")
            if isinstance(metrics, Mapping):
                rounds.append(dict(metrics, round=metrics.get("round", int(suffix))))
    return sorted(rounds, key=lambda r: r["round"])


#: Round-table columns for issue 4's metrics.json: (header, key path, or a (first, last) pair shown "a -> b").
_ROUND_COLUMNS = (
    ("pairs", "n_pairs"),
    ("neurons frozen", "neurons_frozen"),
    ("neurons trained (SN-Tune)", "neurons_trained_only"),
    ("new safety neurons", "identification.new_neurons"),
    ("overlap with previous round", "identification.overlap_with_previous"),
    ("DPO loss (first → last step)", ("training.loss_first", "training.loss_last")),
    ("reward margin (first → last)", ("training.reward_margin_first", "training.reward_margin_last")),
    ("reward accuracy (last)", "training.reward_accuracy_last"),
    ("frozen weights unchanged", "freezing.exact"),
    ("wall time (s)", "timings.wall_s"),
)
_SKIP_FLAT = ("per_mlp", "per_layer", "log_history", "run_key", ".mlp")


def _round_table(rounds: Sequence[Mapping]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the per-round table: the known columns that have values, else any numeric ones."""
    flats = [_flatten(r) for r in rounds]
    headers, getters = ["round"], []
    for header, key in _ROUND_COLUMNS:
        keys = key if isinstance(key, tuple) else (key,)
        if any(f.get(k) is not None for f in flats for k in keys):
            headers.append(header)
            getters.append(keys)
    if not getters:  # another schema: its numeric scalars
        names = [k for k in dict.fromkeys(k for f in flats for k in f)
                 if k != "round" and not any(s in k for s in _SKIP_FLAT)
                 and any(isinstance(f.get(k), (int, float)) for f in flats)][:10]
        headers += names
        getters = [(k,) for k in names]
    rows = []
    for r, f in zip(rounds, flats):
        row = [str(r["round"])]
        for keys in getters:
            row.append(" → ".join(_num(f.get(k)) for k in keys))
        rows.append(row)
    return headers, rows


def _section_align(art: RunArtifacts) -> Section | None:
    if not art.align:
        return None
    rounds_by_mode = {mode: _round_metrics(d) for mode, d in art.align.items()}
    parts_html, parts_md = [], []
    if any(rounds_by_mode.values()):
        parts_html.append(_img(figures.plot_align_metrics(rounds_by_mode),
                               "DPO training per mode: loss and reward margin at every logged step across the "
                               "rounds (dashed: round boundaries), and the safety neurons frozen in each round."))
    for mode, d in art.align.items():
        summary = read_json(d / "align.json") if (d / "align.json").is_file() else {}
        parts_html.append(f"<h3>{_esc(mode)}</h3>")
        facts = [(k, _num(summary.get(k))) for k in ("model", "mode", "rounds", "wall_time_s") if k in summary]
        if isinstance(summary.get("prefs"), Mapping):
            facts.append(("preference pairs", f"{_num(summary['prefs'].get('n_pairs'))} "
                                              f"({summary['prefs'].get('source', '?')})"))
        if facts:
            parts_html.append(_html_table(["", "value"], facts, text_cols=2))
        rounds = rounds_by_mode[mode]
        if rounds:
            headers, rows = _round_table(rounds)
            parts_html.append(_html_table(headers, rows))
            parts_md.append(f"{mode}:\n\n" + _md_table(headers, rows))
        for key in ("settings", "config"):
            if isinstance(summary.get(key), Mapping):
                flat = _flatten(summary[key])
                parts_html.append(f"<details><summary>{_esc(mode)} {key} ({_plural(len(flat), 'value')})</summary>"
                                  + _html_table(["key", "value"], [(k, _num(v)) for k, v in flat.items()], text_cols=2)
                                  + "</details>")
    return Section("align", "Alignment rounds", "\n".join(parts_html), "\n\n".join(parts_md))


def _section_files(art: RunArtifacts) -> Section:
    rows = []
    for path in sorted(art.root.rglob("*")):
        rel = path.relative_to(art.root)
        if path.is_file() and path.suffix in (".json", ".jsonl", ".md", ".safetensors", ".png") \
                and not any(part.startswith(".") for part in rel.parts) and "generations" not in rel.parts \
                and "model" not in rel.parts and len(rel.parts) <= 4:
            rows.append((str(rel), f"{path.stat().st_size / 1024:,.1f} KiB"))
    body = _html_table(["file", "size"], rows[:200]) if rows else "<p>none</p>"
    if len(rows) > 200:
        body += f'<p class="note">… and {len(rows) - 200} more</p>'
    return Section("files", "Artifacts", f"<details><summary>{_plural(len(rows), 'file')}</summary>{body}</details>", "")


SECTIONS: tuple[tuple[str, Callable[[RunArtifacts], Section | None]], ...] = (
    ("settings", _section_settings),
    ("comparison", _section_comparison),
    ("multimodal", _section_multimodal),
    ("robustness", _section_robustness),
    ("attacks", _section_attacks),
    ("capability", _section_capability),
    ("neurons", _section_neurons),
    ("categories", _section_categories),
    ("separability", _section_separability),
    ("align", _section_align),
    ("samples", _section_samples),
)


# --------------------------------------------------------------------------- headline
def _headline(art: RunArtifacts) -> list[str]:
    """A few plain sentences with the numbers that matter most (markdown-safe text)."""
    lines = []
    if art.results is not None:
        try:
            for m in read_object(art.results).get("models", []):
                asr = m.get("asr") or {}
                bits = []
                if asr.get("ori") is not None:
                    bits.append(f"ASR {_pct(asr['ori'])}")
                if asr.get("full") is not None:
                    bits.append(f"{_pct(asr['full'])} after pruning its safety neurons (FULL)")
                area = _area(m)
                if area is not None:
                    bits.append(f"mean ASR {_pct(area)} over the pruning curve")
                if m.get("over_refusal") is not None:
                    bits.append(f"over-refusal {_pct(m['over_refusal'])}")
                mm = m.get("asr_multimodal") or {}
                if mm.get("ori") is not None:
                    bits.append(f"ASR with typographic images {_pct(mm['ori'])}"
                                + (f" ({_pct(mm['full'])} FULL pruned)" if mm.get("full") is not None else ""))
                if m.get("mc_accuracy") is not None:
                    bits.append(f"MC accuracy {_pct(m['mc_accuracy'])}")
                if bits:
                    lines.append(f"{m.get('name', '?')}: " + ", ".join(bits) + ".")
        except (ArtifactError, AttributeError, TypeError, ValueError):
            pass
    if art.identify is not None:
        try:
            m = read_object(art.identify / "identify.json")
            lines.append(f"{_num(m['selected_total']['union'])} safety neurons "
                         f"({_pct(m['selected_fraction']['union'], 2)} of {_num(m['n_neurons'])}) in "
                         f"{m.get('model')}.")
        except (ArtifactError, KeyError, TypeError):
            pass
    return lines


# --------------------------------------------------------------------------- build
def _quick(art: RunArtifacts) -> bool:
    if art.run_json is None:
        return False
    try:
        run = read_object(art.run_json)
    except ArtifactError:
        return False
    settings = run.get("settings") if isinstance(run.get("settings"), Mapping) else {}
    return bool(run.get("quick") or settings.get("quick"))


def _title(art: RunArtifacts) -> str:
    model = None
    for path in (art.run_json, art.identify / "identify.json" if art.identify else None):
        if path is None:
            continue
        try:
            data = read_json(path)
        except ArtifactError:
            continue
        model = data.get("model") or (data.get("settings") or {}).get("model") if isinstance(data, Mapping) else None
        if model:
            break
    return f"safeneuron report: {model}" if model else "safeneuron report"


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` (self-contained) and ``summary.md`` for the artifacts in ``run_dir``.

    Args:
        run_dir: a main-job directory (or one stage's output directory).
        out: the HTML file to write (default ``run_dir/report.html``); ``summary.md`` is
            written beside it.

    Returns:
        The path of the HTML report.

    Raises:
        ReportError: ``run_dir`` does not exist or holds no safeneuron artifacts.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such directory")
    art = locate(run_dir)
    if art.empty():
        raise ReportError(f"{run_dir}: no safeneuron artifacts (looked for run.json, identify/identify.json, "
                          "evaluate/results.json, analysis/*.json, align/*/align.json)")
    out = Path(out) if out is not None else run_dir / "report.html"
    sections: list[Section] = []
    problems: list[str] = []
    for name, make in SECTIONS:
        try:
            section = make(art)
        except (ArtifactError, KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            logger.warning("report section %s skipped: %s", name, err)
            problems.append(f"{name}: {err}")
            continue
        if section is not None:
            sections.append(section)
    sections.append(_section_files(art))

    quick = _quick(art)
    title = _title(art)
    generated = time.strftime("%Y-%m-%d %H:%M")
    headline = _headline(art)
    banner = ""
    if quick:
        banner += ('<div class="banner quick"><b>Quick run.</b> These results come from <code>--quick</code> '
                   "(fewer prompts and training steps, same model): a first look, not final numbers.</div>")
    if problems:
        items = "".join(f"<li>{_esc(p)}</li>" for p in problems)
        banner += f'<div class="banner warn"><b>Some artifacts could not be read:</b><ul>{items}</ul></div>'
    body = []
    if headline:
        body.append('<section id="headline"><h2>Headline</h2><ul class="headline">'
                    + "".join(f"<li>{_esc(line)}</li>" for line in headline) + "</ul></section>")
    for s in sections:
        body.append(f'<section id="{s.anchor}"><h2>{_esc(s.title)}</h2>\n{s.html}\n</section>')
    nav = " ".join(f'<a href="#{s.anchor}">{_esc(s.title)}</a>' for s in sections)
    page = string.Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        title=_esc(title), meta=_esc(f"{run_dir.resolve()} · generated {generated}"), banner=banner, nav=nav,
        body="\n".join(body), version=_esc(__version__), generated=_esc(generated), run_dir=_esc(run_dir.resolve()))
    write_text(out, page)

    md = [f"# {title}", ""]
    if quick:
        md += ["> **Quick run** (`--quick`: fewer prompts and training steps, same model): a first look, "
               "not final numbers.", ""]
    if problems:
        md += ["Artifacts that could not be read: " + "; ".join(problems), ""]
    if headline:
        md += [f"- {line}" for line in headline] + [""]
    for s in sections:
        if s.md:
            md += [f"## {s.title}", "", s.md, ""]
    md += [f"Figures and details: `{out.name}`. Generated by safeneuron {__version__} on {generated}.", ""]
    write_text(out.with_name("summary.md"), "\n".join(md))
    return out
