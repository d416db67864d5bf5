"""Neuron-frozen iterative DPO (the method's Algorithm 1) on top of TRL.

One round::

    identify safety neurons on the current model      -> round_r/identify/
    frozen set = new set, or union with earlier rounds -> round_r/frozen.safetensors
    DPO (TRL) with the frozen neurons ablated in training forward passes and their
        parameters bit-exactly fixed; reference = the model at the round's start
    save the model (merged, for LoRA)                  -> round_r/model/, round_r/metrics.json

:class:`SafeNeuronDPOTrainer` is TRL's ``DPOTrainer`` plus a
:class:`~safeneuron.freezing.NeuronFreezer`; :func:`align` runs the rounds, writes
the artifacts and resumes a killed run from the last completed round (and from the
last trainer checkpoint inside a round). ``mode="dpo"`` is the plain-DPO baseline,
``mode="sn-tune"`` trains only the safety neurons.

Artifacts in ``out/`` (a contract): ``round_{r}/model/`` (HF model dir, safetensors),
``round_{r}/frozen.safetensors`` (bool [d_ff] per MLP, keys ``<mlp module name>``: the
set frozen, or for sn-tune trained, during round r), ``round_{r}/identify/``,
``round_{r}/metrics.json`` (written last: marks the round complete), ``model/`` (the
final model) and ``align.json`` (settings and summary).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from safeneuron import __version__
from safeneuron.artifacts import ArtifactError, read_json, sha256_text, write_json
from safeneuron.config import AlignConfig, IdentifyConfig, PrefsConfig, settings_hash
from safeneuron.distributed import (
    DistributedFreezeCallback,
    all_true,
    barrier,
    is_main_process,
    parallelism,
    process_device,
    world,
)
from safeneuron.data.preferences import (
    PreferenceDataError,
    PreferenceSet,
    load_preferences,
    mix_preferences,
    synthesize_preferences,
)
from safeneuron.errors import SafeneuronError
from safeneuron.freezing import NeuronFreezer, unwrap_peft
from safeneuron.masks import SafetyNeuronMask
from safeneuron.models import LoadedModel, load_model, pick_device, weights_hash
from safeneuron.vlm import (
    LoadedVLM,
    image_preference_dataset,
    images_sha256,
    is_vlm,
    pairs_have_images,
    processor_of,
    resolve_pair_images,
)

try:
    from trl import DPOConfig, DPOTrainer
except ImportError:  # pragma: no cover - trl is a dependency
    DPOConfig = DPOTrainer = None  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)

__all__ = ["SafeNeuronDPOTrainer", "AlignResult", "align", "dpo_config", "lora_config", "register_cli",
           "AlignOutputError"]

# AlignConfig fields that do not change the result (excluded from the run key).
_NOT_RESULT = ("device", "save_steps", "keep_checkpoints", "trust_remote_code")


class AlignOutputError(SafeneuronError):
    """The output directory holds an alignment run with other settings, data or weights."""


# --------------------------------------------------------------------------- the trainer
class SafeNeuronDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` with a set of neurons frozen bit-exactly during training.

    Args (besides DPOTrainer's):
        frozen: the safety neurons (keys: MLP module names); None = plain DPO.
        ablate: zero the frozen neurons' activations in training forward passes
            (None: yes, unless ``invert``).
        invert: train only the ``frozen`` neurons instead (SN-Tune).
        freeze_embeddings / freeze_attention / freeze_layers: also freeze whole modules.

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
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.freezer: NeuronFreezer | None = None
        if frozen is not None:
            self.freezer = NeuronFreezer(self.model, frozen, ablate=ablate, invert=invert,
                                         freeze_embeddings=freeze_embeddings, freeze_attention=freeze_attention,
                                         freeze_layers=freeze_layers).install()
            self.add_callback(self.freezer.callback())
            self.add_callback(DistributedFreezeCallback(self.freezer))

    def remove_freezing(self) -> dict | None:
        """Remove the hooks; returns the freezer's summary with ``exact`` (frozen entries unchanged).

        Under a launch, ``exact`` covers every process (a collective: call it on all of
        them) and ``changed`` lists this process's parameters.
        """
        if self.freezer is None:
            return None
        changed = self.freezer.changed()
        summary = dict(self.freezer.summary(), exact=all_true(not changed), changed=changed)
        self.freezer.remove()
        return summary


def dpo_config(config: AlignConfig, output_dir: str | Path, *, seed: int | None = None,
               progress: bool = True) -> "DPOConfig":
    """TRL's ``DPOConfig`` for one round of ``config`` (CPU when no GPU; no reporting)."""
    device = pick_device(config.device)
    on_gpu = device.type == "cuda"
    bf16 = on_gpu if config.bf16 is None else config.bf16
    return DPOConfig(
        output_dir=str(output_dir),
        beta=config.beta,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,
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
    )


