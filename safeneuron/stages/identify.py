"""The ``identify`` stage: record, score, select safety neurons, write artifacts.

Pipeline (each step a small function)::

    load prompts -> record_activations (one streaming pass, both classes)
                 -> score_stats (ES, T, SAS per neuron)
                 -> select_safety_neurons (ES set, SAS set, union)
                 -> write scores.safetensors, safety_neurons.safetensors, identify.json

Artifacts in ``out/`` (a contract; keys start with the MLP's module name, e.g.
``model.layers.3.mlp``):

* ``scores.safetensors``: float32 [d_ff] ``<mlp>.mean_harmful``, ``.mean_harmless``,
  ``.var_harmful``, ``.var_harmless`` (unbiased), ``.es``, ``.t``, ``.shift``, ``.sas``
  (NeuroStrike: ``.probe_gate``, ``.probe_up`` probe weights).
* ``safety_neurons.safetensors``: bool [d_ff] ``<mlp>.es``, ``.sas``, ``.union``
  (NeuroStrike: ``.probe_gate``, ``.probe_up``, ``.union``).
* ``stats.safetensors``: the raw streaming statistics (count/mean/M2 per group),
  mergeable with another run's.
* ``categories/<category>.safetensors``: per-category sets (``--by-category``).
* ``identify.json``: settings, sizes, hashes, selections per layer, expected false
  selections, timings.
"""

from __future__ import annotations

from safeneuron.errors import SafeneuronError

import dataclasses
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from safeneuron.activations import ActivationStats, collect_activations, record_activations
from safeneuron.arch import backbone_model_type, find_mlps
from safeneuron.cards import mask_metadata
from safeneuron.artifacts import (
    ArtifactError,
    StageDir,
    load_tensors,
    check_out_dir,
    read_json,
    safe_file_names,
    stage_lock,
    save_tensors,
    sha256_text,
    timestamp,
    versions,
    write_json,
)
from safeneuron.config import ConfigError, IdentifyConfig, settings_hash
from safeneuron.data.images import MultimodalPromptSet, load_multimodal_set, typographic_prompts
from safeneuron.data.prompts import PromptFileError, PromptSet, load_prompts, match_lengths
from safeneuron.distributed import all_merge_stats, barrier, shard, world
from safeneuron.evaluation.judges import RefusalJudge
from safeneuron.evaluation.measure import GenerationSettings, judged_responses, model_tag
from safeneuron.evaluation.metrics import Rate, mcnemar_exact
from safeneuron.evaluation.sets import load_eval_prompts
from safeneuron.masks import SafetyNeuronMask
from safeneuron.models import LoadedModel, is_vlm, is_vlm_checkpoint, load_model, processor_of, weights_hash
from safeneuron.scoring import (
    NeuronScores,
    cap_top_frac,
    default_tau_es,
    es_threshold_as_t,
    expected_false_selections,
    false_selection_bound,
    neurostrike_probe,
    neurostrike_select,
    one_sided_p,
    score_neurons,
    select_by_t,
)

logger = logging.getLogger(__name__)

__all__ = ["Identification", "identify", "score_stats", "select_safety_neurons", "OutputDirError"]

# Fields that do not change the result (excluded from the settings hash).
_NOT_RESULT = ("device", "batch_size", "checkpoint_every", "trust_remote_code", "stats_device")


class OutputDirError(SafeneuronError):
    """The output directory holds artifacts of different settings."""


@dataclass
class Identification:
    """Result of an identification: per-MLP scores, the selected sets, the manifest."""

    scores: dict[str, dict[str, torch.Tensor]]
    sets: dict[str, SafetyNeuronMask]
    manifest: dict

    @property
    def union(self) -> SafetyNeuronMask:
        return self.sets["union"]

    @classmethod
    def load(cls, out: str | Path) -> "Identification":
        """Reopen the artifacts of a finished identification."""
        out = Path(out)
        manifest = read_json(out / "identify.json")
        raw = load_tensors(out / "scores.safetensors")
        scores: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in raw.items():
            mlp, name = key.rsplit(".", 1)
            scores.setdefault(mlp, {})[name] = value
        sets = {s: SafetyNeuronMask.load(out / "safety_neurons.safetensors", neuron_set=s) for s in manifest["sets"]}
        return cls(scores, sets, manifest)


