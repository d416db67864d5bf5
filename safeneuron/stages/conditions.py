"""What every attack of the attack profile shares: an attacked condition, a plan of them along a
budget, and one measurement of a plan (ASR with n and interval, per-prompt outcomes, utility cost).

An attack (``safeneuron attack --kind ...``, ``[evaluate.attacks] kinds``) is a function from an
:class:`AttackContext` to an :class:`AttackPlan`: a list of :class:`Condition` s, one per budget
point (neurons pruned, direction rank, prefill attempts, fine-tuning examples), each a scoped
edit of the model (a context manager) and/or a forced answer opening. :func:`measure_plan`
generates and judges the evaluation prompts under each condition (cached, resumable) and prices
it: KL of the next-token distribution on harmless prompts against the unattacked model (nats)
and perplexity on their text, so "jailbroken but broken" is visible.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

from safeneuron.config import AttackSuiteConfig, IdentifyConfig
from safeneuron.data.prompts import PromptSet
from safeneuron.evaluation.capability import perplexity
from safeneuron.evaluation.measure import GenerationSettings, Judged, judged_responses, sample_records
from safeneuron.evaluation.metrics import Rate, ci_list as _ci
from safeneuron.hooks import prune_neurons
from safeneuron.masks import SafetyNeuronMask
from safeneuron.next_token import kl_divergence, next_token_logprobs

logger = logging.getLogger(__name__)

__all__ = ["Condition", "AttackPlan", "AttackContext", "measure_plan", "pruning_condition", "NotApplicable"]


class NotApplicable(Exception):
    """An attack that does not apply to this model (e.g. white-box on a model without a frozen set): skipped,
    with the reason in the results."""


@dataclass
class Condition:
    """One attacked state of the model at one budget point.

    ``edit`` returns a context manager active while answers are generated and utility is scored
    (None = the model as it is); ``tag`` names the edit in the generation-cache key; ``answer_prefix``
    is a forced answer opening (the judge sees the continuation only); ``payload`` what the attack needs to
    save the edit (a direction basis, an adapter directory), not reported."""

    budget: float
    label: str
    tag: str = ""
    edit: Callable[[], ContextManager] | None = None
    answer_prefix: str = ""
    details: dict = field(default_factory=dict)
    payload: Any = None

    def active(self) -> ContextManager:
        return self.edit() if self.edit is not None else contextlib.nullcontext()


@dataclass
class AttackPlan:
    """An attack's conditions along its budget (``budget`` names the unit). With ``cumulative``, the point at
    budget n counts a prompt as jailbroken when any of the first n conditions broke it (``points_at``: the n
    reported); ``utility`` False for attacks that leave the model unchanged (prefill)."""

    kind: str
    budget: str
    conditions: list[Condition]
    details: dict = field(default_factory=dict)
    cumulative: bool = False
    points_at: list[int] = field(default_factory=list)
    utility: bool = True


@dataclass
class AttackContext:
    """What an attack on one model needs: the model, the settings, the judge and generation settings, the
    attacker's identification prompts (never evaluated on) and, lazily, its identification on this model."""

    loaded: Any
    config: AttackSuiteConfig
    judge: Any
    settings: GenerationSettings
    tag: str
    out: Path
    id_config: IdentifyConfig
    id_harmful: PromptSet
    id_harmless: PromptSet
    exclude: list[str] = field(default_factory=list)
    transfer_source: str | None = None
    progress: bool = True
    identify: Callable[[], Any] | None = None
    samples: dict | None = None
    """When a dict: every condition's answers as sample records (:func:`sample_records`), by measurement name."""
    _identification: Any = None
    _reference: Any = None

    def identification(self):
        """The attacker's identification on this model (computed once)."""
        if self._identification is None:
            if self.identify is None:
                raise RuntimeError("this attack needs the attacker's identification; none was given")
            self._identification = self.identify()
        return self._identification

    def utility_prompts(self) -> list[str]:
        return self.id_harmless.prompts[: self.config.utility_prompts]

    def reference(self):
        """The unattacked model's next-token log-probs on the utility prompts, and its perplexity there."""
        if self._reference is None:
            self._reference = _utility_reading(self.loaded, self.utility_prompts(), self.settings.batch_size)
        return self._reference


