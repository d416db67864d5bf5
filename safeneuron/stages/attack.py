"""The ``attack`` stage: neuron-pruning attacks, zero the safety neurons' contribution, measure the ASR.

The attack (NeuroStrike-style) in steps, each a function::

    attacker_identification   identify safety neurons on the model under attack
                              (the adaptive attacker; or reuse a mask file)
    attack_masks              the ES set, the SAS set and their union (FULL)
    iterative_prune           identify -> prune -> re-identify on the pruned model ...
    fraction_sweep            ASR with the top 0 .. 5 % of neurons pruned: a curve
    save_pruned_model         the weight edit, written to a directory
    run_attack                the ``safeneuron attack`` command as a library call

The pruning itself is a core primitive: :func:`safeneuron.hooks.prune_neurons` (a
reversible, scoped hook zeroing the masked neurons) and
:func:`safeneuron.hooks.prune_weights` (the same edit in the weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from safeneuron.arch import find_mlps
from safeneuron.artifacts import ArtifactError, check_out_dir, stage_lock, timestamp, versions, write_json
from safeneuron.cards import mask_metadata, write_model_card
from safeneuron.config import AttackConfig, IdentifyConfig
from safeneuron.data.prompts import load_prompts
from safeneuron.errors import SafeneuronError
from safeneuron.evaluation.judges import load_judge
from safeneuron.evaluation.measure import GenerationSettings, judged_responses, model_tag
from safeneuron.evaluation.metrics import Rate
from safeneuron.evaluation.sets import load_eval_prompts, load_multimodal_harmful
from safeneuron.hooks import prune_neurons, prune_weights
from safeneuron.masks import SafetyNeuronMask
from safeneuron.models import LoadedModel, load_model, save_model_dir
from safeneuron.stages.identify import OutputDirError, identify

logger = logging.getLogger(__name__)

__all__ = [
    "save_pruned_model",
    "load_attack_mask",
    "attacker_config",
    "attacker_prompts",
    "attacker_identification",
    "attack_masks",
    "iterative_prune",
    "top_fraction_mask",
    "fraction_sweep",
    "run_attack",
    "AttackError",
]


class AttackError(SafeneuronError):
    """An attack cannot run as asked (missing score, existing output, ...)."""


# --------------------------------------------------------------------------- the pruned model
def save_pruned_model(loaded: LoadedModel, mask: SafetyNeuronMask, path: str | Path, *, overwrite: bool = False,
                      metadata: dict | None = None) -> Path:
    """Write ``loaded``'s model with ``mask``'s neurons pruned in the weights
    (:func:`~safeneuron.hooks.prune_weights`) and its tokenizer (a VLM: its processor) to
    ``path``, atomically. The in-memory model is restored bit-exactly after saving. The
    mask goes along as ``pruned_neurons.safetensors``.
    """
    path = Path(path)
    if not overwrite:
        _refuse_nonempty_save(path)
    model = loaded.model
    sites = find_mlps(model)
    mask.check(sites)
    backup = {}
    for s in sites:
        idx = mask.indices(s.name).to(s.down.weight.device)
        if idx.numel():
            backup[s.name] = (s, idx, s.down.weight.detach().index_select(s.slices[-1].dim, idx).clone())

    def write_mask(folder: Path) -> None:
        mask.save(folder / "pruned_neurons.safetensors", metadata=mask_metadata(
            model=loaded.name, mask_digest=mask.digest(), pruned=mask.count()))
        write_json(folder / "safeneuron_pruned.json", {
            "source_model": loaded.name, "source_path": loaded.path, "pruned": mask.count(),
            "pruned_per_layer": mask.per_layer(), "mask_digest": mask.digest(), **(metadata or {}),
        })
        write_model_card(folder, {"base_model": loaded.name, "method": "neuron pruning",
                                  "title": f"{loaded.name} with {mask.count()} safety neurons pruned",
                                  "note": "An attack artifact (safeneuron attack --save): the model with its "
                                          "safety neurons' down-projection weights zeroed, for red-teaming, not "
                                          "for deployment. safeneuron_pruned.json names the neurons."})

    try:
        prune_weights(model, mask)
        save_model_dir(model, loaded.processor or loaded.tokenizer, path, write_extra=write_mask)
    finally:
        with torch.no_grad():
            for s, idx, cols in backup.values():
                s.down.weight.index_copy_(s.slices[-1].dim, idx, cols)
    logger.info("saved the model with %d neurons pruned to %s", mask.count(), path)
    return path


def _refuse_nonempty_save(path: str | Path) -> None:
    """An error for a ``--save`` directory that already holds files (checked before any work as well)."""
    path = Path(path)
    try:
        check_out_dir(path, "save directory")
    except ArtifactError as err:
        raise AttackError(str(err), fields=("save",)) from None
    if path.exists() and any(path.iterdir()):
        raise AttackError(f"{path} exists and is not empty; choose another save directory or remove it",
                          fields=("save",))


def load_attack_mask(path: str | Path, neuron_set: str = "union") -> SafetyNeuronMask:
    """A mask file, or an identify output directory's ``safety_neurons.safetensors``;
    ``neuron_set`` picks es/sas/union (``full`` = union)."""
    path = Path(path)
    if path.is_dir():
        path = path / "safety_neurons.safetensors"
    return SafetyNeuronMask.load(path, neuron_set="union" if neuron_set == "full" else neuron_set)


# --------------------------------------------------------------------------- the attacker's identification
def attacker_config(loaded, identify: IdentifyConfig | None = None, *, seed: int = 0,
                    batch_size: int = 16) -> IdentifyConfig:
    """The attacker's identification settings on ``loaded``: ``identify`` (default: the
    attacker's own, mean pooling and 64 prompts per class) with the model, seed and batch size set.

    Mean pooling: on the embedded model the mean-pooled ES/SAS sets carry the refusal
    behaviour (pruning them removes it) while the max-pooled ones barely do; an adaptive
    attacker uses what works.
    """
    identify = identify if identify is not None else AttackConfig().identify
    return dataclasses.replace(identify, model=loaded.name, seed=seed, batch_size=batch_size)


def attacker_prompts(config: IdentifyConfig):
    """The (harmful, harmless) prompts an identification with ``config`` uses, so the
    evaluation can leave them out."""
    harmful = load_prompts(config.harmful, default="harmful", column=config.prompt_column,
                           limit=config.max_prompts, seed=config.seed, allow_fallback=config.allow_fallback)
    harmless = load_prompts(config.harmless, default="harmless", column=config.prompt_column,
                            limit=config.max_prompts, seed=config.seed, allow_fallback=config.allow_fallback)
    return harmful, harmless


def attacker_identification(loaded, config: IdentifyConfig, out: str | Path, *, progress: bool = True):
    """Identify safety neurons on the model as it is now (pruning hooks active stay
    active: this is how the iterative attack re-identifies). Artifacts go to ``out``
    and are reused when the settings match; another run's artifacts there are replaced."""
    try:
        return identify(config, out, loaded=loaded, progress=progress)
    except OutputDirError:
        logger.info("%s: replacing an identification of other settings", out)
        return identify(config, out, loaded=loaded, overwrite=True, progress=progress)


