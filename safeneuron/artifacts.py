"""Artifacts on disk: atomic writes, content hashes and stage manifests.

Every file a stage writes goes to a temporary name in the same directory and is
renamed into place, so a killed process never leaves a half-written artifact that
looks complete.
"""

from __future__ import annotations

from safeneuron.errors import SafeneuronError

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = [
    "atomic_path",
    "atomic_dir",
    "versions",
    "timestamp",
    "write_json",
    "read_json",
    "write_text",
    "save_tensors",
    "load_tensors",
    "sha256_file",
    "sha256_text",
    "source_digest",
    "safe_file_names",
    "jsonl_line",
    "jsonl_lines",
    "write_jsonl",
    "read_jsonl",
    "check_out_dir",
    "stage_lock",
    "LockError",
    "ArtifactError",
    "StageDir",
]


_UMASK = os.umask(0)
os.umask(_UMASK)


class ArtifactError(SafeneuronError):
    """An artifact is missing, unreadable or does not fit what it is used for."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; artifacts get the usual mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` whole
    (a model directory is either the old one or the complete new one, never half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def versions() -> dict[str, str]:
    """Versions of safeneuron and the libraries its results depend on (for manifests); read from
    the installed distributions, so nothing is imported."""
    from importlib import metadata

    from safeneuron import __version__

    out = {"safeneuron": __version__}
    for dist in ("torch", "transformers", "trl", "peft"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # pragma: no cover - all are dependencies
            out[dist] = "not installed"
    return out


def timestamp() -> str:
    """Local time as ISO 8601 with offset, as every manifest's ``created`` holds it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON artifact, with a clear error when it is missing or corrupt."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: not valid JSON ({err})") from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically (contiguous CPU copies)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file (never pickle), with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path}: not a safetensors file ({err})") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(*parts: str) -> str:
    """Hex sha256 of text parts joined by newlines."""
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()


def source_digest(source: str | os.PathLike | None) -> str | None:
    """A data setting by what it names, for run keys: an existing file as ``sha256:<hex of its bytes>`` (however
    its path is spelt), anything else (``builtin:``, ``hf:``, a set name) as it is; None stays None."""
    if source is None:
        return None
    try:
        if Path(str(source)).is_file():
            return "sha256:" + sha256_file(source)
    except OSError:
        pass
    return str(source)


def safe_file_names(names: Iterable[str], max_len: int = 64) -> dict[str, str]:
    """A unique, safe file stem per name (a harm category, a model name): a name that is already short and made of
    letters, digits, ``-``, ``_`` and ``.`` is kept; any other is cleaned (other characters become ``_``), cut to
    ``max_len`` characters and given 8 hex digits of its sha256, so ``a b``, ``a_b``, ``a/b`` and ``a?b`` get four
    files, and no two names differ only by letter case (case-insensitive file systems)."""
    import re

    out: dict[str, str] = {}
    taken: set[str] = set()
    names = list(dict.fromkeys(str(n) for n in names))
    plain = [n for n in names if re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", n) and len(n) <= max_len]
    for name in plain + [n for n in names if n not in plain]:
        stem = name
        if name not in plain or stem.lower() in taken:
            cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:max_len] or "x"
            stem = f"{cleaned}-{hashlib.sha256(name.encode('utf-8')).hexdigest()[:8]}"
        out[name] = stem
        taken.add(stem.lower())
    return {n: out[n] for n in names}


# --------------------------------------------------------------------------- JSONL
#: Characters ``json.dumps(ensure_ascii=False)`` leaves raw that :meth:`str.splitlines` (and so many readers) treats
#: as line breaks; written escaped, so every reader sees one record a line.
_LINE_BREAKS = {0x2028: "\\u2028", 0x2029: "\\u2029", 0x85: "\\u0085"}  # json escapes the controls < 0x20


def jsonl_line(record: Any) -> str:
    """One JSONL line (with its ``\\n``): non-ASCII text kept readable, every character another reader could take
    for a line break (U+2028, U+2029, NEL) escaped."""
    return json.dumps(record, ensure_ascii=False).translate(_LINE_BREAKS) + "\n"


