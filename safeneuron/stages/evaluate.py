"""The ``evaluate`` stage: every measurement on every model, one JSON and one table.

For each model, in order (each step's answers are cached under
``out/generations/<model>/``, so a killed evaluation resumes where it stopped)::

    plain ASR            harmful prompts, judged
    pruning attack       ASR after pruning the ES set, the SAS set, their union (FULL),
                         identified on this very model (adaptive) or from --mask
    robustness curve     ASR with the top 0 .. 5 % of neurons by ES pruned, and its area
    jailbreak templates  ASR per template, and the worst case
    over-refusal         refusal rate on harmless and on XSTest-style prompts
    image+text (VLMs)    ASR (plain and pruned) on the harmful prompts typeset as images,
                         over-refusal on drawn scenes and charts
    capability           MC accuracy (log-likelihood), perplexity, lm-eval tasks
    red-team misuse      share of requests to write a jailbreak prompt complied with

``out/results.json`` (the contract)::

    {"models": [{"name", "path", "judge", "n_harmful", "n_harmless",
                 "asr": {"ori", "es", "sas", "full"}, "asr_ci95": {<same keys>: [lo, hi]},
                 "asr_templates": {template: rate}, "curve": [[fraction, asr], ...],
                 "over_refusal", "mc_accuracy", "perplexity", "redteam_compliance",
                 "asr_multimodal": {"ori", "es", "sas", "full"}, "over_refusal_multimodal" (VLMs; else null),
                 "pruned_counts": {"es", "sas", "full"}, ...}], "settings", ...}

Rates are in [0, 1]; a measurement that was skipped is ``null``. Fractions are of
all MLP neurons (0.01 = 1 %). Extra keys carry the counts, every rate's 95 % Wilson
interval, the judges, the attacker and timings.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from safeneuron.artifacts import (atomic_dir, check_out_dir, read_json, source_digest, stage_lock, timestamp, versions,
                                  write_json, write_jsonl, write_text)
from safeneuron.config import EvalConfig, settings_hash
from safeneuron.data.images import load_multimodal_set
from safeneuron.data.splits import overlap
from safeneuron.errors import SafeneuronError
from safeneuron.evaluation.capability import load_mc, mc_accuracy, perplexity, run_lm_eval
from safeneuron.arch import find_mlps
from safeneuron.evaluation.judges import Judge, RefusalJudge, load_judge, second_refusal_judge
from safeneuron.evaluation.measure import GenerationSettings, Judged, judged_responses, model_tag, sample_records
from safeneuron.evaluation.metrics import Rate, curve_area, detectable_difference, mcnemar_exact, ci_list as _ci
from safeneuron.evaluation.sets import (
    apply_template,
    load_eval_prompts,
    load_multimodal_harmful,
    load_redteam_goals,
    load_templates,
    redteam_request,
)
from safeneuron.masks import SafetyNeuronMask
from safeneuron.models import LoadedModel, load_model
from safeneuron.stages.attack import (
    attack_masks,
    attacker_config,
    attacker_identification,
    attacker_prompts,
    fraction_sweep,
    iterative_prune,
)
from safeneuron.stages.identify import Identification

logger = logging.getLogger(__name__)

__all__ = ["evaluate_model", "evaluate_models", "results_markdown", "model_slug", "given_masks", "settings_key",
           "EvalOutputError"]

_PROTOCOL = ("ori", "es", "sas", "full")


def model_slug(name: str) -> str:
    """A directory name for a model name or path."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name).strip("/")).strip("_.")
    return slug[-80:] or "model"


def given_masks(path: str | Path) -> dict:
    """ES/SAS/FULL masks of a given mask file or identify directory; a plain mask file
    (one set) is FULL only."""
    path = Path(path)
    if path.is_dir():
        path = path / "safety_neurons.safetensors"
    sets = SafetyNeuronMask.sets_in(path)
    named = {"es": "es", "sas": "sas", "full": "union"}
    if any(s in sets for s in named.values()):
        return {k: SafetyNeuronMask.load(path, neuron_set=s) if s in sets else None for k, s in named.items()}
    return {"es": None, "sas": None, "full": SafetyNeuronMask.load(path, neuron_set=None)}


def _identification_beside(mask_path: str | Path):
    """The identification a mask file belongs to (``identify.json`` beside it), or None."""
    path = Path(mask_path)
    folder = path if path.is_dir() else path.parent
    if (folder / "identify.json").exists() and (folder / "scores.safetensors").exists():
        try:
            return Identification.load(folder)
        except Exception as err:  # a partial or foreign directory: no sweep, not a failure
            logger.info("%s: no usable identification for the sweep (%s)", folder, err)
    return None


@dataclass
class _Measure:
    """What every measurement of one model shares: the model, the judges, the generation
    settings, the answer cache, and the ``sources`` and ``timings`` the entry reports."""

    loaded: Any
    config: EvalConfig
    judge: Judge
    refusal_judge: RefusalJudge
    settings: GenerationSettings
    tag: str
    gen_dir: Path
    progress: bool = True
    eval_dir: Path | None = None  # the evaluation's --out (lm-eval's own output goes to lm_eval/<model>/)
    timings: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)  # measurement -> sample records (samples/<model>/<name>.jsonl)
    reported: dict = field(default_factory=dict)  # measurement -> where its rate is in the entry (dotted path)

    def run(self, prompts, what="compliant", *, mask=None, judge_prompts=None, cache="harmful", gen=None,
            use_judge=None, sample: str | None = None, reported: str | None = None, condition: str | None = None):
        """Answers to ``prompts`` (cached in ``<gen_dir>/<cache>.jsonl``), judged for ``what``; kept as the
        measurement ``sample``'s sample records when named (its rate reported at ``reported`` in the entry)."""
        judge = use_judge or self.judge
        judged = judged_responses(self.loaded, prompts, judge, what=what, mask=mask, judge_prompts=judge_prompts,
                                  settings=gen if gen is not None else self.settings,
                                  cache=self.gen_dir / f"{cache}.jsonl", tag=self.tag, progress=self.progress)
        if sample is not None:
            if condition is None:
                condition = f"pruned {mask.count()} neurons ({mask.digest()})" if mask is not None and mask.count() \
                    else "plain"
            self.samples[sample] = sample_records(judged, prompts, condition=condition, judge=judge.name)
            self.reported[sample] = reported
        return judged

    @contextmanager
    def timed(self, key: str):
        """Records the block's wall time as ``timings[key]`` (not when it raises)."""
        t0 = time.perf_counter()
        yield
        self.timings[key] = time.perf_counter() - t0