def attack_masks(identification) -> dict[str, SafetyNeuronMask | None]:
    """The method's protocol sets: ``es``, ``sas`` and ``full`` (their union). A
    NeuroStrike identification has no ES/SAS sets: ``es`` and ``sas`` are None and
    ``full`` is the union of its gate and up probe sets."""
    sets = identification.sets
    return {"es": sets.get("es"), "sas": sets.get("sas"), "full": sets["union"]}


def iterative_prune(loaded, config: IdentifyConfig, rounds: int, out: str | Path, *, neuron_set: str = "union",
                    start: SafetyNeuronMask | None = None, progress: bool = True) -> list[SafetyNeuronMask]:
    """The adaptive iterative attack: identify, prune, re-identify *on the pruned
    model* (the pruning hooks are active during identification, so pruned neurons read
    zero and new ones surface), prune the union, for ``rounds`` rounds.

    Returns the cumulative mask after each round. Round ``r``'s artifacts go to
    ``out/round<r>-<digest of the mask pruned during it>`` and are reused on a rerun.
    """
    pruned = start if start is not None else SafetyNeuronMask.empty_like(find_mlps(loaded.model))
    history = []
    for r in range(1, rounds + 1):
        round_dir = Path(out) / f"round{r}-{pruned.digest()}"
        ctx = prune_neurons(loaded.model, pruned) if pruned.count() else contextlib.nullcontext()
        with ctx:
            ident = attacker_identification(loaded, config, round_dir, progress=progress)
        new = ident.sets["union" if neuron_set == "full" else neuron_set]
        before = pruned.count()
        pruned = pruned | new
        logger.info("iterative pruning round %d: %d new neurons, %d pruned in all", r, pruned.count() - before,
                    pruned.count())
        history.append(pruned)
    return history