# --------------------------------------------------------------------------- pure steps
def score_stats(stats: ActivationStats, harmful: str = "harmful", harmless: str = "harmless") -> dict[str, NeuronScores]:
    """ES, T, shift and SAS for every MLP from two groups' statistics."""
    if harmful not in stats.groups or harmless not in stats.groups:
        raise ValueError(f"statistics lack group {harmful!r} or {harmless!r} (have {', '.join(stats.groups)})")
    return {mlp: score_neurons(s, stats.groups[harmless][mlp]) for mlp, s in stats.groups[harmful].items()}


def select_safety_neurons(
    scores: dict[str, NeuronScores],
    n_harmful: int,
    n_harmless: int,
    *,
    tau_es: float,
    tau_sas: float,
    select: str = "threshold",
    alpha: float = 0.05,
    correction: str = "bh",
    top_frac: float | None = None,
) -> dict[str, SafetyNeuronMask]:
    """The ES set, the SAS set and their union, per MLP.

    ES: ``d > tau_es`` (or, with ``select="t"``, the one-sided Student-t p-value of T, with
    ``n_harmful + n_harmless - 2`` degrees of freedom, below the Bonferroni/BH cut over all neurons). SAS: ``z > tau_sas`` and ``shift > 0``.
    ``top_frac`` caps each set per layer by its own score.
    """
    names = list(scores)
    if select == "t":
        p = torch.cat([one_sided_p(scores[n].t, df=n_harmful + n_harmless - 2) for n in names])  # Student's t
        flat = select_by_t(p, alpha, correction)
        es_sets, start = {}, 0
        for n in names:
            width = scores[n].t.numel()
            es_sets[n] = flat[start : start + width].clone()
            start += width
    else:
        es_sets = {n: scores[n].es > tau_es for n in names}
    sas_sets = {n: (scores[n].sas > tau_sas) & (scores[n].shift > 0) for n in names}
    if top_frac is not None:
        es_sets = {n: cap_top_frac(es_sets[n], scores[n].es, top_frac) for n in names}
        sas_sets = {n: cap_top_frac(sas_sets[n], scores[n].sas, top_frac) for n in names}
    es = SafetyNeuronMask(es_sets)
    sas = SafetyNeuronMask(sas_sets)
    return {"es": es, "sas": sas, "union": es | sas}


# --------------------------------------------------------------------------- NeuroStrike
def _neurostrike(loaded: LoadedModel, harmful: PromptSet, harmless: PromptSet, config: IdentifyConfig, progress: bool):
    """NeuroStrike identification: gate/up outputs (max over tokens) -> per-module probes."""
    sites = find_mlps(loaded.model)
    prompts = harmful.prompts + harmless.prompts
    labels = torch.tensor([1.0] * len(harmful) + [0.0] * len(harmless))
    acts = collect_activations(loaded.model, loaded.tokenizer, prompts, position=config.position, point="up_outputs",
                               batch_size=config.batch_size, max_length=config.max_length, progress=progress)
    t0 = time.perf_counter()
    scores: dict[str, dict[str, torch.Tensor]] = {}
    sets = {k: {} for k in ("probe_gate", "probe_up")}
    device = loaded.model.device if hasattr(loaded.model, "device") else torch.device("cpu")
    from tqdm.auto import tqdm

    for site in tqdm(sites, desc="probes", unit="mlp", disable=not progress):
        for key in sorted(k for k in acts if k.startswith(site.name + ".")):
            kind = "probe_gate" if key.endswith("gate_proj") else "probe_up"
            w = neurostrike_probe(acts[key].to(device), labels.to(device), epochs=config.neurostrike_epochs, seed=1234)
            scores.setdefault(site.name, {})[kind] = w.float()
            sets[kind][site.name] = neurostrike_select(w, config.neurostrike_z)
    probe_s = time.perf_counter() - t0
    masks = {}
    for kind, per in sets.items():
        if per:
            masks[kind] = SafetyNeuronMask({s.name: per.get(s.name, torch.zeros(s.d_ff, dtype=torch.bool)) for s in sites})
    union = None
    for m in masks.values():
        union = m if union is None else union | m
    masks["union"] = union
    return scores, masks, probe_s


