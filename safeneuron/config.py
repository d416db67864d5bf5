"""Configuration dataclasses for every stage and the main job, loadable from TOML or YAML.

Each field has a default and a docstring written under it (TRL style); the CLI flags
mirror them (``--tau-es`` sets ``tau_es``). The rules every config follows, in one place:

* a field typed ``Literal[...]`` takes only those values (:func:`check_choices`);
* a stage that identifies safety neurons embeds an :class:`IdentifyConfig` (field
  ``identify``) instead of copying its fields; the stage sets its model, seed, dtype and
  device. Old flat keys are ``ALIASES`` (``tau_es`` -> ``identify.tau_es``), accepted by the
  constructor, :func:`from_dict`, config files and flags alike;
* the main job's settings are :data:`MAIN_JOB` (written to ``configs/default.toml``) and its
  quick profile is a config file, ``configs/quick.toml`` (:data:`QUICK`), which also serves
  ``align --quick`` and ``prefs --quick``.
"""

from __future__ import annotations

from safeneuron.errors import SafeneuronError

import dataclasses
import difflib
import functools
import math
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

__all__ = ["IdentifyConfig", "ConfigError", "from_dict", "load_config_file", "settings_hash", "check_choices",
           "check_values", "check_lists", "check_range", "check_device", "apply_profile", "Position", "NeuronSet"]

Position = Literal["max", "last", "mean"]
"""Token pooling per prompt: ``max`` over its tokens, the ``last`` token (end of the generation prompt), ``mean``."""
Method = Literal["stats", "neurostrike"]
NeuronSet = Literal["es", "sas", "union"]
AlignMode = Literal["safeneuron", "dpo", "sn-tune"]

#: Fields of an embedded IdentifyConfig that the embedding stage sets itself (its own model, seed, dtype, device).
INHERITED = ("model", "seed", "dtype", "device", "trust_remote_code")


class ConfigError(SafeneuronError):
    """A configuration value or key is invalid."""


# --------------------------------------------------------------------------- rules shared by every config
def _choices(tp) -> tuple | None:
    """The values a ``Literal`` type (or ``Literal | None``) allows; None for other types."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if typing.get_origin(arg) is Literal:
                return typing.get_args(arg)
    return None


def check_choices(config) -> None:
    """Raise :class:`ConfigError` for a value that does not fit its field (:func:`check_values`: the type, a finite
    number, a list where a list is expected) or a ``Literal`` field holding another value (None passes where
    allowed). Every config's ``validate`` calls it first."""
    check_values(config)
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        allowed = _choices(hints[f.name])
        value = getattr(config, f.name)
        if allowed is None or value in allowed or (value is None and type(None) in typing.get_args(hints[f.name])):
            continue
        raise ConfigError(f"{f.name} must be one of {', '.join(repr(c) for c in allowed)}, got {value!r}",
                          fields=(f.name,))


