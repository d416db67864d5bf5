"""Neuron-frozen iterative DPO (the method's Algorithm 1) on top of TRL.

One round::

    identify safety neurons on the current model      -> round_r/identify/
    frozen set = new set, or union with earlier rounds -> round_r/frozen.safetensors
    DPO (TRL) with the frozen neurons ablated in training forward passes and their
        parameters bit-exactly fixed; reference = the model at the round's start
    save the model (merged, for LoRA)                  -> round_r/model/, round_r/metrics.json

:func:`align` runs the rounds with :class:`~safeneuron.trainer.SafeNeuronDPOTrainer`
(TRL's ``DPOTrainer`` plus a :class:`~safeneuron.freezing.NeuronFreezer`), writes the
artifacts and resumes a killed run from the last completed round (and from the last
trainer checkpoint inside a round). ``mode="dpo"`` is the plain-DPO baseline,
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
import itertools
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from safeneuron.artifacts import (ArtifactError, StageDir, atomic_dir, check_out_dir, read_json, sha256_text, source_digest,
                                  stage_lock, timestamp, versions, write_json)
from safeneuron.cards import mask_metadata, push_to_hub, write_model_card
from safeneuron.config import AlignConfig, ConfigError, PrefsConfig, settings_hash
from safeneuron.data.images import (
    MultimodalPrompt,
    image_preference_dataset,
    images_sha256,
    pairs_have_images,
    resolve_pair_images,
)
from safeneuron.data.preferences import PreferenceDataError, PreferenceSet, as_text, load_preferences, mix_preferences
from safeneuron.distributed import barrier, is_main_process, parallelism, process_device, world
from safeneuron.errors import SafeneuronError
from safeneuron.freezing import ReidentifyCallback, unwrap_peft
from safeneuron.inputs import prompt_batches
from safeneuron.masks import SafetyNeuronMask
from safeneuron.models import (LoadedModel, is_model_dir, load_model, processor_of, safetensors_kwargs, save_adapter_dir,
                               save_model_dir, weights_hash)
from safeneuron.stages.identify import Identification, OutputDirError, identify
from safeneuron.stages.prefs import synthesize_preferences
from safeneuron.trainer import SafeNeuronDPOTrainer, dpo_config, dpo_overrides, lora_config, training_dtype

logger = logging.getLogger(__name__)

__all__ = ["AlignResult", "align", "align_card_info", "AlignOutputError"]

# AlignConfig fields that do not change the result (excluded from the run key).
_NOT_RESULT = ("device", "save_steps", "keep_checkpoints", "trust_remote_code", "push_to_hub", "save_merged")
# DPOConfig fields of the ``dpo`` table that only log or publish (a run resumes with tracking switched on).
_DPO_NOT_RESULT = ("report_to", "run_name", "logging_steps", "logging_first_step", "logging_strategy", "logging_nan_inf_filter",
                   "project", "trackio_space_id", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token",
                   "hub_private_repo")


class AlignOutputError(SafeneuronError):
    """The output directory holds an alignment run with other settings, data or weights."""


# --------------------------------------------------------------------------- helpers
def _unpatch(model: nn.Module) -> nn.Module:
    """Drop the instance-level ``forward`` TRL (fused LM head) and accelerate (mixed-precision autocast, which keeps
    the one it wrapped as ``_original_forward``) put on the model, so it is a plain transformers model again."""
    for m in (model, unwrap_peft(model)):
        m.__dict__.pop("forward", None)
        m.__dict__.pop("_original_forward", None)
    return model


def _save_sharded_model_dir(trainer, processing, path: Path) -> None:
    """:func:`~safeneuron.models.save_model_dir` for an FSDP2 model: the Trainer gathers the full state dict
    (every process takes part), the main process writes it."""
    tmp = path.parent / f".{path.name}.sharded"
    trainer.save_model(str(tmp))
    if is_main_process():
        processing.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    barrier()


def _link_dir(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src`` (hard links where possible), atomically."""
    with atomic_dir(dst) as tmp:
        for f in src.iterdir():
            if f.is_file():
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)


