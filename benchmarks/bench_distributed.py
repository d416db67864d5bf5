"""Distributed benchmarks (issue 8: scale out).

(scaling) identification throughput on the embedded model with 1 and 2 processes on the
          same cores: 1 process x 2 threads, 2 processes x 1 thread (torchrun, gloo), and
          1 process x 1 thread as the per-core reference. OMP_NUM_THREADS and
          torch.set_num_threads are set per run so every configuration uses the same
          number of cores. Reports prompts/s (wall time of ``identify`` after the model
          is loaded, slowest rank, merge and writing included) and scaling efficiency
          ``t(1 process x 1 thread) / (2 * t(2 processes x 1 thread))``. The two-process
          sets are checked against the one-process ones.
(gpu)     for a GPU machine, not run on CPU unless ``--shape tiny``: a randomly initialised
          model of a real 7B/8B configuration (bf16, no download) over 1024 prompts of
          128 tokens: identification wall time (goal <= 20 s on one H100) and its ratio
          to a plain forward pass over the same batches (goal <= 1.10); masked vs plain
          DPO step time (goal <= 1.10; LoRA by default: full fine-tuning of 8B with AdamW
          needs ~130 GB, i.e. FSDP over several GPUs). The tokenizer is the embedded
          model's (Qwen2.5 vocabulary), so ``llama3-8b`` gets Qwen's vocabulary size.

Usage:
    .venv/bin/python benchmarks/bench_distributed.py --parts scaling --per-class 64
    .venv/bin/python benchmarks/bench_distributed.py --parts gpu --shape qwen2.5-7b      # on a GPU
    .venv/bin/python benchmarks/bench_distributed.py --parts gpu --shape tiny --device cpu  # smoke test
Writes benchmarks/results/distributed.json (merged with earlier runs, keyed by part).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "distributed.json"

# Real configurations (config.json of the released models), randomly initialised here.
SHAPES = {
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=1e6,
                       max_position_embeddings=32768, tie_word_embeddings=False),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=152064, rope_theta=5e5,
                      max_position_embeddings=8192, tie_word_embeddings=False),  # vocab: Qwen's (tokenizer)
    "tiny": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=152064, max_position_embeddings=512,
                 tie_word_embeddings=False),
}


def machine() -> dict:
    import transformers

    info = {"cpus": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "loadavg_1m": os.getloadavg()[0], "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# --------------------------------------------------------------------------- (scaling)
def scaling_worker(args) -> None:
    """One identification (this process's shard under torchrun); rank 0 prints a JSON line."""
    from safeneuron.config import IdentifyConfig
    from safeneuron.data.prompts import load_prompts
    from safeneuron.distributed import barrier, world
    from safeneuron.stages.identify import identify
    from safeneuron.models import load_model

    torch.set_num_threads(args.threads)
    rank, size = world()
    loaded = load_model(None, dtype="float32", device="cpu")
    out = Path(args.out)
    files = {}
    for kind in ("harmful", "harmless"):
        files[kind] = out / f"{kind}.txt"
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            files[kind].write_text("\n".join(load_prompts(None, default=kind, limit=args.n).prompts) + "\n")
    barrier()
    config = IdentifyConfig(harmful=str(files["harmful"]), harmless=str(files["harmless"]), batch_size=args.batch_size,
                            checkpoint_every=10**9)
    identify(IdentifyConfig(**{**config.__dict__, "max_prompts": 4}), out / "warmup", loaded=loaded, progress=False,
             overwrite=True)
    barrier()
    t0 = time.perf_counter()
    result = identify(config, out / "run", loaded=loaded, progress=False, overwrite=True)
    barrier()
    wall = time.perf_counter() - t0
    if rank == 0:
        m = result.manifest
        print(json.dumps({"processes": size, "threads": args.threads, "wall_s": wall,
                          "prompts": m["n_harmful"] + m["n_harmless"],
                          "prompts_per_s": (m["n_harmful"] + m["n_harmless"]) / wall,
                          "record_s_rank0": m["timings"]["record_s"], "selected": m["selected_total"]}))


def run_scaling(args) -> dict:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    configs = [(1, 2), (2, 1), (1, 1)]  # (processes, threads per process)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_dist_") as tmp:
        for repeat in range(args.repeats):
            for procs, threads in configs:
                env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                           PYTHONPATH=str(ROOT))
                env.pop("WORLD_SIZE", None)
                worker = [__file__, "--worker", "--threads", str(threads), "--per-class", str(args.n), "--batch-size",
                          str(args.batch_size), "--out", str(Path(tmp) / f"p{procs}t{threads}")]
                cmd = ([torchrun, "--standalone", "--nproc_per_node", str(procs), *worker] if procs > 1
                       else [sys.executable, *worker])
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    raise SystemExit(f"worker failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
                row = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
                row["repeat"] = repeat
                rows.append(row)
                print(f"  {procs} process(es) x {threads} thread(s): {row['wall_s']:.1f} s, "
                      f"{row['prompts_per_s']:.2f} prompts/s (load {os.getloadavg()[0]:.1f})", flush=True)
    best = {f"{p}x{t}": min((r for r in rows if r["processes"] == p and r["threads"] == t), key=lambda r: r["wall_s"])
            for p, t in configs}
    same_sets = best["2x1"]["selected"] == best["1x2"]["selected"] == best["1x1"]["selected"]
    return {
        "model": "embedded default (Qwen2.5-Coder-0.5B-Instruct, float32, CPU)",
        "n_harmful": args.n, "n_harmless": args.n, "batch_size": args.batch_size, "repeats": args.repeats,
        "best": {k: {"wall_s": v["wall_s"], "prompts_per_s": v["prompts_per_s"]} for k, v in best.items()},
        "speedup_2proc_vs_1proc_2threads": best["1x2"]["wall_s"] / best["2x1"]["wall_s"],
        "scaling_efficiency_2proc": best["1x1"]["wall_s"] / (2 * best["2x1"]["wall_s"]),
        "thread_efficiency_2threads": best["1x1"]["wall_s"] / (2 * best["1x2"]["wall_s"]),
        "same_selected_counts": same_sets,
        "note": "same 2 cores in every configuration (OMP_NUM_THREADS = threads per process); a shared machine: "
                "see loadavg",
        "runs": rows, "machine": machine(),
    }


# --------------------------------------------------------------------------- (gpu)
def random_model(shape: str, device: str):
    """A randomly initialised causal LM of a real configuration, bf16 on a GPU (float32 on the CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def fixed_length_prompts(tokenizer, n: int, tokens: int, seed: int) -> list[str]:
    """``n`` prompts whose chat rendering is ``tokens`` tokens long (common words; checked below)."""
    import random

    words = ("the of and to in is for on with as that by this be are from at or an it not we can which all your "
             "more will one has have their use time new how about also data when what some may other there").split()
    rng = random.Random(seed)
    base = len(tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"])
    out = []
    for _ in range(n):
        text = " ".join(rng.choice(words) for _ in range(tokens - base))
        out.append(text)
    return out


def step_times(trainer) -> list[float]:
    from transformers import TrainerCallback

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

    trainer.add_callback(Timer())
    trainer.train()
    return times


def gpu_dpo_worker(args) -> dict:
    """DPO steps of one variant (plain / masked) on the random model; one process per variant."""
    from trl import DPOTrainer

    from safeneuron.config import AlignConfig
    from safeneuron.data.preferences import PreferenceSet
    from safeneuron.masks import SafetyNeuronMask
    from safeneuron.trainer import SafeNeuronDPOTrainer, dpo_config, lora_config

    tok = tokenizer()
    model = random_model(args.shape, args.device)
    prompts = fixed_length_prompts(tok, args.dpo_batch * (args.warmup + args.steps), 96, seed=1)
    pairs = PreferenceSet([{"prompt": p, "chosen": "I can't help with that request.",
                            "rejected": "Sure, here is how: " + p[:200]} for p in prompts], "random-words")
    config = AlignConfig(max_steps=args.warmup + args.steps, per_device_train_batch_size=args.dpo_batch,
                         gradient_accumulation_steps=1, max_length=args.dpo_max_length, lora=not args.full,
                         warmup_ratio=0.0, save_steps=10**6, device=args.device,
                         gradient_checkpointing=args.gradient_checkpointing)
    with tempfile.TemporaryDirectory(prefix="bench_dist_dpo_") as tmp:
        dpo_args = dpo_config(config, tmp, progress=False)
        dpo_args.save_strategy = "no"
        common = dict(model=model, args=dpo_args, train_dataset=pairs.to_trl(tok), processing_class=tok,
                      ref_model=None if not args.full else copy.deepcopy(model).requires_grad_(False),
                      peft_config=None if args.full else lora_config(config))
        if args.variant == "masked":
            mask = SafetyNeuronMask.random(model, frac=args.frac, seed=0)
            trainer = SafeNeuronDPOTrainer(frozen=mask, **common)
        else:
            trainer = DPOTrainer(**common)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        times = step_times(trainer)[args.warmup:]
    row = {"variant": args.variant, "lora": not args.full, "step_s_median": statistics.median(times),
           "step_s_all": times}
    if torch.cuda.is_available():
        row["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if args.variant == "masked":
        row["exact"] = not trainer.freezer.changed()
    return row


def tokenizer():
    from transformers import AutoTokenizer

    from safeneuron.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(None)[1])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def run_gpu(args) -> dict:
    from safeneuron.inputs import forward_without_logits as _forward, iter_batches
    from safeneuron.config import IdentifyConfig
    from safeneuron.stages.identify import identify
    from safeneuron.models import LoadedModel

    device = args.device
    tok = tokenizer()
    t0 = time.perf_counter()
    model = random_model(args.shape, device)
    init_s = time.perf_counter() - t0
    n = args.gpu_prompts // 2
    harmful = fixed_length_prompts(tok, n, args.tokens, seed=0)
    harmless = fixed_length_prompts(tok, n, args.tokens, seed=1)
    lengths = [len(b.inputs["input_ids"][0]) for b in iter_batches(tok, harmful[:8], 8, max_length=args.tokens)]
    loaded = LoadedModel(model, tok, f"random-{args.shape}", "<random>")
    out: dict = {"shape": args.shape, "config": SHAPES[args.shape], "dtype": str(next(model.parameters()).dtype),
                 "n_prompts": 2 * n, "tokens_per_prompt": lengths[0], "batch_size": args.gpu_batch_size,
                 "init_s": init_s, "machine": machine()}

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory(prefix="bench_dist_gpu_") as tmp:
        for name, texts in (("harmful", harmful), ("harmless", harmless)):
            Path(tmp, f"{name}.txt").write_text("\n".join(texts) + "\n")
        config = IdentifyConfig(harmful=str(Path(tmp, "harmful.txt")), harmless=str(Path(tmp, "harmless.txt")),
                                batch_size=args.gpu_batch_size, max_length=args.tokens, stats_device="model",
                                checkpoint_every=10**9)
        batches = iter_batches(tok, harmful + harmless, args.gpu_batch_size, max_length=args.tokens, device=device)
        plain, ident = [], []
        for _ in range(args.repeats):  # alternate; the first of each is a warm-up when repeats > 1
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                for b in batches:
                    _forward(model, b.inputs)
            sync()
            plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            result = identify(config, Path(tmp) / "identify", loaded=loaded, progress=False, overwrite=True)
            sync()
            ident.append(time.perf_counter() - t0)
        out.update(plain_forward_s=min(plain), identify_s=min(ident), identify_ratio=min(ident) / min(plain),
                   identify_timings=result.manifest["timings"], plain_all=plain, identify_all=ident,
                   goal={"identify_s": "<= 20 on one H100", "identify_ratio": "<= 1.10", "dpo_time_ratio": "<= 1.10"})
        print(f"  identification {out['identify_s']:.1f} s, plain forward {out['plain_forward_s']:.1f} s, "
              f"ratio {out['identify_ratio']:.3f}", flush=True)
    del model, loaded
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    rows = []
    for variant in ("plain", "masked", "plain", "masked"):
        cmd = [sys.executable, __file__, "--gpu-dpo-worker", "--variant", variant, "--shape", args.shape,
               "--device", device, "--dpo-batch", str(args.dpo_batch), "--dpo-max-length", str(args.dpo_max_length),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--frac", str(args.frac)]
        cmd += ["--full"] if args.full else []
        cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if proc.returncode != 0:
            raise SystemExit(f"DPO worker failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  DPO {variant}: {rows[-1]['step_s_median']:.3f} s/step", flush=True)
    best = {v: min(r["step_s_median"] for r in rows if r["variant"] == v) for v in ("plain", "masked")}
    out["dpo"] = {"lora": not args.full, "batch": args.dpo_batch, "max_length": args.dpo_max_length,
                  "mask_fraction": args.frac, "steps": args.steps, "warmup": args.warmup,
                  "plain_step_s": best["plain"], "masked_step_s": best["masked"],
                  "time_ratio": best["masked"] / best["plain"], "runs": rows}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="scaling", help="comma-separated: scaling, gpu")
    # not --n: torchrun's parser takes --n for an abbreviation of its own options
    p.add_argument("--per-class", dest="n", type=int, default=64, help="(scaling) prompts per class")
    p.add_argument("--batch-size", type=int, default=8, help="(scaling) identification batch size")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--shape", default="qwen2.5-7b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--gpu-prompts", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--gpu-batch-size", type=int, default=64)
    p.add_argument("--dpo-batch", type=int, default=4)
    p.add_argument("--dpo-max-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--frac", type=float, default=0.025, help="fraction of neurons frozen in the masked DPO run")
    p.add_argument("--full", action="store_true", help="(gpu) full fine-tuning instead of LoRA")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--gpu-dpo-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="plain", help=argparse.SUPPRESS)
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)
    if args.worker:
        scaling_worker(args)
        return
    if args.gpu_dpo_worker:
        print(json.dumps(gpu_dpo_worker(args)))
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for part in args.parts.split(","):
        t0 = time.perf_counter()
        if part == "scaling":
            print(f"[scaling] embedded model, {args.n}+{args.n} prompts", flush=True)
            value = run_scaling(args)
        elif part == "gpu":
            if args.device.startswith("cuda") and not torch.cuda.is_available():
                raise SystemExit("--parts gpu needs a CUDA GPU (or --shape tiny --device cpu for a smoke test)")
            print(f"[gpu] random {args.shape} on {args.device}", flush=True)
            value = run_gpu(args)
        else:
            raise SystemExit(f"unknown part {part!r}")
        value["wall_s"] = time.perf_counter() - t0
        value["command"] = " ".join([Path(sys.executable).name, *sys.argv])
        key = part if part == "scaling" else f"gpu/{args.shape}"
        results[key] = value
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
