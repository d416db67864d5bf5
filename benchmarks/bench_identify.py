"""Identification benchmarks on the embedded model (issue: foundation and identification).

(a) identification wall time / plain forward pass over the same prompts (goal <= 1.10)
(b) peak memory as the number of prompts grows 128 -> 2048 (goal: flat within 5%)
(c) speed-up and memory saving over a naive baseline that stores all activations
(d) speed-up over NeuroStrike identification (5,000 full-batch probe epochs per module)

Usage:  .venv/bin/python benchmarks/bench_identify.py [--parts a,b,c,d] [--n 256] [--sizes 128,512,2048]
Writes benchmarks/results/identify.json (merged with earlier parts).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "identify.json"


def prompts(n: int):
    """n harmful + n harmless prompts: built-in first, then ../shared public sets when more are needed."""
    from safeneuron.data.prompts import PromptSet, load_prompts

    harmful = load_prompts(None, default="harmful").prompts
    harmless = load_prompts(None, default="harmless").prompts
    if n > len(harmful) and SHARED.exists():
        harmful += load_prompts(SHARED / "advbench" / "harmful_behaviors.csv").prompts
        harmful += load_prompts(SHARED / "harmless_alpaca" / "harmful_train.json").prompts
        harmful += load_prompts(SHARED / "harmbench" / "harmbench_behaviors_text_all.csv").prompts
    if n > len(harmless) and SHARED.exists():
        harmless += load_prompts(SHARED / "harmless_alpaca" / "harmless_train.json", limit=4 * n).prompts
    k = 0
    while len(harmful) < n:  # memory benchmark only: reuse prompts with a numbered suffix
        harmful.append(f"{harmful[k]} (variant {k})")
        k += 1
    return PromptSet(harmful[:n], source=f"bench-harmful-{n}"), PromptSet(harmless[:n], source=f"bench-harmless-{n}")


def plain_forward_s(loaded, texts, batch_size):
    from safeneuron.inputs import forward_without_logits as _forward, iter_batches

    batches = iter_batches(loaded.tokenizer, texts, batch_size)
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            _forward(loaded.model, b.inputs)
    return time.perf_counter() - t0


def identify_s(loaded, harmful, harmless, out, batch_size, method="stats", epochs=5000):
    from safeneuron.config import IdentifyConfig
    from safeneuron.stages.identify import identify

    cfg = IdentifyConfig(batch_size=batch_size, method=method, neurostrike_epochs=epochs, checkpoint_every=10**9)
    ps_dir = Path(out)
    ps_dir.mkdir(parents=True, exist_ok=True)
    (ps_dir / "h.txt").write_text("\n".join(harmful.prompts))
    (ps_dir / "s.txt").write_text("\n".join(harmless.prompts))
    cfg.harmful, cfg.harmless = str(ps_dir / "h.txt"), str(ps_dir / "s.txt")
    t0 = time.perf_counter()
    result = identify(cfg, ps_dir / method, loaded=loaded, progress=False, overwrite=True)
    total = time.perf_counter() - t0
    timings = result.manifest["timings"]
    return total - timings["load_s"], timings, result


def naive_s(loaded, harmful, harmless, batch_size):
    """Store every prompt's pooled activations, then compute mean/var and Cohen's d."""
    from safeneuron.activations import collect_activations

    t0 = time.perf_counter()
    u = collect_activations(loaded.model, loaded.tokenizer, harmful.prompts, batch_size=batch_size, progress=False)
    s = collect_activations(loaded.model, loaded.tokenizer, harmless.prompts, batch_size=batch_size, progress=False)
    stored = sum(t.numel() * t.element_size() for t in list(u.values()) + list(s.values()))
    for k in u:
        a, b = u[k].double(), s[k].double()
        pooled = (((a.shape[0] - 1) * a.var(0) + (b.shape[0] - 1) * b.var(0)) / (a.shape[0] + b.shape[0] - 2)).sqrt()
        _ = (a.mean(0) - b.mean(0)) / pooled
    return time.perf_counter() - t0, stored


def memory_child(n: int, batch_size: int) -> None:
    """Run one identification in this process and print its peak RSS (MiB) as JSON."""
    from safeneuron.models import load_model

    loaded = load_model(None, dtype="float32", device="cpu")
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    harmful, harmless = prompts(n // 2)
    with tempfile.TemporaryDirectory() as tmp:
        elapsed, _, _ = identify_s(loaded, harmful, harmless, tmp, batch_size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"prompts": n, "peak_rss_mib": peak, "rss_after_load_mib": after_load, "identify_s": elapsed}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="a,b,c,d")
    ap.add_argument("--n", type=int, default=256, help="prompts per class for (a), (c), (d)")
    ap.add_argument("--sizes", default="128,512,2048", help="total prompts for (b)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=5000, help="NeuroStrike probe epochs for (d)")
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.batch_size)
        return

    from safeneuron.artifacts import versions
    from safeneuron.models import load_model

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["machine"] = {"cpus": torch.get_num_threads(), "device": "cpu", **versions()}
    parts = set(args.parts.split(","))
    loaded = None
    if parts & {"a", "c", "d"}:
        loaded = load_model(None, dtype="float32", device="cpu")
        harmful, harmless = prompts(args.n)
        texts = harmful.prompts + harmless.prompts
        plain_forward_s(loaded, texts[:16], args.batch_size)  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        if "a" in parts or "c" in parts or "d" in parts:
            plain = plain_forward_s(loaded, texts, args.batch_size)
            ident, timings, result = identify_s(loaded, harmful, harmless, tmp, args.batch_size)
            results["a_overhead"] = {
                "model": loaded.name, "n_harmful": args.n, "n_harmless": args.n, "batch_size": args.batch_size,
                "plain_forward_s": plain, "identify_s": ident, "identify_timings": timings,
                "ratio": ident / plain, "goal": "<= 1.10", "selected_union": result.union.count(),
            }
            print(json.dumps(results["a_overhead"], indent=1))
        if "c" in parts:
            naive, stored = naive_s(loaded, harmful, harmless, args.batch_size)
            results["c_naive"] = {"naive_s": naive, "identify_s": ident, "speedup": naive / ident,
                                  "naive_stored_activation_bytes": stored,
                                  # two classes x (mean, M2) float64 per neuron
                                  "streaming_state_bytes": 2 * 2 * 8 * result.manifest["n_neurons"],
                                  "note": "forward-bound on CPU; memory is the difference that grows with N"}
            print(json.dumps(results["c_naive"], indent=1))
        if "d" in parts:
            ns, ns_timings, ns_result = identify_s(loaded, harmful, harmless, tmp, args.batch_size, "neurostrike",
                                                   args.epochs)
            sel_stats = timings["score_s"]
            results["d_neurostrike"] = {
                "neurostrike_s": ns, "neurostrike_timings": ns_timings, "epochs": args.epochs,
                "identify_s": ident, "speedup_end_to_end": ns / ident,
                "selection_stats_s": sel_stats, "selection_probes_s": ns_timings["probe_s"],
                "speedup_selection_stage": ns_timings["probe_s"] / max(sel_stats, 1e-9),
                "neurostrike_selected_union": ns_result.union.count(),
                "goal": ">= 15x end to end (a GPU goal: the forward pass dominates on this CPU)",
            }
            print(json.dumps(results["d_neurostrike"], indent=1))
    if "b" in parts:
        rows = []
        for n in [int(x) for x in args.sizes.split(",")]:
            out = subprocess.run([sys.executable, __file__, "--memory-child", str(n), "--batch-size",
                                  str(args.batch_size)], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1])
        peaks = [r["peak_rss_mib"] for r in rows]
        results["b_memory"] = {"rows": rows, "max_over_min": max(peaks) / min(peaks), "goal": "<= 1.05"}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
