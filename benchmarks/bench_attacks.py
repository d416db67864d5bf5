"""The attack profile on one model: does each attack work, what does it cost, how long does it take?

Runs ``safeneuron attack --kind K`` (:func:`safeneuron.stages.attack.run_attack`) for each attack on the same
model, the same held-out harmful prompts (built-in harmful prompts the attacker's identification did not use)
and the same attacker prompts, and writes per attack: plain ASR, ASR at each budget point with 95 % intervals,
the exact McNemar test against plain on the same prompts, the difference the sample can detect, the utility
cost (KL, perplexity) and the wall time of planning (extraction, selection, training) and measuring.

Timing runs (the issue's targets) come first, on their own: ``direction-rank1`` (extraction + selection + one
ablated evaluation) and ``finetune-k10`` (self-generated answers + 3 epochs of LoRA SFT + evaluation after each
epoch). One directory per model (``--out/base``, ``--out/aligned``) keeps the answers, the attacker's
identification and the adapters, shared by the runs and reused on a rerun.

    .venv/bin/python benchmarks/bench_attacks.py [--model M] [--limit 96] [--only direction-rank1,prefill]
        [--aligned DIR --base-identify DIR]  -> benchmarks/results/attacks.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safeneuron.config import AttackConfig  # noqa: E402
from safeneuron.evaluation.metrics import detectable_difference, mcnemar_exact  # noqa: E402
from safeneuron.models import load_model  # noqa: E402
from safeneuron.stages.attack import run_attack  # noqa: E402

ADVBENCH = ROOT.parent / "shared" / "data" / "advbench" / "harmful_behaviors.csv"

#: name -> (kind, attacks settings, on the aligned model)
RUNS = {
    "direction-rank1": ("direction", {"direction_ranks": [1]}, False),
    "finetune-k10": ("finetune", {"finetune_examples": [10]}, False),
    "prefill": ("prefill", {}, False),
    "direction": ("direction", {"direction_ranks": [1, 2, 4]}, False),
    # every (layer, position) candidate below 0.8 of the depth scored by ablation, not the 16 most separating
    "direction-all": ("direction", {"direction_ranks": [1, 2], "direction_candidates": 10_000}, False),
    # the same with a looser utility budget: the strongest candidates (layers 17-18) cost KL 0.4-0.75
    "direction-kl1": ("direction", {"direction_ranks": [1, 2], "direction_candidates": 32, "direction_kl_budget": 1.0},
                      False),
    "best_neuron": ("best_neuron", {"best_neuron_counts": [1, 4, 16]}, False),
    "probe": ("probe", {}, False),
    "finetune-k50": ("finetune", {"finetune_examples": [50], "finetune_epochs": 1, "finetune_prompts": str(ADVBENCH)},
                     False),
    "finetune-advbench": ("finetune", {"finetune_examples": [10, 50, 100], "finetune_prompts": str(ADVBENCH)}, False),
    "transfer": ("transfer", {}, True),
    "whitebox": ("whitebox", {}, True),
}


def summarise(name: str, report: dict, wall: float) -> dict:
    plain = report["plain"]
    prof = report["profile"]
    points = []
    for p in prof["points"]:
        outcomes = prof["outcomes"][p["label"]]
        points.append({k: p.get(k) for k in ("label", "budget", "asr", "ci95", "k", "n", "kl", "perplexity", "pruned",
                                               "examples", "epoch", "rank")}
                      | {"delta_vs_plain": p["asr"] - plain["asr"], "mcnemar_p_vs_plain": mcnemar_exact(
                          plain["outcomes"], outcomes), "verdicts": p.get("verdicts")})
    details = {k: v for k, v in prof["details"].items() if k not in ("candidates",)}
    return {"name": name, "kind": report["attack"], "model": report["model"], "n": plain["n"],
            "harmful": report["harmful"]["source"], "plain": {k: plain[k] for k in ("asr", "ci95", "k", "n", "verdicts")},
            "points": points, "perplexity_plain": prof.get("perplexity_plain"), "details": details,
            "plan_s": prof.get("plan_s"), "measure_s": prof.get("time_s"), "wall_s": round(wall, 1),
            "detectable_difference": detectable_difference(plain["n"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model under attack (default: the embedded one)")
    ap.add_argument("--aligned", default=None, help="an aligned model directory (align/<mode>/model) for "
                                                    "transfer and white-box")
    ap.add_argument("--base-identify", default=None, help="the base model's identify directory (transfer's source)")
    ap.add_argument("--limit", type=int, default=96, help="held-out harmful prompts measured")
    ap.add_argument("--identify-prompts", type=int, default=64)
    ap.add_argument("--dtype", default="fast")
    ap.add_argument("--only", default=None, help="comma-separated run names")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "attacks"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "attacks.json"))
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(RUNS)
    result_path = Path(args.json)
    results = json.loads(result_path.read_text()) if result_path.exists() else {"runs": {}}
    loaded = {}
    for name in names:
        kind, suite, on_aligned = RUNS[name]
        if on_aligned and not args.aligned:
            print(f"{name}: skipped (needs --aligned)")
            continue
        model = args.aligned if on_aligned else args.model
        if model not in loaded:
            loaded.clear()
            loaded[model] = load_model(model, dtype=args.dtype)
        if kind == "transfer":
            suite = dict(suite, transfer_mask=args.base_identify)
        config = AttackConfig(kind=kind, model=model, limit=args.limit, dtype=args.dtype, max_new_tokens=64,
                              identify={"max_prompts": args.identify_prompts}, attacks=suite)
        t0 = time.perf_counter()
        # one directory per model: the plain answers, the attacker's identification and the caches are shared
        report = run_attack(config, Path(args.out) / ("aligned" if on_aligned else "base"), loaded=loaded[model],
                            progress=False)
        results["runs"][name] = summarise(name, report, time.perf_counter() - t0)
        results["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps(results, indent=2))
        r = results["runs"][name]
        print(f"{name}: plain {r['plain']['asr']:.3f} (n={r['n']}); " + "; ".join(
            f"{p['label']}: {p['asr']:.3f} (p={p['mcnemar_p_vs_plain']:.2g}, KL={p['kl']})" for p in r["points"])
              + f"; plan {r['plan_s']} s, measure {r['measure_s']} s, wall {r['wall_s']} s", flush=True)


if __name__ == "__main__":
    main()
