"""Evaluation instruments: judges, prompt sets, metrics, capability, judged generation.

Instruments only: the comparison of models that uses them is the ``evaluate`` stage
(:mod:`safeneuron.stages.evaluate`). Modules:

* ``judges``      refusal phrases; safety classifiers (Llama-Guard, HarmBench, sequence)
* ``sets``        named harmful benchmarks, jailbreak templates, red-team requests
* ``measure``     generate (optionally pruned) + judge = per-prompt flags
* ``metrics``     rates with Wilson intervals, robustness-curve area
* ``capability``  MC accuracy by log-likelihood, perplexity, lm-eval bridge

Generation with its resumable cache is a core module, :mod:`safeneuron.generation`.
"""
