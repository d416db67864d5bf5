"""Reading record files: the one CSV/TSV/JSON/JSONL/TXT reader, with errors that name the problem.

Prompt files, preference files, image+text prompt files and multiple-choice files
all go through :func:`read_records`; each caller says what the file is (for the
messages) and which error class to raise. Hugging Face datasets, ``hf:name[:config][@split]``,
are parsed by :func:`parse_hf_source` and read by :func:`read_hf_records`, for prompts and
preference pairs alike.

JSONL is split on ``\\n`` only: a JSON string may hold U+2028 or other characters
that :meth:`str.splitlines` would treat as line breaks. CSV cells keep their quoted
newlines.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safeneuron.artifacts import jsonl_lines
from safeneuron.errors import SafeneuronError

__all__ = ["read_records", "RECORD_SUFFIXES", "HFSource", "parse_hf_source", "read_hf_records"]

#: File types :func:`read_records` reads.
RECORD_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".txt")


@dataclass(frozen=True)
class HFSource:
    """A Hugging Face dataset named as ``hf:name[:config][@split]``."""

    name: str
    config: str | None = None
    split: str | None = None

    def __str__(self) -> str:
        return f"hf:{self.name}" + (f":{self.config}" if self.config else "") + (f"@{self.split}" if self.split else "")


HF_FORM = "hf:<name>[:<config>][@<split>]"


def parse_hf_source(source: str, *, error: type[SafeneuronError] = SafeneuronError) -> HFSource:
    """``hf:name[:config][@split]`` -> :class:`HFSource` (the one parser of every ``hf:`` prompt and preference
    source): ``hf:walledai/HarmBench:standard@train`` is dataset ``walledai/HarmBench``, config ``standard``, split
    ``train``; config and split are None where not written. A split may hold a slice (``@train[:100]``)."""
    text = str(source).strip()
    if not text.startswith("hf:"):
        raise error(f"{text!r} is not a Hugging Face source ({HF_FORM})")
    body, at, split = text[3:].partition("@")
    name, colon, config = body.partition(":")
    name, config, split = name.strip(), config.strip(), split.strip()
    if not name or (colon and not config) or (at and not split) or any(c.isspace() for c in name):
        raise error(f"{text}: expected {HF_FORM}, e.g. hf:walledai/HarmBench:standard@train")
    return HFSource(name, config or None, split or None)


def read_hf_records(source: str | HFSource, *, split: str = "train", error: type[SafeneuronError] = SafeneuronError,
                    kinds: str | None = "CSV/JSON/JSONL") -> list[dict]:
    """The rows of a Hugging Face dataset (``hf:name[:config][@split]``; ``split`` where the source names none) as
    dicts. A dataset that cannot be loaded (offline without a cached copy, unknown, gated) is one ``error`` line
    naming it and the local ``kinds`` of file to pass instead (``kinds`` None: the reason alone, for a caller that
    words the error itself). Datasets' own loading code is never run (no ``trust_remote_code``)."""
    spec = source if isinstance(source, HFSource) else parse_hf_source(source, error=error)
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise error("loading a Hugging Face dataset needs the `datasets` package") from None
    try:
        ds = datasets.load_dataset(spec.name, spec.config, split=spec.split or split)
    except Exception as err:  # offline, unknown name, gated, no such config or split, ...
        first = (str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)[:300]
        if kinds is None:
            raise error(first) from None
        raise error(f"{spec}: cannot load the Hugging Face dataset ({first}); pass a local {kinds} file "
                    "instead") from None
    if isinstance(ds, dict) or not hasattr(ds, "__iter__"):  # pragma: no cover - split is always given
        raise error(f"{spec}: name a split ({HF_FORM})")
    return [dict(r) for r in ds]


def _text(path: Path, error: type[SafeneuronError], what: str, kinds: str) -> str:
    if not path.exists():
        raise error(f"{path}: {what} not found")
    if path.is_dir():
        raise error(f"{path}: is a directory, expected a {kinds} file")
    raw = path.read_bytes()
    if b"\x00" in raw[:4096]:
        raise error(f"{path}: binary file, expected a {kinds} {what}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text, expected a {kinds} {what}") from None


def read_records(
    path: str | Path,
    *,
    error: type[SafeneuronError] = SafeneuronError,
    what: str = "file",
    items: str = "records",
    suffixes: tuple[str, ...] = RECORD_SUFFIXES,
    fmt: str | None = None,
) -> list[Any]:
    """The records of a file, by its suffix: JSONL (one value a line), JSON (a list, or an object holding
    exactly one list), CSV/TSV (rows as dicts of strings), TXT (non-blank lines, stripped).

    Args:
        error: the error class raised (one line naming the file and the problem).
        what: what the file is, for messages (``prompt file``).
        items: what the records are, for messages (``prompts``).
        suffixes: the file types accepted.
        fmt: read as this type (a suffix such as ``.csv``) whatever the file's suffix.

    Returns:
        The records as parsed (dicts, strings or other JSON values: the caller checks them); ``[]`` for a
        file with no content.
    """
    path = Path(path)
    suffix = fmt or path.suffix.lower()
    kinds = "/".join(s.lstrip(".").upper() for s in suffixes if s not in (".tsv", ".txt"))
    text = _text(path, error, what, kinds)
    if suffix not in suffixes:
        raise error(f"{path}: unknown {what} type {suffix!r} (use {', '.join(suffixes[:-1])} or {suffixes[-1]})")
    if not text.strip():
        return []
    if suffix == ".jsonl":
        records = []
        for n, line in jsonl_lines(text):  # split on "\n" only
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise error(f"{path}:{n}: malformed JSON line ({err.msg})") from None
        return records
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise error(f"{path}: malformed JSON ({err.msg} at line {err.lineno})") from None
        if isinstance(data, dict):  # {"prompts": [...]} or {"train": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise error(f"{path}: expected a JSON list of {items} (or an object holding one list)")
            data = lists[0]
        if not isinstance(data, list):
            raise error(f"{path}: expected a JSON list of {items}")
        return data
    if suffix == ".txt":
        return [line.strip() for line in text.split("\n") if line.strip()]
    try:
        return list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ","))
    except csv.Error as err:
        raise error(f"{path}: malformed CSV ({err})") from None
