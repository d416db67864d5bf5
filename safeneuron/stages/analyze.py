"""The ``analyze`` stage: the analyses of :mod:`safeneuron.analysis`, run and written to disk.

:func:`analyze` writes, in ``out/`` (a contract)::

    layer_distribution.json   categories.json   separability.json   analysis.json
    layer_distribution.png    category_composition.png  category_overlap.png  separability.png

``analysis.json`` is written last (settings, sources, timings, versions).
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from safeneuron.analysis import (
    category_composition,
    collect_features,
    layer_distribution,
    layer_separability,
    load_category_masks,
    overlap_curve,
)
from safeneuron.arch import find_mlps
from safeneuron.artifacts import (ArtifactError, read_json, sha256_file, sha256_text, stage_lock, timestamp, versions,
                                  write_json)
from safeneuron.config import AnalyzeConfig, ConfigError
from safeneuron.data.images import typographic_prompts
from safeneuron.data.prompts import PromptSet, load_prompts
from safeneuron.masks import SafetyNeuronMask
from safeneuron.models import LoadedModel, is_vlm, is_vlm_checkpoint, load_model, processor_of, resolve_model, \
    weights_hash
from safeneuron.report import figures

logger = logging.getLogger(__name__)

__all__ = ["Analysis", "analyze", "ARTIFACTS", "FIGURES"]

#: Files :func:`analyze` writes (JSON, then figures).
ARTIFACTS = ("layer_distribution.json", "categories.json", "separability.json", "analysis.json")
FIGURES = ("layer_distribution.png", "category_composition.png", "category_overlap.png", "separability.png")


def _named(entries: Sequence[str], default_first: str | None = None) -> dict[str, str]:
    """``["name=path", "path"]`` -> ``{name: path}`` (a bare path is named after its directory)."""
    out: dict[str, str] = {}
    for i, entry in enumerate(entries):
        name, sep, path = str(entry).partition("=")
        if not sep:
            path = name
            name = default_first if (i == 0 and default_first) else (Path(path).name or path)
        if name in out:
            raise ConfigError(f"name {name!r} given twice ({out[name]} and {path}); use name=path to tell them apart")
        out[name] = path
    return out


@dataclass
class Analysis:
    """What :func:`analyze` wrote (each part None when it was not produced)."""

    layer_distribution: dict | None
    categories: dict | None
    separability: dict | None
    manifest: dict

    @classmethod
    def load(cls, out: str | Path) -> "Analysis":
        out = Path(out)

        def maybe(name):
            return read_json(out / name) if (out / name).is_file() else None

        return cls(maybe("layer_distribution.json"), maybe("categories.json"), maybe("separability.json"),
                   maybe("analysis.json") or {})


def _probe_prompts(config: AnalyzeConfig, manifest: dict | None) -> tuple[PromptSet, PromptSet, bool]:
    """Balanced harmful/harmless prompts for the probes, held out from identification when possible.

    The identification's own prompts are rebuilt from its settings (same source, limit
    and seed) and left out when at least 8 others remain per class.
    """
    settings = (manifest or {}).get("settings", {})
    sets, held = [], []
    for label in ("harmful", "harmless"):
        given = getattr(config, label)
        column = config.prompt_column or settings.get("prompt_column")
        fallback = config.allow_fallback or bool(settings.get("allow_fallback"))  # as the identification loaded them
        full = load_prompts(given or settings.get(label), default=label, column=column, allow_fallback=fallback)
        held_out = False
        if config.held_out and manifest is not None and given in (None, settings.get(label)):
            used = set(load_prompts(settings.get(label), default=label, column=settings.get("prompt_column"),
                                    limit=settings.get("max_prompts"), seed=settings.get("seed", 0),
                                    allow_fallback=fallback).prompts)
            rest = [i for i, p in enumerate(full.prompts) if p not in used]
            if len(rest) >= 8:
                full = full.subset(rest, f"{full.source} minus identification prompts")
                held_out = True
            else:
                logger.info("%s prompts: only %d not used by the identification; probing on all", label, len(rest))
        sets.append(full)
        held.append(held_out)
    harmful, harmless = sets
    n = min(config.max_prompts, len(harmful), len(harmless))
    if n < 4:
        raise ConfigError(f"the probes need >= 4 prompts per class; have {len(harmful)} harmful, {len(harmless)} harmless")
    return harmful.limit(n, config.seed), harmless.limit(n, config.seed), all(held)


def _load(model: str | None, config: AnalyzeConfig):
    return load_model(model, dtype=config.dtype, device=config.device, trust_remote_code=config.trust_remote_code)


def analyze(
    config: AnalyzeConfig | None = None,
    out: str | Path = "analysis",
    *,
    loaded=None,
    compare: Mapping[str, object] | None = None,
    identifications: Mapping[str, str | Path] | None = None,
    progress: bool = True,
) -> Analysis:
    """Run the analyses and write their artifacts to ``out`` (the analysis directory).

    Args:
        config: settings (defaults: :class:`AnalyzeConfig`).
        out: directory receiving the JSON files and figures (``DIR/analysis`` in a main job).
        loaded: the base model already in memory (a :class:`~safeneuron.models.LoadedModel`);
            otherwise ``config.model`` is loaded.
        compare: name -> path or LoadedModel of further models to probe (overrides ``config.compare``).
        identifications: name -> identification dir (overrides ``config.identify``); the first
            gives the safety neurons and the categories.

    Separability results are kept per model with a key of the settings, weights and
    mask, so a rerun (or a resumed run) skips the models already probed.
    """
    config = config or AnalyzeConfig()
    config.validate()
    with stage_lock(out, "an analysis") as out:  # a second process writing here is refused
        return _analyze_into(config, out, loaded, compare, identifications, progress)


def _analyze_into(config: AnalyzeConfig, out: Path, loaded, compare, identifications, progress: bool) -> Analysis:
    """:func:`analyze` with the output directory's lock held."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    idents = {k: Path(v) for k, v in (identifications or _named(config.identify, "base")).items()}
    for name, path in idents.items():
        if not (path / "identify.json").is_file():
            raise ArtifactError(f"{path}: no identify.json; run the identify stage into it first ({name})",
                                fields=("identify",))
    primary = next(iter(idents.values()), None)
    primary_manifest = read_json(primary / "identify.json") if primary else None
    written: list[str] = []
    distribution = _layer_distribution(config, idents, out, written)  # 1. where the safety neurons sit
    categories = _categories(config, idents, out, written)  # 2. what harm categories share
    timings["artifacts_s"] = time.perf_counter() - t_start

    # 3. separability
    separability = None
    if config.separability:
        t0 = time.perf_counter()
        separability = _separability(config, out, primary, primary_manifest, loaded, compare, progress)
        written.append("separability.json")
        if config.figures:
            figures.save(figures.plot_separability(separability), out / "separability.png")
        timings["separability_s"] = time.perf_counter() - t0

    timings["wall_s"] = time.perf_counter() - t_start
    manifest = {
        "settings": asdict(config),
        "identifications": {k: str(v) for k, v in idents.items()},
        "files": written + [f for f in FIGURES if (out / f).is_file()],
        "timings": timings,
        "versions": versions(),
        "created": timestamp(),
    }
    write_json(out / "analysis.json", manifest)  # written last: marks the stage complete
    return Analysis(distribution, categories, separability, manifest)


