"""From prompts to model batches: one path for text and image+text inputs.

:func:`prompt_batches` is what recording, generation and the probes call:

* text prompts (strings) are rendered with the tokenizer's chat template
  (:func:`~safeneuron.data.prompts.render_chat`), grouped by length (longest first),
  left-padded and truncated from the left at ``max_length`` (keeping the generation
  prompt), with position ids that count real tokens only;
* image+text prompts (:class:`~safeneuron.data.images.MultimodalPrompt`) are rendered
  with the processor's chat template (image, then text), processed in input order
  (images opened or drawn only when their batch is made), left-padded, never truncated
  (cutting a prompt would cut its image tokens).

Either way the last non-padding position of every row is the end of its generation
prompt, and each :class:`Batch` lists the indices of its prompts in the input list.

Token spans (:data:`SPANS`, text prompts with a fast tokenizer): ``prompt`` is every
non-padding token of the rendered chat (the template's constant system prompt and role
markers included), ``content`` the tokens of the user's own text, ``post`` the tokens after
it (end-of-turn marker and generation prompt: refusal_direction's post-instruction
positions). :attr:`Batch.spans` holds a [batch, seq] bool mask for ``content`` and ``post``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from safeneuron.data.images import MultimodalPrompt, is_image_text
from safeneuron.data.prompts import render_chat
from safeneuron.errors import SafeneuronError

logger = logging.getLogger(__name__)

__all__ = ["Batch", "SPANS", "prompt_batches", "iter_batches", "image_text_batches", "render_image_text_chat",
           "tokenizer_of", "model_device", "forward_without_logits"]


#: The token spans a prompt can be pooled over (see the module docstring).
SPANS = ("prompt", "content", "post")


@dataclass
class Batch:
    """One batch: the prompts' indices in the input list, the model inputs and, for text prompts, the
    ``content`` and ``post`` token masks [batch, seq] (bool; see the module docstring)."""

    indices: list[int]
    inputs: dict[str, torch.Tensor]
    spans: dict[str, torch.Tensor] = field(default_factory=dict)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def tokenizer_of(processing) -> object:
    """The tokenizer of a processor (a tokenizer is its own)."""
    return getattr(processing, "tokenizer", processing)


def _prepare_tokenizer(tokenizer) -> None:
    tokenizer.padding_side = "left"  # the last position of every row is the end of its prompt
    tokenizer.truncation_side = "left"  # keep the generation prompt when truncating
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def prompt_batches(
    processing,
    prompts: Sequence[str] | Sequence[MultimodalPrompt],
    batch_size: int,
    *,
    max_length: int = 512,
    model: nn.Module | None = None,
    skip: int = 0,
    spans: bool = False,
    answer_prefix: str = "",
) -> Iterator[Batch]:
    """Batches of text or image+text prompts (see the module docstring), ``skip`` batches left out.

    Args:
        processing: the tokenizer (text prompts) or the processor (image+text prompts).
        max_length: text prompts longer than this many tokens are truncated from the left
            (with a warning); image+text prompts are never cut.
        model: inputs go to its device (and floating inputs, pixels, to its dtype).
        skip: leave out the first ``skip`` batches of the deterministic order (resume).
        spans: also give text batches their ``content`` and ``post`` token masks (:attr:`Batch.spans`).
        answer_prefix: text the assistant's answer begins with, put after the generation prompt (a prefill
            attack); the batch then ends inside the answer.
    """
    prompts = list(prompts)
    if is_image_text(prompts):
        yield from image_text_batches(processing, prompts, batch_size, model=model, skip=skip,
                                      answer_prefix=answer_prefix)
        return
    device = model_device(model) if model is not None else "cpu"
    yield from iter_batches(tokenizer_of(processing), prompts, batch_size, max_length, device, spans=spans,
                            answer_prefix=answer_prefix)[skip:]


def iter_batches(
    tokenizer,
    prompts: Sequence[str],
    batch_size: int,
    max_length: int = 512,
    device: torch.device | str = "cpu",
    *,
    spans: bool = False,
    answer_prefix: str = "",
) -> list[Batch]:
    """Render, tokenise and batch text prompts, grouped by length to minimise padding.

    Batches are left-padded; the order is deterministic (longest first).
    Prompts longer than ``max_length`` tokens are truncated from the left, with a warning.
    With ``spans`` (and a fast tokenizer) each batch gets its ``content`` and ``post`` token masks.
    ``answer_prefix`` follows every generation prompt (the answer's forced opening).
    """
    _prepare_tokenizer(tokenizer)
    texts = render_chat(tokenizer, prompts, [answer_prefix] * len(prompts) if answer_prefix else None)
    special = not bool(getattr(tokenizer, "chat_template", None))
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]
    too_long = sum(n > max_length for n in lengths)
    if too_long:
        logger.warning("%d prompts are longer than max_length=%d tokens and were truncated", too_long, max_length)
    order = sorted(range(len(texts)), key=lambda i: (-lengths[i], i))
    fast = spans and bool(getattr(tokenizer, "is_fast", False))
    content = [_content_chars(t, p) for t, p in zip(texts, prompts)] if fast else []
    if fast and any(c is None for c in content):
        logger.warning("the chat template changes %d prompt(s); their content span is the whole prompt",
                       sum(c is None for c in content))
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length, add_special_tokens=special, return_offsets_mapping=fast)
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        # Positions count real tokens only, so a left-padded prompt sees the same positions as unpadded.
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        masks = _span_masks(enc["offset_mapping"], inputs["attention_mask"], [content[i] for i in idx]) if fast else {}
        batches.append(Batch(idx, {k: v.to(device) for k, v in inputs.items()}, {k: v.to(device)
                                                                                  for k, v in masks.items()}))
    return batches


def _content_chars(text: str, prompt: str) -> tuple[int, int] | None:
    """The character span of the user's text in the rendered chat (the last occurrence: a system prompt
    comes first); None when the template does not keep it verbatim."""
    start = text.rfind(prompt) if prompt else -1
    return (start, start + len(prompt)) if start >= 0 else None


def _span_masks(offsets: torch.Tensor, attention_mask: torch.Tensor,
                content: list[tuple[int, int] | None]) -> dict[str, torch.Tensor]:
    """``content`` and ``post`` token masks [batch, seq] from the tokens' character offsets [batch, seq, 2]."""
    real = attention_mask.bool()
    begin, end = offsets[..., 0], offsets[..., 1]
    bounds = torch.tensor([c if c is not None else (0, 2**62) for c in content], dtype=begin.dtype)
    lo, hi = bounds[:, :1], bounds[:, 1:]
    inside = real & (end > lo) & (begin < hi) & (end > begin)
    after = real & (begin >= hi)
    fallback = torch.tensor([c is None for c in content])[:, None]
    return {"content": torch.where(fallback, real, inside), "post": torch.where(fallback, real, after)}


