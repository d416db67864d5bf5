"""The summaries the commands print: one short text table per stage (the library logs; the CLI prints)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from safeneuron.artifacts import read_json

if TYPE_CHECKING:
    from safeneuron.stages.align import AlignResult
    from safeneuron.stages.analyze import Analysis

__all__ = ["identify_summary", "align_summary", "prefs_summary", "attack_summary", "analysis_summary", "run_summary"]


def identify_summary(result, top: int = 10) -> str:
    """Neurons per layer and the top neurons by effect size, as a text table."""
    m = result.manifest
    sets = m["sets"]
    lines = [
        f"model {m['model']} ({m['model_type']}), method {m['method']}, position {m['position']}, "
        f"{m['n_harmful']} harmful / {m['n_harmless']} harmless prompts, {m['wall_time_s']:.1f} s",
        "",
        f"{'layer':<28}" + "".join(f"{s:>12}" for s in sets),
    ]
    for mlp, counts in m["selected_per_layer"].items():
        lines.append(f"{mlp:<28}" + "".join(f"{counts[s]:>12}" for s in sets))
    lines.append(f"{'total':<28}" + "".join(f"{m['selected_total'][s]:>12}" for s in sets))
    lines.append(f"{'fraction of neurons':<28}" + "".join(f"{m['selected_fraction'][s]:>12.4%}" for s in sets))
    if m.get("expected_false_selections") is not None:
        lines.append(f"expected false selections at tau_ES={m['tau_es']}: {m['expected_false_selections']:.3g} "
                     f"(bound 1-Phi({m['tau_t']:.2f}) per neuron)")
    v = m.get("verification")
    if v:
        lines += ["", f"causal check on {v['harmful']['n']} held-out harmful prompts ({v['harmful']['source']}), "
                      f"judge {v['judge']}:"]
        for name, label in (("plain", "plain"), ("pruned", f"{v['neuron_set']} pruned"), ("random", "random, same count")):
            r = v[name]
            odd = sum((r.get("verdicts") or {}).get(k, 0) for k in ("echo", "loop", "no content"))
            refusals = f", refusals {r['refusal_rate']:.1%}, {odd} echo/loop/empty" if "refusal_rate" in r else ""
            lines.append(f"  ASR {label:<20} {r['rate']:.1%} [{r['ci95'][0]:.0%}, {r['ci95'][1]:.0%}]{refusals}  "
                         f"({r['pruned']} neurons pruned)")
        lines.append(f"  McNemar p vs plain: pruned {v['mcnemar_p']['pruned']:.3g}, random {v['mcnemar_p']['random']:.3g}")
    if m["method"] == "stats" and top:
        import torch  # the scores are tensors; imported here so that --help stays fast

        flat = [(float(v["es"][j]), mlp, j) for mlp, v in result.scores.items()
                for j in torch.topk(v["es"], min(top, v["es"].numel())).indices.tolist()]
        flat.sort(reverse=True)
        lines += ["", f"top {top} neurons by effect size:", f"{'mlp':<28}{'neuron':>8}{'ES':>8}{'SAS z':>8}"]
        for es, mlp, j in flat[:top]:
            lines.append(f"{mlp:<28}{j:>8}{es:>8.2f}{float(result.scores[mlp]['sas'][j]):>8.2f}")
    return "\n".join(lines)


def align_summary(result: AlignResult) -> str:
    """One line per round: neurons, loss and reward margin first -> last, time."""
    m = result.manifest
    lines = [f"model {m['model']}, mode {m['mode']}, {m['prefs']['n_pairs']} pairs, {m['rounds']} round(s), "
             f"{m['wall_time_s']:.1f} s", "",
             f"{'round':>5}{'neurons':>10}{'loss first':>12}{'loss last':>11}{'margin first':>14}"
             f"{'margin last':>13}{'exact':>7}{'time s':>9}"]

    def f(v, spec=".4f"):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    for s in m["summary"]:
        neurons = s["neurons_trained_only"] if m["mode"] == "sn-tune" else s["neurons_frozen"]
        exact = {True: "yes", False: "NO", None: "-"}[s["frozen_exact"]]
        lines.append(f"{s['round']:>5}{neurons:>10}{f(s['loss_first']):>12}{f(s['loss_last']):>11}"
                     f"{f(s['reward_margin_first']):>14}{f(s['reward_margin_last']):>13}{exact:>7}"
                     f"{f(s['wall_s'], '.1f'):>9}")
    return "\n".join(lines)


def prefs_summary(report: dict) -> str:
    """The counts and rates of a preference synthesis (its manifest's ``report``)."""
    return (f"harmful prompts {report['n_harmful']}: intact refusal rate {report['refusal_rate_intact']:.2f}, "
            f"pruned compliance rate {report['compliance_rate_pruned']:.2f}; "
            f"chosen from model/template {report['chosen_from_model']}/{report['chosen_from_template']}, "
            f"rejected from pruned/intact {report['rejected_from_pruned']}/{report['rejected_from_intact']}, "
            f"dropped {report['dropped_no_compliance']}\n"
            f"harmless prompts {report['n_harmless']}: helpful rate {report['helpful_rate_harmless']:.2f}")


def attack_summary(report: dict) -> str:
    """The attack's ASRs as a text table."""
    if "profile" in report:  # an attack of the profile (--kind other than prune)
        from safeneuron.stages.attack_profile import profile_summary

        plain = report["plain"]
        return "\n".join([f"model {report['model']}, attack: {report['attack']}, judge {report['judge']}",
                          f"{report['harmful']['n']} harmful prompts from {report['harmful']['source']}; plain ASR "
                          f"{plain['asr']:.2%}", ""] + profile_summary(report["profile"]))
    lines = [
        f"model {report['model']}, attack: {report['attack']} ({report['attacker']['mode']} attacker, "
        f"{report['attacker']['method']}), judge {report['judge']}",
        f"{report['harmful']['n']} harmful prompts from {report['harmful']['source']}; "
        f"{report['pruned_count']} of {report['n_neurons']} neurons pruned "
        f"({report['pruned_count'] / report['n_neurons']:.3%})",
        "",
        f"{'condition':<34}{'pruned':>8}{'ASR':>8}{'95% CI':>16}",
    ]
    for suffix, res in (("", report["results"]), (" (image+text)", report.get("results_multimodal"))):
        if not res:
            continue
        rows = [("original", res["ori"]), ("pruned", res["pruned"])]
        rows += [(f"round {r['round']}", r) for r in res.get("rounds", [])]
        if "random_control" in res:
            rows.append(("random (same count)", res["random_control"]))
        for name, r in rows:
            ci = f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]" if r["ci95"] else "n/a"
            lines.append(f"{name + suffix:<34}{r['pruned']:>8}{r['asr']:>8.2%}{ci:>16}")
    if report.get("harmful_multimodal"):
        mm = report["harmful_multimodal"]
        lines.append(f"(image+text: {mm['n']} prompts from {mm['source']})")
    return "\n".join(lines)