def lora_config(config: AlignConfig):
    """The peft ``LoraConfig`` of ``config`` (all linear layers but the output layer by default)."""
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.lora_target_modules or "all-linear", task_type="CAUSAL_LM")


# --------------------------------------------------------------------------- helpers
def _unpatch(model: nn.Module) -> nn.Module:
    """Drop TRL's instance-level fused-LM-head ``forward`` so the model is a plain transformers model again."""
    for m in (model, unwrap_peft(model)):
        m.__dict__.pop("forward", None)
    return model


def _save_model_dir(model: nn.Module, tokenizer, path: Path) -> None:
    """``save_pretrained`` (safetensors) into a temporary directory, then rename it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF-loaded fp32 weights are plain tensors
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _save_sharded_model_dir(trainer, tokenizer, path: Path) -> None:
    """Like :func:`_save_model_dir` for an FSDP2 model: the Trainer gathers the full state dict (every process
    takes part), the main process writes it."""
    tmp = path.parent / f".{path.name}.sharded"
    trainer.save_model(str(tmp))
    if is_main_process():
        tokenizer.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    barrier()


def _link_dir(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src`` (hard links where possible), atomically."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        for f in src.iterdir():
            if f.is_file():
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _last_checkpoint(trainer_dir: Path) -> str | None:
    """The newest complete trainer checkpoint (``trainer_state.json`` is written last)."""
    if not trainer_dir.is_dir():
        return None
    found = []
    for d in trainer_dir.glob("checkpoint-*"):
        try:
            step = int(d.name.split("-", 1)[1])
        except ValueError:
            continue
        if (d / "trainer_state.json").is_file():
            found.append((step, d))
    return str(max(found)[1]) if found else None


def _load_round_model(path: Path, config: AlignConfig, name: str) -> LoadedModel:
    """A round's saved model under the base model's name (a VLM with its processor)."""
    loaded = load_model(str(path), dtype=config.dtype, device=process_device(config.device),
                        trust_remote_code=config.trust_remote_code, load_in_4bit=config.load_in_4bit)
    return dataclasses.replace(loaded, name=name, path=str(path))


def _merge_adapter_into(start: Path, adapter: Path, config: AlignConfig) -> nn.Module:
    """QLoRA: the round's start weights in full precision (their saved dtype, on the CPU)
    with the adapter merged in. Frozen neurons' LoRA entries are zero, so their merged
    weights equal the start weights bit-exactly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(str(start), dtype="auto", device_map="cpu",
                                                trust_remote_code=config.trust_remote_code)
    return PeftModel.from_pretrained(full, str(adapter)).merge_and_unload().eval()


def _with_images_resolved(pairs: PreferenceSet, base: Path) -> PreferenceSet:
    """A copy whose pairs' relative ``image`` paths are resolved against ``base`` (the preference file's folder)."""
    if not pairs_have_images(pairs.pairs):
        return pairs
    copies = [dict(p) for p in pairs.pairs]
    resolve_pair_images(copies, base)
    return PreferenceSet(copies, pairs.source)


def _file_dir(source) -> Path:
    """The folder image paths in a preference source are relative to: a file's own, else the working directory."""
    path = Path(str(source))
    return path.parent if not str(source).startswith("hf:") and path.is_file() else Path.cwd()


def _summarise_logs(history: list[dict]) -> dict[str, Any]:
    steps = [h for h in history if "loss" in h and "rewards/margins" in h]
    out: dict[str, Any] = {"steps_logged": len(steps)}
    for key, name in (("loss", "loss"), ("rewards/margins", "reward_margin"),
                      ("rewards/accuracies", "reward_accuracy"), ("rewards/chosen", "reward_chosen"),
                      ("rewards/rejected", "reward_rejected")):
        values = [float(h[key]) for h in steps if key in h]
        if values:
            out[f"{name}_first"] = values[0]
            out[f"{name}_last"] = values[-1]
            out[f"{name}_mean"] = sum(values) / len(values)
    end = [h for h in history if "train_runtime" in h]
    if end:
        out["train_runtime_s"] = float(end[-1]["train_runtime"])
        out["train_loss"] = float(end[-1].get("train_loss", float("nan")))
    return out


