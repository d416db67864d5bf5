"""Wall time of the full default evaluation (``safeneuron evaluate`` with its defaults).

Runs :func:`safeneuron.stages.evaluate.evaluate_models` on one model with the default
:class:`~safeneuron.config.EvalConfig` into an empty directory (nothing cached), plus
the MMLU subset from ../shared when it is present (``--no-mc`` to leave it out), and
records the total and per-step times and the 1-minute load average (other jobs on a
shared machine change CPU timings). Capability uses the default MC set (the built-in
``builtin:general_mc``) unless ``--mc-file`` names another (e.g. the MMLU subset in
../shared/data). Goal: <= 6 minutes for the embedded model on this CPU.

Usage:
    .venv/bin/python benchmarks/bench_evaluate.py                 # embedded default, default settings
    .venv/bin/python benchmarks/bench_evaluate.py --dtype fast     # the main job's evaluation dtype
    .venv/bin/python benchmarks/bench_evaluate.py --model smollm2-135m-instruct --keep runs/eval-smol
Writes benchmarks/results/evaluate.json (merged with earlier runs, keyed by model and dtype).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "evaluate.json"


def main() -> None:
    from safeneuron.config import EvalConfig
    from safeneuron.stages.evaluate import evaluate_models
    from safeneuron.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model (default: the embedded default)")
    parser.add_argument("--mc-file", default=None, help="MC questions (default: EvalConfig's, the built-in set)")
    parser.add_argument("--no-mc", action="store_true", help="leave out multiple-choice capability")
    parser.add_argument("--dtype", default="auto", help="auto (float32 on a CPU, the default) or fast (bfloat16 "
                                                         "where native)")
    parser.add_argument("--keep", default=None, help="write the evaluation here and keep it (must not exist)")
    args = parser.parse_args()

    config = EvalConfig(dtype=args.dtype)
    if args.mc_file or args.no_mc:
        config.mc_file = None if args.no_mc else args.mc_file
    mc = config.mc_file
    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-eval-"))
    if args.keep and out.exists():
        raise SystemExit(f"{out} exists: the benchmark needs an empty directory (nothing cached)")
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    loaded = load_model(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    try:
        results = evaluate_models([loaded], config, out, progress=False)
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    wall = time.perf_counter() - t0
    entry = results["models"][0]
    result = {
        "model": loaded.name,
        "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
        "wall_s": round(wall, 1),
        "load_s": round(load_s, 1),
        "goal_s": 360,
        "steps_s": entry["timings"],
        "mc_file": mc,
        "counts": {k: entry.get(k) for k in ("n_harmful", "n_harmless", "n_xstest", "n_template_prompts", "n_mc",
                                             "n_redteam", "perplexity_tokens")},
        "templates": len(entry["asr_templates"] or {}),
        "sweep_points": len(entry["curve"] or []),
        "figures": {k: entry.get(k) for k in ("asr", "asr_ci95", "pruned_counts", "asr_templates", "asr_worst_template",
                                              "worst_template", "curve", "curve_area", "over_refusal",
                                              "over_refusal_xstest", "mc_accuracy", "perplexity",
                                              "redteam_compliance")},
        "loadavg_1m": {"start": load_start, "end": os.getloadavg()[0]},
        "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "device": "cuda" if torch.cuda.is_available() else "cpu", "torch": torch.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(json.dumps(result, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    previous[loaded.name if args.dtype == "auto" else f"{loaded.name} ({args.dtype})"] = result
    RESULTS.write_text(json.dumps(previous, indent=2) + "\n")


if __name__ == "__main__":
    main()
