"""The commands: one table, each entry a stage's flags and the function that runs it.

A command builds its stage's config from the flags (:func:`~safeneuron.cli.flags.config_from_args`),
calls the library, and prints the stage's summary (:mod:`safeneuron.cli.summaries`). Stage
modules are imported when their command runs, so ``safeneuron --help`` stays fast.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from safeneuron.cli.flags import add_config_flags, config_from_args
from safeneuron.cli.summaries import (
    align_summary,
    analysis_summary,
    attack_summary,
    identify_summary,
    prefs_summary,
    run_summary,
)
from safeneuron.config import (
    DEFAULT_CONFIG,
    STAGES,
    AlignConfig,
    AnalyzeConfig,
    AttackConfig,
    EvalConfig,
    IdentifyConfig,
    PrefsConfig,
)

__all__ = ["Command", "COMMANDS", "add_commands"]


# --------------------------------------------------------------------------- what each command does
def cmd_identify(args: argparse.Namespace) -> int:
    from safeneuron.config import ConfigError
    from safeneuron.stages.identify import identify

    if args.top < 0:  # checked before the work, not when the summary is printed
        raise ConfigError(f"--top is a number of neurons >= 0, got {args.top}")
    result = identify(config_from_args(IdentifyConfig, args), args.out, overwrite=args.overwrite,
                      progress=not args.no_progress)
    print(identify_summary(result, top=args.top))
    print(f"\nartifacts: {Path(args.out).resolve()}")
    return 0


def cmd_prefs(args: argparse.Namespace) -> int:
    from safeneuron.data.preferences import load_preferences, read_manifest
    from safeneuron.models import load_model
    from safeneuron.stages.prefs import synthesize_preferences

    config = config_from_args(PrefsConfig, args).resolved()
    out = Path(args.out)
    if out.is_dir():  # before any work
        from safeneuron.config import ConfigError

        raise ConfigError(f"--out {out} is a directory; prefs writes a JSONL file (e.g. {out / 'prefs.jsonl'})")
    if config.source:
        result = load_preferences(config.source, format=config.format, prefer=config.prefer, split=config.split,
                                  limit=config.limit, seed=config.seed)
        result.write_jsonl(out)
        kinds = "converted"
    else:
        loaded = load_model(config.model, dtype=config.dtype, device=config.device,
                            trust_remote_code=config.trust_remote_code)
        result = synthesize_preferences(loaded, config, out, progress=not args.no_progress)
        kinds = "synthesised"
        print(prefs_summary(read_manifest(out)["report"]))
    print(f"{kinds} {len(result)} pairs -> {out.resolve()}")
    return 0


def cmd_align(args: argparse.Namespace) -> int:
    from safeneuron.stages.align import align

    result = align(config_from_args(AlignConfig, args), args.prefs, args.out, overwrite=args.overwrite,
                   progress=not args.no_progress)
    print(align_summary(result))
    print(f"\nartifacts: {Path(args.out).resolve()}  (final model: {Path(args.out).resolve() / 'model'})")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from safeneuron.stages.attack import run_attack

    report = run_attack(config_from_args(AttackConfig, args), args.out, progress=not args.no_progress)
    print(attack_summary(report))
    if report["saved_model"]:
        print(f"\npruned model: {report['saved_model']}")
    print(f"\nartifacts: {Path(args.out).resolve()}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from safeneuron.stages.evaluate import evaluate_models, results_markdown

    results = evaluate_models(args.model or [None], config_from_args(EvalConfig, args), args.out,
                              progress=not args.no_progress, overwrite=args.overwrite)
    print(results_markdown(results))
    print(f"results: {(Path(args.out) / 'results.json').resolve()} ({results.get('wall_time_s', 0):.0f} s)")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from safeneuron.stages.analyze import analyze

    result = analyze(config_from_args(AnalyzeConfig, args), args.out, progress=not args.no_progress)
    print(analysis_summary(result))
    print(f"\nartifacts: {Path(args.out).resolve()}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from safeneuron.report import build_report

    path = build_report(args.dir, args.out)
    print(f"report: {path.resolve()}")
    print(f"summary: {path.with_name('summary.md').resolve()}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from safeneuron.pipeline import load_run_config, run

    config = load_run_config(args.config, out=args.out, quick=True if args.quick else None,
                             long=True if args.long else None, model=args.model)
    run(config, stages=tuple(args.stages.split(",")) if args.stages else STAGES, progress=not args.no_progress,
        overwrite=args.overwrite)
    print(run_summary(Path(config.out)))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from safeneuron.sweep import load_sweep, sweep, sweep_markdown

    config = load_sweep(args.config, seeds=[int(s) for s in args.seeds] if args.seeds else None)
    if args.arms:
        wanted = args.arms.split(",")
        missing = [a for a in wanted if a not in config.arms]
        if missing:
            from safeneuron.config import ConfigError
            raise ConfigError(f"--arms: {missing[0]!r} is not an arm of {args.config} ({', '.join(config.arms)})",
                              fields=("arms",))
        config.arms = {a: config.arms[a] for a in wanted}
    summary = sweep(config, args.out, progress=not args.no_progress)
    print(sweep_markdown(summary))
    print(f"sweep: {(Path(args.out) / 'sweep.json').resolve()}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from safeneuron.config import ConfigError, dump_toml, load_run_config, stage_classes

    config = load_run_config(args.config, out=args.out, quick=True if args.quick else None,
                             long=True if args.long else None)
    config.validate()
    stages = list(stage_classes())
    if args.stage and args.stage not in stages:
        raise ConfigError(f"--stage: unknown stage {args.stage!r}; stages are {', '.join(stages)}")
    run_wide = {k: v for k, v in asdict(config).items() if k not in stages}
    effective = {} if args.stage else dict(run_wide)
    for stage in [args.stage] if args.stage else stages:
        effective[stage] = asdict(config.stage_config(stage))
    print(f"# the effective settings of `safeneuron run{' --config ' + args.config if args.config else ''}"
          f"{' --quick' if args.quick else ''}{' --long' if args.long else ''}`: the packaged main job, the file "
          "layered over it, then the profile; unset values are left out")
    print(dump_toml(effective), end="")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from safeneuron import embedded

    if args.action == "list":
        for name, spec in embedded.EMBEDDED_MODELS.items():
            state = "pulled" if embedded.is_pulled(name) else "not pulled"
            default = " (default)" if name == embedded.DEFAULT_MODEL else ""
            print(f"{name}{default}: {spec.description} [{state}]")
        return 0
    print(embedded.pull(args.name or embedded.DEFAULT_MODEL, force=args.force))
    return 0


# --------------------------------------------------------------------------- their own flags
def _out(default: str, what: str = "output directory"):
    return lambda p: p.add_argument("--out", default=default, help=f"{what} (default: {default})")


def _overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace another run's artifacts in --out")


def _identify_flags(p: argparse.ArgumentParser) -> None:
    _out("identify")(p)
    _overwrite(p)
    p.add_argument("--top", type=int, default=10, help="top neurons to list in the summary")


def _align_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefs", default=None,
                   help="preference pairs (JSONL/CSV/JSON or hf:<name>); default: synthesise them from the model "
                        "into OUT/prefs/")
    _out("align")(p)
    _overwrite(p)


def _evaluate_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=None,
                   help="model to evaluate (hub id, directory, embedded name); repeat for several (default: the "
                        "embedded default)")
    _out("eval")(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an evaluation of other settings in --out (one of the same settings is merged into)")


def _run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help=f"TOML/YAML run config (default: {DEFAULT_CONFIG.name} in the package)")
    p.add_argument("--out", default=None, help="run directory (default from the config: runs/main)")
    p.add_argument("--model", default=None, help="model to align (default: the embedded default)")
    p.add_argument("--quick", action="store_true", help="quick profile: a first look in a few minutes")
    p.add_argument("--long", action="store_true", help="long profile (configs/long.toml): every attack at every "
                                                       "budget, a 5-round iterative attack, a larger evaluation")
    p.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--overwrite", action="store_true",
                   help="redo the finished stages whose settings changed (and the stages after them); the others "
                        "are kept")


def _sweep_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="TOML/YAML grid: [base] settings, [arms.<name>] overrides, seeds")
    p.add_argument("--out", default="runs/sweep", help="sweep directory (default: runs/sweep)")
    p.add_argument("--arms", default=None, help="comma-separated subset of the grid's arms")
    p.add_argument("--seeds", nargs="+", default=None, help="training seeds per arm (replaces the grid's)")


def _config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["dump"], help="dump: print the effective main-job config as TOML")
    p.add_argument("--config", default=None, help="TOML/YAML run config layered over the packaged main job")
    p.add_argument("--out", default=None, help="run directory, as `run --out` would set it")
    p.add_argument("--quick", action="store_true", help="with the quick profile")
    p.add_argument("--long", action="store_true", help="with the long profile")
    p.add_argument("--stage", default=None, help="print only this stage's section")


def _report_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="main-job directory (or one stage's output directory)")
    p.add_argument("--out", default=None, help="HTML file to write (default: DIR/report.html; summary.md beside it)")


def _models_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "pull"])
    p.add_argument("name", nargs="?", help="embedded model name (default: the embedded default)")
    p.add_argument("--force", action="store_true", help="convert again even if cached")


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Command:
    """One subcommand: its name and help, the config whose fields become flags, its own flags, what it runs."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    config: type | None = None
    flags: Callable[[argparse.ArgumentParser], None] | None = None
    progress: bool = True  # takes --no-progress