def evaluate_model(
    loaded,
    config: EvalConfig | None = None,
    out: str | Path = "eval",
    *,
    name: str | None = None,
    judge: Judge | None = None,
    progress: bool = True,
    transfer_source: str | None = None,
    slug: str | None = None,
) -> dict:
    """Run every enabled measurement on one loaded model; returns its results entry.

    Args:
        loaded: a :class:`safeneuron.models.LoadedModel`.
        out: the evaluation directory (answers cached in ``out/generations/<name>/``,
            the attacker's identification in ``out/attack/<name>/``).
        name: the model's name in the results (default: ``loaded.name``).
        judge: the ASR judge (default: ``config.judge`` loaded here).
        transfer_source: the sets the ``transfer`` attack prunes (another model's attacker identification;
            ``attacks.transfer_mask`` wins).
        slug: the model's folder name under ``generations/``, ``attack/`` and ``samples/`` (default:
            :func:`model_slug` of ``name``; :func:`evaluate_models` makes them unique).
    """
    config = config or EvalConfig()
    config.validate()
    out = Path(out)
    name = name or str(loaded.name)
    slug = slug or model_slug(name)
    judge = judge or load_judge(config.judge, device=config.device, template=config.judge_template)
    unreadable_before = getattr(judge, "unparsed", 0)  # a classifier judge counts the verdicts it could not read
    settings = GenerationSettings(max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                                  seed=config.seed)
    m = _Measure(loaded, config, judge, RefusalJudge(), settings, model_tag(loaded), out / "generations" / slug,
                 progress, eval_dir=out)
    t_model = time.perf_counter()

    # The attacker's identification prompts never enter a measurement (same split for every model).
    id_config = attacker_config(loaded, config.identify, seed=config.seed, batch_size=config.batch_size)
    id_harmful, id_harmless = attacker_prompts(id_config)

    entry: dict = {"name": name, "path": str(loaded.path), "model_type": loaded.model_type, "judge": judge.name,
                   "slug": slug}
    harmful = load_eval_prompts(config.harmful, default="harmful", n=config.capped(config.n_harmful),
                                seed=config.seed, exclude=id_harmful.prompts, allow_fallback=config.allow_fallback)
    harmless = load_eval_prompts(config.harmless, default="harmless", n=config.capped(config.n_harmless),
                                 seed=config.seed, exclude=id_harmless.prompts, allow_fallback=config.allow_fallback)
    entry.update(n_harmful=len(harmful), n_harmless=len(harmless), upstream_overlap=_upstream_overlap(config, harmful,
                                                                                                     harmless))
    m.sources.update(harmful=harmful.source, harmless=harmless.source)
    if config.upstream:
        m.sources["upstream"] = list(config.upstream)

    attack, identification, masks = _asr_and_attack(m, harmful, id_config, id_harmful, id_harmless,
                                                    out / "attack" / slug / "identify")
    entry.update(attack)
    entry.update(_robustness_curve(m, harmful, identification))
    entry.update(_jailbreak_templates(m, harmful))
    entry.update(_over_refusal(m, harmless))
    entry.update(_multimodal_measurements(m, harmful, masks))
    entry.update(_capability(m, id_harmless))
    entry.update(_redteam(m))
    entry["attacks"] = _attack_profile(m, harmful, id_config, id_harmful, id_harmless, identification,
                                       out / "attack" / slug, transfer_source)

    entry["judges"] = {"asr": judge.name, "templates": judge.name, "over_refusal": m.refusal_judge.name,
                       "redteam": m.refusal_judge.name}
    entry["unreadable_verdicts"] = getattr(judge, "unparsed", 0) - unreadable_before  # per measurement: asr_verdicts
    entry["sources"] = m.sources
    entry["samples"] = {"dir": f"samples/{slug}",  # beside results.json
                        "measurements": len(write_samples(out / "samples" / slug, m.samples, m.reported))}
    m.timings["total_s"] = time.perf_counter() - t_model
    entry["timings"] = {k: round(v, 2) for k, v in m.timings.items()}
    return entry


def write_samples(folder: Path, samples: dict[str, list[dict]], reported: dict[str, str | None]) -> dict:
    """``folder/<measurement>.jsonl`` for every measurement (its sample records) and ``folder/index.json``
    (measurement -> file, n, k counted, and where its rate is in the model's results entry, a dotted path); the
    folder is replaced whole. Returns the index."""
    index = {}
    with atomic_dir(folder) as tmp:
        for name, records in samples.items():
            file = f"{model_slug(name)}.jsonl"
            write_jsonl(tmp / file, records)
            index[name] = {"file": file, "n": len(records), "k": sum(r["counted"] for r in records),
                           "reported": reported.get(name)}
        write_json(tmp / "index.json", index)
    return index


def _upstream_overlap(config: EvalConfig, harmful, harmless) -> int:
    """0, or an error: no evaluation prompt may have been seen by identification or alignment (``upstream``)."""
    leaked = overlap(harmful.prompts + harmless.prompts, config.upstream)
    if leaked:
        raise SafeneuronError(f"{len(leaked)} evaluation prompt(s) were used upstream (identification or alignment), "
                              f"e.g. {leaked[0][:60]!r}; evaluate on prompts no upstream stage saw",
                              fields=("harmful", "harmless", "upstream"))
    return 0


