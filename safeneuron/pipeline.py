"""The main job, ``safeneuron run``: every stage in order, in one directory.

Reading :func:`run` tells the whole method::

    identify   safety neurons of the base model             DIR/identify/
    prefs      safety preference pairs from the model       DIR/prefs.jsonl
    align      safeneuron (frozen safety neurons) and       DIR/align/safeneuron/
               plain DPO on the same pairs and schedule     DIR/align/dpo/
    evaluate   base vs DPO vs safeneuron, pruning attacks   DIR/evaluate/results.json
    analyze    layer distribution, categories, probes       DIR/analysis/
    report     one self-contained HTML page                 DIR/report.html, DIR/summary.md

Each stage writes its artifacts atomically and skips work that is already complete,
so an interrupted run continues where it stopped. ``DIR/run.json`` records the
settings, the stage timings and the versions. One TOML/YAML file configures every
stage (see ``safeneuron/configs/default.toml``).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safeneuron.artifacts import ArtifactError, check_out_dir, read_json, sha256_text, stage_lock, timestamp, versions, write_json
from safeneuron.config import (  # the main job's settings live with every other config
    DEFAULT_CONFIG,
    MAIN_JOB,
    QUICK,
    STAGES,
    ConfigError,
    RunConfig,
    load_run_config,
    settings_hash,
    stage_classes,
)
from safeneuron.errors import SafeneuronError
from safeneuron.data.prompts import load_prompts
from safeneuron.data.splits import split_prompts
from safeneuron.masks import SafetyNeuronMask
from safeneuron.models import LoadedModel, load_model
from safeneuron.report import build_report
from safeneuron.stages.align import align, align_card_info
from safeneuron.stages.analyze import analyze
from safeneuron.stages.evaluate import evaluate_models
from safeneuron.cards import evaluation_summary, write_model_card
from safeneuron.stages.identify import identify
from safeneuron.stages.prefs import synthesize_preferences

logger = logging.getLogger(__name__)

__all__ = ["RunConfig", "run", "load_run_config", "stage_classes", "DEFAULT_CONFIG", "STAGES", "MAIN_JOB", "QUICK"]

# --------------------------------------------------------------------------- the job
@dataclass
class _Job:
    """A main job in progress: its settings, directory, record (``run.json``) and the base model's path."""

    config: RunConfig
    out: Path
    record: dict
    progress: bool
    t_start: float
    base_path: str = ""
    splits: dict = field(default_factory=dict)  # "harmful" / "harmless" -> PromptSplit
    keys: dict = field(default_factory=dict)  # stage -> its config key (:func:`stage_keys`)
    redo: set = field(default_factory=set)  # finished stages redone with overwrite (their settings changed)

    def stage_config(self, stage: str):
        """The stage's config: the attacker's identification settings (the defender's, with
        ``attacker_settings = "defender"``), and its prompts from its own parts of the splits (see
        :func:`_split_prompts`)."""
        config = self.config.stage_config(stage)
        if stage == "evaluate" and self.config.attacker_settings == "defender":  # one identification for both
            own = {f: getattr(config.identify, f) for f in ("harmful", "harmless", "max_prompts", "batch_size")}
            config = dataclasses.replace(config, identify=dataclasses.replace(
                self.config.stage_config("identify"), **own, by_category=False, verify=False))
        if not self.splits:
            return config
        part = {kind: split.files for kind, split in self.splits.items()}  # kind -> part name -> file
        attacker = "attacker" if "attacker" in part["harmful"] else "defender"
        if stage == "identify":  # the causal check measures on the prefs part: never seen by identification
            return dataclasses.replace(config, harmful=part["harmful"]["defender"], harmless=part["harmless"]["defender"],
                                       verify_harmful=config.verify_harmful or part["harmful"]["prefs"])
        if stage == "prefs":
            return dataclasses.replace(config, harmful=part["harmful"]["prefs"], harmless=part["harmless"]["prefs"])
        if stage == "align":  # later rounds re-identify on the defender's prompts
            return dataclasses.replace(config, identify=dataclasses.replace(
                config.identify, harmful=part["harmful"]["defender"], harmless=part["harmless"]["defender"]))
        if stage == "evaluate":
            own = {k: part[k].get("evaluation", getattr(config, k)) for k in ("harmful", "harmless")}
            upstream = [f for k in part for name, f in part[k].items() if name != "evaluation"]
            return dataclasses.replace(config, **own, upstream=sorted(set(upstream)), identify=dataclasses.replace(
                config.identify, harmful=part["harmful"][attacker], harmless=part["harmless"][attacker]))
        if stage == "analyze":  # probes on held-out prompts: the evaluation part
            return dataclasses.replace(config, harmful=config.harmful or part["harmful"].get("evaluation"),
                                       harmless=config.harmless or part["harmless"].get("evaluation"))
        return config

    def stage(self, name: str, key: str, fn) -> Any:
        """Run one stage, timing it and recording it in run.json."""
        t0 = time.perf_counter()
        logger.info("== stage %s ==", name)
        result = fn()
        wall = time.perf_counter() - t0
        previous = self.record["stages"].get(name, {})
        self.record["stages"][name] = {"settings_hash": key, "config_key": self.keys.get(name), "wall_s": round(wall, 2),
                                       "status": "done",
                                       "first_run_wall_s": previous.get("first_run_wall_s", round(wall, 2))}
        write_json(self.out / "run.json", self.record)
        gc.collect()
        return result

    @property
    def prefs_file(self) -> Path:
        return self.out / "prefs.jsonl"

    @property
    def models(self) -> dict[str, str]:
        """The models compared: the base model and one aligned model per mode."""
        return {"base": self.base_path, **{m: str(self.out / "align" / m / "model") for m in self.config.modes}}