def _resume_checkpoint(trainer_dir: Path) -> str | None:
    """The round's checkpoint to resume from: transformers' ``get_last_checkpoint``, when complete
    (``trainer_state.json`` is written last). A torn newest checkpoint (a kill mid-save) is set aside
    as ``torn-checkpoint-N`` and the one before it is used."""
    from transformers.trainer_utils import get_last_checkpoint

    while trainer_dir.is_dir():
        barrier()
        last = get_last_checkpoint(str(trainer_dir))
        if last is None or (Path(last) / "trainer_state.json").is_file():
            return last
        barrier()  # every process saw the torn checkpoint before the main one moves it
        if is_main_process():
            os.replace(last, trainer_dir / f"torn-{Path(last).name}")
    return None


def _load_round_model(path: Path, config: AlignConfig, name: str) -> LoadedModel:
    """A round's saved model under the base model's name (a VLM with its processor)."""
    loaded = load_model(str(path), dtype=training_dtype(config), device=process_device(config.device),
                        trust_remote_code=config.trust_remote_code, load_in_4bit=config.load_in_4bit)
    return dataclasses.replace(loaded, name=name, path=str(path))


def _merge_adapter_into(start: Path, adapter: Path, config: AlignConfig) -> nn.Module:
    """QLoRA: the round's start weights in full precision (their saved dtype, on the CPU)
    with the adapter merged in. Frozen neurons' LoRA entries are zero, so their merged
    weights equal the start weights bit-exactly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(str(start), dtype="auto", device_map="cpu",
                                                trust_remote_code=config.trust_remote_code, **safetensors_kwargs(str(start)))
    return PeftModel.from_pretrained(full, str(adapter)).merge_and_unload().eval()


def _with_images_resolved(pairs: PreferenceSet, base: Path, confine: bool = True) -> PreferenceSet:
    """A copy whose pairs' relative ``image`` paths are resolved against ``base`` (the preference file's folder);
    a file's images must lie in its folder (``confine``; pairs built in memory are the caller's own)."""
    if not pairs_have_images(pairs.pairs):
        return pairs
    copies = [dict(p) for p in pairs.pairs]
    resolve_pair_images(copies, base, confine=confine)
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
                      ("rewards/rejected", "reward_rejected"), ("consistency_kl", "consistency_kl")):
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
        from_file = isinstance(prefs, (str, Path))
        safety = _with_images_resolved(safety, _file_dir(prefs) if from_file else Path.cwd(), confine=from_file)
    else:
        path = out / "prefs" / "prefs.jsonl"
        if not path.exists() and world()[1] > 1:
            raise PreferenceDataError("under accelerate launch / torchrun, give the preference pairs (prefs); "
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
    """What the run's artifacts depend on, by content: the settings, the pairs (general ones mixed in included), the
    starting weights by their hash (a hub model by its id), the round-1 mask and the identification's prompt files
    by their bytes; never the spelling of a path (``--out`` relative or absolute gives the same key)."""
    images = [images_sha256(prefs.pairs)] if pairs_have_images(prefs.pairs) else []  # pixels are data too
    ident = dataclasses.replace(config.identify, **{k: source_digest(getattr(config.identify, k))
                                                    for k in ("harmful", "harmless", "verify_harmful")})
    keyed = dataclasses.replace(config, dpo={k: v for k, v in config.dpo.items() if k not in _DPO_NOT_RESULT},
                                identify=ident, mask=source_digest(config.mask), general=None,
                                model=None if whash else config.model)
    return sha256_text(settings_hash(keyed, _NOT_RESULT), prefs.sha256, str(whash or loaded.path), *images)[:16]


def _legacy_run_key(config: AlignConfig, prefs: PreferenceSet, whash: str | None, loaded: LoadedModel) -> str:
    """The key earlier versions gave the same run (it hashed paths as spelt): their rounds are reused."""
    images = [images_sha256(prefs.pairs)] if pairs_have_images(prefs.pairs) else []
    keyed = dataclasses.replace(config, dpo={k: v for k, v in config.dpo.items() if k not in _DPO_NOT_RESULT})
    return sha256_text(settings_hash(keyed, _NOT_RESULT), prefs.sha256, str(whash or loaded.path), *images)[:16]


def _completed_rounds(out: Path, run_key: str, rounds: int, legacy_keys: tuple[str, ...] = ()) -> int:
    done = 0
    for r in range(1, rounds + 1):
        rdir = out / f"round_{r}"
        try:
            metrics = read_json(rdir / "metrics.json")
        except ArtifactError:
            break
        if metrics.get("run_key") not in (run_key, *legacy_keys) or not is_model_dir(rdir / "model"):
            break
        done = r
    return done


def _check_out_dir(out: Path, run_key: str, overwrite: bool, legacy_keys: tuple[str, ...] = ()) -> None:
    """Refuse to mix runs: the manifest or any round of another run key is an error (or removed with overwrite)."""
    StageDir(out, "align.json", run_key, "an alignment run", AlignOutputError, legacy_keys=legacy_keys).claim(
        overwrite, patterns=("round_*/metrics.json", "round_*/round.json"), remove=("round_*", "model"), sync=barrier,
        main=is_main_process())


def _identify_round(config: AlignConfig, loaded: LoadedModel, rdir: Path, r: int, progress: bool
                    ) -> tuple[SafetyNeuronMask, dict]:
    """The safety neurons of the current model: the round-1 mask file, or an identification; with
    ``candidate_frac``, the top fraction of all neurons by its ``t`` score instead of its set."""
    if r == 1 and config.mask:
        mask = SafetyNeuronMask.load(config.mask, neuron_set=config.neuron_set)
        mask.check(loaded.model)
        info = {"source": config.mask, "set": config.neuron_set}
        if config.candidate_frac is None:
            return mask, info
        return _top_candidates(Identification.load(Path(config.mask).parent), config.candidate_frac, info)
    ident_config = dataclasses.replace(config.identify, model=config.model, seed=config.seed, dtype=config.dtype,
                                       device=config.device)
    try:
        result = identify(ident_config, rdir / "identify", loaded=loaded, progress=progress)
    except OutputDirError:  # left by a killed run of other settings in this round directory
        result = identify(ident_config, rdir / "identify", loaded=loaded, overwrite=True, progress=progress)
    m = result.manifest
    info = {"source": str(rdir / "identify"), "set": config.neuron_set, "wall_time_s": m.get("wall_time_s"),
            "selected_total": m.get("selected_total")}
    if config.candidate_frac is None:
        return result.sets[config.neuron_set], info
    return _top_candidates(result, config.candidate_frac, info)


def _top_candidates(ident: Identification, frac: float, info: dict) -> tuple[SafetyNeuronMask, dict]:
    """The wider candidate set: the top ``frac`` of all neurons by the identification's ``t`` score
    (``probe_up`` for NeuroStrike), ranked across layers."""
    key = "t" if all("t" in per for per in ident.scores.values()) else "probe_up"
    mask = SafetyNeuronMask.top_frac({mlp: per[key] for mlp, per in ident.scores.items()}, frac)
    return mask, dict(info, set=f"top {frac:.2%} by {key}")


def _check_image_prompt_length(processor, pairs, max_length: int | None) -> None:
    """A clear error, before any training, when the first image pair's prompt (image tokens included) does not fit
    in ``max_length``: TRL would drop such pairs or cut their answers or image tokens (and a VLM fails when image
    tokens and image features differ). Real VLMs spend hundreds of tokens on one image."""
    first = next((p for p in pairs if p.get("image") not in (None, "")), None)
    if max_length is None or first is None:
        return
    prompt = first["prompt"] if isinstance(first["prompt"], str) else as_text(first["prompt"])  # messages: joined
    batch = next(prompt_batches(processor, [MultimodalPrompt(prompt, first["image"])], 1))
    n = int(batch.inputs["input_ids"].shape[1])
    if n >= max_length:
        raise ConfigError(f"max_length={max_length} cuts an image pair's prompt ({n} tokens with the image's); "
                          f"set [align] max_length above {n} plus the answer's tokens")


@dataclass
class _Run:
    """One run's state, shared by its rounds. ``loaded`` is the current model (a round's start, then its
    result); the tokenizer, processor and training inputs are set by :func:`_training_inputs`."""

    config: AlignConfig
    out: Path
    pairs: PreferenceSet
    weights_sha256: str | None
    run_key: str
    base_name: str
    base_path: str
    main: bool  # under a launch every process trains; the main one writes the artifacts
    progress: bool
    callbacks: Sequence[Any]
    loaded: LoadedModel | None
    tokenizer: Any = None
    processor: Any = None
    dataset: Any = None
    eval_dataset: Any = None
    processing_class: Any = None
    saved_with: Any = None
    legacy_keys: tuple[str, ...] = ()  # keys earlier versions gave this run (their rounds are reused)


def _base_model(config: AlignConfig, loaded: LoadedModel | None) -> LoadedModel:
    """The model to align: ``loaded``, else ``config.model``; for QLoRA a 4-bit copy."""
    if loaded is None:
        return load_model(config.model, dtype=training_dtype(config), device=process_device(config.device),
                          trust_remote_code=config.trust_remote_code, load_in_4bit=config.load_in_4bit)
    if config.load_in_4bit and not getattr(loaded.model, "is_loaded_in_4bit", False):
        return _load_round_model(Path(loaded.path), config, loaded.name)  # QLoRA trains on a 4-bit copy
    return loaded


def _prepare(config: AlignConfig, prefs, loaded: LoadedModel, out: Path, progress: bool,
             callbacks: Sequence[Any]) -> _Run:
    """The training pairs (image pairs checked against the model), the weights hash and run key, as a :class:`_Run`
    holding ``loaded``."""
    base_name, base_path = loaded.name, loaded.path
    pairs = _preferences(config, prefs, loaded, out, progress)
    with_images = pairs_have_images(pairs.pairs)
    if with_images and not loaded.is_vlm:
        raise PreferenceDataError(f"{pairs.source}: pairs carry images but {base_name} "
                                  f"({loaded.model_type}) is a text model; align a vision-language model")
    if with_images:
        _check_image_prompt_length(processor_of(loaded), pairs.pairs, config.max_length)
    whash = weights_hash(base_path) if Path(base_path).is_dir() and str(base_path) else None
    run_key = _run_key(config, pairs, whash, loaded)
    run = _Run(config, out, pairs, whash, run_key, base_name, base_path, is_main_process(), progress, callbacks, loaded)
    run.legacy_keys = tuple({_legacy_run_key(config, pairs, whash, loaded)} - {run_key})
    return run


def _resume(run: _Run, done: int) -> None:
    """Reopen round ``done``'s model as ``run.loaded``, with the starting model's tokenizer and processor."""
    logger.info("%s: rounds 1-%d of %d already complete", run.out, done, run.config.rounds)
    tokenizer = run.loaded.tokenizer
    processor = getattr(run.loaded, "processor", None)
    run.loaded = None  # free the starting weights before loading the round's
    run.loaded = _load_round_model(run.out / f"round_{done}" / "model", run.config, run.base_name)
    run.loaded.tokenizer = tokenizer
    if processor is not None:
        run.loaded.processor = processor


def _training_inputs(run: _Run) -> None:
    """Set ``run``'s tokenizer (given a pad token), processor, training dataset and the processing class that
    prepares it and is saved with each round's model."""
    tokenizer = run.tokenizer = run.loaded.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # A VLM is saved with its processor (so it reloads as a VLM); image pairs are processed by it (TRL's vision
    # collator: pixels + the chat template's image tokens), text pairs by the tokenizer.
    with_images = pairs_have_images(run.pairs.pairs)
    processor = run.processor = processor_of(run.loaded) if run.loaded.is_vlm else None
    run.dataset = image_preference_dataset(run.pairs.pairs) if with_images else run.pairs.to_trl(tokenizer)
    if run.config.eval_pairs:  # a seeded held-out share for TRL's evaluation loop (eval loss, reward accuracy)
        if run.config.eval_pairs >= len(run.dataset):
            raise PreferenceDataError(f"eval_pairs {run.config.eval_pairs} leaves no pair to train on "
                                      f"({len(run.dataset)} pairs)")
        split = run.dataset.train_test_split(test_size=run.config.eval_pairs, seed=run.config.seed)
        run.dataset, run.eval_dataset = split["train"], split["test"]
    run.processing_class = processor if with_images else tokenizer
    run.saved_with = processor if processor is not None else tokenizer


