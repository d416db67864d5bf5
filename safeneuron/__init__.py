"""safeneuron: neuron-level safety alignment for LLMs and VLMs."""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes (the optional QLoRA dependency, imported by peft when installed) warns at
# import time on CPUs with AVX512-BF16 that an optional faster kernel package is missing;
# it would precede every CLI message. Its 4-bit layers work without it.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
