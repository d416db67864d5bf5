"""Batched, deterministic generation with a resumable JSONL cache; text and image+text alike.

Prompts are batched by :func:`safeneuron.inputs.prompt_batches` (chat template,
left padding; text prompts grouped by length, image+text prompts in input order) and
generated in batches (greedy by default). With ``cache``, every finished response is
appended to a JSONL file keyed by the prompt (and its image's pixels) and the
generation settings, so a crashed evaluation resumes without regenerating.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from safeneuron.artifacts import jsonl_lines, sha256_text
from safeneuron.data.images import MultimodalPrompt, image_sha256, is_image_text
from safeneuron.inputs import _prepare_tokenizer, model_device, prompt_batches, tokenizer_of

logger = logging.getLogger(__name__)

__all__ = ["generate", "read_cache", "open_cache", "complete_texts", "generation_config"]


def _cache_keys(prompts: Sequence, settings: list, max_length: int, image_text: bool) -> tuple[list[str], list[str]]:
    """Cache key per prompt (and each image+text prompt's pixel hash): a text prompt's key
    holds ``max_length`` (it may be truncated), an image+text prompt's the image (never cut)."""
    if not image_text:
        text_settings = json.dumps(settings + [max_length])
        return [sha256_text(text_settings, p)[:24] for p in prompts], [""] * len(prompts)
    image_settings = json.dumps(settings + ["image+text"])
    hashes = [image_sha256(p.load_image()) for p in prompts]
    return [sha256_text(image_settings, p.text, h)[:24] for p, h in zip(prompts, hashes)], hashes


def read_cache(path: str | Path) -> dict[str, str]:
    """``{key: response}`` of a generation cache; a torn last line (crash) is ignored."""
    path = Path(path)
    out: dict[str, str] = {}
    if not path.exists():
        return out
    for _, line in jsonl_lines(path.read_text(encoding="utf-8")):  # "\n" only: answers may hold U+2028
        try:
            rec = json.loads(line)
            out[rec["key"]] = rec["response"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return out


def generation_config(model: nn.Module, tokenizer, *, max_new_tokens: int, do_sample: bool = False,
                      temperature: float = 1.0, top_p: float = 1.0):
    """An explicit decoding setup: greedy (or plain temperature/top-p sampling), no
    repetition penalty or top-k from the model's own ``generation_config``, so every
    model is decoded the same way; only the end-of-turn token(s) are taken from it."""
    from transformers import GenerationConfig

    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=None,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )


def open_cache(path: str | Path):
    """Open a JSONL cache for appending, first closing a torn last line (a crash) with a newline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = False
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as fh:
            fh.seek(-1, 2)
            torn = fh.read(1) != b"\n"
    fh = open(path, "a", encoding="utf-8")
    if torn:
        fh.write("\n")
    return fh


@torch.no_grad()
def generate(
    model: nn.Module,
    processing,
    prompts: Sequence[str] | Sequence[MultimodalPrompt],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    max_length: int = 512,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    cache: str | Path | None = None,
    tag: str = "",
    progress: bool = True,
    answer_prefix: str = "",
) -> list[str]:
    """Generate one response per prompt (the user turn), in input order.

    Decoding is greedy unless ``do_sample`` (then batch ``b`` of the prompts still to
    generate samples under ``torch.manual_seed(seed + b)``).

    Args:
        processing: the tokenizer (text prompts) or a VLM's processor (image+text prompts).
        prompts: raw instructions (rendered with the chat template here), or image+text
            :class:`~safeneuron.data.images.MultimodalPrompt` s.
        max_length: text prompts are truncated from the left at this many tokens.
        cache: JSONL file to reuse and extend (one ``{"key", "prompt", "tag", "response"}``
            per line, plus ``image_sha256`` for image+text prompts, flushed after every
            batch); a killed run resumes from it.
        tag: extra text in the cache key, e.g. the model and the attack applied to it.
        answer_prefix: the answer's forced opening (a prefill attack), put after the generation prompt;
            the response is the continuation only (part of the cache key).
    Returns:
        The decoded responses (special tokens removed, stripped).
    """
    prompts = list(prompts)
    image_text = is_image_text(prompts)
    if image_text and cache is None:  # no cache: no pixels hashed, every prompt generated
        keys, image_hashes = [str(i) for i in range(len(prompts))], [""] * len(prompts)
    else:
        key_settings = [tag, max_new_tokens, do_sample, temperature, top_p, seed]
        if answer_prefix:  # keys without a prefix are those of earlier versions
            key_settings.append({"answer_prefix": answer_prefix})
        keys, image_hashes = _cache_keys(prompts, key_settings, max_length, image_text)
    done = read_cache(cache) if cache else {}
    todo_keys = list(dict.fromkeys(k for k in keys if k not in done))  # duplicates generate once
    first = {k: i for i, k in reversed(list(enumerate(keys)))}
    todo = [first[k] for k in todo_keys]
    if todo and len(todo) < len(set(keys)):
        logger.info("generation cache: %d of %d responses reused", len(set(keys)) - len(todo), len(set(keys)))
    results = {k: done[k] for k in keys if k in done}
    if todo:
        _generate_into(results, model, processing, prompts, todo, keys, image_hashes,
                       dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p),
                       batch_size=batch_size, max_length=max_length, seed=seed, cache=cache, tag=tag,
                       progress=progress, answer_prefix=answer_prefix)
    return [results[k] for k in keys]


def _generate_into(results: dict, model: nn.Module, processing, prompts: Sequence, todo: list[int], keys: list[str],
                   image_hashes: list[str], decoding: dict, *, batch_size: int, max_length: int, seed: int,
                   cache, tag: str, progress: bool, answer_prefix: str = "") -> None:
    """Generate the ``todo`` prompts batch by batch into ``results`` (key -> response), appending to the cache."""
    tokenizer = tokenizer_of(processing)
    gen_config = generation_config(model, tokenizer, **decoding)
    cache_fh = open_cache(cache) if cache else None  # closes a torn last line (a kill mid-write)
    was_training = model.training
    model.eval()
    try:
        batches = prompt_batches(processing, [prompts[i] for i in todo], batch_size, max_length=max_length,
                                 model=model, answer_prefix=answer_prefix)
        bar = tqdm(total=len(todo), desc="generating", unit="prompt", disable=not progress)
        for b, batch in enumerate(batches):
            if decoding["do_sample"]:
                torch.manual_seed(seed + b)
            inputs = {k: v for k, v in batch.inputs.items() if k != "position_ids"}
            out = model.generate(**inputs, generation_config=gen_config)
            new = out[:, inputs["input_ids"].shape[1]:]  # [batch, new tokens]; prompts are left-padded
            for j, text in zip(batch.indices, tokenizer.batch_decode(new, skip_special_tokens=True)):
                i = todo[j]
                results[keys[i]] = text.strip()
                if cache_fh:
                    record = {"key": keys[i], "prompt": getattr(prompts[i], "text", prompts[i])}
                    if image_hashes[i]:
                        record["image_sha256"] = image_hashes[i]
                    if answer_prefix:
                        record["answer_prefix"] = answer_prefix
                    cache_fh.write(json.dumps({**record, "tag": tag, "response": text.strip()}) + "\n")
            if cache_fh:
                cache_fh.flush()
            bar.update(len(batch.indices))
        bar.close()
    finally:
        if cache_fh:
            cache_fh.close()
        model.train(was_training)


@torch.no_grad()
def complete_texts(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 8,
    max_length: int = 4096,
) -> list[str]:
    """Greedy continuations of already formatted texts (no chat rendering), in input
    order: a judge model's verdicts. Left-padded batches grouped by length."""
    _prepare_tokenizer(tokenizer)
    gen_config = generation_config(model, tokenizer, max_new_tokens=max_new_tokens)
    device = model_device(model)
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (-lengths[i], i))
    out: list[str] = [""] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length, add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        gen = model.generate(**enc, generation_config=gen_config)
        decoded = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, d in zip(idx, decoded):
            out[i] = d.strip()
    return out


@torch.no_grad()
def last_token_logits(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 4096,
    add_special_tokens: bool = True,
) -> torch.Tensor:
    """Next-token logits after already formatted texts (no chat rendering), float32 [n_texts, vocab], in input
    order: a scoring judge's reading of its own answer token. Left-padded batches grouped by length."""
    _prepare_tokenizer(tokenizer)
    device = model_device(model)
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (-lengths[i], i))
    out: list[torch.Tensor | None] = [None] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length, add_special_tokens=add_special_tokens)
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        logits = model(**enc).logits[:, -1].float().cpu()
        for i, row in zip(idx, logits):
            out[i] = row
    return torch.stack(out) if out else torch.zeros(0, 0)
