"""Runs for tests/test_distributed_align.py: under torchrun (2 processes, gloo) or in one process.

Every process builds the same tiny llama (seed 0), the same random mask and the same
data. Tasks (run in this order by one launch):

``dpo``    masked DPO through :class:`SafeNeuronDPOTrainer` (freeze-only, so the
           gradient masks carry the freezing): accelerate wraps the model in DDP.
``fsdp2``  the freezer on a model sharded with torch FSDP2 (``fully_shard``) and a
           plain AdamW loop: accelerate enables FSDP only on accelerators, so on CPU
           the sharded path is driven directly.
``fsdp1``  FSDP1 (flat parameters) is refused with a clear error.
``align``  one round of :func:`safeneuron.stages.align.align` (ablation + freezing) under DDP:
           the main process writes the artifacts.

Each task writes ``OUT/<task>/rank{r}.json`` and, on rank 0, ``model.safetensors``.

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUT
    python tests/ddp_worker.py OUT --tasks dpo,fsdp2 --batch 2      # the single-process reference
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from conftest import VOCAB, make_tokenizer, tiny_model  # noqa: E402

PAIRS = [{"prompt": f"Tell me how to do harmful thing number {i}.", "chosen": "I can't help with that.",
          "rejected": f"Sure! Step {i}: first you do it."} for i in range(8)]
MASK_FRAC, STEPS, LR, WEIGHT_DECAY = 0.25, 4, 1e-3, 0.1


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def moments_untouched(freezer, optimizer) -> bool:
    """AdamW's first and second moments are exactly zero on every frozen entry (the gradient masks acted)."""
    state = getattr(optimizer, "optimizer", optimizer).state
    for e in freezer.entries:
        for key in ("exp_avg", "exp_avg_sq"):
            if e.index.numel() and _local(state[e.param][key]).index_select(e.dim, e.index).abs().max() != 0:
                return False
    return True


def write(out: Path, rank: int, record: dict, state: dict[str, torch.Tensor]) -> dict:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    record["state_sha256"] = hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()
    if rank == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    return record


