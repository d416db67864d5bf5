"""Preference data: load standard formats, mix safety with general pairs (no model code).

A pair is a dict with ``prompt`` (a string: one user turn, or a list of chat
messages), ``chosen`` and ``rejected`` (the assistant's text, or a list of
messages), plus any provenance fields. :class:`PreferenceSet` holds pairs and turns
them into the records TRL's ``DPOTrainer`` reads (:meth:`PreferenceSet.to_trl`).

Formats read by :func:`load_preferences` (JSONL, JSON, CSV/TSV or ``hf:<name>[:<config>][@<split>]``):

* ``plain``: ``prompt`` / ``chosen`` / ``rejected`` columns, strings or chat messages
  (TRL's explicit and implicit-prompt formats; UltraFeedback-binarized rows included);
* ``pku``: PKU-SafeRLHF rows, ``prompt``, ``response_0``, ``response_1`` and
  ``safer_response_id`` (or ``better_response_id`` with ``prefer="better"``);
* ``hh``: HH-RLHF rows, ``chosen`` / ``rejected`` transcripts written as
  ``\\n\\nHuman: ...\\n\\nAssistant: ...``.

Synthesising an on-policy safety set from the model itself is the ``prefs`` stage
(:func:`safeneuron.stages.prefs.synthesize_preferences`).
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from safeneuron.artifacts import read_json, sha256_text, write_jsonl
from safeneuron.data.files import read_hf_records, read_records
from safeneuron.data.prompts import PLAIN_FORMAT, builtin_path
from safeneuron.errors import SafeneuronError

logger = logging.getLogger(__name__)

__all__ = [
    "PreferenceSet",
    "PreferenceDataError",
    "load_preferences",
    "mix_preferences",
    "refusal_templates",
    "as_text",
    "manifest_path",
    "read_manifest",
]

FORMATS = ("auto", "plain", "pku", "hh")
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


class PreferenceDataError(SafeneuronError):
    """A preference file or dataset cannot be used (missing, no chosen/rejected, all pairs dropped, ...)."""


# --------------------------------------------------------------------------- the set
@dataclass
class PreferenceSet:
    """Preference pairs and where they came from.

    Attributes:
        pairs: dicts with ``prompt``, ``chosen``, ``rejected`` and optional provenance.
        source: file path, ``hf:<name>`` or ``synthesized:<model>``.
    """

    pairs: list[dict[str, Any]]
    source: str = ""

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def sha256(self) -> str:
        """Hash of the prompt/chosen/rejected triples, in order (provenance excluded)."""
        return sha256_text(*(json.dumps([p["prompt"], p["chosen"], p["rejected"]], sort_keys=True)
                             for p in self.pairs))

    def limit(self, n: int | None, seed: int = 0) -> "PreferenceSet":
        """At most ``n`` pairs, a seeded random sample keeping the order."""
        if n is None or n >= len(self):
            return self
        idx = sorted(random.Random(seed).sample(range(len(self)), n))
        return PreferenceSet([self.pairs[i] for i in idx], f"{self.source}[{n}]")

    def write_jsonl(self, path: str | Path) -> Path:
        """Write one pair per line, atomically."""
        path = Path(path)
        write_jsonl(path, self.pairs)  # U+2028 and the like escaped: one pair a line for any reader
        return path

    def to_trl(self, tokenizer=None):
        """A ``datasets.Dataset`` of TRL preference records.

        Conversational (``[{"role": ..., "content": ...}]``) when the tokenizer has a chat
        template, so TRL renders them with it; otherwise plain text in
        :data:`~safeneuron.data.prompts.PLAIN_FORMAT` (a leading space on the completions).
        """
        from datasets import Dataset

        chat = tokenizer is None or bool(getattr(tokenizer, "chat_template", None))
        rows = []
        for p in self.pairs:
            if chat:
                rows.append({"prompt": _as_messages(p["prompt"], "user"),
                             "chosen": _as_messages(p["chosen"], "assistant"),
                             "rejected": _as_messages(p["rejected"], "assistant")})
            else:
                rows.append({"prompt": _as_plain_prompt(p["prompt"]),
                             "chosen": " " + as_text(p["chosen"]), "rejected": " " + as_text(p["rejected"])})
        return Dataset.from_list(rows)


def _as_messages(value, role: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": m["role"], "content": m["content"]} for m in value]


def as_text(value) -> str:
    """A completion or prompt as plain text: a string as is, chat messages' contents joined by newlines."""
    return value if isinstance(value, str) else "\n".join(m["content"] for m in value)