def top_fraction_mask(scores: dict[str, dict[str, torch.Tensor]], score: str, frac: float) -> SafetyNeuronMask:
    """The top ``frac`` of all neurons by ``scores[mlp][score]``, ranked across layers."""
    missing = [mlp for mlp, per in scores.items() if score not in per]
    if missing:
        have = sorted(next(iter(scores.values())).keys()) if scores else []
        raise AttackError(f"identification has no {score!r} score (has {', '.join(have)}); choose another score")
    return SafetyNeuronMask.top_frac({mlp: per[score] for mlp, per in scores.items()}, frac)


def fraction_sweep(loaded, scores: dict[str, dict[str, torch.Tensor]], fractions: Sequence[float],
                   prompts: Sequence[str], judge, *, score: str = "es", settings=None, cache=None, tag: str = "",
                   progress: bool = True) -> list[dict]:
    """ASR with the top ``f`` of neurons (by ``score``) pruned, for each fraction.

    Returns ``[{"fraction", "asr", "k", "n", "pruned"}, ...]`` in the given order.
    Fraction 0 is the unpruned model (its answers are shared with the plain ASR in
    the cache).
    """
    settings = settings or GenerationSettings()
    points = []
    for f in fractions:
        mask = top_fraction_mask(scores, score, f) if f > 0 else None
        judged = judged_responses(loaded, prompts, judge, mask=mask, settings=settings, cache=cache, tag=tag,
                                  progress=progress)
        points.append({"fraction": float(f), "asr": judged.rate, "k": judged.k, "n": judged.n,
                       "pruned": mask.count() if mask is not None else 0})
        logger.info("sweep: top %.2f%% by %s pruned (%d neurons): ASR %s", 100 * f, score,
                    points[-1]["pruned"], f"{judged.rate:.3f}" if judged.rate is not None else "n/a")
    return points


# --------------------------------------------------------------------------- the command
def run_attack(config: AttackConfig | None = None, out: str | Path = "attack", *, loaded=None,
               progress: bool = True) -> dict:
    """The pruning attack on one model: ASR before and after pruning, and after
    pruning as many random neurons per layer (the control). Writes ``out/attack.json``
    (and the pruned model when ``config.save``); returns the same dict.

    On a vision-language model the same conditions are also measured with image+text
    inputs (the harmful prompts typeset as images, or ``config.multimodal_harmful``):
    ``results_multimodal`` and ``harmful_multimodal`` (None for a text model).
    """
    config = config or AttackConfig()
    config.validate()
    out = check_out_dir(out)
    if config.save:  # before any work, not after every answer is generated
        if config.kind not in ("prune", "direction"):
            raise AttackError(f"--save writes a pruned or direction-ablated model; the {config.kind} attack has none",
                              fields=("save",))
        _refuse_nonempty_save(config.save)
    with stage_lock(out, "an attack"):
        return _run_attack(config, out, loaded, progress)


