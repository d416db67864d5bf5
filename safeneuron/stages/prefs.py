"""The ``prefs`` stage: synthesise an on-policy safety preference set from the model itself.

Offline, in steps::

    prompts          harmful and harmless prompts (seeded samples)
    the mask         the safety neurons to prune: given, a mask file, or identified here
    answers          the intact model's answers, and its answers with the mask pruned
    pairs            harmful: chosen = the model's own refusal (judged; a refusal template
                     written for this project as a fallback), rejected = its compliance
                     while pruned (or intact); harmless: chosen = its helpful answer,
                     rejected = a needless refusal (a template)
    artifacts        the JSONL, ``<stem>.manifest.json`` beside it (written last)

A vision-language model answers the instructions typeset as images (FigStep-style, the
harmless ones too, as in identification): its pairs carry ``image`` (a PNG in
``<stem>_images/`` beside the pairs file), the text request as ``prompt`` and the
typeset ``instruction``, and ``align`` trains on them with images.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from safeneuron.artifacts import timestamp, write_json
from safeneuron.config import PrefsConfig
from safeneuron.data.images import typographic_prompts
from safeneuron.data.preferences import PreferenceDataError, PreferenceSet, manifest_path, refusal_templates
from safeneuron.data.prompts import PromptSet, load_prompts
from safeneuron.evaluation.judges import RefusalJudge
from safeneuron.generation import generate
from safeneuron.hooks import prune_neurons
from safeneuron.masks import SafetyNeuronMask
from safeneuron.models import LoadedModel, weights_hash
from safeneuron.stages.identify import identify

logger = logging.getLogger(__name__)

__all__ = ["SynthesisReport", "synthesize_preferences"]


@dataclass
class SynthesisReport:
    """Counts and rates of a synthesis (written to ``<stem>.manifest.json``)."""

    n_harmful: int = 0
    n_harmless: int = 0
    refusal_rate_intact: float = 0.0
    compliance_rate_pruned: float = 0.0
    helpful_rate_harmless: float = 0.0
    chosen_from_model: int = 0
    chosen_from_template: int = 0
    rejected_from_pruned: int = 0
    rejected_from_intact: int = 0
    dropped_no_compliance: int = 0
    dropped_harmless_refused: int = 0
    pairs_harmful: int = 0
    pairs_harmless: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class _Answers:
    """The model's answers, and what each pair shows as its prompt (``prompt``, and for a VLM ``image``
    and ``instruction``), per kind."""

    intact: list[str]
    pruned: list[str]
    helpful: list[str]
    shown: dict[str, list[dict]]


def synthesize_preferences(
    loaded: LoadedModel,
    config: PrefsConfig | None = None,
    out: str | Path = "prefs.jsonl",
    *,
    mask: SafetyNeuronMask | None = None,
    identify_dir: str | Path | None = None,
    progress: bool = True,
) -> PreferenceSet:
    """Synthesise a safety preference set from the model itself and write it as JSONL.

    Args:
        loaded: the model (a VLM answers image+text prompts, see the module docstring).
        config: prompts, counts, generation (``config.quick`` applies the quick profile).
        out: the JSONL file; ``<stem>.manifest.json`` beside it gets the settings and counts,
            ``.<stem>.generations.jsonl`` caches the generations (a killed run resumes).
        mask: safety neurons pruned to produce the compliances; None = ``config.mask`` or,
            without one, an identification on the model written to ``identify_dir``.

    Every pair records its provenance: ``kind`` (harmful/harmless), ``category``,
    ``chosen_source`` (``model`` or ``template``), ``rejected_source`` (``model-pruned``,
    ``model`` or ``template``), the model, the mask and the judge.
    """
    config = (config or PrefsConfig()).resolved()
    config.validate()
    out = Path(out)
    t_start = time.perf_counter()
    harmful = load_prompts(config.harmful, default="harmful", limit=config.n_harmful, seed=config.seed,
                           allow_fallback=config.allow_fallback)
    harmless = (load_prompts(config.harmless, default="harmless", limit=config.n_harmless, seed=config.seed,
                             allow_fallback=config.allow_fallback) if config.n_harmless else None)
    mask, mask_source = _synthesis_mask(loaded, config, mask, identify_dir or out.parent / f"{out.stem}_identify",
                                        progress)
    answers = _answers(loaded, harmful, harmless, mask, config, out, progress)
    judge = RefusalJudge()
    whash = weights_hash(loaded.path)
    provenance = {"model": loaded.name, "weights_sha256": whash, "mask": mask_source, "mask_digest": mask.digest(),
                  "neurons_pruned": mask.count(), "judge": judge.name}
    report = SynthesisReport(n_harmful=len(harmful), n_harmless=len(harmless) if harmless else 0)
    rng, templates = random.Random(config.seed), refusal_templates()  # one seeded draw sequence for both kinds

    def template() -> str:
        return rng.choice(templates)

    pairs = _harmful_pairs(harmful, answers, judge, template, report, provenance, config.rejected)
    pairs += _harmless_pairs(harmless, answers, judge, template, report, provenance)
    if not pairs:
        raise PreferenceDataError(
            f"no preference pair could be synthesised: the model refused all {len(harmful)} harmful prompts even "
            "with its safety neurons pruned, and no harmless answer was usable; give a larger mask or a preference file",
            fields=("mask", "source"))
    result = PreferenceSet(pairs, f"synthesized:{loaded.name}")
    result.write_jsonl(out)
    write_json(manifest_path(out), {  # beside the pairs, written last
        "kind": "synthesized", "model": loaded.name, "model_path": loaded.path, "weights_sha256": whash,
        "out": str(out), "n_pairs": len(pairs), "sha256": result.sha256,
        "harmful": {"source": harmful.source, "sha256": harmful.sha256, "n": len(harmful)},
        "harmless": ({"source": harmless.source, "sha256": harmless.sha256, "n": len(harmless)} if harmless else None),
        "inputs": "image+text" if loaded.is_vlm else "text",
        "mask": {"source": mask_source, "digest": mask.digest(), "neurons": mask.count(), "total": mask.total()},
        "judge": judge.name, "report": asdict(report), "settings": asdict(config),
        "wall_time_s": time.perf_counter() - t_start, "created": timestamp(),
    })
    logger.info("synthesised %d pairs (%d harmful, %d harmless): intact refusal rate %.2f, pruned compliance rate "
                "%.2f, %d chosen from templates, %d harmful prompts dropped (no compliance)", len(pairs),
                report.pairs_harmful, report.pairs_harmless, report.refusal_rate_intact,
                report.compliance_rate_pruned, report.chosen_from_template, report.dropped_no_compliance)
    return result


def _synthesis_mask(loaded: LoadedModel, config: PrefsConfig, mask: SafetyNeuronMask | None, identify_dir: Path,
                    progress: bool) -> tuple[SafetyNeuronMask, str]:
    """The neurons pruned for the compliances and where they came from: given, ``config.mask``, or an
    identification on the model (written to ``identify_dir``)."""
    source = "given"
    if mask is None and config.mask:
        mask, source = SafetyNeuronMask.load(config.mask, neuron_set=config.neuron_set), config.mask
    if mask is None:
        ident_config = dataclasses.replace(config.identify, model=config.model, seed=config.seed, dtype=config.dtype,
                                           device=config.device)
        ident = identify(ident_config, identify_dir, loaded=loaded, progress=progress)
        mask, source = ident.sets[config.neuron_set], str(identify_dir)
    mask.check(loaded.model)
    return mask, source


def _answers(loaded: LoadedModel, harmful: PromptSet, harmless: PromptSet | None, mask: SafetyNeuronMask,
             config: PrefsConfig, out: Path, progress: bool) -> _Answers:
    """The intact and pruned answers to the harmful prompts and the intact answers to the harmless ones.

    A VLM is shown each instruction typeset as an image (one path: the image+text prompts go
    through the same :func:`~safeneuron.generation.generate`); the images are written to
    ``<stem>_images/`` beside ``out`` and each pair shows ``prompt`` (the text request),
    ``image`` (relative to the file, as ``align`` reads it) and ``instruction``.
    """
    texts = {"harmful": harmful.prompts, "harmless": harmless.prompts if harmless else []}
    shown_prompts = {k: typographic_prompts(v) if loaded.is_vlm else v for k, v in texts.items()}
    processing = loaded.processor if loaded.is_vlm else loaded.tokenizer
    cache = out.parent / f".{out.stem}.generations.jsonl"

    def answer(prompts, tag):
        return generate(loaded.model, processing, prompts, max_new_tokens=config.max_new_tokens,
                        batch_size=config.batch_size, max_length=config.max_length, cache=cache, tag=tag,
                        progress=progress) if prompts else []

    intact = answer(shown_prompts["harmful"], "intact")
    with prune_neurons(loaded.model, mask):
        pruned = answer(shown_prompts["harmful"], f"pruned:{mask.digest()}")
    helpful = answer(shown_prompts["harmless"], "intact")
    if not loaded.is_vlm:
        return _Answers(intact, pruned, helpful, {k: [{"prompt": p} for p in v] for k, v in texts.items()})
    folder = out.parent / f"{out.stem}_images"
    folder.mkdir(parents=True, exist_ok=True)
    shown: dict[str, list[dict]] = {}
    for kind, prompts in shown_prompts.items():
        shown[kind] = []
        for i, (p, instruction) in enumerate(zip(prompts, texts[kind])):
            rel = f"{folder.name}/{kind}{i}.png"
            p.load_image().save(out.parent / rel)
            shown[kind].append({"prompt": p.text, "image": rel, "instruction": instruction})
    return _Answers(intact, pruned, helpful, shown)


def _harmful_pairs(harmful: PromptSet, answers: _Answers, judge: RefusalJudge, template: Callable[[], str],
                   report: SynthesisReport, provenance: dict, rejected_first: str = "pruned") -> list[dict]:
    """chosen = the intact model's refusal (else a template), rejected = the pruned compliance (else the
    intact one; the other way round with ``rejected_first="intact"``); a prompt with no compliance at all is
    dropped."""
    refused = [judge.is_refusal(r) for r in answers.intact]
    pruned_refused = [judge.is_refusal(r) for r in answers.pruned]
    pairs = []
    for i in range(len(harmful)):
        drawn = template()
        chosen, chosen_source = (answers.intact[i], "model") if refused[i] else (drawn, "template")
        sources = [(not pruned_refused[i], answers.pruned[i], "model-pruned"), (not refused[i], answers.intact[i], "model")]
        if rejected_first == "intact":
            sources.reverse()
        found = next(((text, src) for ok, text, src in sources if ok), None)
        if found is None:
            report.dropped_no_compliance += 1
            continue
        rejected, rejected_source = found
        report.chosen_from_model += chosen_source == "model"
        report.chosen_from_template += chosen_source == "template"
        report.rejected_from_pruned += rejected_source == "model-pruned"
        report.rejected_from_intact += rejected_source == "model"
        pairs.append({**answers.shown["harmful"][i], "chosen": chosen, "rejected": rejected, "kind": "harmful",
                      "category": harmful.categories[i], "chosen_source": chosen_source,
                      "rejected_source": rejected_source, **provenance})
    report.pairs_harmful = len(pairs)
    report.refusal_rate_intact = sum(refused) / len(refused)
    report.compliance_rate_pruned = 1 - sum(pruned_refused) / len(pruned_refused)
    return pairs


def _harmless_pairs(harmless: PromptSet | None, answers: _Answers, judge: RefusalJudge, template: Callable[[], str],
                    report: SynthesisReport, provenance: dict) -> list[dict]:
    """chosen = the model's helpful answer, rejected = a needless refusal (a template); a harmless prompt the
    model refused is dropped."""
    if not harmless:
        return []
    pairs = []
    for i in range(len(harmless)):
        drawn = template()
        if judge.is_refusal(answers.helpful[i]):
            report.dropped_harmless_refused += 1
            continue
        pairs.append({**answers.shown["harmless"][i], "chosen": answers.helpful[i], "rejected": drawn,
                      "kind": "harmless", "category": harmless.categories[i], "chosen_source": "model",
                      "rejected_source": "template", **provenance})
    report.pairs_harmless = len(pairs)
    report.helpful_rate_harmless = 1 - report.dropped_harmless_refused / len(harmless)
    return pairs
