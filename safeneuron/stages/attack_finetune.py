"""The harmful fine-tuning attack: LoRA SFT (TRL's ``SFTTrainer``) on k harmful prompt/answer pairs.

In steps::

    finetune_pairs    prompt/answer pairs: from a file, or self-generated offline (the model's own
                      answers judged compliant with the attacker's union pruned), never on an
                      evaluation prompt
    train_adapter     LoRA SFT on the first k pairs (completion-only loss), the adapter saved after
                      every epoch to ``out/finetune/k<k>-<key>/epoch<e>/``; a finished training is reused
    attached_adapter  the adapter attached to the model in memory (peft), removed on exit: the model
                      (and its directory) are left as they were
    finetune_plan     one condition per (k, epoch)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Iterator

from safeneuron.artifacts import atomic_dir, read_json, sha256_text, write_json
from safeneuron.data.files import read_records
from safeneuron.data.prompts import load_prompts
from safeneuron.errors import SafeneuronError
from safeneuron.evaluation.measure import GenerationSettings, judged_responses
from safeneuron.models import pick_device
from safeneuron.stages.conditions import AttackContext, AttackPlan, Condition

logger = logging.getLogger(__name__)

__all__ = ["FinetuneAttackError", "finetune_pairs", "train_adapter", "attached_adapter", "finetune_plan"]


class FinetuneAttackError(SafeneuronError):
    """The fine-tuning attack cannot run as asked (no pairs, a bad pair file)."""


def _pairs_from_file(path: str, exclude: set[str]) -> list[tuple[str, str]]:
    rows = read_records(path, error=FinetuneAttackError, what="fine-tuning pair file", items="pairs",
                        suffixes=(".jsonl", ".json", ".csv", ".tsv"))
    pairs = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise FinetuneAttackError(f"{path}: record {i} is not an object with prompt and answer")
        prompt = row.get("prompt", row.get("goal"))
        answer = row.get("answer", row.get("response", row.get("target")))
        if not isinstance(prompt, str) or not isinstance(answer, str) or not prompt.strip() or not answer.strip():
            raise FinetuneAttackError(f"{path}: record {i} needs non-empty text 'prompt' and 'answer' (or 'response')")
        if prompt not in exclude:
            pairs.append((prompt, answer))
    return pairs


def finetune_pairs(ctx: AttackContext, n: int) -> tuple[list[tuple[str, str]], dict]:
    """Up to ``n`` harmful prompt/answer pairs and where they came from. Self-generated: the model answers the
    attacker's harmful prompts (or ``finetune_prompts``) with the attacker's union pruned; the answers the judge
    calls compliant are kept. Evaluation prompts (``ctx.exclude``) are never used."""
    cfg, exclude = ctx.config, set(ctx.exclude)
    if cfg.finetune_answers:
        pairs = _pairs_from_file(cfg.finetune_answers, exclude)
        return pairs[:n], {"source": str(cfg.finetune_answers), "available": len(pairs)}
    if cfg.finetune_prompts:
        given = load_prompts(cfg.finetune_prompts, default="harmful", seed=ctx.id_config.seed,
                             allow_fallback=ctx.id_config.allow_fallback)
        prompts = [p for p in given.prompts if p not in exclude]
    else:
        prompts = list(ctx.id_harmful.prompts)
    mask = ctx.identification().sets["union"]
    settings = GenerationSettings(max_new_tokens=cfg.finetune_answer_tokens, batch_size=ctx.settings.batch_size,
                                  seed=ctx.settings.seed)
    pairs: list[tuple[str, str]] = []
    asked = 0
    for start in range(0, len(prompts), max(n, 8)):  # ask in chunks until n compliant answers are in hand
        chunk = prompts[start: start + max(n, 8)]
        judged = judged_responses(ctx.loaded, chunk, ctx.judge, mask=mask, settings=settings,
                                  cache=ctx.out / "finetune" / "self_answers.jsonl", tag=ctx.tag,
                                  progress=ctx.progress)
        asked += len(chunk)
        pairs += [(p, r) for p, r, ok in zip(chunk, judged.responses, judged.flags) if ok]
        if len(pairs) >= n:
            break
    source = {"source": "self-generated (the attacker's union pruned)", "prompts": cfg.finetune_prompts
              or ctx.id_harmful.source, "asked": asked, "compliant": len(pairs), "pruned": mask.count()}
    return pairs[:n], source


def _key(ctx: AttackContext, pairs: list[tuple[str, str]]) -> str:
    cfg = ctx.config
    settings = [ctx.tag, cfg.finetune_epochs, cfg.finetune_lora_r, cfg.finetune_learning_rate, cfg.finetune_batch_size,
                cfg.finetune_max_length, ctx.settings.seed]
    return sha256_text(json.dumps(settings), json.dumps(pairs))[:12]


def train_adapter(ctx: AttackContext, pairs: list[tuple[str, str]], out: Path) -> list[Path]:
    """LoRA SFT on ``pairs`` for ``finetune_epochs`` epochs; the adapter after each epoch in
    ``out/epoch<e>/``. A finished training (``out/finetune.json``) is reused. The model is left unchanged."""
    cfg = ctx.config
    epochs = [out / f"epoch{e}" for e in range(1, cfg.finetune_epochs + 1)]
    if (out / "finetune.json").is_file() and all((d / "adapter_config.json").is_file() for d in epochs):
        return epochs
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}],
                               "completion": [{"role": "assistant", "content": a}]} for p, a in pairs])
    steps_per_epoch = math.ceil(len(pairs) / cfg.finetune_batch_size)
    on_gpu = pick_device(ctx.id_config.device).type == "cuda"
    args = SFTConfig(output_dir=str(out / "trainer"), num_train_epochs=cfg.finetune_epochs,
                     per_device_train_batch_size=cfg.finetune_batch_size, learning_rate=cfg.finetune_learning_rate,
                     lr_scheduler_type="constant_with_warmup",
                     warmup_steps=int(0.1 * steps_per_epoch * cfg.finetune_epochs),
                     max_length=cfg.finetune_max_length, save_strategy="no", report_to=[], logging_steps=1,
                     use_cpu=not on_gpu, bf16=False, seed=ctx.settings.seed, data_seed=ctx.settings.seed,
                     disable_tqdm=not ctx.progress, dataloader_num_workers=0, packing=False,
                     gradient_checkpointing=False)  # TRL's default turns it on, and with it the model's KV cache off
    peft_config = LoraConfig(r=cfg.finetune_lora_r, lora_alpha=2 * cfg.finetune_lora_r, lora_dropout=0.0,
                             target_modules="all-linear", task_type="CAUSAL_LM")

    class SaveEachEpoch(TrainerCallback):
        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            e = round(state.epoch)
            with atomic_dir(out / f"epoch{e}") as tmp:
                model.save_pretrained(tmp)

    model = ctx.loaded.model
    was_training, use_cache = model.training, getattr(model.config, "use_cache", None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=ctx.loaded.tokenizer,
                         peft_config=peft_config, callbacks=[SaveEachEpoch()])
    t0 = time.perf_counter()
    try:
        result = trainer.train()
        losses = [round(float(h["loss"]), 4) for h in trainer.state.log_history if "loss" in h]
    finally:
        trainer.model.unload()  # the LoRA layers come out; the base weights were never changed
        if getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_disable()
        if use_cache is not None:
            model.config.use_cache = use_cache  # generation after the attack keeps its KV cache
        model.train(was_training)
        del trainer
    write_json(out / "finetune.json", {"pairs": len(pairs), "epochs": cfg.finetune_epochs, "train_s":
                                       round(time.perf_counter() - t0, 2), "train_loss": result.training_loss,
                                       "losses": losses})
    return epochs


@contextlib.contextmanager
def attached_adapter(loaded, adapter_dir: Path) -> Iterator[None]:
    """The LoRA adapter in ``adapter_dir`` attached to ``loaded.model`` in memory (peft injects it in place);
    removed on exit, the base weights untouched."""
    from peft import PeftModel

    dtype = next(loaded.model.parameters()).dtype
    peft_model = PeftModel.from_pretrained(loaded.model, str(adapter_dir), is_trainable=False)
    for name, param in peft_model.named_parameters():  # in the model's dtype: no float32 detour per layer
        if "lora_" in name and param.dtype != dtype:
            param.data = param.data.to(dtype)
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        yield
    finally:
        peft_model.unload()
        loaded.model.train(was_training)


def finetune_plan(ctx: AttackContext) -> AttackPlan:
    """One condition per (k in ``finetune_examples``, epoch 1..``finetune_epochs``): the adapter trained on the
    first k pairs, after that epoch. k above the pairs available is capped (``examples`` says how many)."""
    cfg = ctx.config
    t0 = time.perf_counter()
    pairs, source = finetune_pairs(ctx, max(cfg.finetune_examples))
    if not pairs:
        raise FinetuneAttackError("the fine-tuning attack found no harmful answers to train on (no compliant answer "
                                  "with the union pruned); give attacks.finetune_answers")
    conditions, trained = [], {}
    for k in cfg.finetune_examples:
        used = pairs[:k]
        if len(used) in trained:
            continue
        folder = ctx.out / "finetune" / f"k{len(used)}-{_key(ctx, used)}"
        t1 = time.perf_counter()
        epochs = train_adapter(ctx, used, folder)
        trained[len(used)] = round(time.perf_counter() - t1, 2)
        info = read_json(folder / "finetune.json")
        for e, adapter in enumerate(epochs, 1):
            conditions.append(Condition(len(used), f"k={len(used)}, epoch {e}", tag=f"|finetune:{folder.name}/e{e}",
                                        edit=lambda a=adapter: attached_adapter(ctx.loaded, a), payload=adapter,
                                        details={"examples": len(used), "asked_examples": k, "epoch": e,
                                                 "train_loss": info.get("train_loss")}))
    details = {"pairs": source, "epochs": cfg.finetune_epochs, "lora_r": cfg.finetune_lora_r,
               "learning_rate": cfg.finetune_learning_rate, "train_s": trained,
               "prepare_s": round(time.perf_counter() - t0, 2)}
    return AttackPlan("finetune", "examples", conditions, details)