def jsonl_lines(text: str) -> list[tuple[int, str]]:
    """The non-blank lines of JSONL text with their 1-based numbers, split on ``\\n`` only (a JSON string may hold
    U+2028 and other characters :meth:`str.splitlines` breaks at; a ``\\r\\n`` ending is dropped)."""
    return [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> None:
    """Write one record a line (:func:`jsonl_line`), atomically."""
    write_text(path, "".join(jsonl_line(r) for r in records))


def read_jsonl(path: str | os.PathLike, *, skip_bad: bool = False) -> list[Any]:
    """The records of a JSONL artifact (lines split on ``\\n`` only); a malformed line is an error naming it, or
    skipped with ``skip_bad`` (a cache whose last line a kill tore)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(f"{path}: not found") from None
    except UnicodeDecodeError as err:
        raise ArtifactError(f"{path}: not UTF-8 text ({err})") from None
    out = []
    for n, line in jsonl_lines(text):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            if not skip_bad:
                raise ArtifactError(f"{path}:{n}: malformed JSON line ({err.msg})") from None
    return out


# --------------------------------------------------------------------------- output directories
def check_out_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """``path`` can be a directory to write into: not a file, not a symlink loop, not below a file; a one-line
    error naming the problem otherwise. Returns the path (not created)."""
    path = Path(path)
    try:
        resolved = path.resolve(strict=False)
    except (RuntimeError, OSError) as err:  # RuntimeError: a symlink loop (Python < 3.13)
        raise ArtifactError(f"{path}: cannot be used as the {what} ({_reason(err)})", fields=("out",)) from None
    if path.is_symlink() and not path.exists():
        try:
            os.stat(path)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise ArtifactError(f"{path}: cannot be used as the {what} (a symlink loop)", fields=("out",)) \
                    from None
    for parent in (resolved, *resolved.parents):
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == resolved else f"is below {parent}, which is a file"
                raise ArtifactError(f"{path}: {where}; the {what} must be a directory", fields=("out",))
            break
    return path


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno == errno.ELOOP or "loop" in str(err).lower():
        return "a symlink loop"
    return getattr(err, "strerror", None) or str(err)


class LockError(SafeneuronError):
    """Another process is writing into the same stage directory."""


LOCK_FILE = ".safeneuron.lock"
_HELD: dict[str, list] = {}  # resolved directory -> [open lock file, depth]: a process may nest its own stages


@contextlib.contextmanager
def stage_lock(path: str | os.PathLike, what: str = "a run", *, main: bool = True) -> Iterator[Path]:
    """Hold ``path/.safeneuron.lock`` (an exclusive ``flock`` holding this process's PID) while a stage writes into
    ``path``: a second process asking for it fails at once with a :class:`LockError` naming the process that holds
    it. The kernel drops the lock when its process dies, so a stale file of a dead process never blocks; the file
    is removed on release. Re-entrant within a process; only the ``main`` process of a launch takes it."""
    path = check_out_dir(path)
    if not main:
        yield path
        return
    path.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield path
        finally:
            _HELD[key][1] -= 1
        return
    fh = _acquire(path / LOCK_FILE, path, what)
    _HELD[key] = [fh, 1]
    try:
        yield path
    finally:
        del _HELD[key]
        _release(fh, path / LOCK_FILE)


def _acquire(lock: Path, folder: Path, what: str):
    import fcntl

    for _ in range(10):
        fh = open(lock, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise LockError(f"{folder} is in use by process {holder} ({what} writing there); wait for it to finish "
                            "or choose another output directory", fields=("out",)) from None
        try:  # the file may have been removed by the holder we waited for: lock the one on disk
            same = os.stat(lock).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            return fh
        fh.close()
    raise LockError(f"{folder}: could not take the lock {lock.name}", fields=("out",))  # pragma: no cover


def _release(fh, lock: Path) -> None:
    import fcntl

    try:
        lock.unlink(missing_ok=True)
    finally:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


@dataclass
class StageDir:
    """A stage's output directory, kept the same way by every stage that has a run key.

    The run key hashes what produces the artifacts (settings, data, weights); the
    manifest (e.g. ``identify.json``) carries it and is written last, so its presence
    marks the stage complete; artifacts of another run key are never mixed with this
    run's: :meth:`claim` refuses them, or removes them with ``overwrite``.

    Attributes:
        path: the directory.
        manifest: the manifest's file name.
        run_key: this run's key.
        what: the kind of run, for messages ("an identification", "an alignment run").
        error: the error class raised for another run's artifacts.
        key_field: the manifest field holding the key.
        remedy: what the message tells the user to do.
        fields: the settings the remedy is about (the CLI adds their flags).
        legacy_keys: keys an earlier version gave the same run (a finished stage under one is reused).
    """

    path: Path
    manifest: str
    run_key: str
    what: str = "a run"
    error: type = ArtifactError
    key_field: str = "run_key"
    remedy: str = "overwrite it or choose another output directory"
    fields: tuple[str, ...] = ("overwrite", "out")
    legacy_keys: tuple[str, ...] = ()

    def _ours(self, key: str | None) -> bool:
        return key == self.run_key or (key is not None and key in self.legacy_keys)

    def _key_of(self, file: Path) -> str | None:
        try:
            data = read_json(file)
        except ArtifactError:
            return None
        return data.get(self.key_field) if isinstance(data, dict) else None

    def complete(self) -> bool:
        """The manifest exists and holds this run's key."""
        file = self.path / self.manifest
        return file.is_file() and self._ours(self._key_of(file))

    def foreign(self, patterns: Iterable[str] = ()) -> list[Path]:
        """The manifest (also when unreadable) and the files matching ``patterns`` (globs; unreadable ones are
        skipped) that hold another run's key."""
        manifest = self.path / self.manifest
        out = [manifest] if manifest.is_file() and not self._ours(self._key_of(manifest)) else []
        files = (f for pat in patterns for f in sorted(self.path.glob(pat)))
        return out + [f for f in files if f.is_file() and self._key_of(f) is not None and not self._ours(self._key_of(f))]

    def claim(self, overwrite: bool = False, *, patterns: Iterable[str] = (), remove: Iterable[str] = (),
              sync: Callable[[], None] = lambda: None, main: bool = True) -> None:
        """Make the directory this run's: artifacts of another run (:meth:`foreign`) are an error, or with
        ``overwrite`` the files and folders matching ``remove`` (globs; the manifest always) are deleted by
        the main process after every process called ``sync``. Creates the directory."""
        check_out_dir(self.path)
        foreign = self.foreign(patterns)
        if foreign and not overwrite:
            where = f" ({foreign[0].relative_to(self.path)})" if foreign[0].name != self.manifest else ""
            raise self.error(f"{self.path} holds {self.what} with other settings, data or weights{where}; "
                             f"{self.remedy}", fields=self.fields)
        if foreign:
            sync()  # every process has read the old run before it goes
            if main:
                for pat in (self.manifest, *remove):
                    for f in self.path.glob(pat):
                        if f.is_dir():
                            shutil.rmtree(f, ignore_errors=True)
                        else:
                            f.unlink(missing_ok=True)
            sync()
        self.path.mkdir(parents=True, exist_ok=True)

    def write_manifest(self, manifest: dict) -> None:
        """Write the manifest (with this run's key), atomically; call it last."""
        write_json(self.path / self.manifest, {**manifest, self.key_field: self.run_key})
