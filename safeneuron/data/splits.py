"""Disjoint prompt splits by construction: one pool, split once into named parts.

The main job splits each prompt pool (harmful, harmless) once, with its seed, into
parts for the defender's identification, the preference pairs and the evaluation
(and, optionally, the attacker's own identification). Each part is written to a JSONL
file that its stage reads, so no evaluation prompt can have been seen by identification
or alignment, whatever the sizes; the parts and their hashes are recorded in
``run.json``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from safeneuron.artifacts import write_jsonl
from safeneuron.data.prompts import PromptFileError, PromptSet, load_prompts

__all__ = ["PromptSplit", "split_prompts", "overlap"]


@dataclass
class PromptSplit:
    """A pool's disjoint parts, in order, and the files they were written to."""

    pool: PromptSet
    parts: dict[str, PromptSet]
    seed: int
    files: dict[str, str]

    def manifest(self) -> dict:
        """What ``run.json`` records: the pool, the seed and each part's size, hash and file."""
        return {"source": self.pool.source, "n": len(self.pool), "sha256": self.pool.sha256, "seed": self.seed,
                "parts": {name: {"n": len(ps), "sha256": ps.sha256, "file": self.files.get(name)}
                          for name, ps in self.parts.items()}}


def split_prompts(pool: PromptSet, sizes: Mapping[str, int | None], *, seed: int = 0,
                  out: str | Path | None = None, stem: str = "prompts") -> PromptSplit:
    """Split ``pool`` into disjoint parts of the given sizes (a seeded shuffle, then consecutive slices; each
    part keeps the pool's order). A size of None takes what the others leave. With ``out``, each part is
    written to ``out/<stem>_<part>.jsonl`` (``prompt`` and ``category`` per line).

    Raises:
        PromptFileError: the sizes add up to more prompts than the pool has.
    """
    fixed = sum(n for n in sizes.values() if n is not None)
    if fixed > len(pool):
        wanted = ", ".join(f"{k} {v}" for k, v in sizes.items() if v is not None)
        raise PromptFileError(f"{pool.source}: {len(pool)} prompts cannot be split into disjoint parts of {wanted} "
                              f"({fixed} prompts); use a larger prompt set or smaller counts")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    parts, start = {}, 0
    rest = len(pool) - fixed
    for name, n in sizes.items():
        n = rest if n is None else n
        parts[name] = pool.subset(sorted(order[start : start + n]), f"{pool.source} ({stem} {name} part)")
        start += n
    files = {}
    if out is not None:
        for name, ps in parts.items():
            path = Path(out) / f"{stem}_{name}.jsonl"
            write_jsonl(path, ({"prompt": p, "category": c} for p, c in zip(ps.prompts, ps.categories)))
            files[name] = str(path)
    return PromptSplit(pool, parts, seed, files)


def overlap(prompts: Iterable[str], upstream: Iterable[str | Path]) -> list[str]:
    """The prompts that also occur in any of the ``upstream`` prompt files (whitespace-stripped match)."""
    seen = {p.strip() for f in upstream for p in load_prompts(str(f)).prompts}
    return [p for p in prompts if p.strip() in seen]