def pruning_condition(loaded, mask: SafetyNeuronMask, budget: float, label: str, **details) -> Condition:
    """Pruning ``mask`` as a condition (its cache tag is the one :func:`judged_responses` gives a mask)."""
    return Condition(budget, label, tag=f"|prune:{mask.digest()}" if mask.count() else "",
                     edit=(lambda: prune_neurons(loaded.model, mask)) if mask.count() else None,
                     details={"pruned": mask.count(), **details})


def _utility_reading(loaded, prompts: list[str], batch_size: int):
    if not prompts:
        return None, None
    logp = next_token_logprobs(loaded.model, loaded.tokenizer, prompts, batch_size=batch_size)
    ppl, _ = perplexity(loaded.model, loaded.tokenizer, prompts, batch_size=max(1, batch_size // 2))
    return logp, ppl


def measure_plan(ctx: AttackContext, plan: AttackPlan, prompts: list[str], cache: Path) -> dict:
    """ASR on ``prompts`` under each of ``plan``'s conditions (answers cached in ``cache``), with its utility cost.

    Returns ``{"kind", "budget", "points": [{"budget", "label", "asr", "ci95", "k", "n", "kl", "perplexity",
    "verdicts", ...}], "outcomes": {label: [0/1 per prompt]}, "details", "time_s"}``; ``kl`` is the mean
    KL(unattacked || attacked) of the next-token distribution on the harmless utility prompts (nats), and
    ``perplexity`` theirs under the attack (``perplexity_plain`` beside it)."""
    t0 = time.perf_counter()
    judged: list[Judged] = []
    utility: list[tuple[float | None, float | None]] = []
    ref_logp, ref_ppl = ctx.reference() if plan.utility and ctx.config.utility_prompts else (None, None)
    for c in plan.conditions:
        with c.active():
            judged.append(judged_responses(ctx.loaded, prompts, ctx.judge, settings=ctx.settings, cache=cache,
                                           tag=ctx.tag + c.tag, answer_prefix=c.answer_prefix,
                                           progress=ctx.progress))
            if ref_logp is not None:
                logp, ppl = _utility_reading(ctx.loaded, ctx.utility_prompts(), ctx.settings.batch_size)
                utility.append((float(kl_divergence(ref_logp, logp).mean()), ppl))
            else:
                utility.append((None, None))
        logger.info("%s %s: ASR %d/%d", plan.kind, c.label, judged[-1].k, judged[-1].n)
        if ctx.samples is not None:
            ctx.samples[f"attack_{plan.kind}_{c.label}"] = sample_records(
                judged[-1], prompts, condition=f"{plan.kind}: {c.label}"
                + (f" (answer opens {c.answer_prefix!r})" if c.answer_prefix else ""), judge=ctx.judge.name)
    points, outcomes = [], {}
    if plan.cumulative:
        for n in plan.points_at:
            flags = [any(j.flags[i] for j in judged[:n]) for i in range(len(prompts))]
            points.append(_point(n, f"{plan.budget} {n}", flags, None, (None, None), {"conditions": n}))
            outcomes[points[-1]["label"]] = [int(f) for f in flags]
    else:
        for c, j, u in zip(plan.conditions, judged, utility):
            points.append(_point(c.budget, c.label, j.flags, j, u, c.details))
            outcomes[c.label] = [int(f) for f in j.flags]
    for c, j in zip(plan.conditions, judged):  # every condition's own rate, also for cumulative plans
        c.details.setdefault("asr", j.rate)
    return {"kind": plan.kind, "budget": plan.budget, "n": len(prompts), "points": points, "outcomes": outcomes,
            "perplexity_plain": ref_ppl, "details": plan.details,
            "conditions": [{"label": c.label, "budget": c.budget, **c.details} for c in plan.conditions]
            if plan.cumulative else None, "time_s": round(time.perf_counter() - t0, 2)}


def _point(budget, label: str, flags: list[bool], judged: Judged | None, utility, details: dict) -> dict:
    rate = Rate(int(sum(flags)), len(flags))
    kl, ppl = utility
    point = {"budget": budget, "label": label, "asr": rate.value, "ci95": _ci(rate), "k": rate.k, "n": rate.n,
             "kl": kl, "perplexity": ppl, **{k: v for k, v in details.items() if k not in ("asr",)}}
    if judged is not None:
        point["verdicts"] = judged.verdict_counts()
    return point
