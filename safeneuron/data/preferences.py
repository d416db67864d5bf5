"""Preference data: load standard formats, or synthesise a safety set from the model.

A pair is a dict with ``prompt`` (a string: one user turn, or a list of chat
messages), ``chosen`` and ``rejected`` (the assistant's text, or a list of
messages), plus any provenance fields. :class:`PreferenceSet` holds pairs and turns
them into the records TRL's ``DPOTrainer`` reads (:meth:`PreferenceSet.to_trl`).

Formats read by :func:`load_preferences` (JSONL, JSON, CSV/TSV or ``hf:<dataset>``):

* ``plain``: ``prompt`` / ``chosen`` / ``rejected`` columns, strings or chat messages
  (TRL's explicit and implicit-prompt formats; UltraFeedback-binarized rows included);
* ``pku``: PKU-SafeRLHF rows, ``prompt``, ``response_0``, ``response_1`` and
  ``safer_response_id`` (or ``better_response_id`` with ``prefer="better"``);
* ``hh``: HH-RLHF rows, ``chosen`` / ``rejected`` transcripts written as
  ``\\n\\nHuman: ...\\n\\nAssistant: ...``.

:func:`synthesize_preferences` builds an on-policy safety set offline: harmful prompts
with chosen = the model's own refusal (judged; refusal templates written for this
project as a fallback) and rejected = the same model's compliance while its safety
neurons are pruned (judged non-refusal); harmless prompts with chosen = the model's
helpful answer and rejected = a needless refusal.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from safeneuron.artifacts import read_json, sha256_text, write_json, write_text
from safeneuron.data.prompts import PLAIN_FORMAT, builtin_path, load_prompts
from safeneuron.errors import SafeneuronError

logger = logging.getLogger(__name__)

__all__ = [
    "PreferenceSet",
    "PreferenceDataError",
    "load_preferences",
    "mix_preferences",
    "refusal_templates",
    "synthesize_preferences",
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
        write_text(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in self.pairs))
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
                             "chosen": " " + _as_text(p["chosen"]), "rejected": " " + _as_text(p["rejected"])})
        return Dataset.from_list(rows)


def _as_messages(value, role: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _as_text(value) -> str:
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
    if source.startswith("hf:"):
        try:
            import datasets

            ds = datasets.load_dataset(source[3:], split=split)
        except Exception as err:  # offline, unknown name, gated, ...
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PreferenceDataError(
                f"{source}: cannot load the Hugging Face dataset ({first}); pass a local JSONL/CSV file instead"
            ) from None
        return [dict(r) for r in ds]
    path = Path(source)
    if not path.is_file():
        raise PreferenceDataError(f"{path}: preference file not found")
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise PreferenceDataError(f"{path}:{n}: malformed JSON line ({err.msg})") from None
        return records
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise PreferenceDataError(f"{path}: malformed JSON ({err.msg} at line {err.lineno})") from None
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise PreferenceDataError(f"{path}: expected a JSON list of records (or an object holding one list)")
            data = lists[0]
        if not isinstance(data, list):
            raise PreferenceDataError(f"{path}: expected a JSON list of records")
        return data
    if suffix in (".csv", ".tsv"):
        try:
            return list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
        except csv.Error as err:
            raise PreferenceDataError(f"{path}: malformed CSV ({err})") from None
    raise PreferenceDataError(f"{path}: unknown preference file type {suffix!r} (use .jsonl, .json, .csv or .tsv)")


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


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
    chosen, rejected, prompt = rec.get("chosen"), rec.get("rejected"), rec.get("prompt")
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


def synthesize_preferences(
    loaded,
    config=None,
    out: str | Path = "prefs.jsonl",
    *,
    mask=None,
    identify_dir: str | Path | None = None,
    progress: bool = True,
) -> PreferenceSet:
    """Synthesise a safety preference set from the model itself and write it as JSONL.

    Args:
        loaded: a :class:`~safeneuron.models.LoadedModel`.
        config: a :class:`~safeneuron.config.PrefsConfig` (prompts, counts, generation).
        out: the JSONL file; ``<stem>.manifest.json`` beside it gets the settings and counts,
            ``.<stem>.generations.jsonl`` caches the generations (a killed run resumes).
        mask: safety neurons pruned to produce the compliances; None = ``config.mask`` or,
            without one, an identification on the model written to ``identify_dir``.

    Every pair records its provenance: ``kind`` (harmful/harmless), ``category``,
    ``chosen_source`` (``model`` or ``template``), ``rejected_source`` (``model-pruned``,
    ``model`` or ``template``), the model, the mask and the judge.

    A vision-language model answers the instructions typeset as images (FigStep-style, the
    harmless ones too, as in identification): its pairs carry ``image`` (a PNG in
    ``<stem>_images/`` beside ``out``), the text request as ``prompt`` and the typeset
    ``instruction``, and ``align`` trains on them with images.
    """
    from safeneuron.attacks import prune_neurons
    from safeneuron.config import IdentifyConfig, PrefsConfig
    from safeneuron.evaluation.generation import generate
    from safeneuron.evaluation.judges import RefusalJudge
    from safeneuron.masks import SafetyNeuronMask
    from safeneuron.models import weights_hash
    from safeneuron.vlm import is_vlm

    config = (config or PrefsConfig()).resolved()
    config.validate()
    out = Path(out)
    t_start = time.perf_counter()
    harmful = load_prompts(config.harmful, default="harmful", limit=config.n_harmful, seed=config.seed)
    harmless = (load_prompts(config.harmless, default="harmless", limit=config.n_harmless, seed=config.seed)
                if config.n_harmless else None)

    mask_source = "given"
    if mask is None and config.mask:
        mask = SafetyNeuronMask.load(config.mask, set=config.neuron_set)
        mask_source = config.mask
    if mask is None:
        from safeneuron.identify import identify

        identify_dir = Path(identify_dir) if identify_dir else out.parent / f"{out.stem}_identify"
        ident = identify(IdentifyConfig(model=config.model, max_prompts=config.identify_max_prompts,
                                        seed=config.seed, dtype=config.dtype, device=config.device),
                         identify_dir, loaded=loaded, progress=progress)
        mask = ident.sets[config.neuron_set]
        mask_source = str(identify_dir)
    mask.check(loaded.model)
    mask_digest = sha256_text(*(f"{k}:{v.nonzero().flatten().tolist()}" for k, v in mask.masks.items()))[:12]

    cache = out.parent / f".{out.stem}.generations.jsonl"
    gen_kwargs = dict(max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                      max_length=config.max_length, cache=cache, progress=progress)
    model, tok = loaded.model, loaded.tokenizer
    multimodal = is_vlm(model)
    if multimodal:  # a VLM: image pairs, the instructions typeset (as identify and evaluate show them)
        intact, pruned, helpful, shown = _multimodal_answers(loaded, harmful, harmless, mask, mask_digest, gen_kwargs,
                                                             out)
    else:
        intact = generate(model, tok, harmful.prompts, tag="intact", **gen_kwargs)
        with prune_neurons(model, mask):
            pruned = generate(model, tok, harmful.prompts, tag=f"pruned:{mask_digest}", **gen_kwargs)
        helpful = generate(model, tok, harmless.prompts, tag="intact", **gen_kwargs) if harmless else []
        shown = {"harmful": [{"prompt": p} for p in harmful.prompts],
                 "harmless": [{"prompt": p} for p in harmless.prompts] if harmless else []}

    judge = RefusalJudge()
    templates = refusal_templates()
    rng = random.Random(config.seed)
    whash = weights_hash(loaded.path)
    provenance = {"model": loaded.name, "weights_sha256": whash, "mask": mask_source, "mask_digest": mask_digest,
                  "neurons_pruned": mask.count(), "judge": judge.name}
    report = SynthesisReport(n_harmful=len(harmful), n_harmless=len(harmless) if harmless else 0)
    pairs: list[dict] = []
    refused = [judge.is_refusal(r) for r in intact]
    pruned_refused = [judge.is_refusal(r) for r in pruned]
    for i in range(len(harmful)):
        template = rng.choice(templates)
        if refused[i]:
            chosen, chosen_source = intact[i], "model"
        else:
            chosen, chosen_source = template, "template"
        if not pruned_refused[i]:
            rejected, rejected_source = pruned[i], "model-pruned"
        elif not refused[i]:
            rejected, rejected_source = intact[i], "model"
        else:
            report.dropped_no_compliance += 1
            continue
        report.chosen_from_model += chosen_source == "model"
        report.chosen_from_template += chosen_source == "template"
        report.rejected_from_pruned += rejected_source == "model-pruned"
        report.rejected_from_intact += rejected_source == "model"
        pairs.append({**shown["harmful"][i], "chosen": chosen, "rejected": rejected, "kind": "harmful",
                      "category": harmful.categories[i], "chosen_source": chosen_source,
                      "rejected_source": rejected_source, **provenance})
    report.pairs_harmful = len(pairs)
    if harmless:
        for i in range(len(harmless)):
            template = rng.choice(templates)
            if judge.is_refusal(helpful[i]):
                report.dropped_harmless_refused += 1
                continue
            pairs.append({**shown["harmless"][i], "chosen": helpful[i], "rejected": template, "kind": "harmless",
                          "category": harmless.categories[i], "chosen_source": "model",
                          "rejected_source": "template", **provenance})
        report.pairs_harmless = len(pairs) - report.pairs_harmful
    report.refusal_rate_intact = sum(refused) / len(refused)
    report.compliance_rate_pruned = 1 - sum(pruned_refused) / len(pruned_refused)
    report.helpful_rate_harmless = (1 - report.dropped_harmless_refused / len(harmless)) if harmless else 0.0
    if not pairs:
        raise PreferenceDataError(
            f"no preference pair could be synthesised: the model refused all {len(harmful)} harmful prompts even "
            "with its safety neurons pruned, and no harmless answer was usable; pass a larger --mask or a file"
        )
    result = PreferenceSet(pairs, f"synthesized:{loaded.name}")
    result.write_jsonl(out)
    manifest = {
        "kind": "synthesized",
        "model": loaded.name,
        "model_path": loaded.path,
        "weights_sha256": whash,
        "out": str(out),
        "n_pairs": len(pairs),
        "sha256": result.sha256,
        "harmful": {"source": harmful.source, "sha256": harmful.sha256, "n": len(harmful)},
        "harmless": ({"source": harmless.source, "sha256": harmless.sha256, "n": len(harmless)} if harmless else None),
        "inputs": "image+text" if multimodal else "text",
        "mask": {"source": mask_source, "digest": mask_digest, "neurons": mask.count(), "total": mask.total()},
        "judge": judge.name,
        "report": asdict(report),
        "settings": asdict(config),
        "wall_time_s": time.perf_counter() - t_start,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(manifest_path(out), manifest)
    logger.info("synthesised %d pairs (%d harmful, %d harmless): intact refusal rate %.2f, pruned compliance rate "
                "%.2f, %d chosen from templates, %d harmful prompts dropped (no compliance)", len(pairs),
                report.pairs_harmful, report.pairs_harmless, report.refusal_rate_intact,
                report.compliance_rate_pruned, report.chosen_from_template, report.dropped_no_compliance)
    return result


def _multimodal_answers(loaded, harmful, harmless, mask, mask_digest: str, gen_kwargs: dict, out: Path):
    """A VLM's answers for synthesis: each instruction typeset as an image with the benign FigStep request
    (:func:`~safeneuron.vlm.typographic_prompts`), intact and (harmful ones) with ``mask`` pruned.

    The images are written to ``<stem>_images/`` beside the pairs file; each pair gets ``prompt`` (the text
    request), ``image`` (relative to the file, as ``align`` reads it) and ``instruction`` (what the image says).
    Returns ``(intact, pruned, helpful, shown)``, ``shown`` holding those fields per kind.
    """
    from safeneuron.attacks import prune_neurons
    from safeneuron.vlm import generate_multimodal, processor_of, typographic_prompts

    processor = processor_of(loaded)
    kwargs = {k: v for k, v in gen_kwargs.items() if k != "max_length"}  # images are never cut
    typeset = {"harmful": typographic_prompts(harmful), "harmless": typographic_prompts(harmless) if harmless else []}
    intact = generate_multimodal(loaded.model, processor, typeset["harmful"], tag="intact", **kwargs)
    with prune_neurons(loaded.model, mask):
        pruned = generate_multimodal(loaded.model, processor, typeset["harmful"], tag=f"pruned:{mask_digest}",
                                     **kwargs)
    helpful = generate_multimodal(loaded.model, processor, typeset["harmless"], tag="intact", **kwargs) \
        if harmless else []
    folder = out.parent / f"{out.stem}_images"
    folder.mkdir(parents=True, exist_ok=True)
    shown: dict[str, list[dict]] = {}
    for kind, prompts in typeset.items():
        texts = (harmful if kind == "harmful" else harmless).prompts if prompts else []
        shown[kind] = []
        for i, (p, instruction) in enumerate(zip(prompts, texts)):
            rel = f"{folder.name}/{kind}{i}.png"
            p.load_image().save(out.parent / rel)
            shown[kind].append({"prompt": p.text, "image": rel, "instruction": instruction})
    return intact, pruned, helpful, shown


def manifest_path(out: str | Path) -> Path:
    """Where the manifest of a preference JSONL lives: ``<stem>.manifest.json`` beside it."""
    out = Path(out)
    return out.parent / f"{out.stem}.manifest.json"


def read_manifest(out: str | Path) -> dict:
    return read_json(manifest_path(out))
