"""safeneuron: neuron-level safety alignment for LLMs and VLMs.

The in-memory API for notebooks is at the top of the package (:mod:`safeneuron.api`)::

    found = safeneuron.find_safety_neurons(model, tokenizer, harmful_prompts, harmless_prompts)
    with safeneuron.prune_neurons(model, found.union):
        ...

Each name is imported on first use, so ``import safeneuron`` (and ``safeneuron --help``) stays fast.
"""

__version__ = "0.1.0"

import importlib as _importlib

import logging as _logging

# bitsandbytes (the optional QLoRA dependency, imported by peft when installed) warns at
# import time on CPUs with AVX512-BF16 that an optional faster kernel package is missing;
# it would precede every CLI message. Its 4-bit layers work without it.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

#: The public API: name -> the module that defines it (resolved lazily, PEP 562).
_EXPORTS = {
    "find_safety_neurons": "safeneuron.api",
    "as_loaded": "safeneuron.api",
    "Identification": "safeneuron.stages.identify",
    "identify": "safeneuron.stages.identify",
    "SafetyNeuronMask": "safeneuron.masks",
    "prune_neurons": "safeneuron.hooks",
    "zero_neurons": "safeneuron.hooks",
    "SafeNeuronDPOTrainer": "safeneuron.trainer",
    "align": "safeneuron.stages.align",
    "evaluate_models": "safeneuron.stages.evaluate",
    "load_model": "safeneuron.models",
    "IdentifyConfig": "safeneuron.config",
    "AlignConfig": "safeneuron.config",
    "EvalConfig": "safeneuron.config",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'safeneuron' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
