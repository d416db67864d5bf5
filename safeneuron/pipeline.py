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

from safeneuron.artifacts import read_json, write_json
from safeneuron.config import AlignConfig, ConfigError, EvalConfig, IdentifyConfig, PrefsConfig, from_dict, \
    load_config_file, settings_hash
from safeneuron.errors import SafeneuronError

logger = logging.getLogger(__name__)

__all__ = ["RunConfig", "run", "load_run_config", "DEFAULT_CONFIG", "STAGES"]

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.toml"
STAGES = ("identify", "prefs", "align", "evaluate", "analyze", "report")

#: The main job's budget for this 2-core CPU and the embedded 0.5B model (the values
#: of configs/default.toml; dataclass defaults elsewhere): LoRA (about 2.6x faster per step
#: than full fine-tuning on this CPU, same freezing guarantees), two rounds for both modes
#: (same pairs, same schedule), and evaluation sizes whose 95 % intervals can separate a
#: 30-point difference in ASR. Evaluation, which only generates, runs in ``fast`` dtype
#: (bfloat16 where the CPU computes it natively: 2.4x faster generation here, and the
#: embedded model's own checkpoint dtype); identification and training stay float32.
MAIN_JOB: dict[str, dict[str, Any]] = {
    "identify": {"max_prompts": 128, "by_category": True},
    "prefs": {"n_harmful": 48, "n_harmless": 16, "max_new_tokens": 56, "batch_size": 24},
    "align": {"rounds": 2, "lora": True, "learning_rate": 1e-4, "num_train_epochs": 1.0, "max_pairs": 32,
              "max_prompts": 64, "max_length": 192, "per_device_train_batch_size": 2,
              "gradient_accumulation_steps": 2},
    "evaluate": {
        "n_harmful": 48, "n_harmless": 24, "n_xstest": 24,
        "templates": ["prefix_injection", "refusal_suppression", "role_play"], "n_template_prompts": 16,
        "sweep": [0.0, 0.005, 0.01, 0.02, 0.05], "n_sweep_prompts": 16, "n_mc": 60, "mc_scoring": "option",
        "n_ppl": 16, "n_redteam": 8, "redteam_max_new_tokens": 64, "identify_prompts": 48, "max_new_tokens": 32,
        "dtype": "fast",
    },
    "analyze": {"max_prompts": 48, "n_splits": 2, "n_orders": 100},
}

#: What ``--quick`` sets on top of the config file: fewer prompts, pairs and steps and LoRA
#: (same model), sized so the whole job takes <= 8 minutes on a 2-core CPU. Its numbers are
#: a first look (wide intervals), labelled as quick in the report.
QUICK: dict[str, dict[str, Any]] = {
    "identify": {"max_prompts": 48},
    "prefs": {"quick": True, "n_harmful": 12, "n_harmless": 6, "max_new_tokens": 40, "batch_size": 24},
    "align": {"quick": True, "rounds": 1, "num_train_epochs": 1.0, "max_pairs": 12, "max_prompts": 48,
              "lora": True, "learning_rate": 1e-4, "max_length": 128, "per_device_train_batch_size": 2,
              "gradient_accumulation_steps": 2},
    "evaluate": {
        "n_harmful": 20, "n_harmless": 8, "n_xstest": 8, "templates": ["prefix_injection"],
        "n_template_prompts": 8, "sweep": [0.0, 0.05], "n_sweep_prompts": 8, "n_mc": 24, "n_ppl": 8,
        "n_redteam": 0, "identify_prompts": 16, "max_new_tokens": 16,
    },
    "analyze": {"max_prompts": 24, "n_splits": 1, "n_orders": 50},
}


def stage_classes() -> dict[str, type]:
    """Stage section name -> its config dataclass."""
    from safeneuron.analysis import AnalyzeConfig

    return {"identify": IdentifyConfig, "prefs": PrefsConfig, "align": AlignConfig, "evaluate": EvalConfig,
            "analyze": AnalyzeConfig}