def _layer_distribution(config: AnalyzeConfig, idents: Mapping[str, Path], out: Path, written: list[str]) -> dict | None:
    """The share of each layer's neurons selected, per identification (``layer_distribution.json``)."""
    if not idents:
        return None
    distribution = layer_distribution(idents, neuron_set=config.neuron_set)
    write_json(out / "layer_distribution.json", distribution)
    written.append("layer_distribution.json")
    if config.figures:
        figures.save(figures.plot_layer_distribution(distribution), out / "layer_distribution.png")
    return distribution


def _categories(config: AnalyzeConfig, idents: Mapping[str, Path], out: Path, written: list[str]) -> dict | None:
    """Per-category composition and overlap of the first identification with categories (``categories.json``)."""
    with_categories = [p for p in idents.values() if read_json(p / "identify.json").get("categories")]
    if not with_categories:
        if idents:
            logger.info("no per-category identification (identify with by_category); category analysis skipped")
        return None
    masks = load_category_masks(with_categories[0], neuron_set=config.neuron_set)
    if len(masks) < 2:
        logger.warning("%s: %d category set(s); the overlap analysis needs 2 or more", with_categories[0], len(masks))
        return None
    categories = category_composition(masks)
    categories.update(source=str(with_categories[0]), set=config.neuron_set,
                      overlap=overlap_curve([masks[c] for c in categories["categories"]], n_orders=config.n_orders,
                                            seed=config.seed, band=[float(b) for b in config.band]))
    write_json(out / "categories.json", categories)
    written.append("categories.json")
    if config.figures:
        figures.save(figures.plot_category_composition(categories), out / "category_composition.png")
        figures.save(figures.plot_category_overlap(categories), out / "category_overlap.png")
    return categories


