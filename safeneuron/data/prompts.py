"""Prompt sets: the built-in ones, CSV/JSON/JSONL files, Hugging Face datasets.

A :class:`PromptSet` is a list of instruction strings with an optional harm category
each. Prompts are turned into model input with :func:`render_chat`: the single user
message ``[{"role": "user", "content": prompt}]`` rendered with the tokenizer's own
chat template and the generation prompt (no system prompt of ours).
"""

from __future__ import annotations

from safeneuron.errors import SafeneuronError

import logging
import os
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import urlparse

from safeneuron.artifacts import sha256_text
from safeneuron.data.files import parse_hf_source, read_hf_records, read_records

logger = logging.getLogger(__name__)

__all__ = ["PromptSet", "PromptFileError", "load_prompts", "render_chat", "builtin_path", "match_lengths",
           "PROMPT_COLUMNS", "NamedSet", "NAMED_SETS", "HARMFUL_SETS"]

#: Column names recognised as the prompt, in order of preference (case-insensitive).
PROMPT_COLUMNS = ("prompt", "goal", "behavior", "instruction", "question", "text")
#: Column names recognised as the harm category.
CATEGORY_COLUMNS = ("category", "semanticcategory", "semantic_category", "harm_category")

BUILTIN_DIR = Path(__file__).parent / "builtin"
BUILTIN_SETS = ("harmful", "harmless", "xstest_like")


class PromptFileError(SafeneuronError):
    """A prompt file or dataset cannot be used (missing, empty, no prompt column, ...)."""


@dataclass(frozen=True)
class NamedSet:
    """A public prompt benchmark on the Hugging Face hub, given by its name wherever prompts are.

    Attributes:
        hf_id, subset, split: the dataset, its config and split.
        column: the prompt column.
        size: prompts it holds (the safe ones for XSTest).
        fallback: the built-in set used instead when it cannot be loaded and ``allow_fallback`` is set.
    """

    hf_id: str
    column: str
    split: str = "train"
    subset: str | None = None
    size: int | None = None
    fallback: str = "harmful"


#: The standard harmful sets by name (StrongREJECT's 313 prompts is the method's benchmark).
HARMFUL_SETS: dict[str, NamedSet] = {
    "strongreject": NamedSet("walledai/StrongREJECT", "prompt", size=313),
    "advbench": NamedSet("walledai/AdvBench", "prompt", size=520),
    "harmbench": NamedSet("walledai/HarmBench", "prompt", subset="standard", size=200),
    "jailbreakbench": NamedSet("JailbreakBench/JBB-Behaviors", "Goal", split="harmful", subset="behaviors", size=100),
}
#: Every named set: the harmful ones and XSTest (its 250 safe prompts, for over-refusal: see :func:`_xstest_safe`).
NAMED_SETS: dict[str, NamedSet] = {
    **HARMFUL_SETS,
    "xstest": NamedSet("walledai/XSTest", "prompt", size=250, fallback="xstest_like"),
}


def builtin_path(name: str) -> Path:
    """Path of a built-in data file (e.g. ``harmful.jsonl``, ``refusal_phrases.json``)."""
    path = BUILTIN_DIR / name
    if not path.exists():
        raise PromptFileError(f"no built-in file {name!r} in {BUILTIN_DIR}")
    return path


