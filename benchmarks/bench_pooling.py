"""Which token pooling finds the neurons that carry refusal? A measured comparison on one model.

For each candidate pooling (span x position) this identifies safety neurons on the same
prompts and runs the causal check (``identify --verify``: ASR on the same held-out
harmful prompts plain, with the union pruned, and with as many random neurons per layer
pruned), and reports the diagnostics of the issue:

* ES quantiles (Cohen's d over all neurons) and the sizes of the ES / SAS / union sets;
* the layer-0 share of neurons with a positive harmful-minus-harmless shift (about 0.5 when
  the classes differ only in content; far above 0.5 when a confound such as prompt length
  or the template's constant tokens shifts every neuron);
* neurons with zero variance in both classes (their pooled value never changes: e.g. a max
  that always falls on the template's constant system prompt);
* the causal check: plain / pruned / random ASR with 95 % intervals, McNemar p.

Each pooling's identification lives in ``--out/<name>/`` and is reused on a rerun (and a
killed causal check resumes from its cached answers), so the comparison resumes.

    .venv/bin/python benchmarks/bench_pooling.py [--model M] [--max-prompts 128] [--verify-prompts 96]
        [--only content-max,prompt-max] -> benchmarks/results/pooling.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: name -> (span, position, length-matched harmless prompts); prompt-max was the default, prompt-mean the
#: attacker's; the -matched ones are the length-confound controls.
CANDIDATES = {
    "prompt-max": ("prompt", "max", False),
    "prompt-mean": ("prompt", "mean", False),
    "content-max": ("content", "max", False),
    "content-mean": ("content", "mean", False),
    "post-mean": ("post", "mean", False),
    "last": ("prompt", "last", False),
    "prompt-max-matched": ("prompt", "max", True),
    "content-mean-matched": ("content", "mean", True),
}


def diagnostics(identification) -> dict:
    """ES quantiles, set sizes, positive-shift shares and constant neurons of one identification."""
    import torch

    scores = identification.scores
    mlps = list(scores)
    es = torch.cat([scores[m]["es"].double() for m in mlps])
    quantiles = {f"q{q:g}": float(torch.quantile(es, q / 100)) for q in (50, 90, 99, 99.9)}
    positive = [float((scores[m]["shift"] > 0).double().mean()) for m in mlps]
    constant = sum(int(((scores[m]["var_harmful"] == 0) & (scores[m]["var_harmless"] == 0)).sum()) for m in mlps)
    m = identification.manifest
    return {"es": {**quantiles, "max": float(es.max())}, "selected_total": m["selected_total"],
            "selected_fraction": m["selected_fraction"], "positive_shift_share_layer0": positive[0],
            "positive_shift_share_mean": sum(positive) / len(positive), "constant_neurons": constant,
            "tau_es": m["tau_es"]}


def _share_plain_answers(out: Path, name: str) -> None:
    """Seed this candidate's causal-check cache with the plain (unpruned) answers another candidate already
    generated: the model and the held-out prompts are the same, so those answers are too."""
    from safeneuron.generation import open_cache, read_cache

    records = {}
    for cache in out.glob("*/verify/generations.jsonl"):
        for line in cache.read_text(encoding="utf-8").split("\n"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # blank, or a torn last line (a kill mid-write)
                continue
            if "|prune:" not in record.get("tag", ""):
                records.setdefault(record["key"], record)
    if records:
        target = out / name / "verify" / "generations.jsonl"
        have = read_cache(target)
        with open_cache(target) as fh:  # closes a torn last line first
            fh.writelines(json.dumps(r) + "\n" for key, r in records.items() if key not in have)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model (default: the embedded default)")
    parser.add_argument("--max-prompts", type=int, default=128, help="identification prompts per class")
    parser.add_argument("--verify-prompts", type=int, default=96, help="held-out harmful prompts of the check")
    parser.add_argument("--verify-max-new-tokens", type=int, default=64)
    parser.add_argument("--verify-dtype", default="fast", help="dtype of the causal check's generation (fast: bf16 "
                        "where the CPU computes it natively)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(CANDIDATES)}")
    parser.add_argument("--out", default=str(ROOT / "runs" / "pooling"), help="identification directories")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "pooling.json"))
    args = parser.parse_args()

    from safeneuron.artifacts import versions, write_json
    from safeneuron.config import IdentifyConfig
    from safeneuron.models import load_model
    from safeneuron.stages.identify import identify

    loaded = load_model(args.model)
    names = args.only.split(",") if args.only else list(CANDIDATES)
    results = {"model": loaded.name, "max_prompts": args.max_prompts, "verify_prompts": args.verify_prompts,
               "verify_max_new_tokens": args.verify_max_new_tokens, "candidates": {}, "versions": versions()}
    previous = Path(args.json)
    if previous.is_file():  # keep the candidates of an earlier run with the same sizes
        old = json.loads(previous.read_text())
        if all(old.get(k) == results[k] for k in ("model", "max_prompts", "verify_prompts", "verify_max_new_tokens")):
            results["candidates"] = old.get("candidates", {})
    for name in names:
        span, position, matched = CANDIDATES[name]
        config = IdentifyConfig(model=loaded.name, span=span, position=position, max_prompts=args.max_prompts,
                                match_lengths=matched, verify=True, verify_prompts=args.verify_prompts,
                                verify_max_new_tokens=args.verify_max_new_tokens, verify_dtype=args.verify_dtype)
        _share_plain_answers(Path(args.out), name)
        t0 = time.perf_counter()
        ident = identify(config, Path(args.out) / name, loaded=loaded, progress=False)
        entry = diagnostics(ident)
        entry.update(span=span, position=position, match_lengths=matched, verification=ident.manifest["verification"],
                     wall_s=time.perf_counter() - t0)
        results["candidates"][name] = entry
        v = entry["verification"]
        print(f"{name:<13} union {entry['selected_total']['union']:>5}  ES max {entry['es']['max']:.2f}  "
              f"layer-0 positive {entry['positive_shift_share_layer0']:.2f}  ASR plain {v['plain']['rate']:.3f} "
              f"pruned {v['pruned']['rate']:.3f} random {v['random']['rate']:.3f}  ({entry['wall_s']:.0f} s)",
              flush=True)
        write_json(args.json, results)  # after every candidate
    print(json.dumps({k: {"union": c["selected_total"]["union"], "pruned": c["verification"]["pruned"]["rate"],
                          "random": c["verification"]["random"]["rate"]} for k, c in results["candidates"].items()},
                     indent=1))


if __name__ == "__main__":
    main()