def _start_round(run: _Run, r: int) -> Path:
    """``round_r/`` with a fresh ``round.json`` (a killed round of another run is removed first)."""
    rdir = run.out / f"round_{r}"
    try:
        stale = read_json(rdir / "round.json").get("run_key") not in (run.run_key, *run.legacy_keys)
    except ArtifactError:
        stale = False
    barrier()
    if run.main:
        if stale:  # a killed round of another run (only reachable with overwrite)
            shutil.rmtree(rdir)
        rdir.mkdir(parents=True, exist_ok=True)
        write_json(rdir / "round.json", {"run_key": run.run_key, "round": r,
                                         "started": timestamp()})
    barrier()
    return rdir


def _frozen_set(run: _Run, model: nn.Module, rdir: Path, r: int, frozen_prev: SafetyNeuronMask | None
                ) -> tuple[SafetyNeuronMask | None, SafetyNeuronMask, dict | None]:
    """Round ``r``'s frozen set: the safety neurons identified on the current model, or their union with
    ``frozen_prev`` (None for plain DPO). Returns it, the set saved as ``frozen.safetensors`` and the
    identification info."""
    config = run.config
    if config.mode == "dpo":
        return None, SafetyNeuronMask.empty_like(unwrap_peft(model)), None
    new, ident_info = _identify_round(config, run.loaded, rdir, r, run.progress)
    frozen = new | frozen_prev if (config.frozen_set == "union" and frozen_prev is not None) else new
    ident_info["new_neurons"] = new.count()
    if frozen_prev is not None:
        ident_info["overlap_with_previous"] = (new & frozen_prev).count()
    return frozen, frozen, ident_info