def render_image_text_chat(processor, prompts: Sequence[MultimodalPrompt]) -> list[str]:
    """Each prompt as a one-turn user message (image, then text) with the generation prompt.

    Uses the processor's chat template (no system prompt of ours).
    """
    if not getattr(processor, "chat_template", None):
        raise SafeneuronError(f"{type(processor).__name__} has no chat template for image+text messages; "
                              "set processor.chat_template (see the model card)")
    return [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p.text}]}],
            tokenize=False, add_generation_prompt=True,
        )
        for p in prompts
    ]


def _to_model(inputs: Mapping[str, object], model: nn.Module) -> dict[str, object]:
    """Move the processor's tensors to the model's device; floating ones (pixels) to its dtype."""
    device = model_device(model)
    dtype = next(model.parameters()).dtype
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype=dtype) if value.is_floating_point() else value.to(device)
        out[key] = value
    return out


def image_text_batches(
    processor,
    prompts: Sequence[MultimodalPrompt],
    batch_size: int,
    *,
    model: nn.Module | None = None,
    skip: int = 0,
    answer_prefix: str = "",
) -> Iterator[Batch]:
    """Process image+text prompts in input order, ``batch_size`` at a time, left-padded.

    ``inputs`` hold what the processor returns (``input_ids``, ``attention_mask``,
    ``pixel_values``, ...), on the model's device and dtype when ``model`` is given;
    ``answer_prefix`` follows every generation prompt.
    """
    _prepare_tokenizer(tokenizer_of(processor))
    for start in range(skip * batch_size, len(prompts), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        chunk = [prompts[i] for i in idx]
        texts = [t + answer_prefix for t in render_image_text_chat(processor, chunk)]
        enc = processor(text=texts, images=[[p.load_image()] for p in chunk],
                        padding=True, return_tensors="pt")
        inputs = dict(enc)
        yield Batch(idx, _to_model(inputs, model) if model is not None else inputs)


def forward_without_logits(model: nn.Module, inputs: dict[str, torch.Tensor], **kwargs):
    """A forward pass that skips the full-vocabulary head where the model allows it (only
    activations or hidden states matter); returns the model's output."""
    kwargs = dict(inputs, use_cache=False, **kwargs)
    try:
        return model(**kwargs, logits_to_keep=1)
    except TypeError:
        return model(**kwargs)