@dataclass
class RunConfig:
    """Settings of the main job; each stage section holds that stage's config fields."""

    model: str | None = None
    """Model to align (hub id or local directory); None = the embedded default."""
    out: str = "runs/main"
    """Run directory."""
    quick: bool = False
    """Fewer prompts, pairs and steps (same model) for a first look; labelled as such in the report."""
    modes: list[str] = field(default_factory=lambda: ["safeneuron", "dpo"])
    """Alignment modes to train and compare (``safeneuron``, ``dpo``, ``sn-tune``)."""
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    identify: dict = field(default_factory=dict)
    """IdentifyConfig fields for the base model's identification."""
    prefs: dict = field(default_factory=dict)
    """PrefsConfig fields for the synthesised preference pairs."""
    align: dict = field(default_factory=dict)
    """AlignConfig fields shared by every mode."""
    evaluate: dict = field(default_factory=dict)
    """EvalConfig fields."""
    analyze: dict = field(default_factory=dict)
    """AnalyzeConfig fields."""

    def validate(self) -> None:
        for mode in self.modes:
            if mode not in ("safeneuron", "dpo", "sn-tune"):
                raise ConfigError(f"modes: unknown mode {mode!r}; choose from safeneuron, dpo, sn-tune")
        for name in ("identify", "prefs", "align", "evaluate", "analyze"):
            self.stage_config(name)  # unknown keys and bad values fail here, before any work

    def stage_config(self, stage: str):
        """The stage's config: run-wide settings, then the file's section, then the quick profile."""
        cls = stage_classes()[stage]
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {k: v for k, v in (("model", self.model), ("seed", self.seed),
                                                    ("dtype", self.dtype), ("device", self.device)) if k in names}
        values.update(getattr(self, stage))
        if self.quick:
            values.update(QUICK[stage])
        return from_dict(cls, values, where=f"[{stage}]")


def load_run_config(path: str | Path | None = None, **overrides: Any) -> RunConfig:
    """Read a TOML/YAML run config (default: the packaged default file) and apply overrides."""
    data = load_config_file(path or DEFAULT_CONFIG)
    data.update({k: v for k, v in overrides.items() if v is not None})
    config = from_dict(RunConfig, data, where=str(path or DEFAULT_CONFIG))
    return config


# --------------------------------------------------------------------------- stages
def _stage(record: dict, name: str, key: str, out: Path, fn) -> Any:
    """Run one stage, timing it and recording it in run.json."""
    t0 = time.perf_counter()
    logger.info("== stage %s ==", name)
    result = fn()
    wall = time.perf_counter() - t0
    previous = record["stages"].get(name, {})
    record["stages"][name] = {"settings_hash": key, "wall_s": round(wall, 2), "status": "done",
                              "first_run_wall_s": previous.get("first_run_wall_s", round(wall, 2))}
    write_json(out / "run.json", record)
    gc.collect()
    return result