@dataclass
class PromptSet:
    """Instructions with optional categories.

    Attributes:
        prompts: the instruction strings.
        categories: one category (or None) per prompt.
        source: where they came from (``builtin:harmful``, a path, ``hf:<name>``).
    """

    prompts: list[str]
    categories: list[str | None] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        if not self.categories:
            self.categories = [None] * len(self.prompts)
        if len(self.categories) != len(self.prompts):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.categories)} categories")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def sha256(self) -> str:
        """Hash of the prompts and categories, in order."""
        return sha256_text(*(f"{c}\t{p}" for p, c in zip(self.prompts, self.categories)))

    def category_names(self) -> list[str]:
        """Distinct categories in first-seen order (None excluded)."""
        return list(dict.fromkeys(c for c in self.categories if c is not None))

    def subset(self, indices: Iterable[int], source: str | None = None) -> "PromptSet":
        idx = list(indices)
        return PromptSet([self.prompts[i] for i in idx], [self.categories[i] for i in idx], source or self.source)

    def limit(self, n: int | None, seed: int = 0) -> "PromptSet":
        """At most ``n`` prompts, a seeded random sample keeping the original order."""
        if n is None or n >= len(self):
            return self
        idx = sorted(random.Random(seed).sample(range(len(self)), n))
        return self.subset(idx, f"{self.source}[{n}]")

    def split(self, fraction: float = 0.5, seed: int = 0) -> tuple["PromptSet", "PromptSet"]:
        """Two disjoint random parts: the first has ``round(fraction * len)`` prompts."""
        idx = list(range(len(self)))
        random.Random(seed).shuffle(idx)
        k = round(fraction * len(idx))
        return self.subset(sorted(idx[:k])), self.subset(sorted(idx[k:]))

    def by_category(self) -> dict[str, "PromptSet"]:
        """One PromptSet per category."""
        out: dict[str, list[int]] = {}
        for i, c in enumerate(self.categories):
            if c is not None:
                out.setdefault(c, []).append(i)
        return {c: self.subset(idx, f"{self.source}:{c}") for c, idx in out.items()}


def _pick(columns: Sequence[str], wanted: Sequence[str]) -> str | None:
    lower = {c.lower().strip(): c for c in columns}
    for name in wanted:
        if name in lower:
            return lower[name]
    return None


def _xstest_safe(records: list[dict], columns: Sequence[str], source: str) -> tuple[list[dict], str | None]:
    """XSTest's rows (a ``type`` column beside a ``label`` of ``safe``/``unsafe``; the v2 CSV without ``label``:
    types ``contrast_*`` are the unsafe ones) -> only its safe prompts, and the ``type`` column (their category).
    The unsafe contrast prompts are there to be refused: counted as over-refusal prompts, refusing them would be
    scored as over-refusal. Rows of any other format are returned as they are (and None)."""
    lower = {str(c).lower().strip(): c for c in columns}
    kind, label = lower.get("type"), lower.get("label")
    if kind is None:
        return records, None
    if label is not None:
        labels = {str(r.get(label, "")).strip().lower() for r in records}
        if not labels or not labels <= {"safe", "unsafe"}:
            return records, None
        kept = [r for r in records if str(r.get(label, "")).strip().lower() == "safe"]
        how = f"{label} = safe"
    else:
        if not any(str(r.get(kind, "")).startswith("contrast_") for r in records):
            return records, None
        kept = [r for r in records if not str(r.get(kind, "")).startswith("contrast_")]
        how = f"{kind} not contrast_*"
    logger.info("%s: kept the %d safe of %d XSTest prompts (%s)", source, len(kept), len(records), how)
    if not kept:
        raise PromptFileError(f"{source}: no safe XSTest prompts ({how}: none of {len(records)} rows)")
    return kept, kind