def _reference(model: nn.Module, config: AlignConfig) -> nn.Module | None:
    """DPO's reference: a frozen copy of the model at the round's start (None for LoRA: the adapter-free model)."""
    ref = None
    if not config.lora:
        ref = copy.deepcopy(model).eval()
        ref.requires_grad_(False)
    return ref


def _reidentifier(run: _Run, rdir: Path, r: int, frozen_at_start: SafetyNeuronMask):
    """Dynamic re-identification's ``identify(model)``: the round's identification settings on the policy as it
    is now (artifacts in ``round_r/reidentify/<n>/``), its set (or top candidates), joined with the round's
    starting set under ``frozen_set = "union"``."""
    config = run.config
    count = [0]

    def identify_now(model: nn.Module) -> SafetyNeuronMask:
        count[0] += 1
        net = unwrap_peft(getattr(model, "module", model))
        loaded = dataclasses.replace(run.loaded, model=net)
        ident_config = dataclasses.replace(config.identify, model=config.model, seed=config.seed, dtype=config.dtype,
                                           device=config.device, verify=False, by_category=False)
        result = identify(ident_config, rdir / "reidentify" / str(count[0]), loaded=loaded, overwrite=True,
                          progress=False)
        mask = result.sets[config.neuron_set] if config.candidate_frac is None else \
            _top_candidates(result, config.candidate_frac, {})[0]
        return mask | frozen_at_start if config.frozen_set == "union" else mask

    return identify_now


