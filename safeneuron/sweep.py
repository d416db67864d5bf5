"""The experiment harness: named arms of the main job, run on the same prompts, compared in one table.

``safeneuron sweep --config grid.toml --out DIR`` runs, for every arm and training seed, a normal main
job (:func:`safeneuron.pipeline.run`) in ``DIR/arms/<arm>-s<seed>/``, then writes ``DIR/sweep.json``,
``DIR/sweep.md`` and ``DIR/sweep.png``: one row per arm (its aligned models) and for the base model,
ASR plain / FULL-pruned / iterative / white-box with 95 % intervals, over-refusal, capability and
wall time, and the exact McNemar test of every arm against the reference arm on the same prompts.

A grid file (TOML or YAML)::

    seeds = [0, 1]            # training seeds per arm (align.seed); prompts and splits are the run's
    reference = "dpo"         # the arm every other arm is tested against
    [base]                    # settings every arm shares, layered over the packaged main job
    [base.evaluate]
    n_harmful = 48
    [arms.dpo]
    modes = ["dpo"]
    [arms.safeneuron]
    modes = ["safeneuron"]
    [arms.lora-r32]
    modes = ["safeneuron"]
    align = { lora_r = 32 }

Arms differ in a few run-config fields (``modes``, ``prefs``, ``align``, ...); every arm uses the
same seed for its prompt splits, so all arms are evaluated on the same held-out prompts. A stage
whose settings equal an earlier arm's (the base model's identification, the preference pairs, the
base model's answers) is copied from it instead of recomputed. A killed sweep resumes: finished
arms are reused as they are, an unfinished one continues where it stopped.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safeneuron.artifacts import atomic_dir, read_json, timestamp, write_json, write_text
from safeneuron.config import DEFAULT_CONFIG, ConfigError, RunConfig, from_dict, load_config_file, merge_run_settings
from safeneuron.evaluation.metrics import detectable_difference, mcnemar_exact
from safeneuron.pipeline import STAGES, run

logger = logging.getLogger(__name__)

__all__ = ["SweepConfig", "load_sweep", "sweep", "summarise_sweep"]

#: Stages a sweep runs by default: no per-arm analysis (the summary compares the arms).
SWEEP_STAGES = ("identify", "prefs", "align", "evaluate", "report")


@dataclass
class SweepConfig:
    """A grid: the shared run settings, the arms (name -> run-config overrides), the training seeds."""

    base: dict = field(default_factory=dict)
    arms: dict = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    reference: str | None = None
    stages: list[str] = field(default_factory=lambda: list(SWEEP_STAGES))

    def validate(self) -> None:
        if not self.arms:
            raise ConfigError("the grid has no arms: add [arms.<name>] tables", fields=("arms",))
        for name, arm in self.arms.items():
            if not isinstance(arm, dict):
                raise ConfigError(f"arms.{name} must be a table of run settings, got {type(arm).__name__}")
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ConfigError(f"arm name {name!r}: use letters, digits, '-' and '_'", fields=("arms",))
        if self.reference is not None and self.reference not in self.arms:
            raise ConfigError(f"reference {self.reference!r} is not an arm ({', '.join(self.arms)})",
                              fields=("reference",))
        if not self.seeds or not all(isinstance(s, int) for s in self.seeds):
            raise ConfigError(f"seeds takes whole numbers, got {self.seeds!r}", fields=("seeds",))
        for s in self.stages:
            if s not in STAGES:
                raise ConfigError(f"unknown stage {s!r}; stages are {', '.join(STAGES)}", fields=("stages",))
        for name, seed in self.runs():
            self.run_config(name, seed, Path("unused")).validate()  # every arm's settings, before any work

    def runs(self) -> list[tuple[str, int]]:
        return [(name, seed) for name in self.arms for seed in self.seeds]

    def run_config(self, arm: str, seed: int, out: Path) -> RunConfig:
        """The arm's run config: the packaged main job, then ``base``, then the arm's overrides; ``align.seed``
        is the training seed (the run's own seed, which splits the prompts, stays ``base``'s)."""
        data = merge_run_settings(load_config_file(DEFAULT_CONFIG), self.base)
        data = merge_run_settings(data, self.arms[arm])
        data.setdefault("align", {})
        data["align"] = {**data["align"], "seed": seed}
        data["out"] = str(out)
        return from_dict(RunConfig, data, where=f"arm {arm}", validate=False)


def load_sweep(path: str | Path, **overrides: Any) -> SweepConfig:
    """Read a grid file (TOML/YAML); ``overrides`` replace top-level keys."""
    data = load_config_file(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = {"base", "arms", "seeds", "reference", "stages"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; a grid holds {', '.join(sorted(known))}")
    config = SweepConfig(**data)
    config.validate()
    return config


# --------------------------------------------------------------------------- sharing what arms have in common
def _copy_tree(src: Path, dst: Path) -> None:
    """``dst`` as a copy of ``src`` (hard links where possible: the artifacts are immutable), atomically."""
    if dst.exists():
        return

    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, copy_function=link, dirs_exist_ok=True)


def _upstream_view(config: RunConfig) -> dict:
    """What the base model's identification, the prompt splits and the preference pairs depend on: the run's
    settings but the alignment's, the evaluation's (except the sizes that shape the splits) and the analysis'."""
    data = asdict(config)
    for key in ("out", "align", "modes", "analyze"):
        data.pop(key, None)
    evaluate = data.pop("evaluate", {}) or {}
    data["evaluate"] = {k: evaluate.get(k) for k in ("harmful", "harmless", "n_harmful", "n_harmless", "limit")}
    data["evaluate_identify_prompts"] = (evaluate.get("identify") or {}).get("max_prompts")
    return data