def run(config: RunConfig | None = None, *, stages: tuple[str, ...] = STAGES, progress: bool = True,
        overwrite: bool = False) -> dict:
    """Run the main job; returns the run record (also ``DIR/run.json``).

    Every stage's settings (names included) are checked before any work. A directory holding a run of other
    settings resumes the stages whose settings did not change (a stage that failed is simply run); finished stages
    whose settings changed are an error, or with ``overwrite`` redone together with the stages after them. The run
    directory is locked while the job runs: a second job into it is refused.
    """
    config = config or load_run_config()
    config.validate()
    for s in stages:
        if s not in STAGES:
            raise ConfigError(f"unknown stage {s!r}; stages are {', '.join(STAGES)}")
    _preflight(config)
    with stage_lock(check_out_dir(config.out, "run directory"), "a main job"):
        return _run(config, stages, progress, overwrite)


def _run(config: RunConfig, stages: tuple[str, ...], progress: bool, overwrite: bool) -> dict:
    job = _start(config, stages, progress, overwrite)
    _split_prompts(job)  # 0. disjoint prompts for every stage, by construction
    base = load_model(job.config.model, dtype=job.config.dtype, device=job.config.device)
    job.base_path = base.path
    if "identify" in stages:
        _identify_base(job, base)  # 1. safety neurons of the base model
    if "prefs" in stages:
        _synthesise_prefs(job, base)  # 2. preference pairs from the base model, its safety neurons pruned
    del base
    gc.collect()
    if "align" in stages:
        _align_every_mode(job)  # 3. safeneuron and the baselines: same pairs, same schedule
    if "evaluate" in stages:
        _evaluate_models(job)  # 4. base vs aligned models under the same attacks
    if "analyze" in stages:
        _analyze_models(job)  # 5. layer distribution, categories, separability
    if "report" in stages:
        job.stage("report", "", lambda: build_report(job.out))  # 6. one self-contained HTML page
    return _finish(job)


def stage_keys(config: RunConfig) -> dict[str, str]:
    """A key per stage of the main job for what its settings are, chained in stage order (a stage's key changes
    when its own settings or an earlier stage's change): ``identify``, ``prefs``, ``align/<mode>``, ``evaluate``,
    ``analyze``. Settings only (no path spellings: the stages' own run keys hash the data and weights)."""
    keys: dict[str, str] = {}
    chain = sha256_text(config.attacker_prompts, config.attacker_settings)
    for stage in ("identify", "prefs", "align", "evaluate", "analyze"):
        chain = sha256_text(chain, settings_hash(config.stage_config(stage), exclude=("device",)))[:16]
        if stage == "align":
            keys.update({f"align/{m}": sha256_text(chain, m)[:16] for m in config.modes})
            chain = sha256_text(chain, *config.modes)[:16]
        else:
            keys[stage] = chain
    return keys


#: The stages of a main job in the order they run (what a changed stage's successors are).
STAGE_ORDER = ("identify", "prefs", "align", "evaluate", "analyze", "report")


def _order(name: str) -> int:
    return STAGE_ORDER.index(name.split("/", 1)[0]) if name.split("/", 1)[0] in STAGE_ORDER else len(STAGE_ORDER)