# --------------------------------------------------------------------------- preference data
def _preferences(config: AlignConfig, prefs, loaded: LoadedModel, out: Path, progress: bool) -> PreferenceSet:
    """The training pairs: given, loaded from a file, or synthesised into ``out/prefs/``."""
    if isinstance(prefs, PreferenceSet):
        safety = prefs
    elif isinstance(prefs, (list, tuple)):
        safety = PreferenceSet([dict(p) for p in prefs], "in-memory")
        for i, p in enumerate(safety.pairs):
            if not {"prompt", "chosen", "rejected"} <= set(p):
                raise PreferenceDataError(f"in-memory pair {i} lacks prompt/chosen/rejected (has {', '.join(p)})")
    elif prefs is not None:
        safety = load_preferences(prefs, seed=config.seed)
    if prefs is not None:  # image paths in a file are relative to it
        safety = _with_images_resolved(safety, _file_dir(prefs) if isinstance(prefs, (str, Path)) else Path.cwd())
    else:
        path = out / "prefs" / "prefs.jsonl"
        if not path.exists() and world()[1] > 1:
            raise PreferenceDataError("under accelerate launch / torchrun, give the preference pairs (--prefs); "
                                      "synthesise them first in one process with `safeneuron prefs`")
        if not path.exists():
            prefs_config = PrefsConfig(model=config.model, seed=config.seed, dtype=config.dtype, device=config.device,
                                       quick=config.quick, mask=config.mask, neuron_set=config.neuron_set)
            synthesize_preferences(loaded, prefs_config, path, identify_dir=out / "prefs" / "identify",
                                   progress=progress)
        safety = load_preferences(path, seed=config.seed)  # read back: a resumed run sees the same pairs
    general = load_preferences(config.general, seed=config.seed) if config.general else None
    if general is not None:
        general = _with_images_resolved(general, _file_dir(config.general))
    return mix_preferences(safety, general, config.safety_ratio, max_pairs=config.max_pairs, seed=config.seed)


# --------------------------------------------------------------------------- the rounds
@dataclass
class AlignResult:
    """The final model, its tokenizer, each round's metrics and the run manifest."""

    model: nn.Module
    tokenizer: Any
    rounds: list[dict]
    manifest: dict
    out: Path


def _run_key(config: AlignConfig, prefs: PreferenceSet, whash: str | None, loaded: LoadedModel) -> str:
    images = [images_sha256(prefs.pairs)] if pairs_have_images(prefs.pairs) else []  # pixels are data too
    return sha256_text(settings_hash(config, _NOT_RESULT), prefs.sha256, str(whash or loaded.path), *images)[:16]


def _completed_rounds(out: Path, run_key: str, rounds: int) -> int:
    done = 0
    for r in range(1, rounds + 1):
        rdir = out / f"round_{r}"
        try:
            metrics = read_json(rdir / "metrics.json")
        except ArtifactError:
            break
        if metrics.get("run_key") != run_key or not (rdir / "model" / "config.json").is_file():
            break
        done = r
    return done


def _check_out_dir(out: Path, run_key: str, overwrite: bool) -> None:
    """Refuse to mix runs: any round or manifest of another run key is an error (or removed with overwrite)."""
    foreign = []
    for f in [out / "align.json", *sorted(out.glob("round_*/metrics.json")), *sorted(out.glob("round_*/round.json"))]:
        try:
            key = read_json(f).get("run_key")
        except ArtifactError:
            continue
        if key != run_key:
            foreign.append(f)
    if not foreign:
        return
    if not overwrite:
        raise AlignOutputError(f"{out} holds an alignment run with other settings, data or weights ({foreign[0]}); "
                               "pass --overwrite or choose another --out")
    barrier()  # every process has read the old run before it goes
    if not is_main_process():
        barrier()
        return
    for d in out.glob("round_*"):
        shutil.rmtree(d, ignore_errors=True)
    for f in ("align.json",):
        (out / f).unlink(missing_ok=True)
    shutil.rmtree(out / "model", ignore_errors=True)
    barrier()