def _share(done: list[tuple[Path, RunConfig]], arm_dir: Path, config: RunConfig) -> list[str]:
    """Copy into ``arm_dir`` what an earlier arm computed that this one would compute again: the base model's
    identification and the preference pairs when their inputs are the same (:func:`_upstream_view`), and the base
    model's cached answers and attacker identification in evaluation (content-keyed caches: reused only where
    the keys match). Returns what was shared."""
    shared = []
    for src, other in done:
        if _upstream_view(other) != _upstream_view(config):
            continue
        if (src / "identify" / "identify.json").is_file():
            _copy_tree(src / "identify", arm_dir / "identify")
            shared.append(f"identify from {src.name}")
        for name in ("prefs.jsonl", "prefs.manifest.json"):
            if (src / name).is_file() and not (arm_dir / name).exists():
                shutil.copy2(src / name, arm_dir / name)
                shared.append(f"{name} from {src.name}")
        for part in ("generations/base", "attack/base"):
            if (src / "evaluate" / part).is_dir() and not (arm_dir / "evaluate" / part).exists():
                (arm_dir / "evaluate" / part).parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(src / "evaluate" / part, arm_dir / "evaluate" / part)
                shared.append(f"evaluate/{part} from {src.name}")
        break
    return shared


# --------------------------------------------------------------------------- the sweep
def sweep(config: SweepConfig, out: str | Path, *, progress: bool = True) -> dict:
    """Run every arm x seed (finished ones are reused), then write the summary; returns it."""
    config.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "grid.json", {"base": config.base, "arms": config.arms, "seeds": config.seeds,
                                   "reference": config.reference, "stages": config.stages})
    done: list[tuple[Path, RunConfig]] = []
    timings = {}
    for arm, seed in config.runs():
        arm_dir = out / "arms" / f"{arm}-s{seed}"
        run_config = config.run_config(arm, seed, arm_dir)
        arm_dir.mkdir(parents=True, exist_ok=True)
        shared = [] if (arm_dir / "run.json").is_file() else _share(done, arm_dir, run_config)
        logger.info("== arm %s, seed %d%s ==", arm, seed, f" (shared: {', '.join(shared)})" if shared else "")
        t0 = time.perf_counter()
        run(run_config, stages=tuple(config.stages), progress=progress)
        timings[f"{arm}-s{seed}"] = round(time.perf_counter() - t0, 1)
        done.append((arm_dir, run_config))
        summary = summarise_sweep(out, config)
    summary["session_wall_s"] = timings
    write_json(out / "sweep.json", summary)
    return summary


# --------------------------------------------------------------------------- the summary
def _rate(entry: dict, key: str):
    asr, ci = entry.get("asr") or {}, entry.get("asr_ci95") or {}
    return asr.get(key), ci.get(key)