def _train_round(run: _Run, model: nn.Module, ref: nn.Module | None, frozen: SafetyNeuronMask | None, rdir: Path,
                 r: int) -> tuple[SafeNeuronDPOTrainer, str | None]:
    """Build round ``r``'s :class:`SafeNeuronDPOTrainer` and train (from the last complete checkpoint in
    ``round_r/trainer/``, if any); returns the trainer and that checkpoint."""
    config = run.config
    args = dpo_config(config, rdir / "trainer", seed=config.seed + r - 1, progress=run.progress,
                      n_pairs=len(run.pairs), world_size=world()[1])
    trainer = SafeNeuronDPOTrainer(
        model=model,
        ref_model=ref,
        args=args,
        train_dataset=run.dataset,
        eval_dataset=run.eval_dataset,
        processing_class=run.processing_class,
        peft_config=lora_config(config) if config.lora else None,
        callbacks=list(run.callbacks),
        frozen=frozen,
        ablate=config.mode == "safeneuron" and not config.freeze_only,
        invert=config.mode == "sn-tune",
        freeze_embeddings=config.freeze_embeddings,
        freeze_attention=config.freeze_attention,
        freeze_layers=config.freeze_layers or (),
        ablate_reference=config.ref_ablated and config.mode == "safeneuron" and not config.freeze_only,
        ablate_fraction=config.stochastic_ablation if config.mode == "safeneuron" else None,
        seed=config.seed + r - 1,
        consistency_weight=config.consistency,
    )
    if not run.progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    if config.reidentify_every and config.mode == "safeneuron" and trainer.freezer is not None:
        trainer.add_callback(ReidentifyCallback(trainer.freezer, config.reidentify_every,
                                                _reidentifier(run, rdir, r, frozen)))
    checkpoint = _resume_checkpoint(rdir / "trainer")
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
    return trainer, checkpoint