def _asr_and_attack(m: _Measure, harmful, id_config, id_harmful, id_harmless, identify_dir: Path):
    """Plain ASR, and ASR with the attack's ES, SAS and FULL sets pruned.

    Returns ``(entry keys, identification or None, {"es", "sas", "full"}: mask or None)``;
    without ``config.attack`` only ``"ori"`` is measured and the masks are ``{}``.
    """
    config = m.config
    asr: dict = dict.fromkeys(_PROTOCOL)
    asr_ci: dict = dict.fromkeys(_PROTOCOL)
    asr_k: dict = dict.fromkeys(_PROTOCOL)
    pruned_counts: dict = dict.fromkeys(("es", "sas", "full"))
    judged: dict[str, Judged] = {}
    with m.timed("asr_s"):
        ori = judged["ori"] = m.run(harmful.prompts, sample="asr_ori", reported="asr.ori")
        r = Rate(ori.k, ori.n)
        asr["ori"], asr_ci["ori"], asr_k["ori"] = r.value, _ci(r), r.k

    attacker, identification, masks = None, None, {}
    if config.attack:
        with m.timed("attack_identify_s"):
            attacker, identification, masks = _attacker(m, id_config, id_harmful, id_harmless, identify_dir)
        with m.timed("attack_generate_s"):
            for key in ("es", "sas", "full"):
                mask = masks.get(key)
                if mask is None:
                    continue
                mask.check(m.loaded.model)
                judged[key] = m.run(harmful.prompts, mask=mask, sample=f"asr_{key}", reported=f"asr.{key}") \
                    if mask.count() else ori  # an empty set prunes nothing
                r = Rate(judged[key].k, judged[key].n)
                asr[key], asr_ci[key], asr_k[key] = r.value, _ci(r), r.k
                pruned_counts[key] = mask.count()
    part = dict(asr=asr, asr_ci95=asr_ci, asr_k=asr_k, pruned_counts=pruned_counts, attacker=attacker)
    if config.attack and masks.get("full") is not None and masks["full"].count() and config.random_control:
        with m.timed("random_control_s"):
            part.update(_random_control(m, harmful, masks["full"], judged))
    if config.attack and config.attack_rounds > 1 and identification is not None and not config.mask:
        with m.timed("iterative_s"):
            part.update(_iterative_attack(m, harmful, id_config, identify_dir.parent / "iterative", judged))
    part.update(_second_opinion(judged))
    return part, identification, masks


def _attack_profile(m: _Measure, harmful, id_config, id_harmful, id_harmless, identification, attack_dir: Path,
                    transfer_source: str | None) -> dict | None:
    """The attacks of ``attacks.kinds`` on this model, each along its budget with its utility cost (None when no
    kind is asked for). The attacker's identification is the pruning attack's (made here when that is off)."""
    kinds = m.config.attacks.kinds
    if not kinds:
        return None
    from safeneuron.stages.attack_profile import attack_profile
    from safeneuron.stages.conditions import AttackContext

    ctx = AttackContext(m.loaded, m.config.attacks, m.judge, m.settings, m.tag, attack_dir, id_config, id_harmful,
                        id_harmless, exclude=list(harmful.prompts), transfer_source=transfer_source, progress=m.progress,
                        identify=lambda: attacker_identification(m.loaded, id_config, attack_dir / "identify",
                                                                 progress=m.progress))
    ctx._identification = identification if not m.config.mask else None
    ctx.samples = {}
    with m.timed("attacks_s"):
        profile = attack_profile(ctx, kinds, list(harmful.prompts), m.gen_dir / "attacks")
    for kind, result in profile.items():  # where each condition's rate is reported
        for i, c in enumerate(result.get("conditions") or result.get("points") or []):
            name = f"attack_{kind}_{c['label']}"
            if name in ctx.samples:
                m.samples[name] = ctx.samples[name]
                m.reported[name] = f"attacks.{kind}.{'conditions' if result.get('conditions') else 'points'}.{i}.asr"
    return profile


def _random_control(m: _Measure, harmful, full: SafetyNeuronMask, judged: dict) -> dict:
    """ASR with as many random neurons per layer pruned as the FULL set holds (the control)."""
    control = SafetyNeuronMask.random(find_mlps(m.loaded.model), like=full, seed=m.config.seed)
    judged["random_control"] = m.run(harmful.prompts, mask=control, sample="random_control",
                                     reported="asr_random_control",
                                     condition=f"pruned {control.count()} random neurons ({control.digest()})")
    r = Rate(judged["random_control"].k, judged["random_control"].n)
    return {"asr_random_control": r.value, "asr_random_control_ci95": _ci(r), "random_control_pruned": control.count()}


def _iterative_attack(m: _Measure, harmful, id_config, out: Path, judged: dict) -> dict:
    """The iterative attack: identify, prune, re-identify on the pruned model, for ``attack_rounds``
    rounds; ASR after each round (the union pruned so far)."""
    rounds = iterative_prune(m.loaded, id_config, m.config.attack_rounds, out, progress=m.progress)
    points = []
    for r, mask in enumerate(rounds, 1):
        judged[f"round{r}"] = j = m.run(harmful.prompts, mask=mask, sample=f"iterative_round{r}",
                                        reported=f"asr_iterative.{r - 1}.asr")
        rate = Rate(j.k, j.n)
        points.append({"round": r, "asr": rate.value, "ci95": _ci(rate), "k": rate.k, "n": rate.n,
                       "pruned": mask.count()})
    return {"asr_iterative": points}