def _as_plain_prompt(prompt) -> str:
    if isinstance(prompt, str):
        return PLAIN_FORMAT.format(prompt=prompt)
    parts = []
    for m in prompt:
        name = {"user": "User", "assistant": "Assistant", "system": "System"}.get(m["role"], m["role"])
        parts.append(f"{name}: {m['content']}")
    return "\n".join(parts) + "\nAssistant:"


# --------------------------------------------------------------------------- reading records
def _read_records(source: str, split: str) -> list[dict]:
    if source.startswith("hf:"):  # hf:name[:config][@split], the split of the source or ``split``
        return read_hf_records(source, split=split, error=PreferenceDataError, kinds="JSONL/CSV")
    return read_records(source, error=PreferenceDataError, what="preference file", items="records",
                        suffixes=(".jsonl", ".json", ".csv", ".tsv"))


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


#: Chat roles a pair's messages may take; ShareGPT's ``human`` / ``gpt`` (and its ``from`` / ``value`` keys) are
#: read as ``user`` / ``assistant``.
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}


def _kind(value) -> str:
    """What a wrong value is, for messages: ``a number``, ``a list of strings``, ..."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        kinds = sorted({type(v).__name__ for v in value})
        return f"a list of {'/'.join(kinds)}" if kinds else "an empty list"
    return type(value).__name__


def _as_chat(value, source: str, n: int, field: str):
    """A list of message objects as ``[{"role", "content"}]`` with the roles checked (ShareGPT's ``from`` /
    ``value`` keys and ``human`` / ``gpt`` roles read as ``user`` / ``assistant``); anything else as it is."""
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        return value
    out = []
    for m in value:
        role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        if role is None or content is None:
            return value  # not chat messages: the pair's type check names it
        mapped = ROLES.get(str(role).strip().lower())
        if mapped is None:
            raise PreferenceDataError(f"{source}: record {n}: {field} has a message of role {role!r}; chat messages "
                                      "take the roles system, user and assistant (ShareGPT's human and gpt are read "
                                      "as user and assistant)")
        if not isinstance(content, str):
            raise PreferenceDataError(f"{source}: record {n}: {field} has a message whose content is {_kind(content)}; "
                                      "expected text")
        out.append({"role": mapped, "content": content})
    return out


def _check_pair_types(pair: dict, source: str, n: int) -> None:
    """``prompt`` is text or chat messages, ``chosen`` and ``rejected`` too (None and empty text are left to the
    empty-side count): a number or a list of strings would be trained on as its Python spelling."""
    for field in ("prompt", "chosen", "rejected"):
        value = pair.get(field)
        if value is None or isinstance(value, str) or (_is_messages(value) and value):
            continue
        raise PreferenceDataError(f"{source}: record {n}: {field} is {_kind(value)}; expected text or chat messages "
                                  "([{\"role\": ..., \"content\": ...}])")


def _detect(columns: Sequence[str], first: dict) -> str:
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        if "prompt" not in cols and isinstance(first.get("chosen"), str) and _HH_TURN.search(first["chosen"]):
            return "hh"
        return "plain"
    if {"response_0", "response_1"} <= cols and cols & {"safer_response_id", "better_response_id"}:
        return "pku"
    return "unknown"


def _no_columns(source: str, columns: Iterable[str]) -> PreferenceDataError:
    return PreferenceDataError(
        f"{source}: no chosen/rejected columns (found: {', '.join(columns) or 'none'}); expected prompt/chosen/rejected, "
        "PKU-SafeRLHF (prompt, response_0, response_1, safer_response_id) or HH-RLHF (chosen/rejected transcripts)"
    )


def _split_hh(transcript: str) -> list[dict[str, str]]:
    parts = _HH_TURN.split("\n\n" + transcript.lstrip("\n") if not transcript.startswith("\n\n") else transcript)
    messages = []
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    return messages


def _common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _split_conversations(chosen: list[dict], rejected: list[dict]) -> tuple[Any, Any, Any]:
    """Prompt (common prefix up to the last user turn) and the two completions."""
    n = _common_prefix(chosen, rejected)
    while n > 0 and chosen[n - 1]["role"] == "assistant":  # completions start with the assistant
        n -= 1
    prompt, c, r = chosen[:n], chosen[n:], rejected[n:]
    return _simplify_prompt(prompt), _simplify_completion(c), _simplify_completion(r)


def _simplify_prompt(messages: list[dict]):
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return messages


def _simplify_completion(messages: list[dict]):
    if len(messages) == 1 and messages[0]["role"] == "assistant":
        return messages[0]["content"]
    return messages


def _to_pair(rec: dict, fmt: str, prefer: str, source: str, n: int) -> dict | None:
    extra = {k: v for k, v in rec.items() if k in ("category", "source", "kind", "id", "image")}
    if fmt == "hh":
        if not isinstance(rec.get("chosen"), str) or not isinstance(rec.get("rejected"), str):
            return None
        prompt, chosen, rejected = _split_conversations(_split_hh(rec["chosen"]), _split_hh(rec["rejected"]))
        if not prompt:
            return None
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}
    if fmt == "pku":
        key = f"{prefer}_response_id"
        if key not in rec:
            raise PreferenceDataError(f"{source}: record {n} has no {key!r} (pass prefer='safer' or 'better')")
        try:
            pick = int(rec[key])
        except (TypeError, ValueError):
            return None
        if pick not in (0, 1):
            return None
        pair = {"prompt": rec.get("prompt"), "chosen": rec[f"response_{pick}"], "rejected": rec[f"response_{1 - pick}"]}
        for k in ("category", "harm_category"):
            if k in rec:
                pair["category"] = rec[k]
        return pair
    chosen, rejected, prompt = (_as_chat(rec.get(k), source, n, k) for k in ("chosen", "rejected", "prompt"))
    if _is_messages(chosen) and _is_messages(rejected):
        split_prompt, chosen, rejected = _split_conversations(chosen, rejected)
        if prompt is None or (isinstance(prompt, str) and split_prompt == prompt):
            prompt = split_prompt
        elif split_prompt:  # explicit prompt and completions that repeat more context
            prompt = _as_messages(prompt, "user") + (_as_messages(split_prompt, "user")
                                                      if not isinstance(split_prompt, list) else split_prompt)
    if _is_messages(prompt):
        prompt = _simplify_prompt([{"role": m["role"], "content": m["content"]} for m in prompt])
    if prompt in (None, "", []):
        return None
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def _usable(value) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return _is_messages(value) and any(str(m["content"]).strip() for m in value)


def load_preferences(
    source: str | Path,
    *,
    format: str = "auto",
    prefer: str = "safer",
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    on_identical: str = "drop",
) -> PreferenceSet:
    """Load preference pairs from a JSONL/JSON/CSV/TSV file or ``hf:<dataset>``.

    Args:
        format: ``auto`` (detected from the columns), ``plain``, ``pku`` or ``hh``.
        prefer: PKU-SafeRLHF: choose the ``safer`` or the ``better`` response.
        on_identical: pairs whose chosen equals rejected are dropped with a warning
            (``"drop"``) or rejected with an error (``"error"``).
        limit: keep at most this many pairs (seeded sample, order kept).

    Raises:
        PreferenceDataError: missing file, no chosen/rejected columns, no usable pair.
    """
    if format not in FORMATS:
        raise PreferenceDataError(f"unknown preference format {format!r}; choose one of {', '.join(FORMATS)}")
    if on_identical not in ("drop", "error"):
        raise ValueError(f"on_identical must be 'drop' or 'error', got {on_identical!r}")
    src = str(source)
    records = _read_records(src, split)
    if not records:
        raise PreferenceDataError(f"{src}: no records (empty file)")
    if not all(isinstance(r, dict) for r in records):
        raise PreferenceDataError(f"{src}: expected records (objects) with prompt/chosen/rejected fields")
    columns = list(dict.fromkeys(k for r in records for k in r))
    fmt = _detect(columns, records[0]) if format == "auto" else format
    if fmt == "unknown":
        raise _no_columns(src, columns)
    needed = {"plain": ("chosen", "rejected"), "hh": ("chosen", "rejected"), "pku": ("response_0", "response_1")}[fmt]
    if not set(needed) <= set(columns):
        raise _no_columns(src, columns)
    pairs, malformed, identical, empty = [], 0, 0, 0
    for n, rec in enumerate(records, 1):
        pair = _to_pair(rec, fmt, prefer, src, n)
        if pair is None:
            malformed += 1
            continue
        _check_pair_types(pair, src, n)
        if not (_usable(pair["chosen"]) and _usable(pair["rejected"])):
            empty += 1
            continue
        if json.dumps(pair["chosen"], sort_keys=True) == json.dumps(pair["rejected"], sort_keys=True):
            if on_identical == "error":
                raise PreferenceDataError(f"{src}: record {n} has chosen == rejected (no preference to learn)")
            identical += 1
            continue
        pairs.append(pair)
    if fmt == "plain" and "prompt" not in columns and not pairs:
        raise PreferenceDataError(f"{src}: no prompt column, and chosen/rejected are not chat messages "
                                  "sharing a prompt; add a prompt column")
    if identical or empty or malformed:
        logger.warning("%s: dropped %d pairs with chosen == rejected, %d with an empty side, %d malformed",
                       src, identical, empty, malformed)
    if not pairs:
        raise PreferenceDataError(f"{src}: no usable pair ({identical} identical, {empty} empty, {malformed} malformed)")
    return PreferenceSet(pairs, src).limit(limit, seed)


def mix_preferences(
    safety: PreferenceSet,
    general: PreferenceSet | None,
    safety_ratio: float = 0.3,
    *,
    max_pairs: int | None = None,
    seed: int = 0,
) -> PreferenceSet:
    """Mix safety and general pairs so that safety pairs are ``safety_ratio`` of the result.

    Uses as many pairs as the smaller side allows (seeded samples), capped at
    ``max_pairs``; the result is shuffled with the seed. Each pair gets a ``mix``
    field (``safety`` or ``general``).
    """
    if general is None or len(general) == 0 or safety_ratio >= 1:
        out = [dict(p, mix="safety") for p in safety.pairs]
        return PreferenceSet(out, safety.source).limit(max_pairs, seed)
    n_s, n_g = len(safety), len(general)
    total = min(n_s / safety_ratio, n_g / (1 - safety_ratio))
    if max_pairs is not None:
        total = min(total, max_pairs)
    k_s = max(1, round(total * safety_ratio))
    k_g = max(1, round(total * (1 - safety_ratio)))
    k_s, k_g = min(k_s, n_s), min(k_g, n_g)
    rng = random.Random(seed)
    s_idx = sorted(rng.sample(range(n_s), k_s))
    g_idx = sorted(rng.sample(range(n_g), k_g))
    pairs = [dict(safety.pairs[i], mix="safety") for i in s_idx] + [dict(general.pairs[i], mix="general") for i in g_idx]
    rng.shuffle(pairs)
    return PreferenceSet(pairs, f"mix({safety.source}:{k_s}, {general.source}:{k_g})")


# --------------------------------------------------------------------------- synthesis
def refusal_templates() -> list[str]:
    """The built-in refusal templates (written for this project)."""
    return list(json.loads(builtin_path("refusal_templates.json").read_text(encoding="utf-8")))


def manifest_path(out: str | Path) -> Path:
    """Where the manifest of a preference JSONL lives: ``<stem>.manifest.json`` beside it."""
    out = Path(out)
    return out.parent / f"{out.stem}.manifest.json"


def read_manifest(out: str | Path) -> dict:
    return read_json(manifest_path(out))
