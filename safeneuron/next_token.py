"""The model's next-token distribution at the start of its answer, and what is read off it.

Cheap, generation-free measurements the attacks use to choose and to price an edit:

* :func:`next_token_logprobs`  log-probabilities [n, vocab] of the answer's first token
  (at the end of the generation prompt, or after a forced answer opening);
* :func:`refusal_token_ids`    the first tokens of refusal openings, in the model's vocabulary;
* :func:`refusal_scores`       log-odds that the answer starts like a refusal, per prompt
  (refusal_direction's refusal score);
* :func:`kl_divergence`        KL(p || q) per prompt, in nats: what an edit costs on
  prompts it should leave alone.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from safeneuron.inputs import prompt_batches, tokenizer_of

__all__ = ["REFUSAL_OPENINGS", "next_token_logprobs", "refusal_token_ids", "refusal_scores", "kl_divergence"]

#: How refusals begin (written for this project); their first tokens are the refusal tokens.
REFUSAL_OPENINGS = ("I", "I'm", "I cannot", "Sorry", "As an AI", "Unfortunately", "I apologize", "No,")


@torch.no_grad()
def next_token_logprobs(model: nn.Module, processing, prompts: Sequence, *, batch_size: int = 16,
                        max_length: int = 512, answer_prefix: str = "") -> torch.Tensor:
    """Log-probabilities of the answer's first token (after ``answer_prefix`` when given), float32
    [n_prompts, vocab], in input order; the model is run in eval mode."""
    prompts = list(prompts)
    out: list[torch.Tensor | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for batch in prompt_batches(processing, prompts, batch_size, max_length=max_length, model=model,
                                    answer_prefix=answer_prefix):
            try:
                logits = model(**batch.inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
            except TypeError:
                logits = model(**batch.inputs, use_cache=False).logits[:, -1]
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, i in enumerate(batch.indices):
                out[i] = logp[row]
    finally:
        model.train(was_training)
    return torch.stack(out) if out else torch.empty(0)


def refusal_token_ids(processing, openings: Sequence[str] = REFUSAL_OPENINGS) -> list[int]:
    """The distinct first token of each opening (no special tokens), in the tokenizer's vocabulary."""
    tokenizer = tokenizer_of(processing)
    ids = []
    for text in openings:
        enc = tokenizer(text, add_special_tokens=False)["input_ids"]
        if enc and enc[0] not in ids:
            ids.append(int(enc[0]))
    if not ids:
        raise ValueError("no refusal opening has a token in this vocabulary")
    return ids


def refusal_scores(logprobs: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """Per prompt, log p(refusal) - log(1 - p(refusal)), p = the probability mass on ``token_ids``
    [n]; lower = less likely to refuse."""
    logp = torch.logsumexp(logprobs[:, list(token_ids)], dim=-1)
    eps = 1e-8
    return logp - torch.log1p(-logp.exp().clamp(max=1 - eps))


def kl_divergence(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, in nats [n] (p, q as log-probabilities [n, vocab])."""
    return (p_logprobs.exp() * (p_logprobs - q_logprobs)).sum(-1).clamp_min(0.0)
