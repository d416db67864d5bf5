"""The neuron-frozen DPO trainer: TRL's ``DPOTrainer`` plus a :class:`~safeneuron.freezing.NeuronFreezer`.

:class:`SafeNeuronDPOTrainer` is what one round of the method trains with (the rounds
themselves, identification and artifacts are the ``align`` stage,
:mod:`safeneuron.stages.align`); :func:`dpo_config` and :func:`lora_config` build
TRL's and peft's configs from an :class:`~safeneuron.config.AlignConfig`.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math

import torch
from pathlib import Path
from typing import Sequence

from safeneuron.config import AlignConfig
from safeneuron.distributed import DistributedFreezeCallback, all_true
from safeneuron.freezing import NeuronFreezer
from safeneuron.hooks import zero_neurons
from safeneuron.masks import SafetyNeuronMask
from safeneuron.models import pick_device

try:
    from trl import DPOConfig, DPOTrainer
except ImportError:  # pragma: no cover - trl is a dependency
    DPOConfig = DPOTrainer = None  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)

__all__ = ["SafeNeuronDPOTrainer", "dpo_config", "lora_config", "optimizer_steps", "warmup_steps", "training_dtype"]


# --------------------------------------------------------------------------- the trainer
class SafeNeuronDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` with a set of neurons frozen bit-exactly during training.

    Args (besides DPOTrainer's):
        frozen: the safety neurons (keys: MLP module names); None = plain DPO.
        ablate: zero the frozen neurons' activations in training forward passes
            (None: yes, unless ``invert``).
        invert: train only the ``frozen`` neurons instead (SN-Tune).
        freeze_embeddings / freeze_attention / freeze_layers: also freeze whole modules.
        ablate_reference: the reference is ablated like the policy (``ref_ablated``): the frozen neurons are
            zeroed in its passes too (a separate reference model, or the adapter-free model under LoRA).
        ablate_fraction, seed: stochastic ablation (``stochastic_ablation``): each optimizer step zeroes a fresh
            random share of the frozen neurons (see :class:`~safeneuron.freezing.NeuronFreezer`).
        consistency_weight: weight of the ablation-consistency term added to the DPO loss: the mean KL, over the
            chosen answers' positions, from the intact policy's next-token distribution (a fixed target) to the
            ablated policy's, so what the ablated network says follows what the intact one says (0 = off; logged
            as ``consistency_kl``).

    The freezer is installed after TRL has built (and, with ``peft_config``, wrapped)
    the model and before the optimizer exists; it restores the frozen entries after
    every optimizer step. Under ``accelerate launch`` / ``torchrun`` it is bound to the
    model accelerate prepared at the start of training (DDP, FSDP2; see
    :mod:`safeneuron.distributed`). Call :meth:`remove_freezing` before saving or
    reusing the model outside training.
    """

    def __init__(
        self,
        *args,
        frozen: SafetyNeuronMask | None = None,
        ablate: bool | None = None,
        invert: bool = False,
        freeze_embeddings: bool = False,
        freeze_attention: bool = False,
        freeze_layers: Sequence[int] = (),
        ablate_reference: bool = False,
        ablate_fraction: float | None = None,
        seed: int = 0,
        consistency_weight: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.consistency_weight = consistency_weight
        self.freezer: NeuronFreezer | None = None
        self._reference_ablation = contextlib.ExitStack()
        if frozen is not None:
            self.freezer = NeuronFreezer(self.model, frozen, ablate=ablate, invert=invert,
                                         freeze_embeddings=freeze_embeddings, freeze_attention=freeze_attention,
                                         freeze_layers=freeze_layers, ablate_reference=ablate_reference,
                                         ablate_fraction=ablate_fraction, seed=seed).install()
            self.add_callback(self.freezer.callback())
            self.add_callback(DistributedFreezeCallback(self.freezer))
            if ablate_reference and getattr(self, "ref_model", None) is not None and frozen.count():
                self._reference_ablation.enter_context(zero_neurons(self.ref_model, frozen))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's DPO loss, plus ``consistency_weight`` x the ablation-consistency KL in training passes."""
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not (self.consistency_weight and self.freezer is not None and self.freezer.ablated is not None
                and model.training):
            return result
        kl = self.consistency_kl(model, inputs)
        self._metrics["train"]["consistency_kl"].append(float(kl.detach()))
        if return_outputs:
            return result[0] + self.consistency_weight * kl, result[1]
        return result + self.consistency_weight * kl

    def consistency_kl(self, model, inputs) -> torch.Tensor:
        """Mean KL(intact || ablated) of the next-token distributions at the chosen answers' positions (the
        first half of TRL's [chosen; rejected] batch); the intact distribution is a fixed target (no gradient)."""
        half = inputs["input_ids"].shape[0] // 2
        batch = {"input_ids": inputs["input_ids"][:half], "attention_mask": inputs["attention_mask"][:half],
                 "use_cache": False}
        where = inputs["completion_mask"][:half, 1:].bool()  # positions predicting an answer token
        with torch.no_grad(), self.freezer.intact():
            target = torch.log_softmax(model(**batch).logits[:, :-1].float(), dim=-1)
        ablated = torch.log_softmax(model(**batch).logits[:, :-1].float(), dim=-1)
        kl = (target.exp() * (target - ablated)).sum(-1)  # [batch, seq - 1]
        return kl[where].mean() if where.any() else kl.sum() * 0.0

    def remove_freezing(self) -> dict | None:
        """Remove the hooks; returns the freezer's summary with ``exact`` (frozen entries unchanged).

        Under a launch, ``exact`` covers every process (a collective: call it on all of
        them) and ``changed`` lists this process's parameters.
        """
        self._reference_ablation.close()
        if self.freezer is None:
            return None
        changed = self.freezer.changed()
        summary = dict(self.freezer.summary(), exact=all_true(not changed), changed=changed)
        self.freezer.remove()
        return summary


def optimizer_steps(config: AlignConfig, n_pairs: int, world_size: int = 1) -> int:
    """Optimizer steps of one round: ``max_steps``, else the epochs over ``n_pairs`` pairs in batches of
    ``per_device_train_batch_size x gradient_accumulation_steps x world_size`` (the Trainer's count)."""
    if config.max_steps > 0:
        return config.max_steps
    batches = math.ceil(n_pairs / (config.per_device_train_batch_size * world_size))
    return max(1, math.ceil(math.ceil(batches / config.gradient_accumulation_steps) * config.num_train_epochs))


def warmup_steps(config: AlignConfig, steps: int) -> int:
    """Whole warmup steps for ``warmup_ratio`` of ``steps``, rounded down: a linear warmup starts at lr 0, so a
    round of 8 steps at ratio 0.1 gets none rather than a first step that does not move the weights."""
    return int(config.warmup_ratio * steps)


def training_dtype(config: AlignConfig) -> str:
    """The dtype the trained model is loaded in: full-parameter training keeps float32 master weights (bf16
    autocast on a GPU does the matmuls; AdamW steps of lr 5e-6 round away in bf16 weights), LoRA trains fp32
    adapters on weights in ``config.dtype``."""
    return "float32" if config.dtype == "auto" and not config.lora else config.dtype


def dpo_config(config: AlignConfig, output_dir: str | Path, *, seed: int | None = None, progress: bool = True,
               n_pairs: int | None = None, world_size: int = 1) -> "DPOConfig":
    """TRL's ``DPOConfig`` for one round of ``config`` (CPU when no GPU; bf16 autocast on a GPU or when
    ``config.bf16`` asks; no reporting
    unless ``config.dpo`` sets ``report_to``; any field of ``config.dpo`` overrides the derived one).

    ``n_pairs`` (the round's pairs) sizes the warmup in whole steps (:func:`warmup_steps`); without it
    there is no warmup unless ``max_steps`` fixes the round's length.
    """
    device = pick_device(config.device)
    on_gpu = device.type == "cuda"
    bf16 = on_gpu if config.bf16 is None else config.bf16
    steps = optimizer_steps(config, n_pairs, world_size) if n_pairs is not None or config.max_steps > 0 else 0
    derived = dict(
        output_dir=str(output_dir),
        beta=config.beta,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=warmup_steps(config, steps),
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_length=config.max_length,
        max_grad_norm=config.max_grad_norm,
        gradient_checkpointing=config.gradient_checkpointing,
        bf16=bf16,
        fp16=False,
        use_cpu=not on_gpu,
        report_to=[],
        logging_steps=1,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=1,
        seed=config.seed if seed is None else seed,
        data_seed=config.seed if seed is None else seed,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        precompute_ref_log_probs=config.precompute_ref_log_probs,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        eval_strategy="epoch" if config.eval_pairs else "no",
        per_device_eval_batch_size=config.per_device_train_batch_size,
    )
    return DPOConfig(**{**derived, **config.dpo})  # the ``dpo`` table passes any other DPOConfig field through


def dpo_overrides(dpo_args: "DPOConfig") -> dict:
    """The fields of a user's ``DPOConfig`` that differ from TRL's defaults, as an ``AlignConfig.dpo`` table (the
    ones safeneuron sets itself, e.g. ``output_dir``, left out)."""
    from dataclasses import fields as dataclass_fields

    from safeneuron.config import DPO_RESERVED

    default = DPOConfig(output_dir=dpo_args.output_dir, use_cpu=dpo_args.use_cpu)  # TRL refuses bf16 on a CPU otherwise
    return {f.name: value.value if isinstance(value, enum.Enum) else value for f in dataclass_fields(DPOConfig)
            if f.init and f.name not in DPO_RESERVED
            and (value := getattr(dpo_args, f.name)) != getattr(default, f.name)}


def lora_config(config: AlignConfig):
    """The peft ``LoraConfig`` of ``config`` (all linear layers but the output layer by default)."""
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.lora_target_modules or "all-linear", task_type="CAUSAL_LM")
