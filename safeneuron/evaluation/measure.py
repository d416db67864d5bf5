"""One measurement: generate answers (optionally with neurons pruned), judge them.

:func:`judged_responses` is the step every rate in safeneuron goes through: it
generates (cached, resumable), applies the judge and returns per-prompt flags, so a
rate is always ``k / n`` of flags the caller can inspect.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from safeneuron.data.images import is_image_text
from safeneuron.evaluation.judges import Judge
from safeneuron.generation import generate
from safeneuron.hooks import prune_neurons
from safeneuron.masks import SafetyNeuronMask
from safeneuron.models import processor_of, weights_hash

logger = logging.getLogger(__name__)

__all__ = ["GenerationSettings", "Judged", "judged_responses", "model_tag", "sample_records"]


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings shared by every measurement of a run (greedy by default)."""

    max_new_tokens: int = 48
    batch_size: int = 32
    max_length: int = 1024
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def kwargs(self) -> dict:
        return asdict(self)


@dataclass
class Judged:
    """Responses, the judge's per-prompt flags (True = compliant / refused) and verdicts (why: ``compliant``,
    ``refusal``, ``echo``, ``loop``, ``no content``, ``not harmful``; ``refused`` / ``answered`` for
    over-refusal), and the prompts the judge saw."""

    responses: list[str]
    flags: list[bool]
    verdicts: list[str] = field(default_factory=list)
    judged_prompts: list[str] = field(default_factory=list)

    def verdict_counts(self) -> dict[str, int]:
        """How many answers got each verdict."""
        return dict(Counter(self.verdicts))

    @property
    def k(self) -> int:
        return int(sum(self.flags))

    @property
    def n(self) -> int:
        return len(self.flags)

    @property
    def rate(self) -> float | None:
        return self.k / self.n if self.n else None


def model_tag(loaded) -> str:
    """Identity of a model in generation-cache keys: its weights' hash when local, else its
    name, plus the dtype it runs in unless float32 (bfloat16 answers are other answers)."""
    whash = None
    try:
        whash = weights_hash(loaded.path) if loaded.path else None
    except OSError:
        whash = None
    tag = f"{loaded.name}@{whash[:16]}" if whash else str(loaded.name)
    dtype = next(loaded.model.parameters()).dtype
    return tag if dtype == torch.float32 else f"{tag}|{str(dtype).removeprefix('torch.')}"


def judged_responses(
    loaded,
    prompts: Sequence,
    judge: Judge,
    *,
    what: str = "compliant",
    mask: SafetyNeuronMask | None = None,
    judge_prompts: Sequence[str] | None = None,
    settings: GenerationSettings = GenerationSettings(),
    cache: str | Path | None = None,
    tag: str = "",
    progress: bool = True,
    answer_prefix: str = "",
) -> Judged:
    """Generate an answer to every prompt (with ``mask``'s neurons pruned, when given)
    and judge it.

    ``prompts`` are text, or image+text :class:`~safeneuron.data.images.MultimodalPrompt` s
    for a VLM (generated with its processor; the judge sees their text unless
    ``judge_prompts`` says otherwise).

    Args:
        what: ``compliant`` (harmful compliance, for ASR) or ``refused`` (over-refusal).
        judge_prompts: what the judge sees as the request (e.g. the plain harmful
            prompt behind a jailbreak template); ``prompts`` by default.
        tag: cache-key text naming the model and the attack; a non-empty ``mask`` adds
            its digest, so differently pruned models never share cached answers.
        answer_prefix: the answer's forced opening (a prefill attack); the judge sees the continuation only,
            so the forced words never count as compliance.
    """
    if what not in ("compliant", "refused"):
        raise ValueError(f"what must be 'compliant' or 'refused', got {what!r}")
    prompts = list(prompts)
    multimodal = is_image_text(prompts)
    pruning = mask is not None and mask.count() > 0
    full_tag = f"{tag}|prune:{mask.digest()}" if pruning else tag
    processing = processor_of(loaded) if multimodal else loaded.tokenizer  # a VLM's processor batches images
    with prune_neurons(loaded.model, mask) if pruning else contextlib.nullcontext():
        responses = generate(loaded.model, processing, prompts, cache=cache, tag=full_tag, progress=progress,
                             answer_prefix=answer_prefix, **settings.kwargs())
    if judge_prompts is None and multimodal:
        judge_prompts = [p.text for p in prompts]
    seen = [str(p) for p in (judge_prompts if judge_prompts is not None else prompts)]
    if what == "refused":
        flags = [bool(f) for f in judge.refusals(responses)]
        return Judged(responses, flags, ["refused" if f else "answered" for f in flags], seen)
    if hasattr(judge, "verdicts"):
        verdicts = judge.verdicts(seen, responses)
    else:  # a judge of one's own with only compliant(): its flags, without reasons
        verdicts = ["compliant" if c else "not compliant" for c in judge.compliant(seen, responses)]
    return Judged(responses, [v == "compliant" for v in verdicts], verdicts, seen)


def sample_records(judged: Judged, prompts: Sequence, *, condition: str, judge: str) -> list[dict]:
    """One record per answer for ``samples/<model>/<measurement>.jsonl`` (lm-eval's ``--log_samples``): the request
    the judge saw, the input the model got when it differs (a template, an image+text prompt's text), the
    condition, the answer, the verdict and whether it counts (compliant for ASR, refused for over-refusal)."""
    records = []
    for i, (response, flag) in enumerate(zip(judged.responses, judged.flags)):
        seen = judged.judged_prompts[i] if i < len(judged.judged_prompts) else str(prompts[i])
        given = getattr(prompts[i], "text", prompts[i])
        record = {"prompt": seen, "condition": condition, "response": response,
                  "verdict": judged.verdicts[i] if i < len(judged.verdicts) else None, "counted": bool(flag),
                  "judge": judge}
        if str(given) != seen:
            record["input"] = str(given)
        records.append(record)
    return records
