"""Generation throughput: batched (left-padded) vs one prompt at a time.

The same prompts (held-out built-in harmful and harmless ones, as an evaluation
uses them) are answered greedily with the same ``max_new_tokens``, once one at a
time and in batches; the answers must agree. Goal: batched >= 4x the tokens per
second on this CPU with the embedded model. Other jobs on a shared machine change
CPU speed by several times within minutes, so the two are interleaved in rounds and
compared within each round (median round reported, with the 1-minute load average).

Usage:
    .venv/bin/python benchmarks/bench_generation.py                      # embedded default, 32 prompts
    .venv/bin/python benchmarks/bench_generation.py --model smollm2-135m-instruct --n 16
Writes benchmarks/results/generation.json (merged with earlier runs, keyed by model).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "generation.json"


def machine() -> dict:
    import transformers

    return {"cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__}


def main() -> None:
    from safeneuron.generation import generate
    from safeneuron.evaluation.sets import load_eval_prompts
    from safeneuron.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model (default: the embedded default)")
    parser.add_argument("--n", type=int, default=32, help="prompts (half harmful, half harmless)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (one-at-a-time covers 1/rounds each)")
    args = parser.parse_args()

    loaded = load_model(args.model)
    harmful = load_eval_prompts(None, default="harmful", n=args.n // 2, seed=1).prompts
    harmless = load_eval_prompts(None, default="harmless", n=args.n - args.n // 2, seed=1).prompts
    prompts = [p for pair in zip(harmful, harmless) for p in pair]
    kw = dict(max_new_tokens=args.max_new_tokens, progress=False)
    tok = loaded.tokenizer
    generate(loaded.model, tok, prompts[:2], max_new_tokens=4, progress=False)  # warm-up

    def n_tokens(answers):
        return sum(len(tok(r, add_special_tokens=False)["input_ids"]) for r in answers)

    # CPU speed on a shared machine drifts by several x within minutes: interleave. Each
    # round answers all prompts batched and a quarter of them one at a time, and the
    # throughput ratio is taken within the round; the median round is the figure.
    rounds, single_all, batched_all = [], [None] * len(prompts), None
    quarter = -(-len(prompts) // args.rounds)
    for r in range(args.rounds):
        part = list(range(r * quarter, min(len(prompts), (r + 1) * quarter)))
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        batched_all = generate(loaded.model, tok, prompts, batch_size=args.batch_size, **kw)
        t_b = time.perf_counter() - t0
        t0 = time.perf_counter()
        single = generate(loaded.model, tok, [prompts[i] for i in part], batch_size=1, **kw)
        t_s = time.perf_counter() - t0
        for i, a in zip(part, single):
            single_all[i] = a
        tps_b, tps_s = n_tokens(batched_all) / t_b, n_tokens(single) / t_s
        rounds.append({"batched_s": round(t_b, 2), "batched_tokens_per_s": round(tps_b, 2),
                       "one_at_a_time_prompts": len(part), "one_at_a_time_s": round(t_s, 2),
                       "one_at_a_time_tokens_per_s": round(tps_s, 2), "speedup": round(tps_b / tps_s, 2),
                       "loadavg_1m": load})
        print(rounds[-1], flush=True)
    speedups = sorted(x["speedup"] for x in rounds)
    result = {
        "model": loaded.name,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "generated_tokens": n_tokens(batched_all),
        "rounds": rounds,
        "speedup_median": speedups[len(speedups) // 2] if len(speedups) % 2 else
        round((speedups[len(speedups) // 2 - 1] + speedups[len(speedups) // 2]) / 2, 2),
        "speedup_range": [speedups[0], speedups[-1]],
        "goal_speedup": 4.0,
        "answers_agree": sum(a == b for a, b in zip(single_all, batched_all)) / len(prompts),
        "machine": machine(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(json.dumps(result, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    previous[loaded.name] = result
    RESULTS.write_text(json.dumps(previous, indent=2) + "\n")


if __name__ == "__main__":
    main()
