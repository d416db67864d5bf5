"""Alignment benchmarks (issue: neuron-frozen iterative DPO).

(step)  step time and peak memory of masked DPO (safety neurons ablated + frozen, restore after every
        step) vs plain TRL DPO on the same model, batch and data; full fine-tuning and LoRA.
        Goal: <= 1.10x time, <= 1.05x memory. Each variant runs in its own process (peak RSS is per
        process); variants alternate and each is repeated, the best median counts.
(paired) the same comparison inside one process: masked and plain steps alternate (the freezer is
        installed / removed between steps), so both see the same machine load; robust on a busy machine.
(precision) LoRA DPO step time, in one process on the same batches: today's fp32 step against bf16 autocast
        (fp32 master weights) with and without precomputed reference log-probs, each masked, and the
        masked/plain ratio under bf16. Goal: >= 2x faster than the fp32 step, masked/plain <= 1.10.
        Variants run in alternating blocks (``--repeats``), the best block median counts.
(round) wall time of one round of the default ``align`` (identification on the built-in prompts,
        default DPO schedule) on a model, full and LoRA: identification, step time and saving are
        measured; the DPO part of a default round is extrapolated from the measured step time
        (``--round-steps`` steps are run, the default schedule's step count is computed).

Usage:
    .venv/bin/python benchmarks/bench_align.py --parts step,paired --model smollm2-135m-instruct
    .venv/bin/python benchmarks/bench_align.py --parts step,round --model qwen2.5-coder-0.5b-instruct
Writes benchmarks/results/align.json (merged with earlier runs, keyed by part and model).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "align.json"


def preference_pairs(n: int):
    """The shared HarmBench DPO pairs when ../shared is present, else built-in prompts with templates."""
    from safeneuron.data.preferences import PreferenceSet, load_preferences, refusal_templates
    from safeneuron.data.prompts import load_prompts

    path = SHARED / "dpo_safety_harmbench" / "dpo_pairs.jsonl"
    if path.exists():
        return load_preferences(path, limit=n)
    prompts = load_prompts(None, default="harmful", limit=n).prompts
    templates = refusal_templates()
    return PreferenceSet([{"prompt": p, "chosen": templates[i % len(templates)],
                           "rejected": "Sure, here is a detailed answer. First, gather what you need, then follow "
                                       "these steps carefully one by one."} for i, p in enumerate(prompts)],
                         "builtin-harmful+templates")


def machine() -> dict:
    import transformers
    import trl

    return {"cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__,
            "loadavg_1m": os.getloadavg()[0]}


# --------------------------------------------------------------------------- (step) one variant per process
def step_worker(args) -> dict:
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOTrainer

    from safeneuron.config import AlignConfig
    from safeneuron.masks import SafetyNeuronMask
    from safeneuron.models import load_model
    from safeneuron.trainer import SafeNeuronDPOTrainer, dpo_config, lora_config

    loaded = load_model(args.model, device="auto")
    model, tok = loaded.model, loaded.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    config = AlignConfig(max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch_size,
                         gradient_accumulation_steps=1, max_length=args.max_length, lora=args.lora,
                         warmup_ratio=0.0, save_steps=10_000)
    dataset = preference_pairs(args.batch_size * (args.warmup + args.steps)).to_trl(tok)
    out = tempfile.mkdtemp(prefix="bench_align_")
    dpo_args = dpo_config(config, out, progress=False)
    dpo_args.save_strategy = "no"
    ref = None if args.lora else copy.deepcopy(model).eval().requires_grad_(False)
    peft = lora_config(config) if args.lora else None
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    common = dict(model=model, ref_model=ref, args=dpo_args, train_dataset=dataset, processing_class=tok,
                  peft_config=peft, callbacks=[Timer()])
    mask = None
    if args.variant == "masked":
        mask = SafetyNeuronMask.random(model, frac=args.frac, seed=0)
        trainer = SafeNeuronDPOTrainer(frozen=mask, **common)
    else:
        trainer = DPOTrainer(**common)
    trainer.remove_callback(PrinterCallback)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    measured = times[args.warmup:]
    result = {
        "variant": args.variant, "lora": args.lora, "model": loaded.name, "steps_timed": len(measured),
        "step_s_median": statistics.median(measured), "step_s_all": measured,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "neurons_frozen": mask.count() if mask is not None else 0,
    }
    if torch.cuda.is_available():
        result["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if mask is not None:
        freezer = trainer.freezer
        t0 = time.perf_counter()
        for _ in range(20):
            freezer.restore()
        result["restore_ms"] = (time.perf_counter() - t0) / 20 * 1e3
        result["snapshot_mib"] = sum(e.snapshot.numel() * e.snapshot.element_size() for e in freezer.entries) / 2**20
        result["exact"] = not freezer.changed()
    return result


def run_step(args) -> dict:
    rows = []
    for repeat in range(args.repeats):
        for lora in (False, True):
            for variant in ("plain", "masked"):
                cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--variant", variant,
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size",
                       str(args.batch_size), "--max-length", str(args.max_length), "--frac", str(args.frac)]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                if lora:
                    cmd.append("--lora")
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"worker failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row["repeat"] = repeat
                rows.append(row)
                print(f"  {'lora' if lora else 'full'} {variant:>6}: {row['step_s_median']:.3f} s/step, "
                      f"peak RSS {row['peak_rss_gib']:.2f} GiB", flush=True)
    summary = {}
    for lora in (False, True):
        best = {}
        for variant in ("plain", "masked"):
            sel = [r for r in rows if r["lora"] == lora and r["variant"] == variant]
            best[variant] = {"step_s": min(r["step_s_median"] for r in sel),
                             "peak_rss_gib": min(r["peak_rss_gib"] for r in sel)}
            if "peak_cuda_gib" in sel[0]:
                best[variant]["peak_cuda_gib"] = min(r["peak_cuda_gib"] for r in sel)
        key = "lora" if lora else "full"
        summary[key] = {**best, "time_ratio": best["masked"]["step_s"] / best["plain"]["step_s"],
                        "memory_ratio": best["masked"]["peak_rss_gib"] / best["plain"]["peak_rss_gib"]}
        if "peak_cuda_gib" in best["plain"]:
            summary[key]["cuda_memory_ratio"] = best["masked"]["peak_cuda_gib"] / best["plain"]["peak_cuda_gib"]
    return {"model": args.model, "batch_size": args.batch_size, "max_length": args.max_length,
            "mask_fraction": args.frac, "warmup_steps": args.warmup, "steps": args.steps, "repeats": args.repeats,
            "goal": {"time_ratio": "<= 1.10", "memory_ratio": "<= 1.05"}, "summary": summary, "runs": rows,
            "machine": machine()}


# --------------------------------------------------------------------------- (paired) same process, interleaved
def run_paired(args) -> dict:
    """Step time with and without the freezer, alternating step by step in one process and trainer.

    On a shared machine the load changes from minute to minute; interleaving masked and plain steps
    exposes both to the same load, so the ratio of neighbouring steps is robust where separate
    processes are not. "Plain" here is the same TRL trainer with the freezer removed (no hooks, no
    restore), which runs exactly TRL's DPO step.
    """
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from safeneuron.config import AlignConfig
    from safeneuron.masks import SafetyNeuronMask
    from safeneuron.models import load_model
    from safeneuron.trainer import SafeNeuronDPOTrainer, dpo_config, lora_config

    out = {}
    for lora in (False, True):
        loaded = load_model(args.model, device="auto")
        model, tok = loaded.model, loaded.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        steps = args.warmup + 2 * args.steps
        config = AlignConfig(max_steps=steps, per_device_train_batch_size=args.batch_size,
                             gradient_accumulation_steps=1, max_length=args.max_length, lora=lora,
                             warmup_ratio=0.0, save_steps=10_000)
        dataset = preference_pairs(args.batch_size * steps).to_trl(tok)
        dpo_args = dpo_config(config, tempfile.mkdtemp(prefix="bench_paired_"), progress=False)
        dpo_args.save_strategy = "no"
        ref = None if lora else copy.deepcopy(model).eval().requires_grad_(False)
        mask = SafetyNeuronMask.random(model, frac=args.frac, seed=0)
        times: dict[str, list[float]] = {"masked": [], "plain": []}
        holder: dict = {}

        class Interleave(TrainerCallback):
            def on_step_begin(self, a, state, control, **kw):
                freezer = holder["trainer"].freezer
                self.kind = "masked" if state.global_step % 2 == 0 else "plain"
                if self.kind == "masked":
                    freezer.install()
                else:
                    freezer.remove()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

            def on_step_end(self, a, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if state.global_step > args.warmup:
                    times[self.kind].append(time.perf_counter() - self.t0)

        trainer = SafeNeuronDPOTrainer(model=model, ref_model=ref, args=dpo_args, train_dataset=dataset,
                                       processing_class=tok, peft_config=lora_config(config) if lora else None,
                                       frozen=mask, callbacks=[Interleave()])
        holder["trainer"] = trainer
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        trainer.freezer.remove()
        pairs = list(zip(times["masked"], times["plain"]))
        ratios = [m / p for m, p in pairs]
        key = "lora" if lora else "full"
        out[key] = {"masked_step_s_median": statistics.median(times["masked"]),
                    "plain_step_s_median": statistics.median(times["plain"]),
                    "paired_ratio_median": statistics.median(ratios), "paired_ratios": ratios,
                    "masked_s": times["masked"], "plain_s": times["plain"], "neurons_frozen": mask.count()}
        print(f"  {key}: masked {out[key]['masked_step_s_median']:.3f} s, plain "
              f"{out[key]['plain_step_s_median']:.3f} s, paired ratio {out[key]['paired_ratio_median']:.3f}",
              flush=True)
        del trainer, model, ref, loaded
    return {"model": args.model, "batch_size": args.batch_size, "max_length": args.max_length,
            "mask_fraction": args.frac, "steps_per_variant": args.steps, "goal": "time ratio <= 1.10",
            "summary": out, "machine": machine()}


# --------------------------------------------------------------------------- (precision) bf16 vs fp32 LoRA
PRECISION_VARIANTS = {  # name -> (AlignConfig overrides, masked)
    "fp32-masked": ({"bf16": False}, True),
    "bf16-masked": ({"bf16": True}, True),
    "bf16-precompute-masked": ({"bf16": True, "precompute_ref_log_probs": True}, True),
    "bf16-plain": ({"bf16": True}, False),
}


def run_precision(args) -> dict:
    """Median LoRA DPO step time per variant; all variants in one process, blocks alternate per repeat."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from safeneuron.config import AlignConfig
    from safeneuron.masks import SafetyNeuronMask
    from safeneuron.models import load_model
    from safeneuron.trainer import SafeNeuronDPOTrainer, dpo_config, lora_config

    loaded = load_model(args.model, device="auto")
    model, tok = loaded.model, loaded.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    steps = args.warmup + args.steps
    pairs = preference_pairs(args.batch_size * steps)
    mask = SafetyNeuronMask.random(model, frac=args.frac, seed=0)
    rows = []
    for repeat in range(args.repeats):
        for name, (overrides, masked) in PRECISION_VARIANTS.items():
            config = AlignConfig(max_steps=steps, per_device_train_batch_size=args.batch_size,
                                 gradient_accumulation_steps=1, max_length=args.max_length, lora=True,
                                 warmup_ratio=0.0, save_steps=10_000, **overrides)
            dpo_args = dpo_config(config, tempfile.mkdtemp(prefix="bench_precision_"), progress=False)
            dpo_args.save_strategy = "no"
            times: list[float] = []

            class Timer(TrainerCallback):
                def on_step_begin(self, a, state, control, **kw):
                    self.t0 = time.perf_counter()

                def on_step_end(self, a, state, control, **kw):
                    times.append(time.perf_counter() - self.t0)

            t0 = time.perf_counter()
            trainer = SafeNeuronDPOTrainer(model=model, args=dpo_args, train_dataset=pairs.to_trl(tok),
                                           processing_class=tok, peft_config=lora_config(config),
                                           frozen=mask if masked else None, callbacks=[Timer()])
            setup_s = time.perf_counter() - t0  # includes the reference pass when precomputed
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            if masked:
                trainer.freezer.remove()
            model = trainer.model.unload() if hasattr(trainer.model, "unload") else trainer.model
            measured = times[args.warmup:]
            rows.append({"variant": name, "repeat": repeat, "step_s_median": statistics.median(measured),
                         "step_s_all": measured, "setup_s": setup_s, "losses": losses})
            print(f"  {name:>24}: {rows[-1]['step_s_median']:.3f} s/step (setup {setup_s:.1f} s), "
                  f"losses {[round(x, 3) for x in losses]}", flush=True)
            del trainer
    best = {name: min(r["step_s_median"] for r in rows if r["variant"] == name) for name in PRECISION_VARIANTS}
    summary = {"step_s": best,
               "speedup_bf16_vs_fp32": best["fp32-masked"] / best["bf16-masked"],
               "speedup_bf16_precompute_vs_fp32": best["fp32-masked"] / best["bf16-precompute-masked"],
               "masked_plain_ratio_bf16": best["bf16-masked"] / best["bf16-plain"]}
    print("  " + ", ".join(f"{k} {v:.2f}" for k, v in summary.items() if k != "step_s"), flush=True)
    return {"model": args.model, "batch_size": args.batch_size, "max_length": args.max_length,
            "mask_fraction": args.frac, "warmup_steps": args.warmup, "steps": args.steps, "repeats": args.repeats,
            "goal": {"speedup_vs_fp32": ">= 2", "masked_plain_ratio": "<= 1.10"}, "summary": summary,
            "runs": rows, "machine": machine()}