def _second_opinion(judged: dict) -> dict:
    """Each ASR measurement's verdicts, its per-prompt outcomes (for paired tests across models), and the
    ASR by the independent second refusal judge with the share of answers the two judges agree on."""
    second = second_refusal_judge()
    rates, agree, outcomes, verdicts = {}, {}, {}, {}
    for key, j in judged.items():
        other = second.compliant(j.judged_prompts, j.responses)
        rates[key] = sum(other) / len(other) if other else None
        agree[key] = sum(a == b for a, b in zip(j.flags, other)) / len(other) if other else None
        outcomes[key] = [int(f) for f in j.flags]
        verdicts[key] = j.verdict_counts()
    return {"asr_second_judge": rates, "judge_agreement": agree, "asr_outcomes": outcomes, "asr_verdicts": verdicts,
            "second_judge": second.name}


def _attacker(m: _Measure, id_config, id_harmful, id_harmless, identify_dir: Path):
    """The attack's ``(attacker description, identification or None, masks)``: from
    ``config.mask`` when given, else identified on this very model (adaptive)."""
    config = m.config
    if config.mask:
        attacker = {"mode": "given mask", "mask": config.mask}
        masks = given_masks(config.mask)
        identification = _identification_beside(config.mask)  # its scores drive the sweep, when present
    else:
        attacker = {"mode": "adaptive", "method": config.identify.method, "position": config.identify.position,
                    "identify_prompts": {"harmful": len(id_harmful), "harmless": len(id_harmless)},
                    "harmful": id_harmful.source, "harmless": id_harmless.source}
        identification = attacker_identification(m.loaded, id_config, identify_dir, progress=m.progress)
        masks = attack_masks(identification)
    return attacker, identification, masks


def _robustness_curve(m: _Measure, harmful, identification) -> dict:
    """ASR with the top fractions of neurons (``config.sweep``) pruned, and the curve's area;
    needs the attack's identification (its scores)."""
    config = m.config
    part: dict = {}
    curve, curve_points = None, None
    if config.attack and config.sweep and identification is not None:
        with m.timed("sweep_s"):
            score = config.sweep_score
            if identification.manifest.get("method") == "neurostrike" and score in ("es", "t", "sas", "shift"):
                score = "probe_up"
            sweep_prompts = harmful.prompts[: config.capped(config.n_sweep_prompts)]
            curve_points = fraction_sweep(m.loaded, identification.scores, config.sweep, sweep_prompts, m.judge,
                                          score=score, settings=m.settings, cache=m.gen_dir / "harmful.jsonl",
                                          tag=m.tag, progress=m.progress)
            curve = [[p["fraction"], p["asr"]] for p in curve_points]
            part["curve_score"] = score
    elif config.attack and config.sweep:
        logger.info("robustness curve skipped: the mask has no identification (scores) beside it")
    part.update(curve=curve, curve_area=curve_area(curve) if curve else None, curve_points=curve_points)
    return part


def _jailbreak_templates(m: _Measure, harmful) -> dict:
    """ASR per jailbreak template on the first ``n_template_prompts`` harmful prompts, and the worst."""
    config = m.config
    asr_templates, templates_ci, worst = None, None, None
    templates = load_templates(config.templates)
    n_tpl = config.capped(config.n_template_prompts)
    if templates and n_tpl:
        with m.timed("templates_s"):
            base = harmful.prompts[:n_tpl]
            asr_templates, templates_ci = {}, {}
            for tname, template in templates.items():
                judged = m.run([apply_template(template, p) for p in base], judge_prompts=base, cache="templates",
                               sample=f"template_{tname}", reported=f"asr_templates.{tname}",
                               condition=f"template {tname}")
                r = Rate(judged.k, judged.n)
                asr_templates[tname], templates_ci[tname] = r.value, _ci(r)
            worst = max(asr_templates, key=lambda t: asr_templates[t])
    return dict(asr_templates=asr_templates, asr_templates_ci95=templates_ci,
                asr_worst_template=asr_templates[worst] if worst else None, worst_template=worst,
                n_template_prompts=len(harmful.prompts[:n_tpl]) if templates else 0)


def _over_refusal(m: _Measure, harmless) -> dict:
    """Refusal rate on the harmless prompts and on the XSTest-style ones."""
    config = m.config
    with m.timed("over_refusal_s"):
        over = m.run(harmless.prompts, "refused", cache="harmless", use_judge=m.refusal_judge, sample="over_refusal",
                     reported="over_refusal") if len(harmless) else None
        r = Rate(over.k, over.n) if over else Rate(0, 0)
        xs_rate = Rate(0, 0)
        n_xs = config.capped(config.n_xstest)
        if config.xstest and n_xs:
            xs = load_eval_prompts(config.xstest, default="xstest_like", n=n_xs, seed=config.seed,
                                   allow_fallback=config.allow_fallback)
            m.sources["xstest"] = xs.source
            judged = m.run(xs.prompts, "refused", cache="xstest", use_judge=m.refusal_judge, sample="xstest",
                           reported="over_refusal_xstest")
            xs_rate = Rate(judged.k, judged.n)
    return dict(over_refusal=r.value, over_refusal_ci95=_ci(r),
                over_refusal_xstest=xs_rate.value, over_refusal_xstest_ci95=_ci(xs_rate), n_xstest=xs_rate.n)


