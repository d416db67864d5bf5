"""``python -m safeneuron.cli ...`` with instrumentation, for tests/test_reliability.py.

    python tests/reliability_worker.py <safeneuron CLI arguments>

runs the real command line (``runpy`` of ``safeneuron.cli`` as ``__main__``, exactly
what ``python -m safeneuron.cli`` does) after patching, under these environment
variables:

``SN_DELAY``  seconds slept before every recorded batch (identification forward), every
              generation batch and every training step: a tiny model finishes in a
              blink otherwise, and kill points from outside need a run that lasts a
              few seconds.
``SN_KILL``   the process SIGKILLs itself at a precise point:
              ``progress:K``  after the partial statistics of K batches are saved,
                              before ``.partial/progress.json`` says so;
              ``before:NAME`` just before the JSON artifact ``NAME`` (identify.json,
                              results.json) is written;
              ``torn:N``      halfway through the N-th generation-cache line (flushed).
``SN_COUNT``  a JSON file written at a normal exit: ``forwards`` (identification
              batches run), ``generated`` (prompts generated, not read from a cache) and
              ``train_steps`` (training steps run).
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path

DELAY = float(os.environ.get("SN_DELAY", "0") or 0)
KILL = os.environ.get("SN_KILL", "")
COUNT = os.environ.get("SN_COUNT", "")
counts = {"forwards": 0, "generated": 0, "train_steps": 0}


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def patch() -> None:
    import safeneuron.activations as activations
    import safeneuron.artifacts as artifacts
    import safeneuron.stages.evaluate as evaluate
    import safeneuron.generation as generation
    import safeneuron.stages.identify as identify
    from transformers.generation.utils import GenerationMixin

    real_forward = activations.forward_without_logits

    def forward(model, inputs, **kwargs):
        time.sleep(DELAY)
        counts["forwards"] += 1
        return real_forward(model, inputs, **kwargs)

    activations.forward_without_logits = forward

    real_generate = GenerationMixin.generate

    def generate(self, *args, **kwargs):
        time.sleep(DELAY)
        ids = kwargs.get("input_ids", args[0] if args else None)
        counts["generated"] += int(ids.shape[0])
        return real_generate(self, *args, **kwargs)

    GenerationMixin.generate = generate

    from transformers import Trainer

    real_step = Trainer.training_step

    def training_step(self, *args, **kwargs):
        time.sleep(DELAY)
        counts["train_steps"] += 1
        return real_step(self, *args, **kwargs)

    Trainer.training_step = training_step

    kind, _, arg = KILL.partition(":")
    for module in (identify, evaluate, artifacts):  # artifacts: manifests written by StageDir
        real_write_json = module.write_json

        def write_json(path, obj, _real=real_write_json):
            name = Path(path).name
            if kind == "progress" and name == "progress.json" and obj.get("batches_done") == int(arg):
                die()
            if kind == "before" and name == arg:
                die()
            return _real(path, obj)

        module.write_json = write_json

    if kind == "torn":
        real_open = generation.open_cache
        lines = {"n": 0}

        class Torn:
            def __init__(self, fh):
                self.fh = fh

            def write(self, text):
                if text.strip():
                    lines["n"] += 1
                    if lines["n"] == int(arg):
                        self.fh.write(text[: len(text) // 2])
                        self.fh.flush()
                        die()
                return self.fh.write(text)

            def __getattr__(self, name):
                return getattr(self.fh, name)

        generation.open_cache = lambda path: Torn(real_open(path))


def report() -> None:
    if COUNT:
        Path(COUNT).write_text(json.dumps(counts))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    patch()
    atexit.register(report)
    sys.argv = ["safeneuron", *sys.argv[1:]]
    runpy.run_module("safeneuron.cli", run_name="__main__", alter_sys=True)
