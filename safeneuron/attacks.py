"""Neuron-pruning attacks: zero the safety neurons' contribution, measure the ASR.

The attack (NeuroStrike-style) in steps, each a function::

    attacker_identification   identify safety neurons on the model under attack
                              (the adaptive attacker; or reuse a mask file)
    attack_masks              the ES set, the SAS set and their union (FULL)
    prune_neurons             a reversible, scoped hook zeroing the masked neurons
    iterative_prune           identify -> prune -> re-identify on the pruned model ...
    fraction_sweep            ASR with the top 0 .. 5 % of neurons pruned: a curve
    save_pruned_model         the weight edit (prune_weights), written to a directory
    run_attack                the ``safeneuron attack`` command as a library call

:func:`prune_neurons` zeroes the neuron activations entering each down projection at
the masked channels; :func:`prune_weights` edits the weights instead (the
down-projection columns of the masked neurons are set to zero), for saving a pruned
model. Both give the same outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from safeneuron.activations import neuron_hooks
from safeneuron.arch import find_mlps
from safeneuron.config import AttackConfig, IdentifyConfig
from safeneuron.errors import SafeneuronError
from safeneuron.masks import SafetyNeuronMask

logger = logging.getLogger(__name__)

__all__ = [
    "prune_neurons",
    "prune_weights",
    "mask_digest",
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
    "register_cli",
    "AttackError",
]


class AttackError(SafeneuronError):
    """An attack cannot run as asked (missing score, existing output, ...)."""


# --------------------------------------------------------------------------- pruning
@contextlib.contextmanager
def prune_neurons(model: nn.Module, mask: SafetyNeuronMask) -> Iterator[SafetyNeuronMask]:
    """Zero the masked neurons in every forward pass inside the ``with`` block.

    Outputs are bit-exactly restored on exit (the hooks are removed; no weight changes).
    Hooks nest: pruning inside pruning zeroes the union.
    """
    sites = find_mlps(model)
    mask.check(sites)
    keep = {}
    for s in sites:
        keep[s.name] = (~mask.masks[s.name]).to(device=s.down.weight.device)

    def zero(site, acts: torch.Tensor) -> torch.Tensor | None:
        k = keep[site.name]
        if k.all():
            return None
        return acts * k.to(acts.dtype)  # [batch, seq, d_ff] * [d_ff]

    with neuron_hooks(model, zero, sites):
        yield mask


@torch.no_grad()
def prune_weights(model: nn.Module, mask: SafetyNeuronMask) -> int:
    """Zero the down-projection weights that read the masked neurons (in place).

    Equivalent to :func:`prune_neurons` for the model's outputs. Returns the number
    of neurons pruned.
    """
    sites = find_mlps(model)
    mask.check(sites)
    for s in sites:
        idx = mask.indices(s.name).to(s.down.weight.device)
        if idx.numel() == 0:
            continue
        down_slice = s.slices[-1]  # the down projection's slice: columns (Linear) or rows (Conv1D)
        s.down.weight.index_fill_(down_slice.dim, idx, 0.0)
    return mask.count()


def mask_digest(mask: SafetyNeuronMask) -> str:
    """Short content hash of a mask (names and bits), for cache keys and directory names."""
    h = hashlib.sha256()
    for name in sorted(mask.masks):
        h.update(name.encode())
        h.update(mask.masks[name].to(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def save_pruned_model(loaded, mask: SafetyNeuronMask, path: str | Path, *, overwrite: bool = False,
                      metadata: dict | None = None) -> Path:
    """Write ``loaded``'s model with ``mask``'s neurons pruned in the weights
    (:func:`prune_weights`) and its tokenizer to ``path``, atomically (a temporary
    directory renamed into place). The in-memory model is restored bit-exactly after
    saving. The mask goes along as ``pruned_neurons.safetensors``.
    """
    from safeneuron.artifacts import write_json

    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise AttackError(f"{path} exists and is not empty; choose another --save directory or remove it")
    model = loaded.model
    sites = find_mlps(model)
    mask.check(sites)
    backup = {}
    for s in sites:
        idx = mask.indices(s.name).to(s.down.weight.device)
        if idx.numel():
            backup[s.name] = (s, idx, s.down.weight.detach().index_select(s.slices[-1].dim, idx).clone())
    if getattr(model, "hf_quantizer", None) is not None:  # a GGUF-loaded model: weights are already dequantized
        from safeneuron.embedded import _strip_quantization

        _strip_quantization(model)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        prune_weights(model, mask)
        model.save_pretrained(tmp, safe_serialization=True)
        (getattr(loaded, "processor", None) or loaded.tokenizer).save_pretrained(tmp)  # a VLM keeps its processor
        mask.save(tmp / "pruned_neurons.safetensors")
        write_json(tmp / "safeneuron_pruned.json", {
            "source_model": loaded.name, "source_path": loaded.path, "pruned": mask.count(),
            "pruned_per_layer": mask.per_layer(), "mask_digest": mask_digest(mask), **(metadata or {}),
        })
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        with torch.no_grad():
            for s, idx, cols in backup.values():
                s.down.weight.index_copy_(s.slices[-1].dim, idx, cols)
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved the model with %d neurons pruned to %s", mask.count(), path)
    return path


def load_attack_mask(path: str | Path, set: str = "union") -> SafetyNeuronMask:
    """A mask file, or an identify output directory's ``safety_neurons.safetensors``;
    ``set`` picks es/sas/union (``full`` = union)."""
    path = Path(path)
    if path.is_dir():
        path = path / "safety_neurons.safetensors"
    return SafetyNeuronMask.load(path, set="union" if set == "full" else set)


# --------------------------------------------------------------------------- the attacker's identification
def attacker_config(loaded, *, method: str = "stats", position: str = "mean", harmful: str | None = None,
                    harmless: str | None = None, n_prompts: int = 64, seed: int = 0,
                    batch_size: int = 16) -> IdentifyConfig:
    """The identification settings of the attacker (the method's defaults otherwise).

    ``position="mean"``: on the embedded model the mean-pooled ES/SAS sets carry the
    refusal behaviour (pruning them removes it) while the max-pooled ones barely do;
    an adaptive attacker uses what works.
    """
    return IdentifyConfig(model=loaded.name, method=method, position=position, harmful=harmful, harmless=harmless,
                          max_prompts=n_prompts, seed=seed, batch_size=batch_size)


def attacker_prompts(config: IdentifyConfig):
    """The (harmful, harmless) prompts an identification with ``config`` uses, so the
    evaluation can leave them out."""
    from safeneuron.data.prompts import load_prompts

    harmful = load_prompts(config.harmful, default="harmful", column=config.prompt_column,
                           limit=config.max_prompts, seed=config.seed)
    harmless = load_prompts(config.harmless, default="harmless", column=config.prompt_column,
                            limit=config.max_prompts, seed=config.seed)
    return harmful, harmless


def attacker_identification(loaded, config: IdentifyConfig, out: str | Path, *, progress: bool = True):
    """Identify safety neurons on the model as it is now (pruning hooks active stay
    active: this is how the iterative attack re-identifies). Artifacts go to ``out``
    and are reused when the settings match; another run's artifacts there are replaced."""
    from safeneuron.identify import OutputDirError, identify

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


def iterative_prune(loaded, config: IdentifyConfig, rounds: int, out: str | Path, *, set: str = "union",
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
        round_dir = Path(out) / f"round{r}-{mask_digest(pruned)}"
        ctx = prune_neurons(loaded.model, pruned) if pruned.count() else contextlib.nullcontext()
        with ctx:
            ident = attacker_identification(loaded, config, round_dir, progress=progress)
        new = ident.sets["union" if set == "full" else set]
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
    from safeneuron.evaluation.measure import GenerationSettings, judged_responses

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
    from safeneuron.artifacts import write_json
    from safeneuron.evaluation.judges import load_judge
    from safeneuron.evaluation.measure import GenerationSettings, judged_responses, model_tag
    from safeneuron.evaluation.metrics import Rate
    from safeneuron.evaluation.sets import load_eval_prompts, load_multimodal_harmful
    from safeneuron.identify import versions
    from safeneuron.models import load_model
    from safeneuron.vlm import is_vlm

    config = config or AttackConfig()
    config.validate()
    out = Path(out)
    t_start = time.perf_counter()
    if loaded is None:
        loaded = load_model(config.model, dtype=config.dtype, device=config.device)
    sites = find_mlps(loaded.model)
    judge = load_judge(config.judge, device=config.device)
    id_config = attacker_config(loaded, method=config.method, position=config.position, harmful=config.harmful,
                                harmless=config.harmless,
                                n_prompts=config.identify_prompts, seed=config.seed, batch_size=config.batch_size)
    set_name = "union" if config.set == "full" else config.set

    attacker: dict = {"method": config.method, "position": config.position}
    rounds: list[SafetyNeuronMask] = []
    exclude: list[str] = []
    if config.mask:
        attacker.update(mode="given mask", mask=str(config.mask), set=set_name)
        mask = load_attack_mask(config.mask, set_name)
        mask.check(sites)
        label = f"mask:{set_name}"
    elif config.random_frac is not None:
        attacker.update(mode="random", fraction=config.random_frac, seed=config.seed)
        mask = SafetyNeuronMask.random(sites, frac=config.random_frac, seed=config.seed)
        label = f"random {config.random_frac:.2%}"
    else:
        exclude = [p for ps in attacker_prompts(id_config) for p in ps.prompts]
        attacker.update(mode="adaptive", identify_prompts=config.identify_prompts,
                        harmful=config.harmful or "builtin:harmful", harmless=config.harmless or "builtin:harmless")
        if config.rounds > 1:
            rounds = iterative_prune(loaded, id_config, config.rounds, out / "identify", set=set_name,
                                     progress=progress)
            mask = rounds[-1]
            attacker.update(rounds=config.rounds, set=set_name)
            label = f"iterative {set_name} x{config.rounds}"
        else:
            ident = attacker_identification(loaded, id_config, out / "identify", progress=progress)
            if config.top_frac is not None:
                mask = top_fraction_mask(ident.scores, config.score, config.top_frac)
                attacker.update(top_frac=config.top_frac, score=config.score)
                label = f"top {config.top_frac:.2%} by {config.score}"
            else:
                if set_name not in ident.sets:
                    raise AttackError(f"the {config.method} identification has no {set_name!r} set "
                                      f"(has {', '.join(ident.sets)}); use --set union")
                mask = ident.sets[set_name]
                attacker.update(set=set_name)
                label = set_name

    prompts = load_eval_prompts(config.eval_harmful, default="harmful", n=config.limit, seed=config.seed,
                                exclude=exclude)
    settings = GenerationSettings(max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                                  seed=config.seed)
    cache = out / "generations" / "harmful.jsonl"
    tag = model_tag(loaded)

    def measure_on(batch, judge_prompts, cache_file):
        def measure(m: SafetyNeuronMask | None) -> dict:
            judged = judged_responses(loaded, batch, judge, mask=m, judge_prompts=judge_prompts, settings=settings,
                                      cache=cache_file, tag=tag, progress=progress)
            r = Rate(judged.k, judged.n)
            return {"asr": r.value, "ci95": list(r.ci95) if r.ci95 else None, "k": r.k, "n": r.n,
                    "pruned": m.count() if m is not None else 0}

        return measure

    def conditions(measure) -> dict:
        """ASR plain, pruned, after each round, and with as many random neurons pruned."""
        res = {"ori": measure(None), "pruned": measure(mask)}
        if rounds and len(rounds) > 1:
            res["rounds"] = [dict(measure(m), round=i + 1) for i, m in enumerate(rounds)]
        if config.random_control and mask.count() and config.random_frac is None:
            res["random_control"] = measure(SafetyNeuronMask.random(sites, like=mask, seed=config.seed))
        return res

    results = conditions(measure_on(prompts.prompts, None, cache))
    # A VLM is also attacked with image+text inputs: the same conditions on the harmful prompts
    # typeset as images (or multimodal_harmful), as evaluate's asr_multimodal.
    results_mm, harmful_mm = None, None
    if is_vlm(loaded.model) and config.multimodal_harmful != "":
        mm, judge_prompts = load_multimodal_harmful(prompts, config.multimodal_harmful, n=config.limit,
                                                    seed=config.seed)
        harmful_mm = {"source": mm.source, "n": len(mm), "sha256": mm.sha256}
        results_mm = conditions(measure_on(list(mm), judge_prompts, out / "generations" / "harmful_multimodal.jsonl"))

    saved = None
    if config.save:
        saved = str(save_pruned_model(loaded, mask, config.save, metadata={"attack": label, "attacker": attacker}))
    report = {
        "model": loaded.name,
        "path": loaded.path,
        "attack": label,
        "attacker": attacker,
        "judge": judge.name,
        "harmful": {"source": prompts.source, "n": len(prompts), "sha256": prompts.sha256},
        "n_neurons": sum(s.d_ff for s in sites),
        "pruned_count": mask.count(),
        "pruned_per_layer": mask.per_layer(),
        "results": results,
        "harmful_multimodal": harmful_mm,
        "results_multimodal": results_mm,
        "saved_model": saved,
        "settings": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "wall_time_s": time.perf_counter() - t_start,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(out / "attack.json", report)
    return report


def attack_summary(report: dict) -> str:
    """The attack's ASRs as a text table."""
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


def cmd_attack(args) -> int:
    from safeneuron.cli import config_from_args

    config = config_from_args(AttackConfig, args)
    report = run_attack(config, args.out, progress=not args.no_progress)
    print(attack_summary(report))
    if report["saved_model"]:
        print(f"\npruned model: {report['saved_model']}")
    print(f"\nartifacts: {Path(args.out).resolve()}")
    return 0


def register_cli(subparsers) -> None:
    """Add ``safeneuron attack``."""
    from safeneuron.cli import add_config_flags

    p = subparsers.add_parser("attack", help="neuron-pruning attack: ASR before/after pruning safety neurons")
    add_config_flags(p, AttackConfig)
    p.add_argument("--out", default="attack", help="output directory (default: attack)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_attack)