def _identify_round(config: AlignConfig, loaded: LoadedModel, rdir: Path, r: int, progress: bool
                    ) -> tuple[SafetyNeuronMask, dict]:
    """The safety neurons of the current model: the round-1 mask file, or an identification."""
    from safeneuron.identify import OutputDirError, identify

    if r == 1 and config.mask:
        mask = SafetyNeuronMask.load(config.mask, set=config.neuron_set)
        mask.check(loaded.model)
        return mask, {"source": config.mask, "set": config.neuron_set}
    ident_config = IdentifyConfig(model=config.model, harmful=config.harmful, harmless=config.harmless,
                                  max_prompts=config.max_prompts, tau_es=config.tau_es, tau_sas=config.tau_sas,
                                  top_frac=config.top_frac, seed=config.seed, dtype=config.dtype,
                                  device=config.device)
    try:
        result = identify(ident_config, rdir / "identify", loaded=loaded, progress=progress)
    except OutputDirError:  # left by a killed run of other settings in this round directory
        result = identify(ident_config, rdir / "identify", loaded=loaded, overwrite=True, progress=progress)
    m = result.manifest
    return result.sets[config.neuron_set], {"source": str(rdir / "identify"), "set": config.neuron_set,
                                            "wall_time_s": m.get("wall_time_s"),
                                            "selected_total": m.get("selected_total")}


def _check_image_prompt_length(processor, pairs, max_length: int | None) -> None:
    """A clear error, before any training, when the first image pair's prompt (image tokens included) does not fit
    in ``max_length``: TRL would drop such pairs or cut their answers or image tokens (and a VLM fails when image
    tokens and image features differ). Real VLMs spend hundreds of tokens on one image."""
    from safeneuron.config import ConfigError
    from safeneuron.data.preferences import _as_text
    from safeneuron.vlm import MultimodalPrompt, multimodal_batches

    first = next((p for p in pairs if p.get("image") not in (None, "")), None)
    if max_length is None or first is None:
        return
    prompt = first["prompt"] if isinstance(first["prompt"], str) else _as_text(first["prompt"])  # messages: joined
    batch = next(multimodal_batches(processor, [MultimodalPrompt(prompt, first["image"])], 1))
    n = int(batch.inputs["input_ids"].shape[1])
    if n >= max_length:
        raise ConfigError(f"max_length={max_length} cuts an image pair's prompt ({n} tokens with the image's); "
                          f"set [align] max_length above {n} plus the answer's tokens")