def _row(arm: str, seed: int, model: str, entry: dict, record: dict) -> dict:
    """One model of one arm: the headline numbers, with their intervals and per-prompt outcomes."""
    whitebox = ((entry.get("attacks") or {}).get("whitebox") or {}).get("points") or []
    iterative = entry.get("asr_iterative") or []
    stage = (record.get("stages") or {}).get(f"align/{model}") or {}
    align_s = stage.get("first_run_wall_s", stage.get("wall_s", 0))
    return {
        "arm": arm, "seed": seed, "model": model,
        "asr": _rate(entry, "ori")[0], "asr_ci95": _rate(entry, "ori")[1],
        "asr_full": _rate(entry, "full")[0], "asr_full_ci95": _rate(entry, "full")[1],
        "asr_iterative": iterative[-1]["asr"] if iterative else None,
        "iterative_rounds": len(iterative) or None,
        "asr_whitebox": whitebox[-1]["asr"] if whitebox else None,
        "over_refusal": entry.get("over_refusal"), "over_refusal_xstest": entry.get("over_refusal_xstest"),
        "mc_accuracy": entry.get("mc_accuracy"), "n_harmful": entry.get("n_harmful"),
        "align_wall_s": round(align_s, 1) if align_s else None,
        "run_wall_s": record.get("compute_wall_s", record.get("wall_time_s")),  # the first run's, not a resume's
        "outcomes": entry.get("asr_outcomes") or {},
    }


def summarise_sweep(out: str | Path, config: SweepConfig) -> dict:
    """The table across the finished arms (``DIR/sweep.json``, ``sweep.md``, ``sweep.png``)."""
    out = Path(out)
    rows = []
    base_done = False
    for arm, seed in config.runs():
        arm_dir = out / "arms" / f"{arm}-s{seed}"
        if not (arm_dir / "evaluate" / "results.json").is_file():
            continue
        results = read_json(arm_dir / "evaluate" / "results.json")
        record = read_json(arm_dir / "run.json") if (arm_dir / "run.json").is_file() else {}
        for entry in results.get("models", []):
            if entry["name"] == "base":
                if not base_done:
                    rows.append(_row("base", seed, "base", entry, record))
                    base_done = True
                continue
            rows.append(_row(arm, seed, entry["name"], entry, record))
    reference = [r for r in rows if r["arm"] == config.reference]
    for r in rows:
        r["vs_reference"] = _paired(r, reference)
    summary = {"rows": [{k: v for k, v in r.items() if k != "outcomes"} for r in rows],
               "reference": config.reference, "seeds": config.seeds, "arms": list(config.arms),
               "created": timestamp()}
    write_json(out / "sweep.json", summary)
    write_text(out / "sweep.md", sweep_markdown(summary))
    if rows:
        from safeneuron.report.figures import plot_sweep, save

        save(plot_sweep(summary), out / "sweep.png")
    return summary


def _paired(row: dict, reference: list[dict]) -> dict | None:
    """Exact McNemar p of ``row`` against the reference arm's model with the same seed (else its first), per
    measurement both have, on the same prompts."""
    if not reference or row in reference:
        return None
    ref = next((r for r in reference if r["seed"] == row["seed"]), reference[0])
    out = {}
    for key in ("ori", "full"):
        x, y = row["outcomes"].get(key), ref["outcomes"].get(key)
        if x and y and len(x) == len(y):
            out[key] = {"p": mcnemar_exact(x, y), "n": len(x), "detectable": detectable_difference(len(x))}
    return out or None


def _pct(v, ci=None) -> str:
    if v is None:
        return "n/a"
    text = f"{100 * v:.1f}"
    return text + (f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]" if ci else "")


def sweep_markdown(summary: dict) -> str:
    """The sweep table: rates in %, 95 % intervals, McNemar p against the reference arm."""
    ref = summary.get("reference")
    lines = ["# safeneuron sweep", "",
             f"Rates in %, [95 % Wilson interval]. p: exact McNemar against the reference arm ({ref or 'none'}) on "
             "the same prompts.", "",
             "| arm | seed | model | n | ASR | ASR FULL-pruned | p (FULL) | ASR iterative | ASR white-box | "
             "over-refusal | XSTest-like | MC acc | align s | run s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        p = ((r.get("vs_reference") or {}).get("full") or {}).get("p")
        lines.append(f"| {r['arm']} | {r['seed']} | {r['model']} | {r['n_harmful']} | {_pct(r['asr'], r['asr_ci95'])} | "
                     f"{_pct(r['asr_full'], r['asr_full_ci95'])} | {'n/a' if p is None else f'{p:.3g}'} | "
                     f"{_pct(r['asr_iterative'])} | {_pct(r['asr_whitebox'])} | {_pct(r['over_refusal'])} | "
                     f"{_pct(r['over_refusal_xstest'])} | {_pct(r['mc_accuracy'])} | {r['align_wall_s'] or 'n/a'} | "
                     f"{r['run_wall_s'] or 'n/a'} |")
    return "\n".join(lines) + "\n"