def run(config: RunConfig | None = None, *, stages: tuple[str, ...] = STAGES, progress: bool = True) -> dict:
    """Run the main job; returns the run record (also ``DIR/run.json``)."""
    from safeneuron.identify import identify, versions
    from safeneuron.models import load_model

    config = config or load_run_config()
    config.validate()
    for s in stages:
        if s not in STAGES:
            raise ConfigError(f"unknown stage {s!r}; stages are {', '.join(STAGES)}")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    key = settings_hash(config, exclude=("out",))
    record = read_json(run_file) if run_file.exists() else {}
    if record and record.get("settings_hash") != key:
        raise SafeneuronError(
            f"{out} holds a run with other settings (run.json); choose another --out or delete it to start over"
        )
    record.update({"settings_hash": key, "settings": asdict(config), "quick": config.quick, "versions": versions()})
    record.setdefault("stages", {})
    record["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t_start = time.perf_counter()
    write_json(run_file, record)

    ident_cfg = config.stage_config("identify")
    base = load_model(config.model, dtype=config.dtype, device=config.device)
    base_path = base.path

    # 1. safety neurons of the base model
    if "identify" in stages:
        ident = _stage(record, "identify", settings_hash(ident_cfg), out,
                       lambda: identify(ident_cfg, out / "identify", loaded=base, progress=progress))
        logger.info("base model: %d safety neurons (union)", ident.union.count())

    # 2. safety preference pairs, synthesised from the base model with its own safety neurons pruned
    prefs_file = out / "prefs.jsonl"
    if "prefs" in stages:
        from safeneuron.data.preferences import synthesize_preferences
        from safeneuron.masks import SafetyNeuronMask

        prefs_cfg = config.stage_config("prefs")

        def make_prefs():
            if prefs_file.exists():
                logger.info("%s exists; reusing it", prefs_file)
                return None
            mask = SafetyNeuronMask.load(out / "identify" / "safety_neurons.safetensors", set=prefs_cfg.neuron_set)
            return synthesize_preferences(base, prefs_cfg, prefs_file, mask=mask, progress=progress)

        _stage(record, "prefs", settings_hash(prefs_cfg), out, make_prefs)
    del base
    gc.collect()

    # 3. alignment: safeneuron and the baselines, same pairs, same schedule
    if "align" in stages:
        from safeneuron.training import align

        for mode in config.modes:
            align_cfg = dataclasses.replace(config.stage_config("align"), mode=mode, model=base_path)
            if mode != "dpo" and align_cfg.mask is None:
                align_cfg.mask = str(out / "identify" / "safety_neurons.safetensors")  # round 1 reuses stage 1
            _stage(record, f"align/{mode}", settings_hash(align_cfg), out,
                   lambda: align(align_cfg, prefs_file, out / "align" / mode, progress=progress))

    # 4. evaluation of the three models under the same attacks
    models = {"base": base_path, **{mode: str(out / "align" / mode / "model") for mode in config.modes}}
    if "evaluate" in stages:
        from safeneuron.evaluation import evaluate_models

        eval_cfg = config.stage_config("evaluate")

        def evaluate_all():
            return evaluate_models(models, eval_cfg, out / "evaluate", progress=progress)  # loaded one at a time

        _stage(record, "evaluate", settings_hash(eval_cfg), out, evaluate_all)

    # 5. analysis: layer distribution, categories, separability (base and aligned)
    if "analyze" in stages:
        from safeneuron.analysis import analyze

        analyze_cfg = config.stage_config("analyze")
        idents = {"base": out / "identify"}
        for mode in config.modes:
            last = sorted((out / "align" / mode).glob("round_*/identify/identify.json"))
            if last:
                idents[f"{mode} (last round)"] = last[-1].parent
        _stage(record, "analyze", settings_hash(analyze_cfg), out,
               lambda: analyze(dataclasses.replace(analyze_cfg, model=base_path), out / "analysis",
                               compare={m: p for m, p in models.items() if m != "base"}, identifications=idents,
                               progress=progress))

    # 6. the report
    if "report" in stages:
        from safeneuron.report import build_report

        _stage(record, "report", "", out, lambda: build_report(out))

    record["wall_time_s"] = round(time.perf_counter() - t_start, 2)
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(run_file, record)
    return record


# --------------------------------------------------------------------------- CLI
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


def cmd_run(args) -> int:
    config = load_run_config(args.config, out=args.out, quick=True if args.quick else None, model=args.model)
    stages = tuple(args.stages.split(",")) if args.stages else STAGES
    run(config, stages=stages, progress=not args.no_progress)
    print(run_summary(Path(config.out)))
    return 0


def register_cli(subparsers) -> None:
    """Add ``safeneuron run`` (called by :mod:`safeneuron.cli`)."""
    p = subparsers.add_parser("run", help="the main job: identify, prefs, align (safeneuron + DPO), evaluate, "
                                          "analyze, report")
    p.add_argument("--config", default=None, help=f"TOML/YAML run config (default: {DEFAULT_CONFIG.name} in the package)")
    p.add_argument("--out", default=None, help="run directory (default from the config: runs/main)")
    p.add_argument("--model", default=None, help="model to align (default: the embedded default)")
    p.add_argument("--quick", action="store_true", help="quick profile: a first look in a few minutes")
    p.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)