def _multimodal_measurements(m: _Measure, harmful, masks: Mapping) -> dict:
    """ASR (plain and with the attack's ES/SAS/FULL sets pruned) and over-refusal on image+text prompts.

    For a VLM only (every key is None for a text model): harmful = the ASR prompts
    typeset as images with a benign request (FigStep-style; or ``multimodal_harmful``),
    judged against the instruction the image holds; harmless = drawn scenes and charts
    with questions (or ``multimodal_harmless``), judged for refusal.
    """
    config = m.config
    out: dict = {"asr_multimodal": None, "asr_multimodal_ci95": None, "n_harmful_multimodal": 0,
                 "over_refusal_multimodal": None, "over_refusal_multimodal_ci95": None, "n_harmless_multimodal": 0}
    if not m.loaded.is_vlm:
        return out
    with m.timed("multimodal_s"):
        if config.multimodal_harmful != "":
            # None: the same harmful requests as the text ASR, as images
            mm, judge_prompts = load_multimodal_harmful(harmful, config.multimodal_harmful,
                                                        n=config.capped(config.n_harmful), seed=config.seed)
            m.sources["harmful_multimodal"] = mm.source
            asr, asr_ci = dict.fromkeys(_PROTOCOL), dict.fromkeys(_PROTOCOL)
            for key in _PROTOCOL:
                mask = None if key == "ori" else masks.get(key)
                if key != "ori" and mask is None:
                    continue
                judged = m.run(list(mm), mask=mask, judge_prompts=judge_prompts, cache="harmful_multimodal",
                               sample=f"multimodal_asr_{key}", reported=f"asr_multimodal.{key}")
                r = Rate(judged.k, judged.n)
                asr[key], asr_ci[key] = r.value, _ci(r)
            out.update(asr_multimodal=asr, asr_multimodal_ci95=asr_ci, n_harmful_multimodal=len(mm))
        if config.multimodal_harmless != "":
            mm = load_multimodal_set(config.multimodal_harmless or "builtin:harmless", default="harmless",
                                     limit=config.capped(config.n_harmless), seed=config.seed)
            m.sources["harmless_multimodal"] = mm.source
            judged = m.run(list(mm), "refused", cache="harmless_multimodal", use_judge=m.refusal_judge,
                           sample="multimodal_over_refusal", reported="over_refusal_multimodal")
            r = Rate(judged.k, judged.n)
            out.update(over_refusal_multimodal=r.value, over_refusal_multimodal_ci95=_ci(r),
                       n_harmless_multimodal=r.n)
    return out