COMMANDS: tuple[Command, ...] = (
    Command("identify", "find safety neurons (ES + SAS, or NeuroStrike probes)", cmd_identify, IdentifyConfig,
            _identify_flags),
    Command("prefs", "synthesise a safety preference set from the model, or convert a file", cmd_prefs, PrefsConfig,
            _out("prefs.jsonl", "output JSONL")),
    Command("align", "neuron-frozen iterative DPO (or the dpo / sn-tune baselines)", cmd_align, AlignConfig,
            _align_flags),
    Command("attack", "neuron-pruning attack: ASR before/after pruning safety neurons", cmd_attack, AttackConfig,
            _out("attack")),
    Command("evaluate", "compare models: ASR, pruning attack, jailbreaks, over-refusal, capability, red-team misuse",
            cmd_evaluate, EvalConfig, _evaluate_flags),
    Command("analyze", "layer distribution, category overlap and layer-wise separability", cmd_analyze,
            AnalyzeConfig, _out("analysis")),
    Command("report", "build report.html and summary.md from a run directory's artifacts", cmd_report, None,
            _report_flags, progress=False),
    Command("run", "the main job: identify, prefs, align (safeneuron + DPO), evaluate, analyze, report", cmd_run,
            None, _run_flags),
    Command("sweep", "the experiment harness: named arms of the main job on the same prompts, one table", cmd_sweep,
            None, _sweep_flags),
    Command("config", "print the effective config (`config dump`): packaged defaults, your file, the profile",
            cmd_config, None, _config_flags, progress=False),
    Command("models", "list or pull the embedded models", cmd_models, None, _models_flags, progress=False),
)


def add_commands(subparsers) -> None:
    """One subparser per entry of :data:`COMMANDS`."""
    for command in COMMANDS:
        p = subparsers.add_parser(command.name, help=command.help)
        if command.config is not None:
            p.add_argument("--config", default=None,
                           help=f"TOML/YAML file of {command.name} settings (its keys, or a run config's "
                                f"[{command.name}] table); flags given override it")
            add_config_flags(p, command.config)
        if command.flags is not None:
            command.flags(p)
        if command.progress:
            p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.set_defaults(func=command.run)