def _start(config: RunConfig, stages: tuple[str, ...], progress: bool, overwrite: bool = False) -> _Job:
    """Open the run directory and its record: a run of other settings there goes on with the stages whose settings
    did not change; finished stages whose settings did are an error, or redone with ``overwrite`` (with the stages
    after them)."""
    out = Path(config.out)
    run_key = settings_hash(config, exclude=("out",))
    keys = stage_keys(config)
    try:
        record = read_json(out / "run.json") if (out / "run.json").exists() else {}
    except ArtifactError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("stages", {}), dict):
        raise SafeneuronError(f"{out}/run.json is not a safeneuron run record; choose another output directory or "
                              "delete it to start over", fields=("out",))
    redo: set[str] = set()
    if record and record.get("settings_hash") != run_key:
        changed = sorted((name for name, info in record.get("stages", {}).items()
                          if name != "report" and isinstance(info, dict) and info.get("status") == "done"
                          and info.get("config_key") != keys.get(name)), key=_order)
        if changed and not overwrite:
            raise SafeneuronError(f"{out} holds a run with other settings: the finished stage(s) {', '.join(changed)} "
                                  "would change; run with --overwrite to redo them and the stages after them (the "
                                  "others are kept), or choose another output directory", fields=("overwrite", "out"))
        if changed:
            first = min(_order(n) for n in changed)
            redo = set(changed) | {n for n in (*keys, "report") if _order(n) > first}
            logger.info("settings changed; redoing %s", ", ".join(sorted(redo, key=_order)))
    out.mkdir(parents=True, exist_ok=True)
    record.update({"settings_hash": run_key, "settings": asdict(config), "quick": config.quick, "long": config.long,
                   "versions": versions()})
    record.setdefault("stages", {})
    record["started"] = timestamp()
    write_json(out / "run.json", record)
    return _Job(config, out, record, progress, time.perf_counter(), keys=keys, redo=redo)


def _preflight(config: RunConfig) -> None:
    """What would fail late in the job, checked before any work: the evaluation's judge, its multiple-choice file,
    and every local file a stage names (prompt, text and preference files, masks)."""
    from safeneuron.evaluation.capability import load_mc
    from safeneuron.evaluation.judges import check_judge_spec

    evaluate = config.stage_config("evaluate")
    check_judge_spec(evaluate.judge)
    if evaluate.mc_file:
        load_mc(evaluate.mc_file, n=1)
    align = config.stage_config("align")
    named = {"[evaluate] xstest": evaluate.xstest, "[evaluate] redteam": evaluate.redteam,
             "[evaluate] ppl_file": evaluate.ppl_file, "[evaluate] mask": evaluate.mask, "[align] general": align.general,
             "[align] mask": align.mask, "[prefs] mask": config.stage_config("prefs").mask,
             "[identify] verify_harmful": config.stage_config("identify").verify_harmful}
    for what, source in named.items():
        text = str(source or "")
        if not text or text.startswith(("builtin", "hf:")) or ("/" not in text and "." not in text):
            continue  # off, built in, a hub dataset or a set name
        if not Path(text).exists():
            raise ConfigError(f"{what}: {text} not found")


def _finish(job: _Job) -> dict:
    record = job.record
    record["wall_time_s"] = round(time.perf_counter() - job.t_start, 2)  # this invocation's
    # what the stages took when they first ran: a resumed job's own wall time counts only the reused steps
    record["compute_wall_s"] = round(sum(s.get("first_run_wall_s", s.get("wall_s", 0))
                                         for s in record["stages"].values()), 2)
    record["finished"] = timestamp()
    write_json(job.out / "run.json", record)
    return record


def _split_prompts(job: _Job) -> None:
    """Each prompt pool (the defender's harmful and harmless sources) is split once, with the run's seed, into
    disjoint parts: the defender's identification, the preference pairs, the evaluation (unless evaluate names its
    own prompts) and, with ``attacker_prompts = "own"``, the attacker's identification (else the attacker identifies
    on the defender's part, upstream of evaluation as well). Written to ``DIR/splits/``, recorded in run.json."""
    ident, prefs, evaluate = (job.config.stage_config(s) for s in ("identify", "prefs", "evaluate"))
    for kind in ("harmful", "harmless"):
        pool = load_prompts(getattr(ident, kind), default=kind, column=ident.prompt_column,
                            allow_fallback=ident.allow_fallback)
        sizes: dict[str, int | None] = {"defender": ident.max_prompts, "prefs": getattr(prefs, f"n_{kind}")}
        if job.config.attacker_prompts == "own":
            sizes["attacker"] = evaluate.identify.max_prompts
        if getattr(evaluate, kind) is None:
            sizes["evaluation"] = evaluate.capped(getattr(evaluate, f"n_{kind}"))
        job.splits[kind] = split_prompts(pool, sizes, seed=job.config.seed, out=job.out / "splits", stem=kind)
    job.record["splits"] = {kind: split.manifest() for kind, split in job.splits.items()}
    write_json(job.out / "run.json", job.record)


