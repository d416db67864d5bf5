"""Generation throughput: batched (left-padded) vs one prompt at a time.

The same prompts (held-out built-in harmful and harmless ones, as an evaluation
uses them) are answered greedily with the same ``max_new_tokens``, once one at a
time and once in batches; the answers must agree. Goal: batched >= 4x faster on
this CPU with the embedded model. The batched run is repeated before and after the
sequential one, and the 1-minute load average is recorded, because other jobs on a
shared machine change CPU timings.

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
    from safeneuron.evaluation.generation import generate
    from safeneuron.evaluation.sets import load_eval_prompts
    from safeneuron.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model (default: the embedded default)")
    parser.add_argument("--n", type=int, default=32, help="prompts (half harmful, half harmless)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    loaded = load_model(args.model)
    harmful = load_eval_prompts(None, default="harmful", n=args.n // 2, seed=1).prompts
    harmless = load_eval_prompts(None, default="harmless", n=args.n - args.n // 2, seed=1).prompts
    prompts = [p for pair in zip(harmful, harmless) for p in pair]
    kw = dict(max_new_tokens=args.max_new_tokens, progress=False)
    generate(loaded.model, loaded.tokenizer, prompts[:2], max_new_tokens=4, progress=False)  # warm-up

    def timed(batch_size: int):
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        out = generate(loaded.model, loaded.tokenizer, prompts, batch_size=batch_size, **kw)
        return out, time.perf_counter() - t0, load

    batched_a, t_batched_a, load_a = timed(args.batch_size)
    single, t_single, load_s = timed(1)
    batched_b, t_batched_b, load_b = timed(args.batch_size)
    tokens = sum(len(loaded.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in single)
    t_batched = min(t_batched_a, t_batched_b)
    result = {
        "model": loaded.name,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "generated_tokens": tokens,
        "one_at_a_time_s": round(t_single, 2),
        "batched_s": [round(t_batched_a, 2), round(t_batched_b, 2)],
        "one_at_a_time_tokens_per_s": round(tokens / t_single, 2),
        "batched_tokens_per_s": round(tokens / t_batched, 2),
        "speedup": round(t_single / t_batched, 2),
        "goal_speedup": 4.0,
        "answers_agree": sum(a == b for a, b in zip(single, batched_a)) / len(prompts),
        "loadavg_1m": {"batched_first": load_a, "one_at_a_time": load_s, "batched_second": load_b},
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