def _finished_models(path: Path) -> dict[str, dict]:
    """The models an earlier (or killed) run already probed, by name (each with its settings key)."""
    if not path.is_file():
        return {}
    try:
        return {m["name"]: m for m in read_json(path).get("models", []) if m.get("key")}
    except (ArtifactError, AttributeError):
        return {}


def _separability(config: AnalyzeConfig, out: Path, primary: Path | None, primary_manifest: dict | None,
                  loaded, compare, progress: bool) -> dict:
    position = config.position or (primary_manifest or {}).get("position") or "mean"
    span = (primary_manifest or {}).get("span") or "prompt"  # as the safety neurons were identified
    mask = SafetyNeuronMask.load(primary / "safety_neurons.safetensors", neuron_set=config.neuron_set) if primary else None
    mask_hash = sha256_file(primary / "safety_neurons.safetensors") if primary else None
    harmful, harmless, held_out = _probe_prompts(config, primary_manifest)
    prompts = harmful.prompts + harmless.prompts
    labels = torch.tensor([1.0] * len(harmful) + [0.0] * len(harmless))
    settings_key = sha256_text(position, span, config.neuron_set, str(mask_hash), harmful.sha256, harmless.sha256,
                               *(str(getattr(config, k)) for k in ("test_frac", "n_splits", "l2", "probe_max_iter",
                                                                    "seed", "max_length")))
    base = config.model or (primary_manifest or {}).get("model")  # default: the identified model
    models: dict[str, object] = {"base": loaded if loaded is not None else base}
    models.update(compare if compare is not None else _named(config.compare))
    path = out / "separability.json"
    previous = _finished_models(path)
    result = {
        "position": position, "span": span, "set": config.neuron_set, "mask": str(primary) if primary else None,
        "n_harmful": len(harmful), "n_harmless": len(harmless),
        "prompts": {"harmful": harmful.source, "harmless": harmless.source}, "held_out_from_identification": held_out,
        "test_frac": config.test_frac, "n_splits": config.n_splits, "l2": config.l2, "seed": config.seed,
        "inputs": "text", "models": [],
    }
    for name, spec in models.items():
        t0 = time.perf_counter()
        lm = spec if isinstance(spec, LoadedModel) else None
        model_path = lm.path if lm is not None else resolve_model(None if spec is None else str(spec))[1]
        whash = weights_hash(model_path)
        # a VLM is probed on the prompts typeset as images (as its identification saw them)
        multimodal = is_vlm(lm.model) if lm is not None else is_vlm_checkpoint(model_path)
        key = sha256_text(settings_key, str(whash), "image+text" if multimodal else "")[:16] if whash else None
        if key and previous.get(name, {}).get("key") == key:
            logger.info("separability of %s already computed; reusing it", name)
            result["models"].append(previous[name])
            if previous[name].get("inputs") == "image+text":
                result["inputs"] = "image+text"
            continue
        owned = lm is None
        if owned:
            lm = _load(model_path, config)
        sites = find_mlps(lm.model)
        if mask is not None:
            mask.check(sites)
        random_mask = SafetyNeuronMask.random(sites, like=mask, seed=config.seed) if mask is not None else None
        vlm = is_vlm(lm.model)
        if vlm:
            logger.info("%s is a vision-language model: probing on the prompts typeset as images", name)
            result["inputs"] = "image+text"
        residual, neurons = collect_features(lm.model, lm.tokenizer,
                                             typographic_prompts(harmful) + typographic_prompts(harmless) if vlm
                                             else prompts, position=position, span=span,
                                             batch_size=config.batch_size,
                                             max_length=config.max_length, progress=progress,
                                             processor=processor_of(lm) if vlm else None)
        entry = {"name": name, "model": lm.name, "path": lm.path, "key": key, "n_layers": len(sites),
                 "inputs": "image+text" if vlm else "text"}
        entry.update(layer_separability(residual, neurons, labels, mask=mask, random_mask=random_mask,
                                        test_frac=config.test_frac, seed=config.seed, n_splits=config.n_splits,
                                        l2=config.l2, max_iter=config.probe_max_iter))
        entry["time_s"] = time.perf_counter() - t0
        result["models"].append(entry)
        write_json(path, result)  # after every model: a resumed run skips the finished ones
        del residual, neurons
        if owned:
            del lm
            gc.collect()
    write_json(path, result)
    return result
