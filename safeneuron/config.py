"""Configuration dataclasses for every stage, loadable from TOML or YAML.

Each field has a default and a docstring-style comment; the CLI flags mirror them.
"""

from __future__ import annotations

from safeneuron.errors import SafeneuronError

import difflib
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["IdentifyConfig", "ConfigError", "from_dict", "load_config_file", "settings_hash"]


class ConfigError(SafeneuronError):
    """A configuration value or key is invalid."""


@dataclass
class IdentifyConfig:
    """Settings of safety-neuron identification."""

    model: str | None = None
    """Hub id or local directory; None = the embedded default model."""
    harmful: str | None = None
    """Harmful prompts: file, ``hf:<name>`` or ``builtin:harmful`` (default)."""
    harmless: str | None = None
    """Harmless prompts: file, ``hf:<name>`` or ``builtin:harmless`` (default)."""
    prompt_column: str | None = None
    """Prompt column of the files (detected when None)."""
    method: str = "stats"
    """``stats`` (ES + SAS, closed form, streaming) or ``neurostrike`` (logistic probes)."""
    position: str | None = None
    """Token pooling per prompt: ``max`` over the prompt, ``last`` token, or ``mean``; None = ``max`` for text models,
    ``last`` (the end of the prompt, after the image tokens) for vision-language models."""
    tau_es: float | None = None
    """ES (Cohen's d) threshold; None = 3 for Qwen models, 2 for other families (a VLM: its language backbone's)."""
    tau_sas: float = 2.0
    """SAS z-score threshold within a layer."""
    select: str = "threshold"
    """``threshold`` (d > tau_es) or ``t`` (one-sided T test with ``correction`` at ``alpha``) for the ES set."""
    alpha: float = 0.05
    """Family-wise (bonferroni) or false-discovery (bh) level when ``select = "t"``."""
    correction: str = "bh"
    """``bh`` (Benjamini-Hochberg) or ``bonferroni``."""
    top_frac: float | None = None
    """Optional cap: keep at most this fraction of each layer's neurons per set (highest scores)."""
    batch_size: int = 16
    max_length: int = 512
    """Prompts longer than this many tokens are truncated from the left (with a warning)."""
    max_prompts: int | None = None
    """Use at most this many prompts per class (seeded sample)."""
    by_category: bool = False
    """Also identify safety neurons per harm category (harmful category vs all harmless)."""
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    trust_remote_code: bool = False
    neurostrike_epochs: int = 5000
    """Full-batch Adam epochs per probe (NeuroStrike's published setting)."""
    neurostrike_z: float = 3.0
    """NeuroStrike's z-score threshold on probe weights."""
    checkpoint_every: int = 8
    """Save partial statistics every this many batches (resume after a kill)."""
    stats_device: str = "cpu"
    """Where the float64 accumulators live: ``cpu`` (offloaded) or ``model`` (the model's device; faster on GPU)."""

    def validate(self) -> None:
        if self.method not in ("stats", "neurostrike"):
            raise ConfigError(f"method must be 'stats' or 'neurostrike', got {self.method!r}")
        if self.position is not None and self.position not in ("max", "last", "mean"):
            raise ConfigError(f"position must be max, last or mean, got {self.position!r}")
        if self.tau_es is not None and not self.tau_es > 0:
            raise ConfigError(f"tau_es must be > 0, got {self.tau_es}")
        if not self.tau_sas > 0:
            raise ConfigError(f"tau_sas must be > 0, got {self.tau_sas}")
        if self.select not in ("threshold", "t"):
            raise ConfigError(f"select must be 'threshold' or 't', got {self.select!r}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.correction not in ("bh", "bonferroni"):
            raise ConfigError(f"correction must be 'bh' or 'bonferroni', got {self.correction!r}")
        if self.top_frac is not None and not 0 < self.top_frac <= 1:
            raise ConfigError(f"top_frac must be in (0, 1], got {self.top_frac}")
        if self.stats_device not in ("cpu", "model"):
            raise ConfigError(f"stats_device must be 'cpu' or 'model', got {self.stats_device!r}")
        if self.batch_size < 1 or self.max_length < 1:
            raise ConfigError("batch_size and max_length must be >= 1")
        if self.max_prompts is not None and self.max_prompts < 2:
            raise ConfigError(f"max_prompts must be >= 2 (variances need two prompts per class), got {self.max_prompts}")


def from_dict(cls, data: dict[str, Any], where: str = "config"):
    """Build a config dataclass, rejecting unknown keys with the closest valid one."""
    names = [f.name for f in fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
    obj = cls(**data)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML ({err})") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    raise ConfigError(f"{path}: config must be .toml, .yaml or .yml")


def settings_hash(obj, exclude: tuple[str, ...] = ()) -> str:
    """Stable hash of a config's values (fields in ``exclude`` ignored)."""
    from safeneuron.artifacts import sha256_text
    import json

    data = {k: v for k, v in asdict(obj).items() if k not in exclude}
    return sha256_text(json.dumps(data, sort_keys=True, default=str))[:16]


# --------------------------------------------------------------------------- alignment (issue 4)
ALIGN_MODES = ("safeneuron", "dpo", "sn-tune")


@dataclass
class AlignConfig:
    """Settings of neuron-frozen iterative DPO (the method's Algorithm 1).

    The DPO knobs keep TRL's names (``beta``, ``learning_rate``, ``max_length``,
    ``per_device_train_batch_size``, ...) and the method's defaults; ``quick`` scales
    the run down (see :data:`QUICK_ALIGN`) for fields left at their defaults.
    """

    model: str | None = None
    """Hub id or local directory; None = the embedded default model."""
    mode: str = "safeneuron"
    """``safeneuron`` (ablate + freeze the safety neurons, train the rest), ``dpo`` (plain DPO baseline) or
    ``sn-tune`` (train only the safety neurons, the SN-Tune baseline)."""
    rounds: int = 2
    """Iterations of identify -> freeze -> DPO; each round's reference model is the model at its start."""
    frozen_set: str = "union"
    """Neurons frozen in round r: ``new`` (identified on the current model) or ``union`` (with earlier rounds)."""
    freeze_only: bool = False
    """Freeze the safety neurons without ablating them in training forward passes (ablation study)."""
    neuron_set: str = "union"
    """Identification set used as the safety neurons: ``es``, ``sas`` or ``union``."""
    mask: str | None = None
    """Safety-neuron mask file for round 1 (e.g. an identify run's safety_neurons.safetensors); skips that identification."""
    harmful: str | None = None
    """Harmful prompts for identification: file, ``hf:<name>`` or built-in (default)."""
    harmless: str | None = None
    """Harmless prompts for identification: file, ``hf:<name>`` or built-in (default)."""
    max_prompts: int | None = None
    """Identification uses at most this many prompts per class (seeded sample)."""
    tau_es: float | None = None
    """Identification ES threshold; None = the family default (see IdentifyConfig)."""
    tau_sas: float = 2.0
    """Identification SAS z-score threshold."""
    top_frac: float | None = None
    """Identification cap: at most this fraction of each layer's neurons per set."""
    freeze_embeddings: bool = False
    """Also freeze the input embeddings (and a tied output layer)."""
    freeze_attention: bool = False
    """Also freeze every attention module."""
    freeze_layers: list[int] | None = None
    """Also freeze these decoder layers entirely (indices)."""
    lora: bool = False
    """Train LoRA adapters (peft), merged into the model after each round, instead of all weights."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    lora_target_modules: list[str] | None = None
    """Module names to adapt; None = all linear layers except the output layer."""
    load_in_4bit: bool = False
    """QLoRA: train the LoRA adapters on a 4-bit NF4 copy of the model (bitsandbytes); each round's adapter
    is merged into the full-precision weights, loaded on the CPU, so safety neurons stay bit-exact. Needs ``lora``."""
    general: str | None = None
    """General (UltraFeedback-style) preference pairs mixed with the safety pairs."""
    safety_ratio: float = 0.3
    """Fraction of safety pairs in the mixture when ``general`` is given (the method uses 0.3)."""
    max_pairs: int | None = None
    """Train on at most this many pairs (seeded sample, after mixing)."""
    beta: float = 0.1
    """DPO beta: deviation penalty from the reference model."""
    learning_rate: float = 5e-6
    """AdamW peak learning rate."""
    weight_decay: float = 0.05
    """AdamW weight decay (frozen entries are restored after every step, so it never reaches them)."""
    num_train_epochs: float = 3.0
    """Epochs over the preference pairs per round."""
    lr_scheduler_type: str = "cosine"
    """Learning-rate schedule (transformers scheduler name)."""
    warmup_ratio: float = 0.1
    """Fraction of the round's steps used for linear warmup."""
    max_steps: int = -1
    """Optimizer steps per round; -1 = from num_train_epochs."""
    per_device_train_batch_size: int = 2
    """Preference pairs per forward pass (per device)."""
    gradient_accumulation_steps: int = 4
    """Micro-batches per optimizer step."""
    max_length: int | None = 384
    """Maximum tokens of prompt + completion (longer sequences are truncated at the end)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    bf16: bool | None = None
    """bf16 mixed precision; None = on when training on a GPU."""
    save_steps: int = 20
    """Checkpoint every this many optimizer steps inside a round (resume after a kill)."""
    keep_checkpoints: bool = False
    """Keep each round's trainer checkpoints after the round completes."""
    quick: bool = False
    """Small profile for a fast end-to-end run (fewer pairs, prompts and epochs; see QUICK_ALIGN)."""
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False

    def resolved(self) -> "AlignConfig":
        """A copy with the ``quick`` profile applied to the fields still at their defaults."""
        out = AlignConfig(**asdict(self))
        if self.quick:
            defaults = AlignConfig()
            for key, value in QUICK_ALIGN.items():
                if getattr(out, key) == getattr(defaults, key):
                    setattr(out, key, value)
        return out

    def validate(self) -> None:
        if self.mode not in ALIGN_MODES:
            raise ConfigError(f"mode must be one of {', '.join(ALIGN_MODES)}, got {self.mode!r}")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if self.frozen_set not in ("new", "union"):
            raise ConfigError(f"frozen_set must be 'new' or 'union', got {self.frozen_set!r}")
        if self.neuron_set not in ("es", "sas", "union"):
            raise ConfigError(f"neuron_set must be es, sas or union, got {self.neuron_set!r}")
        if self.freeze_layers is not None:
            try:
                self.freeze_layers = [int(x) for x in self.freeze_layers]
            except (TypeError, ValueError):
                raise ConfigError(f"freeze_layers must be layer indices, got {self.freeze_layers!r}") from None
        if self.mode != "safeneuron" and (self.freeze_only or self.freeze_embeddings or self.freeze_attention
                                          or self.freeze_layers):
            raise ConfigError(f"freeze_only and freeze_* options apply to mode 'safeneuron', not {self.mode!r}")
        if not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps must be -1 (use epochs) or >= 1, got {self.max_steps}")
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise ConfigError(f"num_train_epochs must be > 0, got {self.num_train_epochs}")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("per_device_train_batch_size and gradient_accumulation_steps must be >= 1")
        if self.max_length is not None and self.max_length < 8:
            raise ConfigError(f"max_length must be >= 8 tokens, got {self.max_length}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 < self.safety_ratio <= 1:
            raise ConfigError(f"safety_ratio must be in (0, 1], got {self.safety_ratio}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ConfigError(f"max_pairs must be >= 1, got {self.max_pairs}")
        if self.max_prompts is not None and self.max_prompts < 2:
            raise ConfigError(f"max_prompts must be >= 2 (variances need two prompts per class), got {self.max_prompts}")
        if self.load_in_4bit and not self.lora:
            raise ConfigError("load_in_4bit (QLoRA) trains adapters only: add --lora")
        if self.lora and (self.lora_r < 1 or self.lora_alpha <= 0):
            raise ConfigError(f"lora_r must be >= 1 and lora_alpha > 0, got r={self.lora_r}, alpha={self.lora_alpha}")
        if self.save_steps < 1:
            raise ConfigError(f"save_steps must be >= 1, got {self.save_steps}")


#: Values the ``quick`` profile gives to AlignConfig fields left at their defaults.
QUICK_ALIGN: dict[str, Any] = {
    "rounds": 1,
    "num_train_epochs": 1.0,
    "max_pairs": 32,
    "max_prompts": 64,
    "max_length": 256,
    "gradient_accumulation_steps": 2,
}


@dataclass
class PrefsConfig:
    """Settings of preference data: convert a file, or synthesise a safety set from the model itself."""

    source: str | None = None
    """Preference file or ``hf:<name>`` to convert; None = synthesise from the model."""
    format: str = "auto"
    """Input format: ``auto``, ``plain`` (prompt/chosen/rejected), ``pku`` (PKU-SafeRLHF) or ``hh`` (HH-RLHF)."""
    prefer: str = "safer"
    """PKU-SafeRLHF records: the ``safer`` or the ``better`` response is chosen."""
    split: str = "train"
    """Dataset split for ``hf:`` sources."""
    model: str | None = None
    """Model that synthesises the pairs: hub id, local directory or None for the embedded default."""
    harmful: str | None = None
    """Harmful prompts (chosen = refusal, rejected = compliance): file, ``hf:<name>`` or built-in."""
    harmless: str | None = None
    """Harmless prompts (chosen = helpful answer, rejected = needless refusal): file, ``hf:<name>`` or built-in."""
    n_harmful: int = 64
    """Harmful prompts to use (seeded sample)."""
    n_harmless: int = 32
    """Harmless prompts to use (seeded sample)."""
    mask: str | None = None
    """Safety-neuron mask for the pruning attack that produces the compliances; None = identify on the model."""
    neuron_set: str = "union"
    """Set of the mask file (or of the identification) to prune: es, sas or union."""
    identify_max_prompts: int | None = 128
    """Prompts per class when identifying the safety neurons here."""
    max_new_tokens: int = 96
    """Generated tokens per response."""
    batch_size: int = 8
    """Prompts per generation batch."""
    max_length: int = 512
    """Prompt tokens kept for generation (longer prompts are truncated from the left)."""
    limit: int | None = None
    """Convert at most this many pairs (seeded sample)."""
    quick: bool = False
    """Small profile: 16 harmful, 8 harmless prompts, 64 new tokens."""
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False

    def resolved(self) -> "PrefsConfig":
        """A copy with the ``quick`` profile applied to the fields still at their defaults."""
        out = PrefsConfig(**asdict(self))
        if self.quick:
            defaults = PrefsConfig()
            for key, value in QUICK_PREFS.items():
                if getattr(out, key) == getattr(defaults, key):
                    setattr(out, key, value)
        return out

    def validate(self) -> None:
        if self.format not in ("auto", "plain", "pku", "hh"):
            raise ConfigError(f"format must be auto, plain, pku or hh, got {self.format!r}")
        if self.prefer not in ("safer", "better"):
            raise ConfigError(f"prefer must be 'safer' or 'better', got {self.prefer!r}")
        if self.neuron_set not in ("es", "sas", "union"):
            raise ConfigError(f"neuron_set must be es, sas or union, got {self.neuron_set!r}")
        if self.n_harmful < 1 or self.n_harmless < 0:
            raise ConfigError(f"n_harmful must be >= 1 and n_harmless >= 0, got {self.n_harmful}, {self.n_harmless}")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.max_length < 1:
            raise ConfigError("max_new_tokens, batch_size and max_length must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if self.identify_max_prompts is not None and self.identify_max_prompts < 2:
            raise ConfigError(f"identify_max_prompts must be >= 2, got {self.identify_max_prompts}")


#: Values the ``quick`` profile gives to PrefsConfig fields left at their defaults.
QUICK_PREFS: dict[str, Any] = {"n_harmful": 16, "n_harmless": 8, "max_new_tokens": 64, "identify_max_prompts": 64}

__all__ += ["AlignConfig", "PrefsConfig", "ALIGN_MODES", "QUICK_ALIGN", "QUICK_PREFS"]


# --------------------------------------------------------------------------- attacks and evaluation (issue 5)
#: Fractions of all MLP neurons pruned in the robustness sweep, the fine grid (0 %, 0.1 %, ..., 5 %).
SWEEP_FRACTIONS = [0.0, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05]
#: The default sweep of ``safeneuron evaluate``: five points of the fine grid (each point is one
#: generation pass over the sweep prompts; 0 reuses the plain answers).
DEFAULT_SWEEP = [0.0, 0.005, 0.01, 0.02, 0.05]
#: Jailbreak templates run by default: one of each kind (an instruction to comply, a ban on
#: refusing, a persona, a split request); ``--templates all`` runs all ten.
DEFAULT_TEMPLATES = ["prefix_injection", "refusal_suppression", "role_play", "payload_splitting"]
NEURON_SETS = ("es", "sas", "union")


@dataclass
class AttackConfig:
    """Settings of the neuron-pruning attack (``safeneuron attack``).

    The attacker prunes neurons of the model under attack and measures the attack
    success rate (ASR) on harmful prompts. Which neurons: a set of an identification
    run *on the attacked model* (``set``; the adaptive attacker, default), a given
    ``mask`` file, the ``top_frac`` highest-scoring neurons, or ``random_frac``
    random neurons (the control).
    """

    model: str | None = None
    """Model under attack: hub id, local directory; None = the embedded default model."""
    set: str = "union"
    """Neuron set pruned: ``es``, ``sas`` or ``union`` (the method's FULL set)."""
    mask: str | None = None
    """Reuse this mask file (or identify output directory) instead of identifying on the attacked model."""
    random_frac: float | None = None
    """Prune this fraction of every layer's neurons at random (0.01 = 1 %): the control attack."""
    top_frac: float | None = None
    """Prune the top fraction of all neurons by ``score`` (0.01 = 1 %), ranked across layers."""
    score: str = "es"
    """Score ranked by ``top_frac`` (``es``, ``t``, ``sas``, ``shift``; ``probe_gate``/``probe_up`` for NeuroStrike)."""
    method: str = "stats"
    """Attacker's identification: ``stats`` (ES + SAS) or ``neurostrike`` (logistic probes on gate/up outputs)."""
    position: str = "mean"
    """Attacker's token pooling for identification (``max``, ``last``, ``mean``). On the embedded model the mean-pooled
    sets carry refusal (pruning them removes it) while the max-pooled ones barely do, so the attacker uses ``mean``."""
    rounds: int = 1
    """Iterative pruning: identify, prune, re-identify on the pruned model, prune the union; this many rounds."""
    harmful: str | None = None
    """Attacker's harmful identification prompts: file, ``hf:<name>`` or ``builtin:harmful`` (default)."""
    harmless: str | None = None
    """Attacker's harmless identification prompts: file, ``hf:<name>`` or ``builtin:harmless`` (default)."""
    identify_prompts: int = 64
    """Identification prompts per class (seeded sample)."""
    eval_harmful: str | None = None
    """Harmful prompts the ASR is measured on: a set name (strongreject, advbench, harmbench, jailbreakbench), file,
    ``hf:<name>`` or built-in (default); prompts used for identification are left out."""
    limit: int | None = 32
    """Measure ASR on at most this many harmful prompts (seeded sample)."""
    multimodal_harmful: str | None = None
    """Vision-language models only: image+text harmful prompts for the ASR with images (a JSONL of image path + text,
    a ``builtin:`` multimodal set or a text set, typeset); None = the ASR prompts typeset as images (FigStep-style);
    empty string to skip."""
    random_control: bool = True
    """Also prune as many random neurons per layer as the attack set (the control)."""
    judge: str = "refusal"
    """``refusal`` (refusal phrases) or a safety classifier (hub id or path, e.g. Llama-Guard-3), combined with the phrases."""
    max_new_tokens: int = 32
    """Tokens generated per answer (the first sentence decides a refusal; as ``safeneuron evaluate``)."""
    batch_size: int = 32
    """Prompts per generation batch (on a 2-core CPU, 24-48 per batch cost 3-8x less per token than 8-16)."""
    save: str | None = None
    """Also write the pruned model (weights edited, safetensors) to this directory."""
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"

    def validate(self) -> None:
        if self.set not in NEURON_SETS + ("full",):
            raise ConfigError(f"set must be es, sas or union (full), got {self.set!r}")
        if self.method not in ("stats", "neurostrike"):
            raise ConfigError(f"method must be 'stats' or 'neurostrike', got {self.method!r}")
        if self.position not in ("max", "last", "mean"):
            raise ConfigError(f"position must be max, last or mean, got {self.position!r}")
        for name in ("random_frac", "top_frac"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ConfigError(f"{name} is a fraction in [0, 1] (0.01 = 1 %), got {value}")
        if sum(x is not None for x in (self.mask, self.random_frac, self.top_frac)) > 1:
            raise ConfigError("choose one of mask, random_frac and top_frac")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if self.rounds > 1 and (self.mask or self.random_frac is not None or self.top_frac is not None):
            raise ConfigError("iterative pruning (rounds > 1) re-identifies on the pruned model; it takes no mask, "
                              "random_frac or top_frac")
        if self.identify_prompts < 2:
            raise ConfigError(f"identify_prompts must be >= 2, got {self.identify_prompts}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("max_new_tokens and batch_size must be >= 1")


@dataclass
class EvalConfig:
    """Settings of ``safeneuron evaluate``: the measurements behind the comparison table.

    The defaults are sized for a CPU (the embedded 0.5B model in under six minutes in
    float32 on 2 cores); raise the prompt counts on a GPU. Every rate comes with its count and a 95 %
    Wilson interval; a measurement that is switched off is ``null``, never guessed.
    """

    harmful: str | None = None
    """Harmful prompts for ASR: a set name (strongreject, advbench, harmbench, jailbreakbench), file, ``hf:<name>`` or
    built-in (default; falls back to built-in offline). Prompts used by the attacker's identification are left out."""
    harmless: str | None = None
    """Harmless prompts for over-refusal: file, ``hf:<name>`` or built-in (default)."""
    xstest: str | None = "builtin:xstest_like"
    """Safe prompts that look dangerous (XSTest-style) for over-refusal; empty string to skip."""
    n_harmful: int = 32
    """Harmful prompts for the plain ASR and the pruning attack (seeded sample)."""
    n_harmless: int = 32
    """Harmless prompts for over-refusal."""
    n_xstest: int = 32
    """XSTest-style prompts for over-refusal."""
    multimodal_harmful: str | None = None
    """Vision-language models only: image+text harmful prompts for ``asr_multimodal`` (a JSONL of image path + text, a
    ``builtin:`` multimodal set or a text set, typeset); None = the ASR prompts typeset as images (FigStep-style); empty
    string to skip."""
    multimodal_harmless: str | None = None
    """Vision-language models only: image+text harmless prompts for ``over_refusal_multimodal``; None = the built-in
    drawn scenes and charts (``builtin:harmless``); empty string to skip."""
    limit: int | None = None
    """Quick look: cap every prompt count (and MC questions) at this number."""
    templates: list[str] | None = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    """Jailbreak templates to run (names in data/builtin/jailbreak_templates.json); default: four, one of each kind;
    ``all`` (or None) = all ten; empty list or ``none`` = none."""
    n_template_prompts: int = 16
    """Harmful prompts each jailbreak template is applied to (the first ones of the ASR sample)."""
    attack: bool = True
    """Run the pruning attack: ASR after pruning the ES set, the SAS set and their union (FULL)."""
    attack_method: str = "stats"
    """Attacker's identification: ``stats`` (ES + SAS) or ``neurostrike`` (probes)."""
    mask: str | None = None
    """Prune this mask file's sets instead of identifying on each evaluated model (non-adaptive attacker)."""
    identify_harmful: str | None = None
    """Attacker's harmful identification prompts (built-in by default)."""
    identify_harmless: str | None = None
    """Attacker's harmless identification prompts (built-in by default)."""
    identify_prompts: int = 64
    """Attacker's identification prompts per class."""
    attack_position: str = "mean"
    """Attacker's token pooling for identification (``max``, ``last``, ``mean``; see AttackConfig.position)."""
    sweep: list[float] | None = field(default_factory=lambda: list(DEFAULT_SWEEP))
    """Fractions of all neurons pruned (top by ``sweep_score``) for the robustness curve (default 0, 0.5, 1, 2, 5 %;
    the finer grid is config.SWEEP_FRACTIONS); empty list to skip."""
    sweep_score: str = "es"
    """Score ranking the neurons in the sweep (``es``, ``t``, ``sas``, ``shift``; ``probe_up`` for NeuroStrike)."""
    n_sweep_prompts: int = 16
    """Harmful prompts per sweep point (the first ones of the ASR sample)."""
    mc_file: str | None = "builtin:general_mc"
    """Multiple-choice questions for capability: ``builtin:general_mc`` (120 easy-to-moderate general-knowledge
    questions written for this project: science, arithmetic and units, geography, vocabulary, Python, history,
    logic; a retention check, not a published benchmark), or an MMLU/ARC-format CSV or JSON/JSONL file
    (question,A,B,C,D,answer) by path, e.g. MMLU or ARC for numbers comparable with published ones; None or
    empty = skipped."""
    n_mc: int = 60
    """Multiple-choice questions (seeded sample)."""
    mc_scoring: str = "option"
    """``option`` (log-likelihood of each option's text, ARC style; the default: small models score near chance with
    letters) or ``letter`` (of the answer letter after the listed options, MMLU style, for published MMLU numbers)."""
    ppl_file: str | None = None
    """Text for perplexity (prompt file or .txt); None = the harmless prompts' text."""
    n_ppl: int = 64
    """Texts for perplexity; 0 to skip."""
    redteam: str | None = "builtin:redteam_goals"
    """Red-team goals (a ``goal`` column) for generator misuse; empty string to skip."""
    n_redteam: int = 16
    """Red-team goals asked for."""
    redteam_transfer: bool = False
    """Also send the model's own red-team prompts back to it and report how often they jailbreak it."""
    lm_eval_tasks: list[str] | None = None
    """lm-evaluation-harness tasks (e.g. arc_challenge truthfulqa_mc2 gsm8k); needs the ``eval`` extra."""
    lm_eval_limit: int | None = None
    """Examples per lm-eval task (None = all)."""
    judge: str = "refusal"
    """``refusal`` (refusal phrases) or a safety classifier (hub id or path, e.g. Llama-Guard-3), combined with the phrases."""
    max_new_tokens: int = 32
    """Tokens generated per answer (the first sentence decides a refusal; 32 suffices for the refusal judge, give a
    classifier judge 64 or more)."""
    redteam_max_new_tokens: int = 64
    """Tokens generated per red-team answer (a whole jailbreak prompt)."""
    batch_size: int = 32
    """Prompts per generation batch (on a 2-core CPU, 24-48 per batch cost 3-8x less per token than 8-16)."""
    seed: int = 0
    dtype: str = "auto"
    """``auto`` (float32 on a CPU, bfloat16 on a GPU), ``fast`` (bfloat16 wherever the device computes it natively,
    e.g. a CPU with AVX512-BF16: about 2.2x faster here, same ASRs on the embedded model), or a dtype name."""
    device: str = "auto"

    def validate(self) -> None:
        # CLI lists arrive as strings; "none" turns a list option off.
        if self.sweep is not None:
            if [str(x).lower() for x in self.sweep] == ["none"]:
                self.sweep = []
            try:
                self.sweep = [float(x) for x in self.sweep]
            except ValueError:
                raise ConfigError(f"sweep takes fractions such as 0 0.001 0.01, got {self.sweep}") from None
        if self.templates is not None and [t.lower() for t in self.templates] == ["none"]:
            self.templates = []
        if self.templates is not None and [t.lower() for t in self.templates] == ["all"]:
            self.templates = None
        if self.lm_eval_tasks is not None and [t.lower() for t in self.lm_eval_tasks] == ["none"]:
            self.lm_eval_tasks = None
        if self.mc_scoring not in ("letter", "option"):
            raise ConfigError(f"mc_scoring must be 'letter' or 'option', got {self.mc_scoring!r}")
        if self.attack_position not in ("max", "last", "mean"):
            raise ConfigError(f"attack_position must be max, last or mean, got {self.attack_position!r}")
        if self.attack_method not in ("stats", "neurostrike"):
            raise ConfigError(f"attack_method must be 'stats' or 'neurostrike', got {self.attack_method!r}")
        for name in ("n_harmful", "n_harmless", "n_xstest", "n_template_prompts", "n_sweep_prompts", "n_mc", "n_ppl",
                     "n_redteam"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if self.identify_prompts < 2:
            raise ConfigError(f"identify_prompts must be >= 2, got {self.identify_prompts}")
        for f in self.sweep or []:
            if not 0 <= f <= 1:
                raise ConfigError(f"sweep fractions must be in [0, 1] (0.01 = 1 %), got {f}")
        if self.max_new_tokens < 1 or self.redteam_max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("max_new_tokens, redteam_max_new_tokens and batch_size must be >= 1")

    def capped(self, n: int) -> int:
        """``n`` capped by ``limit``."""
        return n if self.limit is None else min(n, self.limit)


__all__ += ["AttackConfig", "EvalConfig", "SWEEP_FRACTIONS", "DEFAULT_SWEEP", "DEFAULT_TEMPLATES", "NEURON_SETS"]
