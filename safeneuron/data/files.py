"""Reading record files: the one CSV/TSV/JSON/JSONL/TXT reader, with errors that name the problem.

Prompt files, preference files, image+text prompt files and multiple-choice files
all go through :func:`read_records`; each caller says what the file is (for the
messages) and which error class to raise.

JSONL is split on ``\\n`` only: a JSON string may hold U+2028 or other characters
that :meth:`str.splitlines` would treat as line breaks. CSV cells keep their quoted
newlines.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from safeneuron.artifacts import jsonl_lines
from safeneuron.errors import SafeneuronError

__all__ = ["read_records", "RECORD_SUFFIXES"]

#: File types :func:`read_records` reads.
RECORD_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".txt")


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