def _from_records(records: list, source: str, column: str | None) -> PromptSet:
    if not records:
        raise PromptFileError(f"{source}: no prompts (empty file)")
    if all(isinstance(r, str) for r in records):
        return PromptSet(list(records), source=source)
    if not all(isinstance(r, dict) for r in records):
        raise PromptFileError(f"{source}: expected a list of strings or of objects with a prompt field")
    columns = list(dict.fromkeys(k for r in records for k in r))
    prompt_col = column if column is not None else _pick(columns, PROMPT_COLUMNS)
    if prompt_col is None or prompt_col not in columns:
        raise PromptFileError(
            f"{source}: no prompt column (looked for {column or '/'.join(PROMPT_COLUMNS)}; found {', '.join(columns) or 'none'}); "
            "name the column (prompt_column)", fields=("prompt_column",)
        )
    if "FunctionalCategory" in columns:  # HarmBench: only the plain behaviours are prompts on their own
        kept = [r for r in records if r.get("FunctionalCategory") in (None, "", "standard")]
        if len(kept) < len(records):
            logger.info("%s: kept %d 'standard' of %d HarmBench rows", source, len(kept), len(records))
        records = kept
    records, xstest_type = _xstest_safe(records, columns, source)
    cat_col = _pick(columns, CATEGORY_COLUMNS) or xstest_type
    prompts, categories = [], []
    for n, r in enumerate(records, 1):
        value = r.get(prompt_col)
        if value is None:
            continue
        if not isinstance(value, str):  # a list, object or number would become its Python spelling
            kind = "a number" if isinstance(value, (int, float)) else f"a {type(value).__name__}"
            raise PromptFileError(f"{source}: record {n}: {prompt_col} is {kind} ({str(value)[:40]}), expected text")
        prompts.append(value)
        cat = r.get(cat_col) if cat_col else None
        categories.append(str(cat) if cat not in (None, "") else None)
    return PromptSet(prompts, categories, source)


def _read_file(path: Path, column: str | None) -> PromptSet:
    records = read_records(path, error=PromptFileError, what="prompt file", items="prompts")
    if not records:
        raise PromptFileError(f"{path}: no prompts (empty file)")
    return _from_records(records, str(path), column)


