"""Prompt sets (built-in and loaded), chat rendering and preference data."""

from safeneuron.data.prompts import (
    PromptSet,
    PromptFileError,
    builtin_path,
    load_prompts,
    render_chat,
)

__all__ = ["PromptSet", "PromptFileError", "builtin_path", "load_prompts", "render_chat"]