def analysis_summary(result: Analysis) -> str:
    """A short text summary of an analysis."""
    lines = []
    if result.layer_distribution:
        for row in result.layer_distribution["rows"]:
            fr = row["fraction"]
            peak = max(range(len(fr)), key=fr.__getitem__) if fr else 0
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


def run_summary(out: Path) -> str:
    """The short table printed at the end of ``safeneuron run``."""
    lines = []
    results_file = out / "evaluate" / "results.json"
    if results_file.exists():
        results = read_json(results_file)
        head = f"{'model':<12}{'ASR':>8}{'ASR pruned':>12}{'worst tmpl':>12}{'over-refusal':>14}{'MC acc':>8}"
        lines += [head, "-" * len(head)]

        def pct(v):
            return "n/a" if v is None else f"{100 * v:.1f}%"

        for m in results["models"]:
            asr = m.get("asr") or {}
            templates = m.get("asr_templates") or {}
            worst = max(templates.values()) if templates else None
            lines.append(f"{m['name']:<12}{pct(asr.get('ori')):>8}{pct(asr.get('full')):>12}{pct(worst):>12}"
                         f"{pct(m.get('over_refusal')):>14}{pct(m.get('mc_accuracy')):>8}")
        lines.append(f"(n = {results['models'][0].get('n_harmful')} harmful prompts; ASR pruned = after pruning the "
                     "model's own safety neurons, identified by an adaptive attacker)")
    record = read_json(out / "run.json")
    lines.append(f"wall time {record.get('wall_time_s', 0) / 60:.1f} min"
                 + (" (quick profile)" if record.get("quick") else ""))
    report = out / "report.html"
    if report.exists():
        lines.append(f"report: {report.resolve()}")
    return "\n".join(lines)