def _identify_base(job: _Job, base: LoadedModel) -> None:
    config = job.stage_config("identify")
    ident = job.stage("identify", settings_hash(config),
                      lambda: identify(config, job.out / "identify", loaded=base, overwrite="identify" in job.redo,
                                       progress=job.progress))
    logger.info("base model: %d safety neurons (union)", ident.union.count())


def _synthesise_prefs(job: _Job, base: LoadedModel) -> None:
    config = job.stage_config("prefs")

    def make_prefs():
        if "prefs" in job.redo:  # its settings (or the identification's) changed: synthesised again
            job.prefs_file.unlink(missing_ok=True)
        if job.prefs_file.exists():
            logger.info("%s exists; reusing it", job.prefs_file)
            return None
        mask = SafetyNeuronMask.load(job.out / "identify" / "safety_neurons.safetensors", neuron_set=config.neuron_set)
        return synthesize_preferences(base, config, job.prefs_file, mask=mask, progress=job.progress)

    job.stage("prefs", settings_hash(config), make_prefs)


def _align_every_mode(job: _Job) -> None:
    for mode in job.config.modes:
        config = dataclasses.replace(job.stage_config("align"), mode=mode, model=job.base_path)
        if mode != "dpo" and config.mask is None:
            config.mask = str(job.out / "identify" / "safety_neurons.safetensors")  # round 1 reuses stage 1
        job.stage(f"align/{mode}", settings_hash(config),
                  lambda: align(config, job.prefs_file, job.out / "align" / mode, overwrite=f"align/{mode}" in job.redo,
                                progress=job.progress))


def _evaluation_is_current(job: _Job, key: str) -> bool:
    """True when ``DIR/evaluate/results.json`` is this stage's finished result with these settings (``key``), holds
    every model of the job by name and path, and is newer than each model's weights: a resumed job (a sweep's
    finished arm) does not evaluate again. Any doubt (no record, a model retrained since, redo) means evaluate."""
    record = job.record["stages"].get("evaluate") or {}
    results = job.out / "evaluate" / "results.json"
    if "evaluate" in job.redo or record.get("status") != "done" or record.get("settings_hash") != key \
            or not results.is_file():
        return False
    entries = {m.get("name"): m for m in read_json(results).get("models", []) if isinstance(m, dict)}
    written = results.stat().st_mtime
    for name, path in job.models.items():
        entry = entries.get(name)
        if entry is None or not entry.get("path") or Path(entry["path"]).resolve() != Path(path).resolve():
            return False
        weights = Path(path)
        if weights.is_dir() and any(f.stat().st_mtime > written for f in weights.glob("*.safetensors")):
            return False
    return True


def _evaluate_models(job: _Job) -> None:
    config = job.stage_config("evaluate")
    key = settings_hash(config)
    if _evaluation_is_current(job, key):
        def reuse():
            logger.info("%s: every model already evaluated with these settings; reusing it", job.out / "evaluate")
            return read_json(job.out / "evaluate" / "results.json")

        job.stage("evaluate", key, reuse)
    else:
        job.stage("evaluate", key,  # models are loaded one at a time
                  lambda: evaluate_models(job.models, config, job.out / "evaluate", progress=job.progress,
                                          overwrite="evaluate" in job.redo))
    _cards_with_evaluation(job)


def _cards_with_evaluation(job: _Job) -> None:
    """Each aligned model's card gains its evaluation summary (the card align wrote holds the training only)."""
    results = job.out / "evaluate" / "results.json"
    if not results.is_file():
        return
    entries = {e["name"]: e for e in read_json(results).get("models", [])}
    for mode in job.config.modes:
        manifest, entry = job.out / "align" / mode / "align.json", entries.get(mode)
        model_dir = (job.out / "align" / mode / "model").resolve()
        if entry is not None and manifest.is_file() and model_dir.is_dir():
            write_model_card(model_dir, align_card_info(read_json(manifest), evaluation_summary(entry)))


def _analyze_models(job: _Job) -> None:
    config = dataclasses.replace(job.stage_config("analyze"), model=job.base_path)
    idents = {"base": job.out / "identify"}
    for mode in job.config.modes:
        last = sorted((job.out / "align" / mode).glob("round_*/identify/identify.json"))
        if last:
            idents[f"{mode} (last round)"] = last[-1].parent
    compare = {m: p for m, p in job.models.items() if m != "base"}
    job.stage("analyze", settings_hash(job.stage_config("analyze")),
              lambda: analyze(config, job.out / "analysis", compare=compare, identifications=idents,
                              progress=job.progress))