def _run_attack(config: AttackConfig, out: Path, loaded, progress: bool) -> dict:
    t_start = time.perf_counter()
    if loaded is None:
        loaded = load_model(config.model, dtype=config.dtype, device=config.device)
    if config.kind != "prune":
        return _run_attack_kind(loaded, config, out, progress, t_start)
    sites = find_mlps(loaded.model)
    judge = load_judge(config.judge, device=config.device, template=config.judge_template)
    chosen = _attack_mask(loaded, config, out, progress)
    prompts = load_eval_prompts(config.eval_harmful, default="harmful", n=config.limit, seed=config.seed,
                                exclude=chosen.exclude, allow_fallback=config.allow_fallback)
    measure = _Conditions(loaded, config, judge, chosen, progress)
    results = measure(prompts.prompts, None, out / "generations" / "harmful.jsonl")
    # A VLM is also attacked with image+text inputs: the same conditions on the harmful prompts
    # typeset as images (or multimodal_harmful), as evaluate's asr_multimodal.
    results_mm, harmful_mm = None, None
    if loaded.is_vlm and config.multimodal_harmful != "":
        mm, judge_prompts = load_multimodal_harmful(prompts, config.multimodal_harmful, n=config.limit,
                                                    seed=config.seed)
        harmful_mm = {"source": mm.source, "n": len(mm), "sha256": mm.sha256}
        results_mm = measure(list(mm), judge_prompts, out / "generations" / "harmful_multimodal.jsonl")
    saved = None
    if config.save:
        saved = str(save_pruned_model(loaded, chosen.mask, config.save,
                                      metadata={"attack": chosen.label, "attacker": chosen.attacker}))
    report = {
        "model": loaded.name, "path": loaded.path, "attack": chosen.label, "attacker": chosen.attacker,
        "judge": judge.name, "harmful": {"source": prompts.source, "n": len(prompts), "sha256": prompts.sha256},
        "n_neurons": sum(s.d_ff for s in sites), "pruned_count": chosen.mask.count(),
        "pruned_per_layer": chosen.mask.per_layer(), "results": results, "harmful_multimodal": harmful_mm,
        "results_multimodal": results_mm, "saved_model": saved, "settings": asdict(config),
        "wall_time_s": time.perf_counter() - t_start, "versions": versions(), "created": timestamp(),
    }
    write_json(out / "attack.json", report)
    return report


def _run_attack_kind(loaded, config: AttackConfig, out: Path, progress: bool, t_start: float) -> dict:
    """``--kind`` other than ``prune``: the attack's plan along its budget, measured with its utility cost
    beside the plain ASR on the same prompts; ``--save`` writes a direction attack's edited weights."""
    from safeneuron.stages.attack_direction import save_orthogonalized
    from safeneuron.stages.attack_profile import PLANNERS
    from safeneuron.stages.conditions import AttackContext, NotApplicable, measure_plan

    if config.save and config.kind != "direction":
        raise AttackError(f"--save writes a pruned or direction-ablated model; the {config.kind} attack has none",
                          fields=("save",))
    if config.save:
        _refuse_nonempty_save(config.save)
    judge = load_judge(config.judge, device=config.device, template=config.judge_template)
    id_config = attacker_config(loaded, config.identify, seed=config.seed, batch_size=config.batch_size)
    id_harmful, id_harmless = attacker_prompts(id_config)
    prompts = load_eval_prompts(config.eval_harmful, default="harmful", n=config.limit, seed=config.seed,
                                exclude=id_harmful.prompts + id_harmless.prompts, allow_fallback=config.allow_fallback)
    settings = GenerationSettings(max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, seed=config.seed)
    ctx = AttackContext(loaded, config.attacks, judge, settings, model_tag(loaded), out, id_config, id_harmful,
                        id_harmless, exclude=prompts.prompts, progress=progress,
                        identify=lambda: attacker_identification(loaded, id_config, out / "identify", progress=progress))
    plain = judged_responses(loaded, prompts.prompts, judge, settings=settings, cache=out / "generations" / "plain.jsonl",
                             tag=ctx.tag, progress=progress)
    rate = Rate(plain.k, plain.n)
    t_plan = time.perf_counter()
    try:
        plan = PLANNERS[config.kind](ctx)
    except NotApplicable as why:
        raise AttackError(f"the {config.kind} attack does not apply to {loaded.name}: {why}") from None
    plan_s = time.perf_counter() - t_plan
    result = measure_plan(ctx, plan, prompts.prompts, out / "generations" / f"{config.kind}.jsonl")
    result["plan_s"] = round(plan_s, 2)
    saved = None
    if config.save:
        first = plan.conditions[0]
        saved = str(save_orthogonalized(loaded, first.payload, config.save,
                                        metadata={"attack": "direction", "rank": first.budget}))
    report = {
        "model": loaded.name, "path": loaded.path, "attack": config.kind, "judge": judge.name,
        "harmful": {"source": prompts.source, "n": len(prompts), "sha256": prompts.sha256},
        "plain": {"asr": rate.value, "ci95": list(rate.ci95) if rate.ci95 else None, "k": rate.k, "n": rate.n,
                  "verdicts": plain.verdict_counts(), "outcomes": [int(f) for f in plain.flags]},
        "profile": result, "saved_model": saved, "settings": asdict(config),
        "wall_time_s": time.perf_counter() - t_start, "versions": versions(), "created": timestamp(),
    }
    write_json(out / "attack.json", report)
    return report