# --------------------------------------------------------------------------- the stage
def _load_sets(config: IdentifyConfig, multimodal: bool = False
               ) -> tuple[PromptSet | MultimodalPromptSet, PromptSet | MultimodalPromptSet]:
    """The two classes' prompts: text prompts, or for a VLM image+text prompts
    (:func:`safeneuron.data.images.load_multimodal_set`: image JSONL files, ``builtin:`` multimodal
    sets, text sets typeset as images)."""
    load = load_multimodal_set if multimodal else load_prompts
    fallback = config.allow_fallback  # a named set that cannot be loaded: an error unless this is set
    harmful = load(config.harmful, default="harmful", column=config.prompt_column, limit=config.max_prompts,
                   seed=config.seed, allow_fallback=fallback)
    if config.match_lengths and not multimodal:  # the harmless prompts of the harmful prompts' word counts
        harmless = match_lengths(load_prompts(config.harmless, default="harmless", column=config.prompt_column,
                                              allow_fallback=fallback), harmful)
    else:
        harmless = load(config.harmless, default="harmless", column=config.prompt_column, limit=config.max_prompts,
                        seed=config.seed, allow_fallback=fallback)
    for label, ps in (("harmful", harmful), ("harmless", harmless)):
        if len(ps) < 2:
            raise PromptFileError(f"{ps.source}: {len(ps)} {label} prompt(s); statistics need at least 2 per class")
    return harmful, harmless


def _run_key(config: IdentifyConfig, harmful: PromptSet, harmless: PromptSet, whash: str | None,
             verify_sha: str = "") -> str:
    """What the artifacts depend on: the settings (prompt files by their content, never their paths), the
    prompts, the causal check's held-out prompts and the weights (a local model by its weights' hash, never the
    spelling of its path)."""
    paths = ("harmful", "harmless", "verify_harmful") + (("model",) if whash is not None else ())
    settings = settings_hash(config, _NOT_RESULT + paths)
    return sha256_text(settings, harmful.sha256, harmless.sha256, verify_sha, str(whash))[:16]


def _legacy_run_keys(config: IdentifyConfig, harmful: PromptSet, harmless: PromptSet, whash: str | None,
                     verify_sha: str = "") -> tuple[str, ...]:
    """The keys earlier versions gave the same run (they hashed the model's path, and before that the prompt
    files' paths too): their finished identifications are reused."""
    settings = settings_hash(config, _NOT_RESULT + ("harmful", "harmless", "verify_harmful"))
    return (sha256_text(settings, harmful.sha256, harmless.sha256, verify_sha, str(whash))[:16],
            sha256_text(settings_hash(config, _NOT_RESULT), harmful.sha256, harmless.sha256, str(whash))[:16])


def _verify_prompts(config: IdentifyConfig, harmful: PromptSet):
    """The causal check's held-out harmful prompts: never one identification used."""
    return load_eval_prompts(config.verify_harmful or config.harmful, default="harmful", n=config.verify_prompts,
                             seed=config.seed, exclude=harmful.prompts, allow_fallback=config.allow_fallback)