def dpo(out: Path, batch: int) -> dict:
    """``STEPS`` freeze-only masked DPO steps with per-device batch ``batch`` through the TRL trainer."""
    from safeneuron.config import AlignConfig
    from safeneuron.data.preferences import PreferenceSet
    from safeneuron.distributed import full_state_dict, world
    from safeneuron.masks import SafetyNeuronMask
    from safeneuron.trainer import SafeNeuronDPOTrainer, dpo_config

    rank, size = world()
    model = tiny_model("llama", seed=0)
    mask = SafetyNeuronMask.random(model, frac=MASK_FRAC, seed=0)
    config = AlignConfig(max_steps=STEPS, learning_rate=LR, weight_decay=WEIGHT_DECAY, warmup_ratio=0.0,
                         per_device_train_batch_size=batch, gradient_accumulation_steps=1, device="cpu")
    args = dpo_config(config, out / "trainer", progress=False)
    args.save_strategy = "no"
    tok = make_tokenizer()
    seen: list[str] = []

    class Recording(SafeNeuronDPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            ids = inputs["input_ids"][: len(inputs["input_ids"]) // 2]  # chosen halves: one row per pair
            seen.extend(tok.decode(row[row != tok.pad_token_id]) for row in ids)
            return super().training_step(model, inputs, num_items_in_batch)

    trainer = Recording(model=model, ref_model=copy.deepcopy(model).eval().requires_grad_(False), args=args,
                        train_dataset=PreferenceSet(PAIRS).to_trl(tok), processing_class=tok, frozen=mask,
                        ablate=False)
    trainer.train()
    record = {"rank": rank, "world_size": size, "batches": seen, "ddp": type(trainer.model_wrapped).__name__,
              "moments_untouched": moments_untouched(trainer.freezer, trainer.optimizer),
              "log": [h for h in trainer.state.log_history if "loss" in h]}
    summary = trainer.remove_freezing()
    record.update(exact=summary["exact"], changed=summary["changed"], frozen_entries=summary["frozen_entries"])
    return write(out, rank, record, full_state_dict(trainer.model))


def fsdp2(out: Path, sharded: bool) -> dict:
    """``STEPS`` freeze-only LM steps, AdamW, global batch 4 (split over the processes when ``sharded``)."""
    from safeneuron.distributed import bind_freezer, full_state_dict, parallelism, world
    from safeneuron.freezing import NeuronFreezer
    from safeneuron.masks import SafetyNeuronMask

    rank, size = world() if sharded else (0, 1)
    model = tiny_model("llama", seed=0).train()
    mask = SafetyNeuronMask.random(model, frac=MASK_FRAC, seed=0)
    freezer = NeuronFreezer(model, mask, ablate=False).install()  # snapshots of the whole parameters
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        bind_freezer(freezer, model)  # what DistributedFreezeCallback does at on_train_begin
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    freezer.attach(optimizer)
    data = torch.randint(7, VOCAB, (STEPS, 4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(STEPS):
        batch = data[step].chunk(size)[rank]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    record = {"rank": rank, "world_size": size, "parallelism": parallelism(model), "losses": losses,
              "moments_untouched": moments_untouched(freezer, optimizer),
              "sharded_entries": sum(type(e).__name__ == "ShardedFrozenEntries" for e in freezer.entries),
              "local_frozen": sum(e.index.numel() for e in freezer.entries)}
    record["exact"] = not freezer.changed()
    freezer.remove()
    return write(out, rank, record, full_state_dict(model))


def align_run(out: Path) -> dict:
    """One round of ``align`` from a given mask: ablation + freezing, DDP, artifacts by the main process."""
    from safeneuron.config import AlignConfig
    from safeneuron.distributed import world
    from safeneuron.masks import SafetyNeuronMask
    from safeneuron.models import LoadedModel
    from safeneuron.stages.align import align

    rank, size = world()
    model = tiny_model("llama", seed=0)
    mask_file = out / f"mask.rank{rank}.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    SafetyNeuronMask.random(model, frac=MASK_FRAC, seed=0).save(mask_file)
    config = AlignConfig(rounds=1, mask=str(mask_file), max_steps=2, learning_rate=LR, weight_decay=WEIGHT_DECAY,
                         per_device_train_batch_size=1, gradient_accumulation_steps=1, device="cpu")
    result = align(config, PAIRS, out / "run", loaded=LoadedModel(model, make_tokenizer(), "tiny-llama", "<memory>"),
                   progress=False)
    record = {"rank": rank, "world_size": size, "exact": result.rounds[0]["freezing"]["exact"]}
    return write(out, rank, record, {k: v.detach().clone() for k, v in result.model.state_dict().items()})


def fsdp1(out: Path) -> dict:
    """FSDP1 (flat parameters) is refused with a clear error at bind time."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from safeneuron.distributed import bind_freezer, world
    from safeneuron.freezing import FreezeError, NeuronFreezer
    from safeneuron.masks import SafetyNeuronMask

    rank, _ = world()
    model = tiny_model("llama", seed=0)
    freezer = NeuronFreezer(model, SafetyNeuronMask.random(model, frac=MASK_FRAC, seed=0)).install()
    wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    try:
        bind_freezer(freezer, wrapped)
        error = None
    except FreezeError as err:
        error = str(err)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "error": error}))
    return {"error": error}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--tasks", default="dpo,fsdp2,fsdp1,align")
    p.add_argument("--batch", type=int, default=1, help="per-device DPO batch")
    a = p.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    from safeneuron.distributed import world

    launched = world()[1] > 1
    for task in a.tasks.split(","):
        if task == "dpo":
            dpo(out / "dpo", a.batch)
        elif task == "fsdp2":
            fsdp2(out / "fsdp2", sharded=launched)
        elif task == "fsdp1":
            fsdp1(out / "fsdp1")
        elif task == "align":
            align_run(out / "align")
        else:
            raise SystemExit(f"unknown task {task!r}")
    if launched:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