def _number(name: str, value, kind: type):
    """``value`` as a finite ``kind`` (int or float): numbers as they are, numeric text (YAML reads ``5e-6`` as
    text) converted; bools, other text, NaN and infinities are errors."""
    what = "a whole number" if kind is int else "a finite number"
    if isinstance(value, str):
        try:
            value = int(value) if kind is int else float(value)
        except ValueError:
            raise ConfigError(f"{name} must be {what}, got {value!r}", fields=(name,)) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be {what}, got {value!r}", fields=(name,))
    if kind is int:
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise ConfigError(f"{name} must be {what}, got {value!r}", fields=(name,))
        return int(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be {what}, got {value!r}", fields=(name,))
    return float(value) if not isinstance(value, int) else value


def _fit(name: str, value, tp):
    """``value`` checked against the type hint ``tp`` (numbers converted as :func:`_number` does); raises
    :class:`ConfigError` naming the field."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _fit(name, value, inner[0])
        return value  # pragma: no cover - no config field has a wider union
    if origin is Literal:
        return value  # check_choices reports a value outside the choices
    if value is None:
        raise ConfigError(f"{name} must be set, got none", fields=(name,))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}", fields=(name,))
        return value
    if tp in (int, float):
        return _number(name, value, tp)
    if tp is str:
        if isinstance(value, Path):  # a library caller's path is its text
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be text, got {value!r}", fields=(name,))
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a table of settings, got {value!r}", fields=(name,))
        return value
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list (e.g. [{value!r}]), got {value!r}", fields=(name,))
        item = args[0] if args else Any
        if item is Any:
            return list(value)
        out = [_fit(name, v, item) for v in value]
        choices = _choices(item)
        bad = [v for v in out if choices is not None and v not in choices]
        if bad:
            raise ConfigError(f"{name}: {bad[0]!r} is not one of {', '.join(repr(c) for c in choices)}",
                              fields=(name,))
        return out
    return value  # nested configs are validated by their own validate()


def check_lists(config) -> None:
    """Raise :class:`ConfigError` for a list field holding something other than a list (``sweep = 0.01``, a
    string where a list of strings is expected): what the list options' own normalisation needs first."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        tp, value = hints[f.name], getattr(config, f.name)
        base = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (
            typing.Union, types.UnionType) else [tp]
        if value is not None and len(base) == 1 and (base[0] is list or typing.get_origin(base[0]) is list) \
                and not isinstance(value, (list, tuple)):
            raise ConfigError(f"{f.name} must be a list (e.g. [{value!r}]), got {value!r}", fields=(f.name,))


def check_values(config) -> None:
    """Every field's value fits its declared type: numbers are finite (no NaN or infinity) and of the right kind
    (a whole number for an ``int`` field; numeric text such as YAML's ``5e-6`` is converted in place), text is
    text, lists are lists of such values, tables are tables; ``device`` fields name a device. The one check
    under every config's ``validate`` (via :func:`check_choices`)."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value = getattr(config, f.name)
        checked = _fit(f.name, value, hints[f.name])
        if checked is not value and not dataclasses.is_dataclass(value):
            setattr(config, f.name, checked)
        if f.name == "device":
            check_device(checked)


_DEVICE = re.compile(r"(auto|auto-map|cpu|mps|meta|(cuda|xpu|npu|hpu|mlu|mtia)(:\d+)?)")


def check_device(device: str) -> None:
    """A device setting names a device: ``auto``, ``auto-map``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``, ..."""
    if not _DEVICE.fullmatch(str(device)):
        close = difflib.get_close_matches(str(device), ["auto", "auto-map", "cpu", "cuda", "mps"], n=1)
        hint = "; did you mean 'cuda'?" if str(device).lower() in ("gpu", "nvidia") else (
            f"; did you mean {close[0]!r}?" if close else "")
        raise ConfigError(f"device must be auto, auto-map, cpu, cuda, cuda:N or mps, got {device!r}{hint}",
                          fields=("device",))


def check_range(config, name: str, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False, what: str = "") -> None:
    """``config.<name>`` (a number, or None where the field allows it) lies in the interval given (open or closed at
    either end); a one-line error naming the field otherwise."""
    value = getattr(config, name)
    if value is None:
        return
    ok = (low is None or (value > low if low_open else value >= low)) and \
         (high is None or (value < high if high_open else value <= high))
    if not ok:
        if high is None:
            bound = f"{'>' if low_open else '>='} {low:g}"
        elif low is None:
            bound = f"{'<' if high_open else '<='} {high:g}"
        else:
            bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{name} must be {bound}{what}, got {value!r}", fields=(name,))


def _nested(cls) -> dict[str, type]:
    """Fields holding another config dataclass (e.g. ``identify``), by name."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def _field_default(cls, name: str):
    f = next(f for f in fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _route_aliases(cls, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` with ``ALIASES`` keys moved to their fields (``tau_es`` -> ``identify: {tau_es}``); nested
    fields' values stay dicts here. Giving an old key and its field both is an error."""
    out = dict(values)
    for old, new in getattr(cls, "ALIASES", {}).items():
        if old not in out:
            continue
        value = out.pop(old)
        outer, _, inner = new.partition(".")
        if not inner:
            if outer in out:
                raise ConfigError(f"{where}: {old!r} and {new!r} are the same setting; give one")
            out[outer] = value
            continue
        nested = out.get(outer)
        nested = dict(asdict(nested) if dataclasses.is_dataclass(nested) else nested or {})
        if inner in nested:
            raise ConfigError(f"{where}: {old!r} and {new!r} are the same setting; give one")
        nested[inner] = value
        out[outer] = nested
    return out


def _nested_config(cls, name: str, value, where: str):
    """A nested field's value as its config: a dict is layered over the field's default."""
    sub = _nested(cls)[name]
    if isinstance(value, sub):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {name} must be a table of {sub.__name__} settings, got {type(value).__name__}")
    base = _field_default(cls, name)
    return from_dict(sub, {**asdict(base), **value}, where=f"{where}.{name}", validate=False)


def config_dataclass(cls):
    """``@dataclass`` plus ``ALIASES`` and nested configs in the constructor: ``AlignConfig(tau_es=3)`` is
    ``AlignConfig(identify=IdentifyConfig(tau_es=3))`` (over the field's default), and a dict for a nested
    field becomes its config."""
    cls = dataclass(cls)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        kwargs = _route_aliases(cls, kwargs, cls.__name__)
        for name in _nested(cls):
            if name in kwargs:
                kwargs[name] = _nested_config(cls, name, kwargs[name], cls.__name__)
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def apply_profile(config, profile: dict[str, Any], defaults=None):
    """A copy of ``config`` with ``profile``'s values given to the fields still at their defaults (those of
    ``defaults``, a default-built config when None; nested fields too): how ``quick`` applies :data:`QUICK`."""
    cls = type(config)
    profile = _route_aliases(cls, {k: v for k, v in profile.items() if k != "quick"}, cls.__name__)
    defaults = defaults if defaults is not None else cls()
    changes = {}
    for key, value in profile.items():
        if key in _nested(cls):
            changes[key] = apply_profile(getattr(config, key), value, getattr(defaults, key))
        elif getattr(config, key) == getattr(defaults, key):
            changes[key] = value
    return dataclasses.replace(config, **changes)


@config_dataclass
class IdentifyConfig:
    """Settings of safety-neuron identification."""

    model: str | None = None
    """Hub id or local directory; None = the embedded default model."""
    harmful: str | None = None
    """Harmful prompts: a set name (strongreject, advbench, harmbench, jailbreakbench), file,
    ``hf:<name>[:<config>][@<split>]`` or ``builtin:harmful`` (default)."""
    harmless: str | None = None
    """Harmless prompts: file, ``hf:<name>[:<config>][@<split>]`` or ``builtin:harmless`` (default)."""
    prompt_column: str | None = None
    """Prompt column of the files (detected when None)."""
    allow_fallback: bool = False
    """A named set (strongreject, advbench, harmbench, jailbreakbench, xstest) that cannot be loaded (offline, no
    cached copy) is an error; true = use the built-in prompts instead, with a warning, recorded in the prompts'
    source (``builtin:harmful (fallback for strongreject)``)."""
    method: Method = "stats"
    """``stats`` (ES + SAS, closed form, streaming) or ``neurostrike`` (logistic probes)."""
    position: Position | None = None
    """Token pooling per prompt: ``max`` or ``mean`` over the ``span``'s tokens, or the ``last`` token; None = ``mean``
    for text models (with ``span = "post"``: chosen by a measured comparison, see the README), ``last`` (the end of
    the prompt, after the image tokens) for vision-language models, ``max`` for ``method = "neurostrike"``."""
    span: Literal["prompt", "content", "post"] = "post"
    """Tokens that ``max``/``mean`` pool over: ``post`` (the tokens after the user's text: end-of-turn marker and
    generation prompt, the default), ``content`` (the user's own text only) or ``prompt`` (every token of the rendered
    chat, the template's constant system prompt and role markers included). Image+text prompts pool over the whole
    prompt."""
    tau_es: float | None = None
    """ES (Cohen's d) threshold; None = 3 for Qwen models, 2 for other families (a VLM: its language backbone's)."""
    tau_sas: float = 2.0
    """SAS z-score threshold within a layer."""
    select: Literal["threshold", "t"] = "threshold"
    """``threshold`` (d > tau_es) or ``t`` (one-sided T test with ``correction`` at ``alpha``) for the ES set."""
    alpha: float = 0.05
    """Family-wise (bonferroni) or false-discovery (bh) level when ``select = "t"``."""
    correction: Literal["bh", "bonferroni"] = "bh"
    """``bh`` (Benjamini-Hochberg) or ``bonferroni``."""
    top_frac: float | None = None
    """Optional cap: keep at most this fraction of each layer's neurons per set (highest scores)."""
    batch_size: int = 16
    max_length: int = 512
    """Prompts longer than this many tokens are truncated from the left (with a warning)."""
    max_prompts: int | None = None
    """Use at most this many prompts per class (seeded sample)."""
    match_lengths: bool = False
    """Choose the harmless prompts to match the harmful prompts' word counts (one each, nearest length) instead of a
    random sample: the control for a length confound (longer prompts give larger max-pooled activations)."""
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
    stats_device: Literal["cpu", "model"] = "cpu"
    """Where the float64 accumulators live: ``cpu`` (offloaded) or ``model`` (the model's device; faster on GPU)."""
    verify: bool = False
    """Causal check: prune the union on the identified model and, separately, as many random neurons per layer, and
    measure the ASR on held-out harmful prompts (plain / pruned / random, 95 % intervals, in identify.json's
    ``verification``). Safety neurons raise the ASR when pruned; random ones barely move it."""
    verify_prompts: int = 64
    """Held-out harmful prompts of the causal check (seeded sample, none used by the identification)."""
    verify_harmful: str | None = None
    """Harmful prompts of the causal check: a set name, file or ``hf:<name>[:<config>][@<split>]``; None = the
    identification's harmful source; its identification prompts are always left out."""
    verify_max_new_tokens: int = 64
    """Tokens generated per answer in the causal check."""
    verify_dtype: str | None = None
    """dtype of the model the causal check generates with: None = the identified model as it is; ``fast`` = a
    bfloat16 copy where the device computes it natively (2.4x faster generation on a CPU with AVX512-BF16)."""

    def validate(self) -> None:
        check_choices(self)
        if self.tau_es is not None and not self.tau_es > 0:
            raise ConfigError(f"tau_es must be > 0, got {self.tau_es}")
        if not self.tau_sas > 0:
            raise ConfigError(f"tau_sas must be > 0, got {self.tau_sas}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.top_frac is not None and not 0 < self.top_frac <= 1:
            raise ConfigError(f"top_frac must be in (0, 1], got {self.top_frac}")
        if self.batch_size < 1 or self.max_length < 1:
            raise ConfigError("batch_size and max_length must be >= 1")
        if self.max_prompts is not None and self.max_prompts < 2:
            raise ConfigError(f"max_prompts must be >= 2 (variances need two prompts per class), got {self.max_prompts}")
        if self.verify_prompts < 1 or self.verify_max_new_tokens < 1:
            raise ConfigError("verify_prompts and verify_max_new_tokens must be >= 1",
                              fields=("verify_prompts", "verify_max_new_tokens"))
        check_range(self, "checkpoint_every", 1, what=" (batches between saved partial statistics)")
        check_range(self, "neurostrike_epochs", 1)
        check_range(self, "neurostrike_z", 0, low_open=True)


def from_dict(cls, data: dict[str, Any], where: str = "config", *, validate: bool = True):
    """Build a config dataclass, rejecting unknown keys with the closest valid one.

    ``ALIASES`` keys go to their fields and a table for a nested config (``identify``) is
    layered over that field's default; ``validate`` checks the values.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table of settings, got {type(data).__name__}")
    data = _route_aliases(cls, data, where)
    names = [f.name for f in fields(cls)]
    for key in data:
        if key not in names:
            known = names + list(getattr(cls, "ALIASES", {}))
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
    for name in _nested(cls):
        if name in data:
            data[name] = _nested_config(cls, name, data[name], where)
    try:
        obj = cls(**data)
    except TypeError as err:  # pragma: no cover - keys are checked above
        raise ConfigError(f"{where}: {err}") from None
    if validate and hasattr(obj, "validate"):
        obj.validate()
    return obj


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the config file as UTF-8") from None
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


#: Config fields added after finished runs were first keyed, with their defaults: a settings hash leaves such a
#: field out while it holds its default, so a run of an earlier version is still recognised and resumed (a new
#: setting that is used changes the key). Add a field here when you add it to a config.
LATE_FIELDS: dict[str, Any] = {
    "AlignConfig.eval_pairs": 0, "AlignConfig.dpo": {}, "AlignConfig.push_to_hub": None, "AlignConfig.save_merged": True,
    **{f"{c}.allow_fallback": False for c in ("IdentifyConfig", "PrefsConfig", "AlignConfig", "AttackConfig",
                                              "EvalConfig", "AnalyzeConfig")},
    "AttackConfig.judge_template": None, "EvalConfig.judge_template": None,
    "EvalConfig.lm_eval_chat_template": False,
}


def _hashed_values(obj):
    """``asdict(obj)`` without the late fields at their defaults (nested configs too)."""
    if not dataclasses.is_dataclass(obj):
        return obj
    values = asdict(obj)  # once: the plain values of every field
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        key = f"{type(obj).__name__}.{f.name}"
        if key in LATE_FIELDS and value == LATE_FIELDS[key]:
            continue
        out[f.name] = _hashed_values(value) if dataclasses.is_dataclass(value) else values[f.name]
    return out


def settings_hash(obj, exclude: tuple[str, ...] = ()) -> str:
    """Stable hash of a config's values (fields in ``exclude`` ignored; :data:`LATE_FIELDS` at their defaults
    too)."""
    from safeneuron.artifacts import sha256_text
    import json

    data = {k: v for k, v in _hashed_values(obj).items() if k not in exclude}
    return sha256_text(json.dumps(data, sort_keys=True, default=str))[:16]


# --------------------------------------------------------------------------- alignment (issue 4)
#: DPOConfig fields safeneuron sets from its own options; a ``dpo`` table may not set them.
DPO_RESERVED = {"output_dir": "--out", "use_cpu": "device", "disable_tqdm": "--no-progress"}


def check_dpo_passthrough(table) -> None:
    """The ``dpo`` table names DPOConfig fields (TRL is imported only when the table is not empty)."""
    if not isinstance(table, dict):
        raise ConfigError(f"dpo is a table of DPOConfig fields, got {type(table).__name__}", fields=("dpo",))
    if not table:
        return
    from trl import DPOConfig

    names = [f.name for f in fields(DPOConfig)]
    for key in table:
        if key in DPO_RESERVED:
            raise ConfigError(f"dpo.{key} is set by safeneuron; use {DPO_RESERVED[key]}", fields=("dpo",))
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            raise ConfigError(f"dpo.{key}: not a DPOConfig field" + (f"; did you mean {close[0]!r}?" if close else ""),
                              fields=("dpo",))



ALIGN_MODES = typing.get_args(AlignMode)


@config_dataclass
class AlignConfig:
    """Settings of neuron-frozen iterative DPO (the method's Algorithm 1).

    The DPO knobs keep TRL's names (``beta``, ``learning_rate``, ``max_length``,
    ``per_device_train_batch_size``, ...) and the method's defaults; ``quick`` scales
    the run down (``[align]`` of ``configs/quick.toml``) for fields left at their defaults.
    """

    ALIASES: ClassVar[dict[str, str]] = {k: f"identify.{k}" for k in ("harmful", "harmless", "max_prompts", "tau_es",
                                                                       "tau_sas", "top_frac")}
    """Old keys (and flags) of the identification settings: ``tau_es`` is ``identify.tau_es``, ..."""

    model: str | None = None
    """Hub id or local directory; None = the embedded default model."""
    mode: AlignMode = "safeneuron"
    """``safeneuron`` (ablate + freeze the safety neurons, train the rest), ``dpo`` (plain DPO baseline) or
    ``sn-tune`` (train only the safety neurons, the SN-Tune baseline)."""
    rounds: int = 2
    """Iterations of identify -> freeze -> DPO; each round's reference model is the model at its start."""
    frozen_set: Literal["new", "union"] = "union"
    """Neurons frozen in round r: ``new`` (identified on the current model) or ``union`` (with earlier rounds)."""
    freeze_only: bool = False
    """Freeze the safety neurons without ablating them in training forward passes (ablation study)."""
    ref_ablated: bool = False
    """The DPO reference is ablated like the policy (the frozen neurons zeroed in its passes too): policy and
    reference then differ only by what training changed (loss ln 2 at step 0). Default: an intact reference."""
    stochastic_ablation: float | None = None
    """Stochastic ablation: each optimizer step zeroes a fresh random share (e.g. 0.5) of the frozen set, so no
    fixed small set carries refusal; all of it stays frozen. None = the whole set ablated every step."""
    consistency_weight: float | None = None
    """Ablation-consistency term (safeneuron mode): this weight x the mean KL from the intact policy's next-token
    distribution to the ablated policy's on the chosen answers, added to the DPO loss (0 = off). None = 1.0 when the
    policy is ablated (safeneuron mode without ``freeze_only``: the recipe search's winner, see the README), 0
    otherwise; :attr:`consistency` is the weight in effect."""
    reidentify_every: int = 0
    """Dynamic re-identification (safeneuron mode): every this many optimizer steps inside a round, identify the
    safety neurons of the policy as it is now (the round's identification settings, closed-form statistics) and
    freeze and ablate them from then on, so the ablated set follows the model as it learns (0 = off; a resumed
    round restarts from the round's starting set)."""
    candidate_frac: float | None = None
    """Freeze (and ablate) the top fraction of all neurons by the identification's ``t`` score (e.g. 0.05) instead
    of its ES/SAS set: the wider candidate set for stochastic ablation."""
    neuron_set: NeuronSet = "union"
    """Identification set used as the safety neurons: ``es``, ``sas`` or ``union``."""
    mask: str | None = None
    """Safety-neuron mask file for round 1 (e.g. an identify run's safety_neurons.safetensors); skips that identification."""
    identify: IdentifyConfig = field(default_factory=IdentifyConfig)
    """Identification settings of every round (prompts, ``max_prompts``, pooling ``position``, ``tau_es``, ``tau_sas``,
    ``top_frac``, ...: an :class:`IdentifyConfig`; TOML ``[align.identify]``, flags ``--identify.<field>``). Its
    model, seed, dtype and device are this stage's."""
    allow_fallback: bool = False
    """The rounds' identification: a named prompt set that cannot be loaded is an error; true = the built-in prompts
    instead, with a warning (``identify.allow_fallback``)."""
    freeze_embeddings: bool = False
    """Also freeze the input embeddings (and a tied output layer)."""
    freeze_attention: bool = False
    """Also freeze every attention module."""
    freeze_layers: list[int] | None = None
    """Also freeze these decoder layers entirely (indices)."""
    lora: bool = False
    """Train LoRA adapters (peft), merged into the model after each round, instead of all weights."""
    save_merged: bool = True
    """LoRA: each round's ``model/`` is the merged model (true), or only the round's adapter (false:
    ``adapter_config.json`` + ``adapter_model.safetensors``, naming the round's start model as its base by absolute
    path), which :func:`~safeneuron.models.load_model` merges into its base when it loads the directory: megabytes
    per round instead of a copy of the model. Training and results are the same either way."""
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
    """bf16 autocast with float32 master weights; None = on a GPU. On a CPU with AVX512-BF16/AMX ``true`` makes LoRA
    DPO steps 1.9x faster than float32 (2-vCPU Xeon, ``bench_align.py --parts precision``) but it is not the CPU
    default: a round resumed from a checkpoint then differs from an uninterrupted one in the last digits."""
    precompute_ref_log_probs: bool = False
    """TRL's ``precompute_ref_log_probs``: the reference's log-probs of every pair computed once before training,
    saving a forward pass per step (the reference is fixed within a round). Not with ``ref_ablated`` (TRL
    precomputes outside the training passes the ablation applies to)."""
    group_by_length: bool = False
    """Batches of pairs of similar length (transformers' ``group_by_length`` sampler): less padding per step."""
    eval_pairs: int = 0
    """Pairs held out (seeded) as TRL's evaluation set: eval loss and reward accuracy every epoch (or as
    ``dpo.eval_strategy`` says), logged in each round's ``metrics.json``. 0: every pair trains."""
    dpo: dict = field(default_factory=dict)
    """Any field of TRL's ``DPOConfig`` passed through as it is (``loss_type``, ``optim``, ``report_to``,
    ``logging_steps``, ``run_name``, ``use_liger_kernel``, ...): a ``[align.dpo]`` table, ``--dpo.KEY VALUE``, or
    ``align(..., dpo_args=DPOConfig(...))``. It overrides what safeneuron derives from the fields above, except
    ``output_dir`` (``--out``), ``use_cpu`` (``device``) and ``disable_tqdm`` (``--no-progress``)."""
    save_steps: int = 20
    """Checkpoint every this many optimizer steps inside a round (resume after a kill)."""
    keep_checkpoints: bool = False
    """Keep each round's trainer checkpoints after the round completes."""
    push_to_hub: str | None = None
    """A hub repository id (``user/name``) to upload the final model directory to, with its model card (needs a
    token: ``huggingface-cli login``). None: nothing is published."""
    quick: bool = False
    """Small profile for a fast run (``[align]`` of ``configs/quick.toml``, for fields left at their defaults)."""
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False

    def resolved(self) -> "AlignConfig":
        """A copy with the ``quick`` profile (``[align]`` of ``configs/quick.toml``) applied to the fields still at
        their defaults."""
        return apply_profile(self, QUICK.get("align", {})) if self.quick else dataclasses.replace(self)

    @property
    def consistency(self) -> float:
        """The ablation-consistency weight in effect: ``consistency_weight``, or with None 1.0 when the policy is
        ablated (safeneuron mode, not ``freeze_only``) and 0 otherwise."""
        if self.consistency_weight is not None:
            return float(self.consistency_weight) if self.mode == "safeneuron" else 0.0
        return 1.0 if self.mode == "safeneuron" and not self.freeze_only else 0.0

    def validate(self) -> None:
        check_choices(self)
        if self.allow_fallback:  # the rounds' identification loads the prompts
            self.identify.allow_fallback = True
        self.identify.validate()
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if self.freeze_layers is not None:
            try:
                self.freeze_layers = [int(x) for x in self.freeze_layers]
            except (TypeError, ValueError):
                raise ConfigError(f"freeze_layers must be layer indices, got {self.freeze_layers!r}") from None
        if self.mode != "safeneuron" and (self.freeze_only or self.freeze_embeddings or self.freeze_attention
                                          or self.freeze_layers):
            raise ConfigError(f"freeze_only and freeze_* options apply to mode 'safeneuron', not {self.mode!r}")
        for name in ("stochastic_ablation", "candidate_frac"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not 0 < value <= 1):
                raise ConfigError(f"{name} is a share in (0, 1] (0.5 = half), got {value!r}", fields=(name,))
        if not isinstance(self.reidentify_every, int) or self.reidentify_every < 0:
            raise ConfigError(f"reidentify_every is a number of optimizer steps >= 0, got {self.reidentify_every!r}",
                              fields=("reidentify_every",))
        check_dpo_passthrough(self.dpo)
        if not isinstance(self.eval_pairs, int) or isinstance(self.eval_pairs, bool) or self.eval_pairs < 0:
            raise ConfigError(f"eval_pairs is a number of pairs >= 0, got {self.eval_pairs!r}", fields=("eval_pairs",))
        if self.precompute_ref_log_probs and self.ref_ablated:
            raise ConfigError("precompute_ref_log_probs computes the reference outside training passes, where "
                              "ref_ablated's ablation does not apply; choose one", fields=("precompute_ref_log_probs",))
        if self.consistency_weight is not None and (
                not isinstance(self.consistency_weight, (int, float)) or isinstance(self.consistency_weight, bool)
                or not math.isfinite(self.consistency_weight) or self.consistency_weight < 0):
            raise ConfigError(f"consistency_weight must be a finite number >= 0, got {self.consistency_weight!r}",
                              fields=("consistency_weight",))
        if (self.ref_ablated or self.stochastic_ablation is not None or self.consistency_weight) and self.freeze_only:
            raise ConfigError("ref_ablated, stochastic_ablation and consistency_weight shape the ablation; "
                              "freeze_only has none", fields=("freeze_only",))
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
        if self.load_in_4bit and not self.lora:
            raise ConfigError("load_in_4bit (QLoRA) trains adapters only: set lora", fields=("lora",))
        if not self.save_merged and (not self.lora or self.load_in_4bit):
            raise ConfigError("save_merged = false keeps each round's LoRA adapter instead of the merged model: it "
                              "needs lora and full-precision weights (not load_in_4bit)", fields=("save_merged",))
        if self.lora and (self.lora_r < 1 or self.lora_alpha <= 0):
            raise ConfigError(f"lora_r must be >= 1 and lora_alpha > 0, got r={self.lora_r}, alpha={self.lora_alpha}")
        if self.save_steps < 1:
            raise ConfigError(f"save_steps must be >= 1, got {self.save_steps}")
        check_range(self, "num_train_epochs", 0, low_open=True)
        check_range(self, "max_grad_norm", 0, what=" (0 disables clipping)")
        check_range(self, "lora_dropout", 0, 1, high_open=True)
        check_scheduler(self.lr_scheduler_type)


#: transformers' learning-rate schedules (``SchedulerType``) as of 4.57/5.x; another name is looked up in the
#: installed transformers before it is refused.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
              "warmup_stable_decay", "greedy")


def check_scheduler(name: str) -> None:
    """``lr_scheduler_type`` names a transformers schedule (checked before any work, not at the first step)."""
    if name in SCHEDULERS:
        return
    try:
        from transformers.trainer_utils import SchedulerType

        known = [s.value for s in SchedulerType]
    except ImportError:  # pragma: no cover - transformers is a dependency
        known = list(SCHEDULERS)
    if name not in known:
        close = difflib.get_close_matches(str(name), known, n=1)
        raise ConfigError(f"lr_scheduler_type: unknown schedule {name!r}" + (
            f"; did you mean {close[0]!r}?" if close else f"; choose one of {', '.join(known)}"),
            fields=("lr_scheduler_type",))


@config_dataclass
class PrefsConfig:
    """Settings of preference data: convert a file, or synthesise a safety set from the model itself."""

    ALIASES: ClassVar[dict[str, str]] = {"identify_max_prompts": "identify.max_prompts"}
    """Old keys (and flags): ``identify_max_prompts`` is ``identify.max_prompts``."""

    source: str | None = None
    """Preference file or ``hf:<name>[:<config>][@<split>]`` to convert; None = synthesise from the model."""
    format: Literal["auto", "plain", "pku", "hh"] = "auto"
    """Input format: ``auto``, ``plain`` (prompt/chosen/rejected), ``pku`` (PKU-SafeRLHF) or ``hh`` (HH-RLHF)."""
    prefer: Literal["safer", "better"] = "safer"
    """PKU-SafeRLHF records: the ``safer`` or the ``better`` response is chosen."""
    split: str = "train"
    """Dataset split for ``hf:`` sources that name none (``@<split>``)."""
    model: str | None = None
    """Model that synthesises the pairs: hub id, local directory or None for the embedded default."""
    harmful: str | None = None
    """Harmful prompts (chosen = refusal, rejected = compliance): a set name (strongreject, advbench, harmbench,
    jailbreakbench), file, ``hf:<name>[:<config>][@<split>]`` or built-in."""
    harmless: str | None = None
    """Harmless prompts (chosen = helpful answer, rejected = needless refusal): file, ``hf:<name>`` or built-in."""
    allow_fallback: bool = False
    """A named set that cannot be loaded is an error; true = the built-in prompts instead, with a warning, recorded in
    the manifest's prompt source (also for the stage's own identification, ``identify``)."""
    n_harmful: int = 64
    """Harmful prompts to use (seeded sample)."""
    n_harmless: int = 32
    """Harmless prompts to use (seeded sample)."""
    mask: str | None = None
    """Safety-neuron mask for the pruning attack that produces the compliances; None = identify on the model."""
    neuron_set: NeuronSet = "union"
    """Set of the mask file (or of the identification) to prune: es, sas or union."""
    rejected: Literal["pruned", "intact"] = "pruned"
    """Where a harmful pair's rejected answer comes from first: ``pruned`` (the model's compliance with its safety
    neurons pruned, today's), or ``intact`` (the intact model's own compliance); the other is the fallback."""
    identify: IdentifyConfig = field(default_factory=lambda: IdentifyConfig(max_prompts=128))
    """Identification settings when no mask is given (128 prompts per class by default) (prompts, ``max_prompts``, pooling ``position``, ``tau_es``, ``tau_sas``,
    ``top_frac``, ...: an :class:`IdentifyConfig`; TOML ``[prefs.identify]``, flags ``--identify.<field>``). Its
    model, seed, dtype and device are this stage's."""
    max_new_tokens: int = 96
    """Generated tokens per response."""
    batch_size: int = 8
    """Prompts per generation batch."""
    max_length: int = 512
    """Prompt tokens kept for generation (longer prompts are truncated from the left)."""
    limit: int | None = None
    """Convert at most this many pairs (seeded sample)."""
    quick: bool = False
    """Small profile for a fast run (``[prefs]`` of ``configs/quick.toml``, for fields left at their defaults)."""
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False

    def resolved(self) -> "PrefsConfig":
        """A copy with the ``quick`` profile (``[prefs]`` of ``configs/quick.toml``) applied to the fields still at
        their defaults."""
        return apply_profile(self, QUICK.get("prefs", {})) if self.quick else dataclasses.replace(self)

    def validate(self) -> None:
        check_choices(self)
        if self.allow_fallback:  # the stage's own identification loads prompts too
            self.identify.allow_fallback = True
        self.identify.validate()
        if self.n_harmful < 1 or self.n_harmless < 0:
            raise ConfigError(f"n_harmful must be >= 1 and n_harmless >= 0, got {self.n_harmful}, {self.n_harmless}")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.max_length < 1:
            raise ConfigError("max_new_tokens, batch_size and max_length must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")


__all__ += ["AlignConfig", "PrefsConfig", "ALIGN_MODES"]


# --------------------------------------------------------------------------- attacks and evaluation (issue 5)
#: Fractions of all MLP neurons pruned in the robustness sweep, the fine grid (0 %, 0.1 %, ..., 5 %).
SWEEP_FRACTIONS = [0.0, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05]
#: The default sweep of ``safeneuron evaluate``: the informative range of the fine grid, 0 to 2 % (at 5 %
#: every model is jailbroken; each point is one generation pass over the sweep prompts; 0 reuses the plain
#: answers).
DEFAULT_SWEEP = [0.0, 0.001, 0.0025, 0.005, 0.01, 0.02]
#: Jailbreak templates run by default: one of each kind (an instruction to comply, a ban on
#: refusing, a persona, a split request); ``--templates all`` runs all ten.
DEFAULT_TEMPLATES = ["prefix_injection", "refusal_suppression", "role_play", "payload_splitting"]
NEURON_SETS = ("es", "sas", "union")


#: The attacks beyond one-shot pruning (``safeneuron attack --kind``, ``[evaluate.attacks] kinds``).
ATTACK_KINDS = ("transfer", "whitebox", "best_neuron", "probe", "direction", "prefill", "finetune")
AttackKind = Literal["prune", "transfer", "whitebox", "best_neuron", "probe", "direction", "prefill", "finetune"]


@config_dataclass
class AttackSuiteConfig:
    """Settings of the attacks a red-teamer tries beyond one-shot pruning, each measured as ASR against its budget
    with the utility it costs (KL of the next-token distribution on harmless prompts against the unattacked model,
    and perplexity on harmless text). TOML ``[attack.attacks]`` / ``[evaluate.attacks]``, flags ``--attacks.<field>``.

    Kinds: ``transfer`` (the base model's sets pruned on this model: NeuroStrike's setting), ``whitebox`` (the
    defender's frozen set from the aligned model's align artifacts, alone and with the re-identified set),
    ``best_neuron`` (the neuron whose zeroing most lowers the refusal score on attacker prompts), ``probe`` (a 2-layer
    MLP probe per layer, neurons by input-gradient attribution), ``direction`` (refusal-direction ablation, rank 1..k),
    ``prefill`` (the answer begins with a compliant opening; judged on the continuation) and ``finetune`` (LoRA SFT on
    k harmful prompt/answer pairs).
    """

    kinds: list[str] = field(default_factory=list)
    """Attacks ``evaluate`` runs on every model (``results.json`` ``attacks``); empty = none (``all`` = every kind)."""
    utility_prompts: int = 16
    """Harmless prompts (the attacker's) for each condition's utility cost: KL and perplexity; 0 = not measured."""
    transfer_mask: str | None = None
    """``transfer``: the source model's sets (mask file or identify directory). In ``evaluate``, None = the first
    evaluated model's attacker identification (the base model, in the main job)."""
    whitebox_mask: str | None = None
    """``whitebox``: the defender's frozen set (a ``frozen.safetensors``); None = read from the aligned model's align
    artifacts (``round_<r>/frozen.safetensors`` of the round its model directory is)."""
    best_neuron_candidates: int = 32
    """``best_neuron``: neurons tried one at a time (the top ones by the attacker's ``t`` score)."""
    best_neuron_counts: list[int] = field(default_factory=lambda: [1])
    """``best_neuron``: how many of the best-ranked neurons are pruned together (the budget)."""
    probe_hidden: int = 64
    """``probe``: hidden width of each layer's 2-layer MLP probe."""
    probe_epochs: int = 300
    """``probe``: full-batch Adam epochs per probe."""
    probe_z: float = 3.0
    """``probe``: neurons whose mean input-gradient attribution has a within-layer z-score above this are pruned."""
    direction_ranks: list[int] = field(default_factory=lambda: [1, 2, 4])
    """``direction``: dimensions of the ablated refusal subspace (the budget): the best candidates, orthonormalised."""
    direction_positions: int = 5
    """``direction``: post-instruction positions (the prompt's last tokens) a direction may be taken at."""
    direction_candidates: int = 16
    """``direction``: (layer, position) candidates scored by ablation (the most separating ones)."""
    direction_kl_budget: float = 0.1
    """``direction``: a candidate whose ablation moves the harmless next-token distribution by more KL (nats) is not
    chosen."""
    direction_max_layer: float = 0.8
    """``direction``: candidates come from layers below this fraction of the depth (refusal_direction's filter)."""
    direction_selection_share: float = 0.25
    """``direction``: share of the attacker's prompts kept out of the extraction to choose the candidate on."""
    prefill_openings: list[str] | None = None
    """``prefill``: answer openings tried in turn (None = the built-in ones, written for this project)."""
    prefill_attempts: list[int] = field(default_factory=lambda: [1, 2, 4])
    """``prefill``: the budget: a prompt counts as jailbroken when one of the first n openings works."""
    finetune_examples: list[int] = field(default_factory=lambda: [10, 50, 100])
    """``finetune``: harmful prompt/answer pairs trained on (the budget); capped by the pairs available (reported)."""
    finetune_epochs: int = 3
    """``finetune``: epochs of LoRA SFT; the ASR is measured after each."""
    finetune_answers: str | None = None
    """``finetune``: a file of prompt/answer pairs (JSONL/CSV, ``prompt``/``answer`` or ``response`` columns); None =
    self-generated: the model's own answers judged compliant with the attacker's union pruned."""
    finetune_prompts: str | None = None
    """``finetune``: harmful prompts the self-generated answers are asked for (file, set name); None = the attacker's
    identification prompts. Evaluation prompts are always left out."""
    finetune_lora_r: int = 8
    """``finetune``: LoRA rank (alpha = 2 r, all linear layers)."""
    finetune_learning_rate: float = 2e-4
    """``finetune``: learning rate (constant after a 10 % warmup)."""
    finetune_batch_size: int = 2
    """``finetune``: pairs per optimizer step."""
    finetune_max_length: int = 256
    """``finetune``: tokens per training sequence."""
    finetune_answer_tokens: int = 96
    """``finetune``: tokens generated per self-generated answer."""

    def validate(self) -> None:
        check_lists(self)
        if [str(k).lower() for k in self.kinds] == ["all"]:
            self.kinds = list(ATTACK_KINDS)
        if [str(k).lower() for k in self.kinds] == ["none"]:
            self.kinds = []
        for name in ("best_neuron_counts", "direction_ranks", "prefill_attempts", "finetune_examples"):
            values = getattr(self, name)  # CLI lists arrive as strings
            if isinstance(values, list):
                try:
                    setattr(self, name, [int(v) if isinstance(v, str) else v for v in values])
                except ValueError:
                    raise ConfigError(f"attacks.{name} takes whole numbers >= 1, got {values!r}", fields=(name,)) \
                        from None
        check_choices(self)
        unknown = [k for k in self.kinds if k not in ATTACK_KINDS]
        if unknown:
            raise ConfigError(f"attacks.kinds: unknown attack {unknown[0]!r}; choose from {', '.join(ATTACK_KINDS)}",
                              fields=("kinds",))
        positive = {"best_neuron_candidates": [self.best_neuron_candidates], "best_neuron_counts": self.best_neuron_counts,
                    "probe_hidden": [self.probe_hidden], "probe_epochs": [self.probe_epochs],
                    "direction_ranks": self.direction_ranks, "direction_positions": [self.direction_positions],
                    "direction_candidates": [self.direction_candidates], "prefill_attempts": self.prefill_attempts,
                    "finetune_examples": self.finetune_examples, "finetune_epochs": [self.finetune_epochs],
                    "finetune_lora_r": [self.finetune_lora_r], "finetune_batch_size": [self.finetune_batch_size],
                    "finetune_max_length": [self.finetune_max_length],
                    "finetune_answer_tokens": [self.finetune_answer_tokens]}
        for name, values in positive.items():
            try:
                ok = bool(values) and all(int(v) == v and v >= 1 for v in values)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ConfigError(f"attacks.{name} takes whole numbers >= 1, got {getattr(self, name)!r}",
                                  fields=(name,))
        if self.utility_prompts < 0:
            raise ConfigError(f"attacks.utility_prompts must be >= 0, got {self.utility_prompts}")
        for name in ("direction_kl_budget", "finetune_learning_rate", "probe_z"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"attacks.{name} must be a finite number > 0, got {value!r}", fields=(name,))
        for name in ("direction_max_layer", "direction_selection_share"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ConfigError(f"attacks.{name} is a fraction in (0, 1), got {value!r}", fields=(name,))
        if self.prefill_openings is not None and not all(isinstance(o, str) and o.strip()
                                                         for o in self.prefill_openings):
            raise ConfigError("attacks.prefill_openings must be non-empty strings", fields=("prefill_openings",))


__all__ += ["AttackSuiteConfig", "ATTACK_KINDS"]


@config_dataclass
class AttackConfig:
    """Settings of the neuron-pruning attack (``safeneuron attack``).

    The attacker prunes neurons of the model under attack and measures the attack
    success rate (ASR) on harmful prompts. Which neurons: a set of an identification
    run *on the attacked model* (``neuron_set``; the adaptive attacker, default), a given
    ``mask`` file, the ``top_frac`` highest-scoring neurons, or ``random_frac``
    random neurons (the control).
    """

    ALIASES: ClassVar[dict[str, str]] = {"set": "neuron_set", "method": "identify.method",
                                         "position": "identify.position", "harmful": "identify.harmful",
                                         "harmless": "identify.harmless", "identify_prompts": "identify.max_prompts"}
    """Old keys (and flags): ``set`` is ``neuron_set``; ``method``, ``position``, ``harmful``, ``harmless`` and
    ``identify_prompts`` are the attacker's ``identify.method``, ... ``identify.max_prompts``."""

    model: str | None = None
    """Model under attack: hub id, local directory; None = the embedded default model."""
    kind: AttackKind = "prune"
    """The attack: ``prune`` (the neuron-pruning attack below) or one of the attacks of ``attacks``
    (``transfer``, ``whitebox``, ``best_neuron``, ``probe``, ``direction``, ``prefill``, ``finetune``), each measured
    against its budget with its utility cost."""
    attacks: AttackSuiteConfig = field(default_factory=AttackSuiteConfig)
    """Settings of those attacks (an :class:`AttackSuiteConfig`; TOML ``[attack.attacks]``, flags
    ``--attacks.<field>``)."""
    neuron_set: Literal["es", "sas", "union", "full"] = "union"
    """Neuron set pruned: ``es``, ``sas`` or ``union`` (the method's FULL set; ``full`` is the same)."""
    mask: str | None = None
    """Reuse this mask file (or identify output directory) instead of identifying on the attacked model."""
    random_frac: float | None = None
    """Prune this fraction of every layer's neurons at random (0.01 = 1 %): the control attack."""
    top_frac: float | None = None
    """Prune the top fraction of all neurons by ``score`` (0.01 = 1 %), ranked across layers."""
    score: str = "es"
    """Score ranked by ``top_frac`` (``es``, ``t``, ``sas``, ``shift``; ``probe_gate``/``probe_up`` for NeuroStrike)."""
    identify: IdentifyConfig = field(default_factory=lambda: IdentifyConfig(max_prompts=64))
    """The attacker's identification on the model under attack (an :class:`IdentifyConfig`: ``method`` ``stats`` or
    ``neurostrike``, pooling ``position`` and ``span``, prompts, ``max_prompts`` per class, thresholds; TOML
    ``[attack.identify]``, flags ``--identify.<field>``; its model, seed, dtype and device are this stage's).
    Defaults: the defender's identification (the same pooling and thresholds), 64 prompts per class."""
    rounds: int = 1
    """Iterative pruning: identify, prune, re-identify on the pruned model, prune the union; this many rounds."""
    eval_harmful: str | None = None
    """Harmful prompts the ASR is measured on: a set name (strongreject, advbench, harmbench, jailbreakbench), file,
    ``hf:<name>[:<config>][@<split>]`` or built-in (default); prompts used for identification are left out."""
    allow_fallback: bool = False
    """A named set that cannot be loaded (offline, no cached copy) is an error; true = the built-in prompts
    instead, with a warning, recorded in the prompts' source (also for the attacker's identification)."""
    limit: int | None = 32
    """Measure ASR on at most this many harmful prompts (seeded sample)."""
    multimodal_harmful: str | None = None
    """Vision-language models only: image+text harmful prompts for the ASR with images (a JSONL of image path + text,
    a ``builtin:`` multimodal set or a text set, typeset); None = the ASR prompts typeset as images (FigStep-style);
    empty string to skip."""
    random_control: bool = True
    """Also prune as many random neurons per layer as the attack set (the control)."""
    judge: str = "refusal"
    """The ASR judge, as ``safeneuron evaluate``'s: ``refusal`` (refusal phrases), a safety classifier (hub id or
    path, e.g. Llama-Guard-3 or a HarmBench classifier; ``guard:``/``harmbench:``/``sequence:`` names its kind) or
    ``strongreject:<chat model>`` (the StrongREJECT rubric graded by any chat model) or ``strongreject-ft:<model>``
    (StrongREJECT's fine-tuned grader, e.g. ``qylu4156/strongreject-15k-v1``), combined with the phrases."""
    judge_template: str | None = None
    """A classifier judge's prompt, a text file with ``{behavior}`` and ``{generation}`` placeholders (for a
    classifier trained on another format); None = the classifier's own (HarmBench's Llama-2 or Mistral template)."""
    max_new_tokens: int | None = None
    """Tokens generated per answer; None = 64 with the refusal-phrase judge, 256 with a classifier or StrongREJECT
    judge (they grade the whole answer: a cut-off answer is judged on what it says so far)."""
    batch_size: int = 32
    """Prompts per generation batch (on a 2-core CPU, 24-48 per batch cost 3-8x less per token than 8-16)."""
    save: str | None = None
    """Also write the pruned model (weights edited, safetensors) to this directory."""
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"

    def validate(self) -> None:
        check_choices(self)
        if self.allow_fallback:  # the attacker's identification loads prompts too
            self.identify.allow_fallback = True
        self.identify.validate()
        self.attacks.validate()
        check_judge_template(self.judge, self.judge_template)
        if self.max_new_tokens is None:
            self.max_new_tokens = judge_new_tokens(self.judge)
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
        if self.identify.max_prompts is None:
            raise ConfigError("identify.max_prompts (identify_prompts) must be set: the attacker's prompts per class")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("max_new_tokens and batch_size must be >= 1")


@config_dataclass
class EvalConfig:
    """Settings of ``safeneuron evaluate``: the measurements behind the comparison table.

    The defaults are sized for a CPU (the embedded 0.5B model in under six minutes in
    float32 on 2 cores); raise the prompt counts on a GPU. Every rate comes with its count and a 95 %
    Wilson interval; a measurement that is switched off is ``null``, never guessed.
    """

    ALIASES: ClassVar[dict[str, str]] = {"attack_method": "identify.method", "attack_position": "identify.position",
                                         "identify_harmful": "identify.harmful", "identify_harmless": "identify.harmless",
                                         "identify_prompts": "identify.max_prompts"}
    """Old keys (and flags) of the attacker's identification: ``attack_method`` is ``identify.method``,
    ``attack_position`` ``identify.position``, ``identify_prompts`` ``identify.max_prompts``, ..."""

    harmful: str | None = None
    """Harmful prompts for ASR: a set name (strongreject, advbench, harmbench, jailbreakbench), file,
    ``hf:<name>[:<config>][@<split>]`` or built-in (default). A named set that cannot be loaded is an error (see
    ``allow_fallback``). Prompts used by the attacker's identification are left out."""
    harmless: str | None = None
    """Harmless prompts for over-refusal: file, ``hf:<name>[:<config>][@<split>]`` or built-in (default)."""
    xstest: str | None = "builtin:xstest_like"
    """Safe prompts that look dangerous for over-refusal: ``builtin:xstest_like`` (written for this project),
    ``xstest`` (XSTest's 250 safe prompts from the hub), an XSTest CSV/JSON copy or ``hf:`` dataset (only the rows
    labelled safe are kept: its unsafe contrast prompts are meant to be refused), or any prompt file; empty string
    to skip."""
    allow_fallback: bool = False
    """A named set (strongreject, advbench, harmbench, jailbreakbench, xstest) that cannot be loaded (offline, no
    cached copy) is an error; true = the built-in prompts instead, with a warning, recorded in the measurement's
    source (``builtin:harmful (fallback for strongreject)``); also for the attacker's identification."""
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
    mask: str | None = None
    """Prune this mask file's sets instead of identifying on each evaluated model (non-adaptive attacker)."""
    upstream: list[str] = field(default_factory=list)
    """Prompt files that identification and alignment used (the main job sets its splits' parts here): evaluation
    refuses to measure on any of their prompts (``upstream_overlap`` in results.json is always 0)."""
    identify: IdentifyConfig = field(default_factory=lambda: IdentifyConfig(max_prompts=64))
    """The attacker's identification on each evaluated model (an :class:`IdentifyConfig`, as in AttackConfig: the
    defender's pooling and thresholds, 64 prompts per class by default; TOML ``[evaluate.identify]``, flags
    ``--identify.<field>``). Its prompts never enter a measurement."""
    random_control: bool = True
    """Also prune as many random neurons per layer as the FULL set holds (the control): ``asr_random_control``."""
    attack_rounds: int = 1
    """Iterative attack: identify, prune, re-identify on the pruned model, for this many rounds (``asr_iterative``;
    1 = the one-shot attack only)."""
    attacks: AttackSuiteConfig = field(default_factory=AttackSuiteConfig)
    """The attacks beyond one-shot pruning run on every model (``attacks.kinds``; none by default) and their settings
    (an :class:`AttackSuiteConfig`; TOML ``[evaluate.attacks]``, flags ``--attacks.<field>``): ``results.json``
    ``attacks``, one curve of ASR against budget per attack, with n, intervals and utility cost."""
    sweep: list[float] | None = field(default_factory=lambda: list(DEFAULT_SWEEP))
    """Fractions of all neurons pruned (top by ``sweep_score``) for the robustness curve (default 0, 0.1, 0.25, 0.5,
    1, 2 %; config.SWEEP_FRACTIONS adds 5 %); empty list to skip."""
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
    mc_scoring: Literal["option", "letter"] = "option"
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
    lm_eval_chat_template: bool = False
    """Pass lm-eval's ``apply_chat_template`` (each request wrapped in the model's chat template, few-shot
    examples as turns); its results and per-example samples are written to ``lm_eval/<model>/``."""
    judge: str = "refusal"
    """The ASR judge: ``refusal`` (refusal phrases); a safety classifier by hub id or path (Llama-Guard, the
    HarmBench classifiers ``cais/HarmBench-Llama-2-13b-cls`` / ``cais/HarmBench-Mistral-7b-val-cls``, each fed its
    own prompt format; ``guard:``/``harmbench:``/``sequence:`` names the kind); or ``strongreject:<chat model>``
    (StrongREJECT's rubric graded by any chat model, hub id or path); or ``strongreject-ft:<model>`` (StrongREJECT's
    fine-tuned grader, the adapter ``qylu4156/strongreject-15k-v1`` or a merged copy, read off its grade-token
    probabilities). Combined with the refusal phrases."""
    judge_template: str | None = None
    """A classifier judge's prompt, a text file with ``{behavior}`` and ``{generation}`` placeholders (for a
    classifier trained on another format); None = the classifier's own (HarmBench's Llama-2 or Mistral template)."""
    max_new_tokens: int | None = None
    """Tokens generated per answer; None = 64 with the refusal-phrase judge (enough to see whether an answer has
    content of its own beyond an echo or a forced opening), 256 with a classifier or StrongREJECT judge (they grade
    the whole answer: a cut-off answer is judged on what it says so far; HarmBench generates 512)."""
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
        check_lists(self)
        if self.sweep is not None:
            if [str(x).lower() for x in self.sweep] == ["none"]:
                self.sweep = []
            try:
                self.sweep = [float(x) for x in self.sweep]
            except (TypeError, ValueError):
                raise ConfigError(f"sweep takes fractions such as 0 0.001 0.01, got {self.sweep}",
                                  fields=("sweep",)) from None
        if self.templates is not None and [str(t).lower() for t in self.templates] == ["none"]:
            self.templates = []
        if self.templates is not None and [str(t).lower() for t in self.templates] == ["all"]:
            self.templates = None
        if self.lm_eval_tasks is not None and [str(t).lower() for t in self.lm_eval_tasks] == ["none"]:
            self.lm_eval_tasks = None
        check_choices(self)
        check_template_names(self.templates)
        check_range(self, "lm_eval_limit", 1)
        if self.allow_fallback:  # the attacker's identification loads prompts too
            self.identify.allow_fallback = True
        self.identify.validate()
        self.attacks.validate()
        check_judge_template(self.judge, self.judge_template)
        if self.max_new_tokens is None:
            self.max_new_tokens = judge_new_tokens(self.judge)
        for name in ("n_harmful", "n_harmless", "n_xstest", "n_template_prompts", "n_sweep_prompts", "n_mc", "n_ppl",
                     "n_redteam"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if self.identify.max_prompts is None:
            raise ConfigError("identify.max_prompts (identify_prompts) must be set: the attacker's prompts per class")
        if self.attack_rounds < 1:
            raise ConfigError(f"attack_rounds must be >= 1, got {self.attack_rounds}", fields=("attack_rounds",))
        for f in self.sweep or []:
            if not 0 <= f <= 1:
                raise ConfigError(f"sweep fractions must be in [0, 1] (0.01 = 1 %), got {f}")
        if self.max_new_tokens < 1 or self.redteam_max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("max_new_tokens, redteam_max_new_tokens and batch_size must be >= 1")

    def capped(self, n: int) -> int:
        """``n`` capped by ``limit``."""
        return n if self.limit is None else min(n, self.limit)


#: Tokens generated per answer when ``max_new_tokens`` is None, by judge: the refusal-phrase judge reads the start
#: of an answer; a classifier or StrongREJECT judge grades the whole of it (HarmBench generates 512 tokens).
JUDGE_NEW_TOKENS = {"refusal": 64, "classifier": 256}


def judge_new_tokens(judge: str | None) -> int:
    """The default answer length for ``judge``: :data:`JUDGE_NEW_TOKENS`."""
    refusal = judge in (None, "", "refusal", "refusal-phrases")
    return JUDGE_NEW_TOKENS["refusal" if refusal else "classifier"]


def check_judge_template(judge: str | None, template: str | None) -> None:
    """``judge_template`` is a readable text file holding ``{behavior}`` and ``{generation}``, given with a
    classifier judge."""
    if template in (None, ""):
        return
    if judge in (None, "", "refusal", "refusal-phrases") or str(judge).startswith(("strongreject:", "strongreject-ft:")):
        raise ConfigError("judge_template is the prompt of a classifier judge; set judge to a classifier (the "
                          "refusal judge reads no prompt, the StrongREJECT grader uses its rubric)",
                          fields=("judge_template", "judge"))
    path = Path(template)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        why = "not found" if isinstance(err, FileNotFoundError) else (
            "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else (err.strerror or type(err).__name__))
        raise ConfigError(f"judge_template {template}: {why}", fields=("judge_template",)) from None
    missing = [p for p in ("{behavior}", "{generation}") if p not in text]
    if missing:
        raise ConfigError(f"judge_template {template}: no {' and no '.join(missing)} placeholder (the classifier's "
                          "prompt holds the request as {behavior} and the answer as {generation})",
                          fields=("judge_template",))


#: The built-in jailbreak templates (read by name here, so a misspelt name fails before any work).
TEMPLATES_FILE = Path(__file__).parent / "data" / "builtin" / "jailbreak_templates.json"


def check_template_names(names: list[str] | None) -> None:
    """Every name in ``templates`` is a built-in jailbreak template (None = all of them)."""
    if not names:
        return
    import json

    known = [k for k in json.loads(TEMPLATES_FILE.read_text(encoding="utf-8")) if not k.startswith("_")]
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            raise ConfigError(f"templates: unknown jailbreak template {name!r}" + (
                f"; did you mean {close[0]!r}?" if close else "") + f" (templates: {', '.join(known)})",
                fields=("templates",))


__all__ += ["AttackConfig", "EvalConfig", "SWEEP_FRACTIONS", "DEFAULT_SWEEP", "DEFAULT_TEMPLATES", "NEURON_SETS",
            "JUDGE_NEW_TOKENS", "judge_new_tokens", "check_judge_template"]


# --------------------------------------------------------------------------- analysis (issue 6)
@config_dataclass
class AnalyzeConfig:
    """Settings of the analysis stage."""

    ALIASES: ClassVar[dict[str, str]] = {"set": "neuron_set"}
    """Old keys (and flags) accepted for a field: ``set`` is ``neuron_set``."""

    model: str | None = None
    """Base model for the separability probes: hub id or local directory; None = the identified model
    (identify.json's ``model``), else the embedded default."""
    compare: list[str] = field(default_factory=list)
    """Further models to probe, e.g. aligned ones: ``name=path`` or a path (named after its directory)."""
    identify: list[str] = field(default_factory=list)
    """Identification directories (``name=dir`` or a dir). The first gives the safety neurons for the
    probes and the per-category sets; all of them enter the layer-distribution heatmap."""
    neuron_set: NeuronSet = "union"
    """Which safety-neuron set to analyse: ``union``, ``es`` or ``sas``."""
    separability: bool = True
    """Run the probes (needs the models); off = only the analyses of identification artifacts."""
    harmful: str | None = None
    """Harmful prompts for the probes (default: the identification's source, else built-in)."""
    harmless: str | None = None
    """Harmless prompts for the probes (default: the identification's source, else built-in)."""
    prompt_column: str | None = None
    allow_fallback: bool = False
    """A named set that cannot be loaded is an error; true = the built-in prompts instead (the identification's own
    setting is followed for its prompts)."""
    max_prompts: int = 128
    """Prompts per class for the probes (seeded sample; both classes get the same number)."""
    held_out: bool = True
    """Probe on prompts not used by the identification when enough remain."""
    position: Position | None = None
    """Token pooling for the probes: ``max``, ``last`` or ``mean``; None = the identification's."""
    test_frac: float = 0.3
    """Held-out share of the prompts for measuring probe accuracy (stratified split)."""
    n_splits: int = 3
    """Probe accuracy is the mean over this many seeded train/test splits."""
    l2: float = 1e-2
    """L2 penalty of the logistic probe (on standardised features, mean loss)."""
    probe_max_iter: int = 100
    """L-BFGS iterations per probe."""
    n_orders: int = 200
    """Random category orders for the overlap curve (all orders when there are fewer)."""
    band: list[float] = field(default_factory=lambda: [10.0, 90.0])
    """Percentiles of the overlap curve's band over category orders."""
    figures: bool = True
    """Also write PNG figures beside the JSON."""
    seed: int = 0
    batch_size: int = 16
    max_length: int = 512
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False

    def validate(self) -> None:
        check_choices(self)
        if not 0 < self.test_frac < 1:
            raise ConfigError(f"test_frac must be in (0, 1), got {self.test_frac}")
        if self.max_prompts < 4:
            raise ConfigError(f"max_prompts must be >= 4 (the probe needs train and test prompts of both classes), "
                              f"got {self.max_prompts}")
        if self.n_splits < 1 or self.n_orders < 1 or self.probe_max_iter < 1:
            raise ConfigError("n_splits, n_orders and probe_max_iter must be >= 1")
        if self.l2 < 0:
            raise ConfigError(f"l2 must be >= 0, got {self.l2}")
        if len(self.band) != 2 or not 0 <= float(self.band[0]) < float(self.band[1]) <= 100:
            raise ConfigError(f"band must be two percentiles 0 <= low < high <= 100, got {self.band}")
        if self.batch_size < 1 or self.max_length < 1:
            raise ConfigError("batch_size and max_length must be >= 1")


__all__ += ["AnalyzeConfig"]


# --------------------------------------------------------------------------- the main job (issue 6)
#: The packaged run configs: the main job's (every option, documented) and its quick profile.
CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.toml"
QUICK_CONFIG = CONFIG_DIR / "quick.toml"
LONG_CONFIG = CONFIG_DIR / "long.toml"
STAGES = ("identify", "prefs", "align", "evaluate", "analyze", "report")

#: The main job's budget for this 2-core CPU and the embedded 0.5B model (the values
#: of configs/default.toml; dataclass defaults elsewhere): LoRA (about 2.6x faster per step
#: than full fine-tuning on this CPU, same freezing guarantees), two rounds for both modes
#: (same pairs, same schedule), and evaluation sizes whose 95 % intervals can separate a
#: 30-point difference in ASR. Evaluation, which only generates, runs in ``fast`` dtype
#: (bfloat16 where the CPU computes it natively: 2.4x faster generation here, and the
#: embedded model's own checkpoint dtype); identification and training stay float32.
MAIN_JOB: dict[str, dict[str, Any]] = {
    "identify": {"max_prompts": 128, "by_category": True, "verify": True, "verify_dtype": "fast"},
    "prefs": {"n_harmful": 48, "n_harmless": 16, "max_new_tokens": 56, "batch_size": 24},
    "align": {"rounds": 2, "lora": True, "learning_rate": 1e-4, "num_train_epochs": 1.0, "max_pairs": 32,
              "max_length": 192, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
              "identify": {"max_prompts": 64}},
    "evaluate": {
        "n_harmful": 48, "n_harmless": 24, "n_xstest": 24,
        "templates": ["prefix_injection", "refusal_suppression", "role_play"], "n_template_prompts": 16,
        "sweep": [0.0, 0.001, 0.0025, 0.005, 0.01, 0.02], "n_sweep_prompts": 16, "n_mc": 60, "mc_scoring": "option",
        "n_ppl": 16, "n_redteam": 8, "redteam_max_new_tokens": 64, "dtype": "fast",  # max_new_tokens: the judge's
        "identify": {"max_prompts": 48},
        # the cheap attacks of the attack profile, one budget point each (--long: every kind, every budget)
        "attacks": {"kinds": ["transfer", "whitebox", "direction", "prefill", "finetune"], "direction_ranks": [1],
                    "prefill_attempts": [1], "finetune_examples": [10], "finetune_epochs": 1},
    },
    "analyze": {"max_prompts": 48, "n_splits": 2, "n_orders": 100},
}

#: What ``--quick`` sets on top of the config file, per stage section (``configs/quick.toml``): fewer prompts,
#: pairs and steps and LoRA (same model), sized so the whole job takes <= 8 minutes on a 2-core CPU. Its
#: numbers are a first look (wide intervals), labelled as quick in the report. ``align --quick`` and
#: ``prefs --quick`` apply their section to the fields left at their defaults.
QUICK: dict[str, dict[str, Any]] = load_config_file(QUICK_CONFIG)

#: What ``--long`` sets on top of the config file (``configs/long.toml``): every attack of the attack profile at
#: every budget, a 5-round iterative attack and a larger evaluation.
LONG: dict[str, dict[str, Any]] = load_config_file(LONG_CONFIG)


def stage_classes() -> dict[str, type]:
    """Stage section name -> its config dataclass."""
    return {"identify": IdentifyConfig, "prefs": PrefsConfig, "align": AlignConfig, "evaluate": EvalConfig,
            "analyze": AnalyzeConfig}


@config_dataclass
class RunConfig:
    """Settings of the main job; each stage section holds that stage's config fields."""

    model: str | None = None
    """Model to align (hub id or local directory); None = the embedded default."""
    out: str = "runs/main"
    """Run directory."""
    quick: bool = False
    """Fewer prompts, pairs and steps (same model) for a first look; labelled as such in the report."""
    long: bool = False
    """The long profile (``configs/long.toml``): every attack at every budget, a 5-round iterative attack, a larger
    evaluation."""
    modes: list[AlignMode] = field(default_factory=lambda: ["safeneuron", "dpo"])
    """Alignment modes to train and compare (``safeneuron``, ``dpo``, ``sn-tune``)."""
    attacker_settings: Literal["defender", "own"] = "defender"
    """The adaptive attacker's identification settings (pooling, span, thresholds, method): ``defender`` (the
    [identify] section's, run on the model under attack: one identification for defender and attacker) or ``own``
    (the [evaluate.identify] section as given)."""
    attacker_prompts: Literal["defender", "own"] = "defender"
    """The adaptive attacker's identification prompts: ``defender`` (the defender's part of the split: same prompts,
    run on the model under attack) or ``own`` (a disjoint part of its own). Either way evaluation never sees them."""
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    identify: dict = field(default_factory=dict)
    """IdentifyConfig fields for the base model's identification."""
    prefs: dict = field(default_factory=dict)
    """PrefsConfig fields for the synthesised preference pairs."""
    align: dict = field(default_factory=dict)
    """AlignConfig fields shared by every mode."""
    evaluate: dict = field(default_factory=dict)
    """EvalConfig fields."""
    analyze: dict = field(default_factory=dict)
    """AnalyzeConfig fields."""

    def validate(self) -> None:
        check_choices(self)
        if self.quick and self.long:
            raise ConfigError("quick and long are opposite profiles; choose one", fields=("quick", "long"))
        for mode in self.modes:
            if mode not in ALIGN_MODES:
                raise ConfigError(f"modes: unknown mode {mode!r}; choose from {', '.join(ALIGN_MODES)}")
        for name in ("identify", "prefs", "align", "evaluate", "analyze"):
            try:
                self.stage_config(name)  # unknown keys and bad values fail here, before any work
            except ConfigError as err:  # named by its section: the main job has no per-field flags
                text = str(err)
                raise ConfigError(text if text.startswith("[") else f"[{name}] {text}") from None

    def stage_config(self, stage: str):
        """The stage's config: run-wide settings, then the file's section, then the quick profile."""
        cls = stage_classes()[stage]
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {k: v for k, v in (("model", self.model), ("seed", self.seed),
                                                    ("dtype", self.dtype), ("device", self.device)) if k in names}
        layers = [getattr(self, stage)] + ([QUICK.get(stage, {})] if self.quick else []) \
            + ([LONG.get(stage, {})] if self.long else [])
        for layer in layers:  # each layer's old keys go to their fields first, then nested tables merge
            for key, value in _route_aliases(cls, layer, f"[{stage}]").items():
                values[key] = {**values[key], **value} if isinstance(value, dict) and isinstance(values.get(key), dict) \
                    else value
        return from_dict(cls, values, where=f"[{stage}]")


def toml_value(value) -> str:
    """One TOML value (bool, number, string, list of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if math.isfinite(value) else ("nan" if value != value else ("inf" if value > 0 else "-inf"))
    if isinstance(value, str):
        import json

        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in value) + "]"
    raise TypeError(f"no TOML value for {type(value).__name__}")


def toml_literal(text: str):
    """``text`` read as one TOML value (``5e-6``, ``true``, ``["tensorboard"]``), else the string itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def dump_toml(data: dict[str, Any], prefix: str = "") -> str:
    """``data`` as TOML: plain keys first, then a ``[table]`` per nested dict; ``None`` values are left out (TOML
    has no null) and empty tables too."""
    lines = [f"{k} = {toml_value(v)}" for k, v in data.items() if v is not None and not isinstance(v, dict)]
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in data.items():
        if isinstance(value, dict) and value:
            name = f"{prefix}.{key}" if prefix else key
            out += f"\n[{name}]\n" + dump_toml(value, name)
    return out


#: The run-wide keys of a run config that every stage taking them inherits.
RUN_WIDE = ("model", "seed", "dtype", "device")


def merge_run_settings(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` layered on ``base`` (run-config dicts): stage sections and their nested tables merged key by key,
    each section's old keys routed to their fields first (so ``identify_prompts`` over ``[evaluate.identify]
    max_prompts`` replaces it)."""
    def merge(a, b):
        out = dict(a)
        for key, value in b.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    classes = stage_classes()
    routed = {}
    for data in (base, over):
        routed[id(data)] = {k: _route_aliases(classes[k], v, f"[{k}]") if k in classes and isinstance(v, dict) else v
                            for k, v in (data or {}).items()}
    return merge(routed[id(base)], routed[id(over)])


def read_run_settings(path: str | Path | None = None) -> dict[str, Any]:
    """The run settings of a TOML/YAML file layered over the packaged main job (``configs/default.toml``): a key
    the file leaves out keeps the main job's value, a table the file gives is merged key by key
    (:func:`merge_run_settings`), a list replaces the main job's list. No file: the main job itself."""
    data = load_config_file(DEFAULT_CONFIG)
    if path is None or Path(path).resolve() == DEFAULT_CONFIG.resolve():
        return data
    user = load_config_file(path)
    if not isinstance(user, dict):
        raise ConfigError(f"{path}: expected a table of settings at the top, got {type(user).__name__}")
    for name in stage_classes():
        if name in user and not isinstance(user[name], dict):
            raise ConfigError(f"{path}: [{name}] must be a table of settings, got {type(user[name]).__name__}")
    return merge_run_settings(data, user)


def load_run_config(path: str | Path | None = None, **overrides: Any) -> RunConfig:
    """The main job's settings: a TOML/YAML file layered over the packaged default (:func:`read_run_settings`),
    then ``overrides`` (run-wide keys, e.g. ``out`` from ``--out``)."""
    data = read_run_settings(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    if data.get("long"):  # the long profile's run-wide keys (its stage tables apply in stage_config)
        data.update({k: v for k, v in LONG.items() if not isinstance(v, dict)})
    config = from_dict(RunConfig, data, where=str(path or DEFAULT_CONFIG))
    return config


__all__ += ["RunConfig", "load_run_config", "read_run_settings", "merge_run_settings", "RUN_WIDE", "dump_toml", "toml_value", "toml_literal", "stage_classes", "STAGES", "DEFAULT_CONFIG", "QUICK_CONFIG", "MAIN_JOB",
            "QUICK", "LONG", "LONG_CONFIG"]