def _read_hf(source: str, column: str | None, split: str) -> PromptSet:
    """``hf:name[:config][@split]`` (``split`` where it names none)."""
    spec = parse_hf_source(source, error=PromptFileError)
    return _from_records(read_hf_records(spec, split=split, error=PromptFileError), str(spec), column)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """False when the hub's host does not resolve (fails fast instead of the datasets library's retries); True in
    offline mode (``HF_HUB_OFFLINE=1``: datasets reads its local cache)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    previous = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(timeout)
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(previous)


def _read_named(name: str, allow_fallback: bool) -> PromptSet:
    """A benchmark of :data:`NAMED_SETS` from the hub (or its cached copy). One that cannot be loaded is an error
    naming it, unless ``allow_fallback``: then its built-in fallback set, with a warning, recorded in the set's
    ``source`` (``builtin:harmful (fallback for strongreject)``)."""
    spec = NAMED_SETS[name]
    try:
        if not _hub_reachable():
            raise PromptFileError("the Hugging Face hub is not reachable and HF_HUB_OFFLINE is not set")
        records = read_hf_records(f"hf:{spec.hf_id}" + (f":{spec.subset}" if spec.subset else "") + f"@{spec.split}",
                                  error=PromptFileError, kinds=None)
        return _from_records(records, f"hf:{spec.hf_id}", spec.column)
    except PromptFileError as err:
        why = str(err)
        if not allow_fallback:
            raise PromptFileError(
                f"{name}: cannot load the benchmark {spec.hf_id} ({why}); pass a local copy of it (a CSV/JSON/JSONL "
                f"file), or set allow_fallback to use the built-in {spec.fallback} prompts instead",
                fields=("allow_fallback",)) from None
        logger.warning("%s: %s; falling back to the built-in %s prompts (allow_fallback)", name, why, spec.fallback)
        ps = _read_file(builtin_path(f"{spec.fallback}.jsonl"), None)
        ps.source = f"builtin:{spec.fallback} (fallback for {name})"
        return ps


def _clean(ps: PromptSet) -> PromptSet:
    """Drop blank and duplicated prompts (with a warning)."""
    seen: set[str] = set()
    keep = []
    blank = dup = 0
    for i, p in enumerate(ps.prompts):
        s = p.strip()
        if not s:
            blank += 1
        elif s in seen:
            dup += 1
        else:
            seen.add(s)
            keep.append(i)
    if blank or dup:
        logger.warning("%s: dropped %d blank and %d duplicated prompts", ps.source, blank, dup)
    out = PromptSet([ps.prompts[i].strip() for i in keep], [ps.categories[i] for i in keep], ps.source)
    if not out.prompts:
        raise PromptFileError(f"{ps.source}: no prompts (all blank)")
    return out


def load_prompts(
    source: str | Path | None = None,
    *,
    default: str = "harmful",
    column: str | None = None,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    allow_fallback: bool = False,
) -> PromptSet:
    """Load a prompt set: the one loader of every stage that takes prompts.

    Args:
        source: ``None`` or ``"builtin"`` for the built-in ``default`` set,
            ``"builtin:<name>"`` (harmful, harmless, xstest_like), a name of :data:`NAMED_SETS`
            (``strongreject``, ``advbench``, ``harmbench``, ``jailbreakbench``, ``xstest``), a
            CSV/TSV/JSON/JSONL/TXT path, or ``"hf:<name>[:<config>][@<split>]"`` for a Hugging Face
            dataset. XSTest rows (a file or dataset) keep only their safe prompts (:func:`_xstest_safe`).
        default: built-in set used when ``source`` is None.
        column: prompt column (detected among :data:`PROMPT_COLUMNS` when None; a named set has its own).
        split: dataset split for ``hf:`` sources that name none.
        limit: keep at most this many prompts (seeded random sample, order kept).
        allow_fallback: a named set that cannot be loaded (offline, no cached copy) is replaced by its built-in
            fallback set with a warning (recorded in ``source``) instead of being an error.
    """
    if source is None or str(source) == "builtin":
        source = f"builtin:{default}"
    src = str(source)
    if src.strip().lower() in NAMED_SETS:
        ps = _read_named(src.strip().lower(), allow_fallback)
    elif src.startswith("builtin:"):
        name = src.split(":", 1)[1]
        if name not in BUILTIN_SETS:
            raise PromptFileError(f"unknown built-in prompt set {name!r}; choose one of {', '.join(BUILTIN_SETS)}")
        ps = _read_file(builtin_path(f"{name}.jsonl"), column)
        ps.source = src
    elif src.startswith("hf:"):
        ps = _read_hf(src, column, split)
    else:
        ps = _read_file(Path(src), column)
    return _clean(ps).limit(limit, seed)


def match_lengths(pool: PromptSet, reference: PromptSet) -> PromptSet:
    """As many prompts of ``pool`` as ``reference`` holds, chosen so their word counts match: for each
    reference prompt, longest first, the unused pool prompt of the nearest word count (ties: pool order).
    The confound control of identification: harmful and harmless prompts of the same lengths."""
    if len(pool) < len(reference):
        raise PromptFileError(f"{pool.source}: {len(pool)} prompts cannot match the lengths of {len(reference)}")
    lengths = [len(p.split()) for p in pool.prompts]
    free = set(range(len(pool)))
    chosen = []
    for target in sorted((len(p.split()) for p in reference.prompts), reverse=True):
        best = min(free, key=lambda i: (abs(lengths[i] - target), i))
        free.remove(best)
        chosen.append(best)
    return pool.subset(sorted(chosen), f"{pool.source} (length-matched to {reference.source})")


#: Format used when a tokenizer has no chat template.
PLAIN_FORMAT = "User: {prompt}\nAssistant:"


def render_chat(tokenizer, prompts: Sequence[str], response: Sequence[str] | None = None) -> list[str]:
    """Render each prompt as a one-turn chat ready for generation.

    Uses the tokenizer's chat template with ``add_generation_prompt=True`` and no
    system prompt of ours; falls back to :data:`PLAIN_FORMAT` when the tokenizer has
    no template. With ``response``, each rendered prompt is followed by that text.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if not has_template and not getattr(tokenizer, "_safeneuron_warned", False):
        logger.warning("tokenizer has no chat template; using the plain format %r", PLAIN_FORMAT)
        try:
            tokenizer._safeneuron_warned = True
        except AttributeError:  # pragma: no cover
            pass
    out = []
    for i, p in enumerate(prompts):
        if has_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = PLAIN_FORMAT.format(prompt=p)
        if response is not None:
            text += response[i]
        out.append(text)
    return out