def align(
    config: AlignConfig | None = None,
    prefs: str | Path | PreferenceSet | list[dict] | None = None,
    out: str | Path = "align",
    *,
    loaded: LoadedModel | None = None,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
) -> AlignResult:
    """Run ``config.rounds`` rounds of identify -> freeze -> DPO and write the artifacts to ``out``.

    Args:
        config: settings (``config.quick`` applies the quick profile).
        prefs: preference pairs: a file or ``hf:`` dataset, a :class:`PreferenceSet`, a list
            of dicts, or None to synthesise them from the model into ``out/prefs/``.
        loaded: the model to align (default: ``config.model``); its ``path`` identifies
            the starting weights in the run key.
        overwrite: replace another run's artifacts in ``out``.
        callbacks: extra transformers ``TrainerCallback`` objects for every round.

    A killed run resumes: completed rounds (``round_r/metrics.json`` with the same run
    key) are skipped, and a round restarts from its last trainer checkpoint; with the
    same seed the result equals an uninterrupted run's.
    """
    config = (config or AlignConfig()).resolved()
    config.validate()
    out = Path(out)
    t_start = time.perf_counter()
    if not progress:
        import datasets

        datasets.disable_progress_bars()
    if loaded is None:
        loaded = load_model(config.model, dtype=config.dtype, device=process_device(config.device),
                            trust_remote_code=config.trust_remote_code, load_in_4bit=config.load_in_4bit)
    elif config.load_in_4bit and not getattr(loaded.model, "is_loaded_in_4bit", False):
        loaded = _load_round_model(Path(loaded.path), config, loaded.name)  # QLoRA trains on a 4-bit copy
    base_name, base_path = loaded.name, loaded.path
    pairs = _preferences(config, prefs, loaded, out, progress)
    with_images = pairs_have_images(pairs.pairs)
    if with_images and not is_vlm(loaded.model):
        raise PreferenceDataError(f"{pairs.source}: pairs carry images but {base_name} "
                                  f"({loaded.model_type}) is a text model; align a vision-language model")
    if with_images:
        _check_image_prompt_length(processor_of(loaded), pairs.pairs, config.max_length)
    whash = weights_hash(base_path) if Path(base_path).is_dir() and str(base_path) else None
    run_key = _run_key(config, pairs, whash, loaded)
    out.mkdir(parents=True, exist_ok=True)
    _check_out_dir(out, run_key, overwrite)
    main = is_main_process()  # under a launch every process trains; the main one writes the artifacts

    done = _completed_rounds(out, run_key, config.rounds)
    round_metrics = [read_json(out / f"round_{r}" / "metrics.json") for r in range(1, done + 1)]
    if done:
        logger.info("%s: rounds 1-%d of %d already complete", out, done, config.rounds)
        tokenizer = loaded.tokenizer
        processor = getattr(loaded, "processor", None)
        loaded = None  # free the starting weights before loading the round's
        loaded = _load_round_model(out / f"round_{done}" / "model", config, base_name)
        loaded.tokenizer = tokenizer
        if processor is not None:
            loaded.processor = processor
    frozen_prev = (SafetyNeuronMask.load(out / f"round_{done}" / "frozen.safetensors", set=None)
                   if done and config.mode != "dpo" else None)
    tokenizer = loaded.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # A VLM is saved with its processor (so it reloads as a VLM); image pairs are processed by it (TRL's vision
    # collator: pixels + the chat template's image tokens), text pairs by the tokenizer.
    processor = processor_of(loaded) if is_vlm(loaded.model) else None
    dataset = image_preference_dataset(pairs.pairs) if with_images else pairs.to_trl(tokenizer)
    processing_class = processor if with_images else tokenizer
    saved_with = processor if processor is not None else tokenizer

    for r in range(done + 1, config.rounds + 1):
        rdir = out / f"round_{r}"
        try:
            stale = read_json(rdir / "round.json").get("run_key") != run_key
        except ArtifactError:
            stale = False
        barrier()
        if main:
            if stale:  # a killed round of another run (only reachable with overwrite)
                shutil.rmtree(rdir)
            rdir.mkdir(parents=True, exist_ok=True)
            write_json(rdir / "round.json", {"run_key": run_key, "round": r,
                                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        barrier()
        t_round = time.perf_counter()
        model = loaded.model
        start_path = Path(loaded.path)
        # 1. the frozen set
        if config.mode == "dpo":
            frozen, ident_info = None, None
            record = SafetyNeuronMask.empty_like(unwrap_peft(model))
        else:
            new, ident_info = _identify_round(config, loaded, rdir, r, progress)
            frozen = new | frozen_prev if (config.frozen_set == "union" and frozen_prev is not None) else new
            record = frozen
            ident_info["new_neurons"] = new.count()
            if frozen_prev is not None:
                ident_info["overlap_with_previous"] = (new & frozen_prev).count()
        t_identify = time.perf_counter() - t_round

        # 2. DPO against the model at the round's start
        t0 = time.perf_counter()
        ref = None
        if not config.lora:
            ref = copy.deepcopy(model).eval()
            ref.requires_grad_(False)
        args = dpo_config(config, rdir / "trainer", seed=config.seed + r - 1, progress=progress)
        trainer = SafeNeuronDPOTrainer(
            model=model,
            ref_model=ref,
            args=args,
            train_dataset=dataset,
            processing_class=processing_class,
            peft_config=lora_config(config) if config.lora else None,
            callbacks=list(callbacks),
            frozen=frozen,
            ablate=config.mode == "safeneuron" and not config.freeze_only,
            invert=config.mode == "sn-tune",
            freeze_embeddings=config.freeze_embeddings,
            freeze_attention=config.freeze_attention,
            freeze_layers=config.freeze_layers or (),
        )
        if not progress:
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        checkpoint = _last_checkpoint(rdir / "trainer")
        if checkpoint:
            logger.info("round %d: resuming from %s", r, checkpoint)
        if trainer.is_fsdp_enabled:
            if config.lora:
                raise AlignOutputError("align does not merge LoRA adapters trained under FSDP; train LoRA without "
                                       "FSDP (one GPU, or DDP) or train all weights with FSDP2")
            if "FULL_STATE_DICT" not in str(trainer.accelerator.state.fsdp_plugin.state_dict_type):
                raise AlignOutputError("align saves every round's model whole: set fsdp_state_dict_type: "
                                       "FULL_STATE_DICT in the accelerate FSDP config")
        trainer.train(resume_from_checkpoint=checkpoint)
        freeze_summary = trainer.remove_freezing()
        history = list(trainer.state.log_history)
        sharded = parallelism(trainer.model) == "fsdp2"
        t_train = time.perf_counter() - t0

        # 3. artifacts: model, frozen set, metrics (last: marks the round complete)
        t0 = time.perf_counter()
        if sharded or config.load_in_4bit:  # the round is saved, then every process goes on from the saved model
            if sharded:  # gather the FSDP2 shards into a checkpoint
                _save_sharded_model_dir(trainer, saved_with, rdir / "model")
            elif main:  # QLoRA: merge the adapter into the full-precision weights, then go on in 4-bit
                trainer.model.save_pretrained(str(rdir / "adapter"))
                merged = _merge_adapter_into(start_path, rdir / "adapter", config)
                _save_model_dir(merged, saved_with, rdir / "model")
                del merged
            del trainer, ref, model
            loaded = None
            gc.collect()
            barrier()  # the saved model is complete before any process reads it
            model = _load_round_model(rdir / "model", config, base_name).model
        else:
            model = trainer.model
            if config.lora:
                model = model.merge_and_unload()
            model = _unpatch(model)
            model.eval()
            del trainer, ref
            gc.collect()
            if main:
                _save_model_dir(model, saved_with, rdir / "model")
        if main:
            record.save(rdir / "frozen.safetensors", metadata={"mode": config.mode, "round": str(r)})
        t_save = time.perf_counter() - t0
        metrics = {
            "round": r,
            "run_key": run_key,
            "mode": config.mode,
            "lora": config.lora,
            "load_in_4bit": config.load_in_4bit,
            "ablate": config.mode == "safeneuron" and not config.freeze_only,
            "n_pairs": len(pairs),
            "neurons_frozen": record.count() if config.mode == "safeneuron" else 0,
            "neurons_trained_only": record.count() if config.mode == "sn-tune" else None,
            "neurons_total": record.total(),
            "frozen_per_mlp": record.per_layer(),
            "identification": ident_info,
            "freezing": freeze_summary,
            "training": _summarise_logs(history),
            "log_history": history,
            "resumed_from_checkpoint": checkpoint,
            "timings": {"identify_s": t_identify, "train_s": t_train, "save_s": t_save,
                        "wall_s": time.perf_counter() - t_round},
        }
        if main:
            write_json(rdir / "metrics.json", metrics)
            if not config.keep_checkpoints:
                shutil.rmtree(rdir / "trainer", ignore_errors=True)
        barrier()
        round_metrics.append(metrics)
        tr = metrics["training"]
        logger.info("round %d/%d: %d neurons %s, loss %.4f -> %.4f, reward margin %.4f -> %.4f, %.1f s", r,
                    config.rounds, record.count(), "trained only" if config.mode == "sn-tune" else "frozen",
                    tr.get("loss_first", float("nan")), tr.get("loss_last", float("nan")),
                    tr.get("reward_margin_first", float("nan")), tr.get("reward_margin_last", float("nan")),
                    metrics["timings"]["wall_s"])
        loaded = (LoadedVLM(model, tokenizer, base_name, str(rdir / "model"), processor=processor)
                  if processor is not None else LoadedModel(model, tokenizer, base_name, str(rdir / "model")))
        frozen_prev = record if config.mode != "dpo" else None

    final_src = out / f"round_{config.rounds}" / "model"
    if main and (not (out / "model" / "config.json").is_file() or done < config.rounds):
        _link_dir(final_src, out / "model")
    manifest = {
        "run_key": run_key,
        "model": base_name,
        "model_path": base_path,
        "weights_sha256": whash,
        "mode": config.mode,
        "rounds": config.rounds,
        "prefs": {"source": pairs.source, "n_pairs": len(pairs), "sha256": pairs.sha256,
                  "n_with_image": sum(p.get("image") not in (None, "") for p in pairs.pairs)},
        "summary": [{"round": m["round"], "neurons_frozen": m["neurons_frozen"],
                     "neurons_trained_only": m.get("neurons_trained_only"),
                     **{k: m["training"].get(k) for k in ("loss_first", "loss_last", "reward_margin_first",
                                                          "reward_margin_last", "reward_accuracy_last")},
                     "frozen_exact": (m["freezing"] or {}).get("exact"),
                     "wall_s": m["timings"]["wall_s"]} for m in round_metrics],
        "final_model": str(out / "model"),
        "settings": asdict(config),
        "wall_time_s": time.perf_counter() - t_start,
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if main:
        write_json(out / "align.json", manifest)
    barrier()
    return AlignResult(loaded.model, tokenizer, round_metrics, manifest, out)


def _versions() -> dict[str, str]:
    import peft
    import transformers
    import trl

    return {"safeneuron": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "peft": peft.__version__}


# --------------------------------------------------------------------------- CLI
def align_summary(result: AlignResult) -> str:
    """One line per round: neurons, loss and reward margin first -> last, time."""
    m = result.manifest
    lines = [f"model {m['model']}, mode {m['mode']}, {m['prefs']['n_pairs']} pairs, {m['rounds']} round(s), "
             f"{m['wall_time_s']:.1f} s", "",
             f"{'round':>5}{'neurons':>10}{'loss first':>12}{'loss last':>11}{'margin first':>14}"
             f"{'margin last':>13}{'exact':>7}{'time s':>9}"]

    def f(v, spec=".4f"):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    for s in m["summary"]:
        neurons = s["neurons_trained_only"] if m["mode"] == "sn-tune" else s["neurons_frozen"]
        exact = {True: "yes", False: "NO", None: "-"}[s["frozen_exact"]]
        lines.append(f"{s['round']:>5}{neurons:>10}{f(s['loss_first']):>12}{f(s['loss_last']):>11}"
                     f"{f(s['reward_margin_first']):>14}{f(s['reward_margin_last']):>13}{exact:>7}"
                     f"{f(s['wall_s'], '.1f'):>9}")
    return "\n".join(lines)


def cmd_align(args) -> int:
    from safeneuron.cli import config_from_args

    config = config_from_args(AlignConfig, args)
    result = align(config, args.prefs, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    print(align_summary(result))
    print(f"\nartifacts: {Path(args.out).resolve()}  (final model: {Path(args.out).resolve() / 'model'})")
    return 0


def cmd_prefs(args) -> int:
    from safeneuron.cli import config_from_args
    from safeneuron.data.preferences import manifest_path

    config = config_from_args(PrefsConfig, args).resolved()
    out = Path(args.out)
    if config.source:
        result = load_preferences(config.source, format=config.format, prefer=config.prefer, split=config.split,
                                  limit=config.limit, seed=config.seed)
        result.write_jsonl(out)
        kinds = "converted"
    else:
        loaded = load_model(config.model, dtype=config.dtype, device=config.device,
                            trust_remote_code=config.trust_remote_code)
        result = synthesize_preferences(loaded, config, out, progress=not args.no_progress)
        kinds = "synthesised"
        report = read_json(manifest_path(out))["report"]
        print(f"harmful prompts {report['n_harmful']}: intact refusal rate {report['refusal_rate_intact']:.2f}, "
              f"pruned compliance rate {report['compliance_rate_pruned']:.2f}; "
              f"chosen from model/template {report['chosen_from_model']}/{report['chosen_from_template']}, "
              f"rejected from pruned/intact {report['rejected_from_pruned']}/{report['rejected_from_intact']}, "
              f"dropped {report['dropped_no_compliance']}")
        print(f"harmless prompts {report['n_harmless']}: helpful rate {report['helpful_rate_harmless']:.2f}")
    print(f"{kinds} {len(result)} pairs -> {out.resolve()}")
    return 0


def register_cli(subparsers) -> None:
    """Add the ``align`` and ``prefs`` subcommands (called by :mod:`safeneuron.cli`)."""
    from safeneuron.cli import add_config_flags

    p = subparsers.add_parser("align", help="neuron-frozen iterative DPO (or the dpo / sn-tune baselines)")
    add_config_flags(p, AlignConfig)
    p.add_argument("--prefs", default=None,
                   help="preference pairs (JSONL/CSV/JSON or hf:<name>); default: synthesise them from the model "
                        "into OUT/prefs/")
    p.add_argument("--out", default="align", help="output directory (default: align)")
    p.add_argument("--overwrite", action="store_true", help="replace another run's artifacts in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_align)

    p = subparsers.add_parser("prefs", help="synthesise a safety preference set from the model, or convert a file")
    add_config_flags(p, PrefsConfig)
    p.add_argument("--out", default="prefs.jsonl", help="output JSONL (default: prefs.jsonl)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_prefs)