def _capability(m: _Measure, id_harmless) -> dict:
    """MC accuracy (log-likelihood), perplexity (on texts outside the attacker's harmless
    split) and the lm-eval tasks."""
    config, model, tokenizer = m.config, m.loaded.model, m.loaded.tokenizer
    mc_rate = Rate(0, 0)
    n_mc = config.capped(config.n_mc)
    if config.mc_file and n_mc:
        with m.timed("mc_s"):
            questions = load_mc(config.mc_file, n=n_mc, seed=config.seed)
            correct = mc_accuracy(model, tokenizer, questions, scoring=config.mc_scoring,
                                  batch_size=max(1, config.batch_size // 2))
            mc_rate = Rate(sum(correct), len(correct))
            m.sources["mc"] = str(config.mc_file)
    part = dict(mc_accuracy=mc_rate.value, mc_accuracy_ci95=_ci(mc_rate), n_mc=mc_rate.n,
                mc_scoring=config.mc_scoring if mc_rate.n else None)

    ppl, ppl_tokens = None, 0
    n_ppl = config.capped(config.n_ppl)
    if n_ppl:
        with m.timed("perplexity_s"):
            texts = load_eval_prompts(config.ppl_file or config.harmless, default="harmless", n=n_ppl,
                                      seed=config.seed, exclude=id_harmless.prompts,
                                      allow_fallback=config.allow_fallback)
            ppl, ppl_tokens = perplexity(model, tokenizer, texts.prompts, batch_size=max(1, config.batch_size // 2))
            m.sources["perplexity"] = texts.source
    part.update(perplexity=ppl, perplexity_tokens=ppl_tokens)

    lm_eval_results = None
    if config.lm_eval_tasks:
        with m.timed("lm_eval_s"):
            lm_eval_results = run_lm_eval(model, tokenizer, config.lm_eval_tasks, limit=config.lm_eval_limit,
                                          batch_size=config.batch_size,
                                          apply_chat_template=config.lm_eval_chat_template,
                                          out_dir=None if m.eval_dir is None else m.eval_dir / "lm_eval" / m.gen_dir.name)
        m.sources["lm_eval"] = f"lm_eval/{m.gen_dir.name}"  # lm-eval's results.json and samples_<task>.jsonl
    part["lm_eval"] = lm_eval_results
    return part


def _redteam(m: _Measure) -> dict:
    """Share of requests to write a jailbreak prompt complied with; with ``redteam_transfer``,
    the ASR of the prompts it wrote, asked of the model itself."""
    config = m.config
    rt_rate, transfer = Rate(0, 0), None
    n_rt = config.capped(config.n_redteam)
    if config.redteam and n_rt:
        with m.timed("redteam_s"):
            goals = load_redteam_goals(config.redteam, n=n_rt, seed=config.seed)
            rt_settings = GenerationSettings(max_new_tokens=config.redteam_max_new_tokens,
                                             batch_size=config.batch_size, seed=config.seed)
            judged = m.run([redteam_request(g) for g in goals.prompts], cache="redteam", gen=rt_settings,
                           use_judge=m.refusal_judge, sample="redteam", reported="redteam_compliance",
                           condition="asked to write a jailbreak prompt")
            rt_rate = Rate(judged.k, judged.n)
            m.sources["redteam"] = goals.source
            if config.redteam_transfer:
                written = [resp for resp, ok in zip(judged.responses, judged.flags) if ok and resp.strip()]
                if written:
                    tj = m.run(written, cache="redteam_transfer", sample="redteam_transfer",
                               reported="redteam_transfer.asr", condition="the model's own jailbreak prompts")
                    tr = Rate(tj.k, tj.n)
                    transfer = {"asr": tr.value, "ci95": _ci(tr), "n": tr.n}
    return dict(redteam_compliance=rt_rate.value, redteam_compliance_ci95=_ci(rt_rate), n_redteam=rt_rate.n,
                redteam_transfer=transfer)


def evaluate_models(
    models: Sequence | Mapping[str, Any],
    config: EvalConfig | None = None,
    out: str | Path = "eval",
    *,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Evaluate several models on the same prompts and write ``out/results.json``,
    ``out/results.md`` and ``out/generations/``.

    ``out`` may hold an evaluation already: with the same settings the models are merged into it (a model of the
    same name replaces its entry); of other settings it is an error unless ``overwrite``. Each model gets its own
    folder name (``slug`` in its entry), unique within the results.

    Args:
        models: hub ids, local directories, embedded names (None = the embedded
            default) or already loaded :class:`~safeneuron.models.LoadedModel` objects;
            or a mapping display name -> one of those. Models given by name or path are
            loaded one at a time (only one is in memory).
    Returns:
        The results dict (also in ``out/results.json``, rewritten after each model).
    """
    config = config or EvalConfig()
    config.validate()
    out = check_out_dir(out)
    with stage_lock(out, "an evaluation"):  # a second process writing here is refused
        return _evaluate_into(models, config, out, progress, overwrite)


class EvalOutputError(SafeneuronError):
    """The output directory holds an evaluation of other settings."""


def settings_key(config: EvalConfig) -> str:
    """What an evaluation's numbers depend on besides the models, by content: the settings with every prompt, MC,
    text and mask file by its bytes (never the spelling of its path); the device is left out."""
    files = ("harmful", "harmless", "xstest", "multimodal_harmful", "multimodal_harmless", "mc_file", "ppl_file",
             "redteam", "judge_template", "mask")
    mask = Path(config.mask) / "safety_neurons.safetensors" if config.mask and Path(config.mask).is_dir() else config.mask
    keyed = replace(config, **{k: source_digest(getattr(config, k)) for k in files if k != "mask"},
                    mask=source_digest(mask),
                    upstream=sorted(source_digest(f) for f in config.upstream),
                    identify=replace(config.identify, harmful=source_digest(config.identify.harmful),
                                     harmless=source_digest(config.identify.harmless)))
    return settings_hash(keyed, ("device",))


def _previous_results(out: Path, key: str, config: EvalConfig, overwrite: bool) -> list[dict]:
    """The model entries already in ``out/results.json`` that this evaluation merges with: those of the same
    settings (a results file of other settings is an error, or replaced with ``overwrite``)."""
    path = out / "results.json"
    if overwrite or not path.exists():
        return []
    previous = read_json(path)
    same = isinstance(previous, dict) and isinstance(previous.get("models"), list) and (
        previous.get("settings_key") == key if "settings_key" in previous
        else json.loads(json.dumps(previous.get("settings"), default=str)) ==
        json.loads(json.dumps(asdict(config), default=str)))
    if not same:
        names = [m.get("name") for m in previous.get("models", [])] if isinstance(previous, dict) else []
        raise EvalOutputError(f"{path} holds an evaluation with other settings ({', '.join(map(str, names)) or 'none'}"
                              "); overwrite it or choose another output directory (models evaluated with the same "
                              "settings are merged into it)", fields=("overwrite", "out"))
    return [m for m in previous["models"] if isinstance(m, dict) and "name" in m]


def _unique_slug(name: str, taken: Mapping[str, str]) -> str:
    """The folder name of ``name``: :func:`model_slug`, with 8 hex digits of the name's sha256 when another name
    already has that folder (``a/model`` and ``a_model``, or two long paths with the same last 80 characters)."""
    slug = model_slug(name)
    if taken.get(slug, name) != name:
        slug = f"{slug[:71]}-{hashlib.sha256(name.encode('utf-8')).hexdigest()[:8]}"
    return slug


def _evaluate_into(models, config: EvalConfig, out: Path, progress: bool, overwrite: bool) -> dict:
    """:func:`evaluate_models` with the output directory's lock held."""
    t_start = time.perf_counter()
    judge = load_judge(config.judge, device=config.device, template=config.judge_template)
    key = settings_key(config)
    kept = _previous_results(out, key, config, overwrite)
    results: dict = {"models": kept, "settings": asdict(config), "settings_key": key, "versions": versions()}
    if kept:
        logger.info("%s: merging with the %d model(s) already evaluated there with the same settings (%s)", out,
                    len(kept), ", ".join(m["name"] for m in kept))
    slugs = {m.get("slug") or model_slug(m["name"]): m["name"] for m in kept}  # folder -> the model using it
    seen: set[str] = set()
    named = list(models.items()) if isinstance(models, Mapping) else [(None, m) for m in (models or [None])]
    for display, spec in named:
        loaded = spec if isinstance(spec, LoadedModel) else load_model(spec, dtype=config.dtype, device=config.device)
        name = str(display if display is not None else loaded.name)
        while name in seen:
            name += "'"
        seen.add(name)
        slug = _unique_slug(name, slugs)
        slugs[slug] = name
        logger.info("evaluating %s", name)
        first = results["models"][0] if results["models"] else None
        source = str(out / "attack" / (first.get("slug") or model_slug(first["name"])) / "identify") \
            if first is not None else None
        entry = evaluate_model(loaded, config, out, name=name, judge=judge, progress=progress,
                               transfer_source=source, slug=slug)
        at = next((i for i, m in enumerate(results["models"]) if m["name"] == name), None)
        if at is None:
            results["models"].append(entry)
        else:  # the same name evaluated again with the same settings: its entry is replaced
            results["models"][at] = entry
        results["wall_time_s"] = round(time.perf_counter() - t_start, 2)
        results["created"] = timestamp()
        results["paired"] = paired_tests(results["models"])
        write_json(out / "results.json", results)
        write_text(out / "results.md", results_markdown(results))
        if not isinstance(spec, LoadedModel):
            del loaded
            gc.collect()
    return results


def paired_tests(models: Sequence[Mapping]) -> list[dict]:
    """Exact McNemar tests between every pair of models on the same harmful prompts, per ASR measurement
    (``ori``, ``full``, ``random_control``, iterative rounds), with the difference the sample could detect
    (two-sided 5 %, power 0.8, unpaired worst case)."""
    out = []
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            shared = set(a.get("asr_outcomes") or {}) & set(b.get("asr_outcomes") or {})
            for key in [k for k in (a.get("asr_outcomes") or {}) if k in shared]:
                x, y = a["asr_outcomes"][key], b["asr_outcomes"][key]
                if len(x) != len(y) or not x:
                    continue
                out.append({"a": a["name"], "b": b["name"], "measurement": key, "n": len(x),
                            "asr_a": sum(x) / len(x), "asr_b": sum(y) / len(y),
                            "only_a": sum(p and not q for p, q in zip(x, y)),
                            "only_b": sum(q and not p for p, q in zip(x, y)),
                            "mcnemar_p": mcnemar_exact(x, y), "detectable_difference": detectable_difference(len(x))})
            for kind, res_a in (a.get("attacks") or {}).items():  # the attack profile, point by point
                res_b = (b.get("attacks") or {}).get(kind) or {}
                for label, x in (res_a.get("outcomes") or {}).items():
                    y = (res_b.get("outcomes") or {}).get(label)
                    if y is None or len(x) != len(y) or not x:
                        continue
                    out.append({"a": a["name"], "b": b["name"], "measurement": f"{kind}: {label}", "n": len(x),
                                "asr_a": sum(x) / len(x), "asr_b": sum(y) / len(y),
                                "only_a": sum(p and not q for p, q in zip(x, y)),
                                "only_b": sum(q and not p for p, q in zip(x, y)),
                                "mcnemar_p": mcnemar_exact(x, y),
                                "detectable_difference": detectable_difference(len(x))})
    return out


# --------------------------------------------------------------------------- the table
def _pct(value, ci=None) -> str:
    if value is None:
        return "n/a"
    text = f"{100 * value:.1f}"
    if ci:
        text += f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"
    return text


def results_markdown(results: dict) -> str:
    """``results.json`` as markdown tables: rates in %, with 95 % Wilson intervals."""
    models = results["models"]
    lines = ["# safeneuron evaluation", ""]
    lines += _summary_table(models)
    lines.append("")
    lines += _attacker_table(models)
    lines += _multimodal_table(models)
    lines += _curve_table(models)
    lines += _templates_table(models)
    lines += _controls_table(models)
    lines += _profile_table(models)
    lines += _paired_table(results.get("paired") or [])
    lines.append("")
    return "\n".join(lines)


def _controls_table(models: list) -> list[str]:
    """The random-pruning control, the iterative attack and the second judge's view of the same answers."""
    if not any(m.get("asr_second_judge") for m in models):
        return []
    lines = ["", "Controls: ASR (%) with as many random neurons pruned as FULL, after each iterative round, and by the "
             "second (disjoint-phrase) refusal judge, with the share of answers both judges agree on.", "",
             "| model | random control | iterative rounds | 2nd judge ORI / FULL | agreement ORI / FULL | "
             "not counted (echo, loop, no content) ORI / FULL |", "|---|---|---|---|---|---|"]
    for m in models:
        second, agree, verdicts = m.get("asr_second_judge") or {}, m.get("judge_agreement") or {}, m.get("asr_verdicts") or {}
        rounds = ", ".join(_pct(r["asr"]) for r in m.get("asr_iterative") or []) or "n/a"

        def odd(key):
            v = verdicts.get(key) or {}
            return str(sum(v.get(k, 0) for k in ("echo", "loop", "no content"))) if v else "n/a"

        lines.append(f"| {m['name']} | {_pct(m.get('asr_random_control'), m.get('asr_random_control_ci95'))} | {rounds} | "
                     f"{_pct(second.get('ori'))} / {_pct(second.get('full'))} | {_pct(agree.get('ori'))} / "
                     f"{_pct(agree.get('full'))} | {odd('ori')} / {odd('full')} |")
    return lines


def _profile_table(models: list) -> list[str]:
    """The attack profile: ASR (%) at each budget point of each attack, per model, with the KL it costs."""
    kinds = list(dict.fromkeys(k for m in models for k in (m.get("attacks") or {})))
    if not kinds:
        return []
    lines = ["", "Attack profile: ASR (%) [95 % interval] at each attack's budget, and the utility it costs (KL of the "
             "next-token distribution on harmless prompts against the unattacked model, nats).", "",
             "| attack | budget | " + " | ".join(m["name"] for m in models) + " |", "|---|---|" + "---|" * len(models)]
    for kind in kinds:
        labels = list(dict.fromkeys(p["label"] for m in models
                                    for p in ((m.get("attacks") or {}).get(kind) or {}).get("points", [])))
        if not labels:
            reasons = {m["name"]: ((m.get("attacks") or {}).get(kind) or {}).get("skipped") for m in models}
            lines.append(f"| {kind} | - | " + " | ".join(f"skipped ({r})" if r else "n/a" for r in reasons.values())
                         + " |")
            continue
        for label in labels:
            cells = []
            for m in models:
                res = (m.get("attacks") or {}).get(kind) or {}
                pt = next((p for p in res.get("points", []) if p["label"] == label), None)
                if pt is None:
                    cells.append(f"skipped ({res['skipped']})" if res.get("skipped") else "n/a")
                    continue
                kl = "" if pt.get("kl") is None else f", KL {pt['kl']:.3f}"
                cells.append(f"{_pct(pt['asr'], pt['ci95'])}{kl}")
            lines.append(f"| {kind} | {label} | " + " | ".join(cells) + " |")
    return lines


def _paired_table(paired: list) -> list[str]:
    """Exact McNemar tests between models on the same prompts."""
    if not paired:
        return []
    lines = ["", "Paired tests (exact McNemar, same prompts): p < 0.05 means the two models' ASRs differ; with n "
             "prompts a difference below the detectable one can pass unseen.", "",
             "| models | measurement | n | ASR a / b | only a / only b | p | detectable |", "|---|---|---|---|---|---|---|"]
    for t in paired:
        lines.append(f"| {t['a']} vs {t['b']} | {t['measurement']} | {t['n']} | {_pct(t['asr_a'])} / {_pct(t['asr_b'])} "
                     f"| {t['only_a']} / {t['only_b']} | {t['mcnemar_p']:.3g} | {100 * t['detectable_difference']:.0f} pts |")
    return lines


def _summary_table(models: list) -> list[str]:
    """The main table: one row per model, every headline rate."""
    lines = [
        "Rates in %, [95 % Wilson interval]; n/a = not measured. ASR = share of harmful prompts answered "
        "compliantly (judge below); FULL = the ES and SAS sets pruned together.",
        "",
        "| model | n harmful | ASR ORI | ASR ES | ASR SAS | ASR FULL | worst template | curve area | "
        "over-refusal | XSTest-like refusal | MC acc | perplexity | red-team compliance |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in models:
        a, c = m["asr"], m["asr_ci95"]
        worst = "n/a" if m.get("worst_template") is None else \
            f"{_pct(m['asr_worst_template'])} ({m['worst_template']})"
        ppl = "n/a" if m.get("perplexity") is None else f"{m['perplexity']:.2f}"
        area = "n/a" if m.get("curve_area") is None else _pct(m["curve_area"])
        lines.append(
            f"| {m['name']} | {m['n_harmful']} | {_pct(a['ori'], c['ori'])} | {_pct(a['es'], c['es'])} | "
            f"{_pct(a['sas'], c['sas'])} | {_pct(a['full'], c['full'])} | {worst} | {area} | "
            f"{_pct(m['over_refusal'], m.get('over_refusal_ci95'))} (n={m['n_harmless']}) | "
            f"{_pct(m.get('over_refusal_xstest'), m.get('over_refusal_xstest_ci95'))} (n={m.get('n_xstest', 0)}) | "
            f"{_pct(m.get('mc_accuracy'), m.get('mc_accuracy_ci95'))} (n={m.get('n_mc', 0)}) | {ppl} | "
            f"{_pct(m.get('redteam_compliance'), m.get('redteam_compliance_ci95'))} (n={m.get('n_redteam', 0)}) |"
        )
    return lines


def _attacker_table(models: list) -> list[str]:
    """Judge, attacker and pruned-set sizes per model."""
    lines = ["| model | judge (ASR) | attacker | pruned ES / SAS / FULL |", "|---|---|---|---|"]
    for m in models:
        att = m.get("attacker") or {}
        mode = att.get("mode", "none")
        if mode == "adaptive":
            mode += f" ({att.get('method')}, {att['identify_prompts']['harmful']}+{att['identify_prompts']['harmless']} prompts)"
        elif mode == "given mask":
            mode += f" ({att.get('mask')})"
        pc = m["pruned_counts"]
        counts = " / ".join("n/a" if pc[k] is None else str(pc[k]) for k in ("es", "sas", "full"))
        lines.append(f"| {m['name']} | {m['judge']} | {mode} | {counts} |")
    return lines


def _multimodal_table(models: list) -> list[str]:
    """The image+text table (preceded by a blank line), or nothing when no model is a VLM."""
    if not any(m.get("asr_multimodal") or m.get("over_refusal_multimodal") is not None for m in models):
        return []
    lines = ["", "Image+text inputs (vision-language models): ASR (%) on the harmful prompts typeset as images "
             "(FigStep-style), plain and with the same ES/SAS/FULL sets pruned; over-refusal (%) on drawn "
             "scenes and charts.", ""]
    lines.append("| model | n | ASR ORI | ASR ES | ASR SAS | ASR FULL | over-refusal |")
    lines.append("|---|---|---|---|---|---|---|")
    for m in models:
        a, c = m.get("asr_multimodal") or {}, m.get("asr_multimodal_ci95") or {}
        lines.append(f"| {m['name']} | {m.get('n_harmful_multimodal', 0)} | "
                     + " | ".join(_pct(a.get(k), c.get(k)) for k in _PROTOCOL)
                     + f" | {_pct(m.get('over_refusal_multimodal'), m.get('over_refusal_multimodal_ci95'))} "
                       f"(n={m.get('n_harmless_multimodal', 0)}) |")
    return lines


def _curve_table(models: list) -> list[str]:
    """The robustness-curve table (preceded by a blank line), or nothing without a curve."""
    if not any(m.get("curve") for m in models):
        return []
    fracs = sorted({p[0] for m in models for p in (m.get("curve") or [])})
    lines = ["", "Robustness curve: ASR (%) with the top fraction of neurons pruned "
             f"(score: {next(m.get('curve_score') for m in models if m.get('curve'))}).", ""]
    lines.append("| model | " + " | ".join(f"{100 * f:g} %" for f in fracs) + " | area |")
    lines.append("|---|" + "---|" * (len(fracs) + 1))
    for m in models:
        pts = dict((f, a) for f, a in (m.get("curve") or []))
        lines.append(f"| {m['name']} | " + " | ".join(_pct(pts.get(f)) for f in fracs)
                     + f" | {_pct(m.get('curve_area'))} |")
    return lines


def _templates_table(models: list) -> list[str]:
    """The per-template ASR table (preceded by a blank line), or nothing without templates."""
    if not any(m.get("asr_templates") for m in models):
        return []
    names = list(dict.fromkeys(t for m in models for t in (m.get("asr_templates") or {})))
    lines = ["", "Jailbreak templates: ASR (%) per template.", ""]
    lines.append("| template | " + " | ".join(m["name"] for m in models) + " |")
    lines.append("|---|" + "---|" * len(models))
    for t in names:
        cells = []
        for m in models:
            rates = m.get("asr_templates") or {}
            cells.append(_pct(rates.get(t), (m.get("asr_templates_ci95") or {}).get(t)))
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return lines
