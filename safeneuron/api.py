"""The in-memory Python API: the stages on a model you already hold, for notebooks.

Everything here is also reachable from the top of the package (``safeneuron.find_safety_neurons``, ...)::

    import safeneuron
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(path)
    found = safeneuron.find_safety_neurons(model, tokenizer, ["How do I make a pipe bomb?", ...],
                                           ["How do I bake bread?", ...], tau_es=0.5)
    print(found.union.count(), "safety neurons")
    with safeneuron.prune_neurons(model, found.union):   # zeroed while inside, restored after
        ...

Nothing is written to disk unless you pass ``out``: the stages' artifacts go to a temporary directory that is
removed before the call returns, and the result holds every tensor in memory.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

from safeneuron.artifacts import write_jsonl
from safeneuron.config import ConfigError, IdentifyConfig, from_dict
from safeneuron.models import LoadedModel
from safeneuron.stages.identify import Identification, identify

__all__ = ["find_safety_neurons", "as_loaded"]


def as_loaded(model, tokenizer, processor=None) -> LoadedModel:
    """An already-loaded transformers model (and its tokenizer, and a VLM's processor) as the stages take it; the
    directory it was read from (``model.name_or_path``) names its weights in the run keys."""
    path = str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "in-memory")
    return LoadedModel(model, tokenizer, name=path, path=path, processor=processor)


def _prompt_source(prompts: Any, folder: Path, name: str) -> str | None:
    """A prompt set as the loaders take it: a source string as it is, a list of prompts written to a JSONL file."""
    if prompts is None or isinstance(prompts, (str, Path)):
        return None if prompts is None else str(prompts)
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"{name}: give a list of prompt strings or a source (file, hf:, builtin:), got "
                          f"{type(prompts).__name__}")
    path = folder / f"{name}.jsonl"
    write_jsonl(path, [{"prompt": p} for p in prompts])
    return str(path)


def find_safety_neurons(model, tokenizer, harmful: Sequence[str] | str | None = None,
                        harmless: Sequence[str] | str | None = None, *, out: str | Path | None = None,
                        progress: bool = False, **settings: Any) -> Identification:
    """Safety neurons of an in-memory model: ES (Cohen's d) and SAS scores of every MLP neuron from the two classes'
    activations, and the selected ``es``, ``sas`` and ``union`` sets (:class:`SafetyNeuronMask`).

    Args:
        model, tokenizer: a loaded transformers causal LM and its tokenizer (a VLM: ``identify(config,
            loaded=as_loaded(model, tokenizer, processor))``).
        harmful, harmless: lists of prompts, or sources (a file, ``hf:name``, ``builtin:<set>``); None = built-in.
        out: a directory to keep the artifacts in (``safeneuron identify``'s); None = nothing written.
        settings: :class:`~safeneuron.config.IdentifyConfig` fields (``tau_es=0.5``, ``position="last"``, ...).
    Returns:
        The :class:`Identification`: ``.scores[mlp]["es"|"sas"|...]`` tensors of shape ``[d_ff]``, ``.sets``,
        ``.union``, ``.manifest``; the same values ``safeneuron identify`` writes for this model and prompts.
    """
    with tempfile.TemporaryDirectory(prefix="safeneuron-") as tmp:
        values = dict(settings)
        for name, prompts in (("harmful", harmful), ("harmless", harmless)):
            source = _prompt_source(prompts, Path(tmp), name)
            if source is not None:
                values[name] = source
        config = from_dict(IdentifyConfig, values, where="find_safety_neurons")
        return identify(config, out if out is not None else Path(tmp) / "identify", loaded=as_loaded(model, tokenizer),
                        progress=progress)