@dataclass
class _Chosen:
    """The neurons an attack prunes: the mask, its label, the attacker's description (``attack.json``'s
    ``attacker``), the cumulative mask of each iterative round, and the prompts its identification used."""

    mask: SafetyNeuronMask
    label: str
    attacker: dict
    rounds: list[SafetyNeuronMask] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)


def _attack_mask(loaded, config: AttackConfig, out: Path, progress: bool) -> _Chosen:
    """A given mask, random neurons, or the adaptive attacker's set (top fraction, iterative rounds)."""
    sites = find_mlps(loaded.model)
    set_name = "union" if config.neuron_set == "full" else config.neuron_set
    attacker: dict = {"method": config.identify.method, "position": config.identify.position}
    if config.mask:
        mask = load_attack_mask(config.mask, set_name)
        mask.check(sites)
        return _Chosen(mask, f"mask:{set_name}", dict(attacker, mode="given mask", mask=str(config.mask),
                                                      set=set_name))
    if config.random_frac is not None:
        mask = SafetyNeuronMask.random(sites, frac=config.random_frac, seed=config.seed)
        return _Chosen(mask, f"random {config.random_frac:.2%}",
                       dict(attacker, mode="random", fraction=config.random_frac, seed=config.seed))
    id_config = attacker_config(loaded, config.identify, seed=config.seed, batch_size=config.batch_size)
    exclude = [p for ps in attacker_prompts(id_config) for p in ps.prompts]
    attacker.update(mode="adaptive", identify_prompts=config.identify.max_prompts,
                    harmful=config.identify.harmful or "builtin:harmful",
                    harmless=config.identify.harmless or "builtin:harmless")
    if config.rounds > 1:
        rounds = iterative_prune(loaded, id_config, config.rounds, out / "identify", neuron_set=set_name,
                                 progress=progress)
        return _Chosen(rounds[-1], f"iterative {set_name} x{config.rounds}",
                       dict(attacker, rounds=config.rounds, set=set_name), rounds, exclude)
    ident = attacker_identification(loaded, id_config, out / "identify", progress=progress)
    if config.top_frac is not None:
        mask = top_fraction_mask(ident.scores, config.score, config.top_frac)
        return _Chosen(mask, f"top {config.top_frac:.2%} by {config.score}",
                       dict(attacker, top_frac=config.top_frac, score=config.score), exclude=exclude)
    if set_name not in ident.sets:
        raise AttackError(f"the {config.identify.method} identification has no {set_name!r} set "
                          f"(has {', '.join(ident.sets)}); set neuron_set to 'union'", fields=("neuron_set",))
    return _Chosen(ident.sets[set_name], set_name, dict(attacker, set=set_name), exclude=exclude)


class _Conditions:
    """ASR plain, pruned, after each iterative round, and with as many random neurons pruned (the control),
    on one batch of prompts."""

    def __init__(self, loaded, config: AttackConfig, judge, chosen: _Chosen, progress: bool) -> None:
        self.loaded, self.config, self.judge, self.chosen, self.progress = loaded, config, judge, chosen, progress
        self.settings = GenerationSettings(max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                                           seed=config.seed)
        self.tag = model_tag(loaded)

    def __call__(self, prompts, judge_prompts, cache) -> dict:
        def asr(mask: SafetyNeuronMask | None) -> dict:
            judged = judged_responses(self.loaded, prompts, self.judge, mask=mask, judge_prompts=judge_prompts,
                                      settings=self.settings, cache=cache, tag=self.tag, progress=self.progress)
            r = Rate(judged.k, judged.n)
            return {"asr": r.value, "ci95": list(r.ci95) if r.ci95 else None, "k": r.k, "n": r.n,
                    "pruned": mask.count() if mask is not None else 0}

        mask, rounds = self.chosen.mask, self.chosen.rounds
        res = {"ori": asr(None), "pruned": asr(mask)}
        if rounds and len(rounds) > 1:
            res["rounds"] = [dict(asr(m), round=i + 1) for i, m in enumerate(rounds)]
        if self.config.random_control and mask.count() and self.config.random_frac is None:
            res["random_control"] = asr(SafetyNeuronMask.random(find_mlps(self.loaded.model), like=mask,
                                                                seed=self.config.seed))
        return res