def _save_for_reload(run: _Run, trainer, rdir: Path, start_path: Path, sharded: bool) -> None:
    """Write ``round_r/model/`` from an FSDP2-sharded model (every process takes part) or, for QLoRA, from the
    round's start weights with the adapter merged in (the main process); the caller reloads it."""
    if sharded:  # gather the FSDP2 shards into a checkpoint
        _save_sharded_model_dir(trainer, run.saved_with, rdir / "model")
    elif run.main:  # QLoRA: merge the adapter into the full-precision weights, then go on in 4-bit
        trainer.model.save_pretrained(str(rdir / "adapter"))
        merged = _merge_adapter_into(start_path, rdir / "adapter", run.config)
        save_model_dir(merged, run.saved_with, rdir / "model")
        del merged


def _trained_model(trainer, config: AlignConfig) -> nn.Module:
    """The trained model as a plain transformers model in eval mode (LoRA: adapter merged)."""
    model = trainer.model
    if config.lora:
        model = model.merge_and_unload()
    model = _unpatch(model)
    model.eval()
    return model


def _round(run: _Run, r: int, frozen_prev: SafetyNeuronMask | None) -> tuple[dict, SafetyNeuronMask | None]:
    """Round ``r``: the frozen set, DPO against the round's start model, the artifacts (metrics last).
    ``run.loaded`` becomes the round's model; returns the metrics and the next round's ``frozen_prev``."""
    config = run.config
    rdir = _start_round(run, r)
    t_round = time.perf_counter()
    model = run.loaded.model
    start_path = Path(run.loaded.path)
    # 1. the frozen set
    frozen, record, ident_info = _frozen_set(run, model, rdir, r, frozen_prev)
    t_identify = time.perf_counter() - t_round

    # 2. DPO against the model at the round's start
    keep_adapter = config.lora and not config.save_merged  # round_r/model/ is the adapter, not the merged model
    if run.main and not keep_adapter:
        _check_free_space(model, rdir, r)  # before the training, not when its result cannot be saved
    t0 = time.perf_counter()
    ref = _reference(model, config)
    trainer, checkpoint = _train_round(run, model, ref, frozen, rdir, r)
    freeze_summary = trainer.remove_freezing()
    history = list(trainer.state.log_history)
    sharded = parallelism(trainer.model) == "fsdp2"
    t_train = time.perf_counter() - t0

    # 3. artifacts: model, frozen set, metrics (last: marks the round complete)
    t0 = time.perf_counter()
    if sharded or config.load_in_4bit:  # the round is saved, then every process goes on from the saved model
        _save_for_reload(run, trainer, rdir, start_path, sharded)
        del trainer, ref, model
        run.loaded = None
        gc.collect()
        barrier()  # the saved model is complete before any process reads it
        model = _load_round_model(rdir / "model", config, run.base_name).model
        _check_finite(model, r)
    else:
        if keep_adapter:  # the adapter alone, its base the round's start model; saved before merging unloads it
            _check_finite(trainer.model, r)
            if run.main:
                save_adapter_dir(trainer.model, run.saved_with, rdir / "model", base=str(start_path))
        model = _trained_model(trainer, config)
        _check_finite(model, r)  # before anything is saved: a NaN model is never a result
        del trainer, ref
        gc.collect()
        if run.main and not keep_adapter:
            save_model_dir(model, run.saved_with, rdir / "model")
    if run.main:
        record.save(rdir / "frozen.safetensors", metadata=mask_metadata(
            mode=config.mode, round=str(r), model=run.base_name, weights_sha256=run.weights_sha256,
            neuron_set=config.neuron_set, frozen_set=config.frozen_set, prefs_sha256=run.pairs.sha256,
            run_key=run.run_key))
    t_save = time.perf_counter() - t0
    metrics = _round_metrics(run, r, record, ident_info, freeze_summary, history, checkpoint,
                             (t_identify, t_train, t_save), t_round)
    _complete_round(run, rdir, metrics, record)
    run.loaded = LoadedModel(model, run.tokenizer, run.base_name, str(rdir / "model"), processor=run.processor)
    return metrics, record if config.mode != "dpo" else None