# --------------------------------------------------------------------------- (round) default align
def run_round(args) -> dict:
    from safeneuron.config import AlignConfig
    from safeneuron.models import load_model
    from safeneuron.stages.align import align

    out = {}
    pairs = preference_pairs(args.round_pairs)
    for lora in (False, True):
        default = AlignConfig(lora=lora)
        n_pairs = len(pairs)
        per_step = default.per_device_train_batch_size * default.gradient_accumulation_steps
        default_steps = math.ceil(n_pairs / per_step) * int(default.num_train_epochs)
        config = AlignConfig(model=args.model, rounds=1, lora=lora, max_steps=args.round_steps, warmup_ratio=0.0,
                             save_steps=10_000)
        t0 = time.perf_counter()
        loaded = load_model(args.model)
        load_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory(prefix="bench_round_") as tmp:
            result = align(config, pairs, Path(tmp) / "run", loaded=loaded, progress=False)
        m = result.rounds[0]
        steps = [h for h in m["log_history"] if "loss" in h and "rewards/margins" in h]
        train_s = m["timings"]["train_s"]
        step_s = m["training"].get("train_runtime_s", train_s) / max(1, len(steps))
        estimate = m["timings"]["identify_s"] + default_steps * step_s + m["timings"]["save_s"]
        row = {"lora": lora, "model": loaded.name, "n_pairs": n_pairs, "identify_s": m["timings"]["identify_s"],
               "neurons_frozen": m["neurons_frozen"], "steps_run": len(steps), "step_s": step_s,
               "train_s_measured": train_s, "save_s": m["timings"]["save_s"], "load_s": load_s,
               "default_steps": default_steps,
               "default_round_s_estimate": estimate,
               "estimate": "identify_s + default_steps * step_s + save_s (DPO part extrapolated)",
               "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               "frozen_exact": m["freezing"]["exact"]}
        print(f"  {'lora' if lora else 'full'}: identify {row['identify_s']:.0f} s, {step_s:.1f} s/step x "
              f"{default_steps} default steps, save {row['save_s']:.0f} s -> ~{estimate / 60:.1f} min per round",
              flush=True)
        out["lora" if lora else "full"] = row
        del result, loaded
    return {"model": args.model, "defaults": {k: getattr(AlignConfig(), k) for k in (
        "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
        "learning_rate", "beta", "weight_decay", "lr_scheduler_type")}, "pairs_source": pairs.source,
        "rounds": out, "machine": machine()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="step", help="comma-separated: step, paired, precision, round")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--frac", type=float, default=0.025, help="fraction of neurons in the random mask")
    p.add_argument("--round-steps", type=int, default=2, help="DPO steps actually run in the round benchmark")
    p.add_argument("--round-pairs", type=int, default=100)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 is far less sensitive to other jobs on a busy machine")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="plain", help=argparse.SUPPRESS)
    p.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(step_worker(args)))
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for part in args.parts.split(","):
        print(f"[{part}] {args.model}", flush=True)
        t0 = time.perf_counter()
        if part == "step":
            value = run_step(args)
        elif part == "paired":
            value = run_paired(args)
        elif part == "round":
            value = run_round(args)
        elif part == "precision":
            value = run_precision(args)
        else:
            raise SystemExit(f"unknown part {part!r}")
        value["wall_s"] = time.perf_counter() - t0
        value["command"] = " ".join([Path(sys.executable).name, *sys.argv])
        value["threads"] = torch.get_num_threads()
        key = args.model if not args.threads else f"{args.model}@{args.threads}thread"
        results.setdefault(part, {})[key] = value
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