def identify(
    config: IdentifyConfig | None = None,
    out: str | Path = "identify",
    *,
    loaded: LoadedModel | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Identification:
    """Identify safety neurons and write the artifacts to ``out``.

    Skipped (artifacts reopened) when ``out`` already holds a finished identification
    of the same settings, prompts and weights; resumes from partial statistics after
    a kill; refuses to mix with another run's artifacts unless ``overwrite``.
    """
    config = config or IdentifyConfig()
    config.validate()
    check_out_dir(out)
    t_start = time.perf_counter()
    run = _prepare(config, loaded)  # prompts first: a bad prompt file fails before a model is loaded
    verify_sha = _verify_prompts(run.config, run.harmful).sha256 if run.config.verify else ""
    stage = StageDir(Path(out), "identify.json", _run_key(run.config, run.harmful, run.harmless, run.whash, verify_sha),
                     "an identification", OutputDirError,
                     legacy_keys=_legacy_run_keys(run.config, run.harmful, run.harmless, run.whash, verify_sha))
    with stage_lock(stage.path, "an identification", main=world()[0] == 0):  # a second process is refused
        return _identify_into(run, stage, overwrite, progress, t_start)


def _identify_into(run: "_Run", stage: StageDir, overwrite: bool, progress: bool, t_start: float) -> Identification:
    """The identification of ``run`` into ``stage`` (its lock held): reused when complete, else recorded and
    written."""
    if stage.complete() and not overwrite:
        logger.info("%s: identification already complete; reusing it", stage.path)
        return Identification.load(stage.path)
    stage.claim(overwrite, remove=("scores.safetensors", "safety_neurons.safetensors", "stats.safetensors",
                                   "categories"), sync=barrier, main=world()[0] == 0)
    if run.config.method == "neurostrike":
        selection = _select_neurostrike(run, progress)
    else:
        selection = _select_stats(run, stage, progress)
    if world()[0] != 0:  # the main process writes; the others wait and reopen its artifacts
        barrier()
        return Identification.load(stage.path)
    if run.config.verify:
        selection.verification = _verify(run, stage, selection.sets["union"], progress)
    _write_artifacts(run, stage, selection, t_start)
    shutil.rmtree(stage.path / ".partial", ignore_errors=True)
    barrier()
    return Identification.load(stage.path)


@dataclass
class _Run:
    """What an identification runs on: its settings (pooling resolved), the loaded model, the two classes'
    prompts (image+text for a VLM), the weights' hash, the ES threshold, the MLP sites and timings."""

    config: IdentifyConfig
    loaded: LoadedModel
    harmful: PromptSet | MultimodalPromptSet
    harmless: PromptSet | MultimodalPromptSet
    whash: str | None
    tau_es: float
    sites: list
    timings: dict[str, float]

    @property
    def image_text(self) -> bool:
        return self.loaded.is_vlm


@dataclass
class _Selection:
    """The scores (flat ``<mlp>.<score>`` keys), the selected sets, the statistics' false-selection bound and the
    per-category results of an identification."""

    flat_scores: dict[str, torch.Tensor]
    sets: dict[str, SafetyNeuronMask]
    expected_false: float | None
    categories: dict[str, dict]
    verification: dict | None = None


def default_position(config: IdentifyConfig, multimodal: bool = False) -> str:
    """The pooling of an identification that leaves ``position`` unset: the measured default, mean over the
    post-instruction tokens (benchmarks/bench_pooling.py); a VLM's prompt ends after its image tokens: the last
    position; NeuroStrike pools max over the prompt."""
    if config.position is not None:
        return config.position
    return "last" if multimodal else "max" if config.method == "neurostrike" else "mean"


def _prepare(config: IdentifyConfig, loaded: LoadedModel | None) -> _Run:
    """Load the prompts (image+text for a VLM), then the model; resolve the pooling and the ES threshold."""
    timings: dict[str, float] = {}
    multimodal = is_vlm(loaded.model) if loaded is not None else is_vlm_checkpoint(config.model,
                                                                                   config.trust_remote_code)
    harmful, harmless = _load_sets(config, multimodal)
    t0 = time.perf_counter()
    if loaded is None:
        loaded = load_model(config.model, dtype=config.dtype, device=config.device,
                            trust_remote_code=config.trust_remote_code)
    timings["load_s"] = time.perf_counter() - t0
    if loaded.is_vlm != multimodal:  # the config alone could not tell (e.g. an unreachable hub config)
        multimodal = not multimodal
        harmful, harmless = _load_sets(config, multimodal)
    if config.position is None:
        config = replace(config, position=default_position(config, multimodal))
    if multimodal and config.method == "neurostrike":
        raise ConfigError("method neurostrike records text prompts only; identify a vision-language model "
                          "with method stats", fields=("method",))
    backbone = backbone_model_type(loaded.model)  # a VLM's language model sets the ES threshold
    tau_es = config.tau_es if config.tau_es is not None else default_tau_es(backbone)
    return _Run(config, loaded, harmful, harmless, weights_hash(loaded.path), tau_es, find_mlps(loaded.model),
                timings)


def _select_neurostrike(run: _Run, progress: bool) -> _Selection:
    if world()[1] > 1:
        raise OutputDirError("method 'neurostrike' runs in one process; launch it without accelerate/torchrun",
                             fields=("method",))
    t0 = time.perf_counter()
    raw_scores, sets, probe_s = _neurostrike(run.loaded, run.harmful, run.harmless, run.config, progress)
    run.timings["record_s"] = time.perf_counter() - t0 - probe_s
    run.timings["probe_s"] = probe_s
    return _Selection({f"{mlp}.{k}": v for mlp, d in raw_scores.items() for k, v in d.items()}, sets, None, {})


def _select_stats(run: _Run, stage: StageDir, progress: bool) -> _Selection:
    """Record the statistics (this process's shard; merged across processes), score, select, and write the
    raw statistics and the per-category sets."""
    config, (rank, size) = run.config, world()
    stats, run.timings["record_s"] = _record_with_checkpoints(run.loaded, shard(run.harmful), shard(run.harmless),
                                                              config, stage.path, stage.run_key,
                                                              progress and rank == 0)
    if size > 1:
        groups = ["harmful", "harmless"]
        if config.by_category:
            groups += [f"harmful/{c}" for c in run.harmful.category_names()]
        stats = all_merge_stats(stats, groups, [s.name for s in run.sites])
    t0 = time.perf_counter()
    scores = score_stats(stats)
    sets = select_safety_neurons(scores, len(run.harmful), len(run.harmless), tau_es=run.tau_es,
                                 tau_sas=config.tau_sas, select=config.select, alpha=config.alpha,
                                 correction=config.correction, top_frac=config.top_frac)
    run.timings["score_s"] = time.perf_counter() - t0
    n_neurons = sum(s.d_ff for s in run.sites)
    categories: dict[str, dict] = {}
    if rank == 0:
        save_tensors(stage.path / "stats.safetensors", stats.to_tensors(), {"position": config.position})
        if config.by_category:
            categories = _write_categories(stats, config, run.tau_es, stage.path)
    return _Selection({f"{mlp}.{k}": v for mlp, s in scores.items() for k, v in s.as_dict().items()}, sets,
                      expected_false_selections(n_neurons, run.tau_es, len(run.harmful), len(run.harmless)),
                      categories)


def _verify(run: _Run, stage: StageDir, union: SafetyNeuronMask, progress: bool) -> dict:
    """The causal check: ASR on held-out harmful prompts plain, with ``union`` pruned, and with as many random
    neurons per layer pruned (answers cached in ``out/verify/``, so a killed check resumes)."""
    config = run.config
    t0 = time.perf_counter()
    held_out = _verify_prompts(config, run.harmful)
    judge = RefusalJudge()
    settings = GenerationSettings(max_new_tokens=config.verify_max_new_tokens, batch_size=max(32, config.batch_size),
                                  seed=config.seed)
    control = SafetyNeuronMask.random(run.sites, like=union, seed=config.seed)
    out: dict = {"neuron_set": "union", "judge": judge.name, "max_new_tokens": config.verify_max_new_tokens,
                 "harmful": {"source": held_out.source, "n": len(held_out), "sha256": held_out.sha256}}
    prompts = typographic_prompts(held_out) if run.image_text else held_out.prompts  # as a VLM was identified
    loaded = run.loaded
    if config.verify_dtype is not None and Path(loaded.path).is_dir():  # a copy in the check's dtype
        loaded = dataclasses.replace(load_model(loaded.path, dtype=config.verify_dtype, device=config.device),
                                     name=loaded.name)
    out["dtype"] = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    flags = {}
    for name, mask in (("plain", None), ("pruned", union), ("random", control)):
        judged = judged_responses(loaded, prompts, judge, mask=mask, judge_prompts=held_out.prompts,
                                  settings=settings, cache=stage.path / "verify" / "generations.jsonl",
                                  tag=model_tag(loaded), progress=progress)
        counts = judged.verdict_counts()
        out[name] = {**Rate(judged.k, judged.n).as_dict(), "pruned": mask.count() if mask is not None else 0,
                     "refusal_rate": counts.get("refusal", 0) / judged.n if judged.n else None, "verdicts": counts}
        flags[name] = judged.flags
    out["asr_increase"] = {k: out[k]["rate"] - out["plain"]["rate"] for k in ("pruned", "random")}
    out["mcnemar_p"] = {k: mcnemar_exact(flags["plain"], flags[k]) for k in ("pruned", "random")}
    out["wall_s"] = time.perf_counter() - t0
    logger.info("causal check on %d held-out prompts: ASR plain %.3f, union pruned %.3f, random %.3f",
                len(held_out), out["plain"]["rate"], out["pruned"]["rate"], out["random"]["rate"])
    return out


def _write_artifacts(run: _Run, stage: StageDir, selection: _Selection, t_start: float) -> None:
    """Scores, sets, then ``identify.json`` (last: its presence marks the stage complete)."""
    t0 = time.perf_counter()
    save_tensors(stage.path / "scores.safetensors", selection.flat_scores)
    sites, sets, config = run.sites, selection.sets, run.config
    save_tensors(stage.path / "safety_neurons.safetensors",
                 {f"{mlp}.{name}": m for name, mask in selection.sets.items() for mlp, m in mask.masks.items()},
                 mask_metadata(model=run.loaded.name, weights_sha256=run.whash, method=config.method,
                               position=config.position, span=config.span, tau_es=run.tau_es, tau_sas=config.tau_sas,
                               select=config.select, n_harmful=len(run.harmful), n_harmless=len(run.harmless),
                               harmful_sha256=run.harmful.sha256, harmless_sha256=run.harmless.sha256,
                               sets=list(sets), run_key=stage.run_key))
    n_neurons = sum(s.d_ff for s in sites)
    totals = {name: mask.count() for name, mask in sets.items()}
    run.timings["write_s"] = time.perf_counter() - t0
    run.timings["wall_s"] = time.perf_counter() - t_start
    n_u, n_s = len(run.harmful), len(run.harmless)
    tau_t = es_threshold_as_t(run.tau_es, n_u, n_s)
    stage.write_manifest({
        "method": config.method, "model": run.loaded.name, "model_path": run.loaded.path,
        "model_type": run.loaded.model_type, "backbone_model_type": backbone_model_type(run.loaded.model),
        "inputs": "image+text" if run.image_text else "text", "weights_sha256": run.whash,
        "n_layers": len(sites), "d_ff": sites[0].d_ff, "n_neurons": n_neurons, "n_harmful": n_u, "n_harmless": n_s,
        "processes": world()[1],
        "harmful": {"source": run.harmful.source, "sha256": run.harmful.sha256, "n": n_u},
        "harmless": {"source": run.harmless.source, "sha256": run.harmless.sha256, "n": n_s},
        "position": config.position, "span": config.span, "tau_es": run.tau_es, "tau_sas": config.tau_sas, "tau_t": tau_t,
        "false_selection_bound_per_neuron": false_selection_bound(tau_t),
        "expected_false_selections": selection.expected_false, "sets": list(sets), "selected_total": totals,
        "selected_fraction": {k: v / n_neurons for k, v in totals.items()},
        "selected_per_layer": {s.name: {name: int(mask.masks[s.name].sum()) for name, mask in sets.items()}
                               for s in sites},
        "categories": selection.categories, "verification": selection.verification, "settings": asdict(config), "run_key": stage.run_key,
        "timings": run.timings, "wall_time_s": run.timings["wall_s"], "versions": versions(), "created": timestamp(),
    })


def _record_with_checkpoints(loaded, harmful, harmless, config, out: Path, run_key: str, progress: bool):
    """Record statistics, saving them every few batches under ``out/.partial`` and resuming from there."""
    rank, size = world()
    partial = out / ".partial" / (f"rank{rank}-of-{size}" if size > 1 else "")
    stats, skip = None, 0
    progress_file = partial / "progress.json"
    stats_file = partial / "stats.safetensors"
    if stats_file.exists():
        # The batch count is read from the statistics file itself (one atomic write): a kill between
        # saving the statistics and progress.json must not count the last batches twice.
        try:
            with safe_open(str(stats_file), framework="pt") as fh:
                info = fh.metadata() or {}
            if info.get("run_key") == run_key and info.get("batch_size") == str(config.batch_size):
                stats = ActivationStats.from_tensors(load_tensors(stats_file), config.position)
                skip = int(info["batches_done"])
                logger.info("resuming identification after %d batches", skip)
        except (ArtifactError, KeyError, ValueError, OSError, SafetensorError):  # unreadable: start over
            stats, skip = None, 0

    def checkpoint(batches_done: int, current: ActivationStats) -> None:
        if batches_done % config.checkpoint_every:
            return
        progress_info = {"run_key": run_key, "batch_size": config.batch_size, "batches_done": batches_done}
        save_tensors(stats_file, current.to_tensors(), {k: str(v) for k, v in progress_info.items()})
        write_json(progress_file, progress_info)  # for people reading the directory; resume trusts the metadata

    t0 = time.perf_counter()
    processing = processor_of(loaded) if loaded.is_vlm else loaded.tokenizer  # a VLM sees image+text prompts
    stats = record_activations(
        loaded.model, processing, {"harmful": harmful, "harmless": harmless},
        position=config.position, span=config.span, batch_size=config.batch_size, max_length=config.max_length,
        by_category=("harmful",) if config.by_category else False, stats=stats, skip_batches=skip, on_batch=checkpoint,
        progress=progress, stats_device=config.stats_device,
    )
    return stats, time.perf_counter() - t0


def _write_categories(stats: ActivationStats, config: IdentifyConfig, tau_es: float, out: Path) -> dict[str, dict]:
    """Per-category sets: each harm category's prompts against all harmless prompts."""
    result = {}
    n_s = stats.count("harmless")
    groups = sorted(g for g in stats.groups if g.startswith("harmful/"))
    files = safe_file_names(g.split("/", 1)[1] for g in groups)  # unique, safe, recorded in identify.json
    for group in groups:
        category = group.split("/", 1)[1]
        n_u = stats.count(group)
        if n_u < 2:
            logger.warning("category %r has %d prompt(s); skipped (statistics need 2)", category, n_u)
            continue
        scores = score_stats(stats, harmful=group)
        sets = select_safety_neurons(scores, n_u, n_s, tau_es=tau_es, tau_sas=config.tau_sas, select=config.select,
                                     alpha=config.alpha, correction=config.correction, top_frac=config.top_frac)
        safe_name = files[category]
        save_tensors(out / "categories" / f"{safe_name}.safetensors",
                     {f"{mlp}.{name}": m for name, mask in sets.items() for mlp, m in mask.masks.items()})
        result[category] = {"file": f"categories/{safe_name}.safetensors", "n_harmful": n_u,
                            "selected_total": {k: v.count() for k, v in sets.items()}}
    return result