def _check_free_space(model: nn.Module, rdir: Path, r: int) -> None:
    """An :class:`AlignOutputError` when the disk under ``rdir`` has less free space than round ``r``'s model
    takes in safetensors (its parameters and buffers at their dtypes, plus 5 %)."""
    need = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    need = int(need * 1.05)
    free = shutil.disk_usage(rdir).free
    if free < need:
        raise AlignOutputError(f"round {r}: {rdir} has {free / 2**30:.1f} GiB free, the round's model needs about "
                               f"{need / 2**30:.1f} GiB: free some space, or with lora set save_merged = false "
                               "(each round keeps its adapter only)", fields=("save_merged",))


def _check_finite(model: nn.Module, r: int) -> None:
    """An :class:`AlignOutputError` when training left NaN or infinite weights (a diverged run): the round is not
    saved as complete, earlier rounds stay."""
    import torch

    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
    if bad:
        raise AlignOutputError(f"round {r}: training left non-finite (NaN/inf) weights in {len(bad)} parameter "
                               f"tensor(s), e.g. {bad[0]}; the round is not saved: lower learning_rate or beta, "
                               "set max_grad_norm, or check the preference pairs", fields=("learning_rate",))


def _round_metrics(run: _Run, r: int, record: SafetyNeuronMask, ident_info: dict | None, freeze_summary,
                   history: list[dict], checkpoint: str | None, times: tuple[float, float, float],
                   t_round: float) -> dict:
    """Round ``r``'s ``metrics.json``; ``times`` are the identify, train and save seconds."""
    config = run.config
    t_identify, t_train, t_save = times
    return {
        "round": r,
        "run_key": run.run_key,
        "mode": config.mode,
        "lora": config.lora,
        "load_in_4bit": config.load_in_4bit,
        "ablate": config.mode == "safeneuron" and not config.freeze_only,
        "n_pairs": len(run.pairs),
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


def _complete_round(run: _Run, rdir: Path, metrics: dict, record: SafetyNeuronMask) -> None:
    """Write ``metrics.json`` (the round is complete), drop the trainer checkpoints unless kept, log the round."""
    config = run.config
    if run.main:
        write_json(rdir / "metrics.json", metrics)
        if (rdir / "trainer" / "runs").is_dir():  # tracking logs (report_to=tensorboard) outlive the checkpoints
            shutil.rmtree(rdir / "runs", ignore_errors=True)
            os.replace(rdir / "trainer" / "runs", rdir / "runs")
        if not config.keep_checkpoints:
            shutil.rmtree(rdir / "trainer", ignore_errors=True)
    barrier()
    tr = metrics["training"]
    logger.info("round %d/%d: %d neurons %s, loss %.4f -> %.4f, reward margin %.4f -> %.4f, %.1f s", metrics["round"],
                config.rounds, record.count(), "trained only" if config.mode == "sn-tune" else "frozen",
                tr.get("loss_first", float("nan")), tr.get("loss_last", float("nan")),
                tr.get("reward_margin_first", float("nan")), tr.get("reward_margin_last", float("nan")),
                metrics["timings"]["wall_s"])


def align_card_info(manifest: dict, evaluation: dict | None = None) -> dict:
    """What the final model's card says (:func:`safeneuron.cards.model_card`), from ``align.json``."""
    return {"base_model": manifest["model"], "method": manifest["mode"], "rounds": manifest["summary"],
            "prefs": manifest["prefs"], "settings_hash": manifest["run_key"],
            "weights_sha256": manifest.get("weights_sha256"), "evaluation": evaluation}


def _write_manifest(run: _Run, round_metrics: list[dict], t_start: float) -> dict:
    """Write ``align.json`` (settings, data, weights and a per-round summary) and return it."""
    config, pairs, out = run.config, run.pairs, run.out
    manifest = {
        "run_key": run.run_key,
        "model": run.base_name,
        "model_path": run.base_path,
        "weights_sha256": run.weights_sha256,
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
        "versions": versions(),
        "created": timestamp(),
    }
    if run.main:
        write_json(out / "align.json", manifest)
    barrier()
    return manifest


def align(
    config: AlignConfig | None = None,
    prefs: str | Path | PreferenceSet | list[dict] | None = None,
    out: str | Path = "align",
    *,
    loaded: LoadedModel | None = None,
    overwrite: bool = False,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
    dpo_args: Any = None,
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
        dpo_args: a TRL ``DPOConfig`` whose fields that differ from TRL's defaults are passed through to every
            round (layered over ``config.dpo``; see :func:`safeneuron.trainer.dpo_overrides`).

    A killed run resumes: completed rounds (``round_r/metrics.json`` with the same run
    key) are skipped, and a round restarts from its last trainer checkpoint; with the
    same seed the result equals an uninterrupted run's.
    """
    config = (config or AlignConfig()).resolved()
    if dpo_args is not None:
        config.dpo = {**config.dpo, **dpo_overrides(dpo_args)}
    config.validate()
    out = check_out_dir(out)
    with stage_lock(out, "an alignment run", main=is_main_process()):  # a second process is refused
        return _align_locked(config, prefs, out, loaded, overwrite, progress, callbacks)


def _align_locked(config: AlignConfig, prefs, out: Path, loaded: LoadedModel | None, overwrite: bool, progress: bool,
                  callbacks: Sequence[Any]) -> AlignResult:
    """:func:`align` with the output directory's lock held."""
    t_start = time.perf_counter()
    if not progress:
        import datasets

        datasets.disable_progress_bars()
    # the model and the pairs; the run key names settings, data and starting weights
    loaded = _base_model(config, loaded)
    run = _prepare(config, prefs, loaded, out, progress, callbacks)
    del loaded  # run.loaded is the current model from here on (dropped before each reload)
    _check_out_dir(out, run.run_key, overwrite, run.legacy_keys)

    # completed rounds of this run are kept: go on from the last one's model and frozen set
    done = _completed_rounds(out, run.run_key, config.rounds, run.legacy_keys)
    round_metrics = [read_json(out / f"round_{r}" / "metrics.json") for r in range(1, done + 1)]
    if done:
        _resume(run, done)
    frozen_prev = (SafetyNeuronMask.load(out / f"round_{done}" / "frozen.safetensors", neuron_set=None)
                   if done and config.mode != "dpo" else None)
    _training_inputs(run)

    # the rounds: identify -> frozen set -> DPO -> artifacts
    for r in range(done + 1, config.rounds + 1):
        metrics, frozen_prev = _round(run, r, frozen_prev)
        round_metrics.append(metrics)

    # the final model and the manifest
    final_src = out / f"round_{config.rounds}" / "model"
    if run.main and (not is_model_dir(out / "model") or done < config.rounds):
        _link_dir(final_src, out / "model")
    manifest = _write_manifest(run, round_metrics, t_start)
    if run.main:  # the final model directory carries its card (and is what gets published)
        write_model_card(out / "model", align_card_info(manifest))
        if config.push_to_hub:
            logger.info("pushed %s to %s", out / "model", push_to_hub(out / "model", config.push_to_hub,
                                                                       message=f"safeneuron align ({config.mode})"))
    return AlignResult(run.loaded.model, run.tokenizer, round_metrics, manifest, out)
