"""safeneuron: neuron-level safety alignment for LLMs and VLMs."""

__version__ = "0.1.0"
