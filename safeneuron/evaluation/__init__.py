"""Evaluation: generation with a resumable cache, judges, metrics and the comparison.

Library entry points: :func:`evaluate_models` (several models -> ``results.json`` and
``results.md``) and :func:`evaluate_model` (one loaded model -> its entry). Modules:

* ``generation``  batched, left-padded, cached generation
* ``judges``      refusal phrases; safety classifiers (Llama-Guard, HarmBench, sequence)
* ``sets``        named harmful benchmarks, jailbreak templates, red-team requests
* ``measure``     generate (optionally pruned) + judge = per-prompt flags
* ``metrics``     rates with Wilson intervals, robustness-curve area
* ``capability``  MC accuracy by log-likelihood, perplexity, lm-eval bridge
* ``evaluate``    the comparison and its table
"""

from __future__ import annotations

__all__ = ["evaluate_models", "evaluate_model", "register_cli"]


def __getattr__(name: str):
    # Imported on first use: safeneuron.attacks imports from this package and the
    # comparison imports safeneuron.attacks.
    if name in ("evaluate_models", "evaluate_model", "results_markdown"):
        from safeneuron.evaluation import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def evaluate_summary(results: dict) -> str:
    """The comparison as the markdown table (what ``results.md`` holds)."""
    from safeneuron.evaluation.evaluate import results_markdown

    return results_markdown(results)


def cmd_evaluate(args) -> int:
    from pathlib import Path

    from safeneuron.cli import config_from_args
    from safeneuron.config import EvalConfig
    from safeneuron.evaluation.evaluate import evaluate_models

    config = config_from_args(EvalConfig, args)
    results = evaluate_models(args.model or [None], config, args.out, progress=not args.no_progress)
    print(evaluate_summary(results))
    print(f"results: {(Path(args.out) / 'results.json').resolve()} ({results.get('wall_time_s', 0):.0f} s)")
    return 0


def register_cli(subparsers) -> None:
    """Add ``safeneuron evaluate``."""
    from safeneuron.cli import add_config_flags
    from safeneuron.config import EvalConfig

    p = subparsers.add_parser("evaluate", help="compare models: ASR, pruning attack, jailbreaks, over-refusal, "
                                               "capability, red-team misuse")
    p.add_argument("--model", action="append", default=None,
                   help="model to evaluate (hub id, directory, embedded name); repeat for several (default: the "
                        "embedded default)")
    add_config_flags(p, EvalConfig)
    p.add_argument("--out", default="eval", help="output directory (default: eval)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)
