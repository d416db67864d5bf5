"""Capability: multiple-choice accuracy by log-likelihood, perplexity, lm-eval bridge.

* :func:`mc_accuracy` reads MMLU/ARC-format CSV files (columns ``question,A,B,C,D,
  answer``; ``answer`` a letter or a 0-based index), JSON/JSONL records with the same
  fields, or a built-in set (``builtin:general_mc``: 120 general-knowledge questions
  written for this project, not a public benchmark) and picks the option with the
  highest log-likelihood, zero-shot on plain text (no chat template), as
  lm-evaluation-harness does: ``letter`` scores the continuations `` A`` .. `` D`` after
  ``Answer:``; ``option`` scores each option's text (ARC style).
* :func:`perplexity` is ``exp`` of the mean token negative log-likelihood over texts.
* :func:`run_lm_eval` runs lm-evaluation-harness tasks (ARC 25-shot, TruthfulQA
  MC1/MC2, GSM8K 5-shot, ...) on an in-memory model; it needs the optional
  ``lm-eval`` package (``pip install 'safeneuron[eval]'``).
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from safeneuron.artifacts import write_json, write_jsonl
from safeneuron.inputs import model_device
from safeneuron.data.files import read_records
from safeneuron.errors import SafeneuronError

logger = logging.getLogger(__name__)

__all__ = [
    "MCQuestion",
    "MCFileError",
    "LmEvalMissingError",
    "load_mc",
    "format_mc",
    "continuation_logprobs",
    "next_token_logprobs",
    "mc_predictions",
    "mc_accuracy",
    "perplexity",
    "run_lm_eval",
    "LM_EVAL_FEWSHOT",
    "BUILTIN_MC",
]

LETTERS = ("A", "B", "C", "D")
#: Built-in multiple-choice sets (``builtin:<name>``; ``data/builtin/<name>.jsonl``).
BUILTIN_MC = ("general_mc",)


class MCFileError(SafeneuronError):
    """A multiple-choice file cannot be used."""


class LmEvalMissingError(SafeneuronError):
    """lm-evaluation-harness is not installed."""


@dataclass(frozen=True)
class MCQuestion:
    question: str
    options: tuple[str, ...]
    answer: int  # index into options
    subject: str | None = None


def _read_mc_rows(path: Path) -> list[dict]:
    """Records of a JSONL (one object a line) / JSON (a list of objects) file, or of a CSV (any other suffix)."""
    suffix = path.suffix.lower()
    records = read_records(path, error=MCFileError, what="multiple-choice file", items="questions",
                           fmt=suffix if suffix in (".json", ".jsonl", ".tsv") else ".csv")
    if not all(isinstance(r, dict) for r in records):
        raise MCFileError(f"{path}: expected JSON objects with question, A, B, C, D, answer")
    return [{k: "" if v is None else str(v) for k, v in r.items()} for r in records]


def load_mc(path: str | Path, n: int | None = None, seed: int = 0) -> list[MCQuestion]:
    """Questions of an MMLU/ARC-format CSV, a JSON/JSONL file with the same fields, or
    ``builtin:<name>`` (:data:`BUILTIN_MC`); a seeded sample of at most ``n`` (file order
    kept). A ``subject`` or ``category`` field becomes :attr:`MCQuestion.subject`."""
    if str(path).startswith("builtin:"):
        from safeneuron.data.prompts import builtin_path

        name = str(path).split(":", 1)[1]
        if name not in BUILTIN_MC:
            raise MCFileError(f"unknown built-in multiple-choice set {name!r}; choose one of {', '.join(BUILTIN_MC)}")
        path = builtin_path(f"{name}.jsonl")
    path = Path(path)
    if not path.is_file():
        raise MCFileError(f"{path}: multiple-choice file not found")
    try:
        rows = _read_mc_rows(path)
    except UnicodeDecodeError as err:
        raise MCFileError(f"{path}: not readable UTF-8 text ({err})") from None
    if not rows:
        raise MCFileError(f"{path}: no questions")
    columns = {c.strip().lower(): c for c in rows[0]}
    missing = [c for c in ("question", "a", "b", "answer") if c not in columns]
    if missing:
        raise MCFileError(f"{path}: missing column(s) {', '.join(missing)}; expected question,A,B,C,D,answer")
    option_cols = [columns[c.lower()] for c in LETTERS + ("E",) if c.lower() in columns]
    out = []
    first_line = 1 if path.suffix.lower() in (".jsonl", ".json") else 2  # a CSV has its header first
    blank_inside = 0
    for line, r in enumerate(rows, first_line):
        given = [str(r.get(c) or "").strip() for c in option_cols]  # by letter: the answer names a column
        raw = str(r[columns["answer"]]).strip().upper()
        if raw.isdigit():
            answer = int(raw)
        elif len(raw) == 1 and "A" <= raw <= "E":
            answer = ord(raw) - ord("A")
        else:
            raise MCFileError(f"{path}:{line}: answer {raw!r} is neither a letter A-E nor a 0-based index")
        if not 0 <= answer < len(given) or not given[answer]:
            why = f"names a blank option" if 0 <= answer < len(given) else \
                f"points past the {sum(bool(o) for o in given)} options"
            raise MCFileError(f"{path}:{line}: answer {raw!r} {why}")
        # a blank option is left out and the answer keeps pointing at the option it names
        kept = [i for i, o in enumerate(given) if o]
        if kept != list(range(len(kept))):
            blank_inside += 1
        options = tuple(given[i] for i in kept)
        answer = kept.index(answer)
        subject_col = columns.get("subject", columns.get("category"))
        subject = r.get(subject_col) if subject_col else None
        out.append(MCQuestion(str(r[columns["question"]]).strip(), options, answer, subject))
    if blank_inside:
        logger.warning("%s: %d question(s) have a blank option before a filled one; it is left out and each answer "
                       "still names the option its letter points at", path, blank_inside)
    if n is not None and n < len(out):
        idx = sorted(random.Random(seed).sample(range(len(out)), n))
        out = [out[i] for i in idx]
    return out


def format_mc(q: MCQuestion) -> str:
    """``<question>\\nA. <opt>\\nB. <opt>...\\nAnswer:`` (MMLU's zero-shot format)."""
    lines = [q.question] + [f"{LETTERS[i] if i < 4 else 'E'}. {o}" for i, o in enumerate(q.options)]
    return "\n".join(lines) + "\nAnswer:"


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


@torch.no_grad()
def continuation_logprobs(
    model: nn.Module,
    tokenizer,
    contexts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 1024,
) -> list[float]:
    """Sum of log p(continuation tokens | context) per pair, float64.

    Context and continuation are tokenised separately and concatenated (as
    lm-evaluation-harness does), right-padded; long inputs lose tokens on the left.
    """
    device = model_device(model)
    pairs = []
    for ctx, cont in zip(contexts, continuations):
        c_ids = _encode(tokenizer, ctx, True)
        x_ids = _encode(tokenizer, cont, False)
        if not x_ids:
            raise ValueError(f"continuation {cont!r} has no tokens")
        ids = (c_ids + x_ids)[-max_length:]
        pairs.append((ids, min(len(x_ids), len(ids) - 1)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = [0.0] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(pairs[i][0]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids = pairs[i][0]
            input_ids[r, : len(ids)] = torch.tensor(ids)
            mask[r, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits, -1)  # [batch, width, vocab]
        for r, i in enumerate(idx):
            ids, n_cont = pairs[i]
            end = len(ids)
            targets = torch.tensor(ids[end - n_cont :], device=logp.device)
            # the token at position t is predicted by the logits at t - 1
            out[i] = float(logp[r, end - n_cont - 1 : end - 1].gather(-1, targets[:, None]).double().sum())
    return out


@torch.no_grad()
def next_token_logprobs(model: nn.Module, tokenizer, contexts: Sequence[str], *, batch_size: int = 8,
                        max_length: int = 1024) -> list[torch.Tensor]:
    """log p(next token | context) [vocab] per context (left-padded, only the last
    position's logits are computed). Equals :func:`continuation_logprobs` for a
    one-token continuation."""
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [_encode(tokenizer, c, True)[-max_length:] for c in contexts]
    out: list[torch.Tensor] = [None] * len(encoded)  # type: ignore[list-item]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            input_ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        kwargs = dict(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device))
        try:
            logits = model(**kwargs, logits_to_keep=1).logits[:, -1]
        except TypeError:  # a model without logits_to_keep
            logits = model(**kwargs).logits[:, -1]
        logp = torch.log_softmax(logits.float(), -1).cpu()  # [batch, vocab]
        for r, i in enumerate(idx):
            out[i] = logp[r]
    return out


@torch.no_grad()
def mc_predictions(model: nn.Module, tokenizer, questions: Sequence[MCQuestion], *, scoring: str = "letter",
                   batch_size: int = 8) -> list[int]:
    """The predicted option index of every question (highest log-likelihood)."""
    if scoring not in ("letter", "option"):
        raise SafeneuronError(f"mc scoring must be 'letter' or 'option', got {scoring!r}")
    if scoring == "letter":
        letter_ids = [_encode(tokenizer, f" {c}", False) for c in LETTERS + ("E",)]
        if all(len(ids) == 1 for ids in letter_ids):  # one forward per question
            logp = next_token_logprobs(model, tokenizer, [format_mc(q) for q in questions], batch_size=batch_size)
            return [int(torch.tensor([float(lp[letter_ids[i][0]]) for i in range(len(q.options))]).argmax())
                    for lp, q in zip(logp, questions)]
    contexts, continuations, owner = [], [], []
    for qi, q in enumerate(questions):
        if scoring == "letter":
            ctx = format_mc(q)
            conts = [f" {LETTERS[i] if i < 4 else 'E'}" for i in range(len(q.options))]
        else:
            ctx = f"Question: {q.question}\nAnswer:"
            conts = [f" {o}" for o in q.options]
        for c in conts:
            contexts.append(ctx)
            continuations.append(c)
            owner.append(qi)
    scores = continuation_logprobs(model, tokenizer, contexts, continuations, batch_size=batch_size)
    best: dict[int, tuple[float, int]] = {}
    counter: dict[int, int] = {}
    for qi, s in zip(owner, scores):
        k = counter.get(qi, 0)
        counter[qi] = k + 1
        if qi not in best or s > best[qi][0]:
            best[qi] = (s, k)
    return [best[i][1] for i in range(len(questions))]


def mc_accuracy(model: nn.Module, tokenizer, questions: Sequence[MCQuestion], *, scoring: str = "letter",
                batch_size: int = 8) -> list[bool]:
    """Per-question correctness (True = the highest-likelihood option is the answer)."""
    preds = mc_predictions(model, tokenizer, questions, scoring=scoring, batch_size=batch_size)
    return [p == q.answer for p, q in zip(preds, questions)]


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 8,
               max_length: int = 512) -> tuple[float, int]:
    """``(exp(mean token NLL), tokens scored)`` over plain texts (no chat template).

    Each text is scored on its own (right-padded batches); its first token is the
    context, the rest are predicted.
    """
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [_encode(tokenizer, t, True)[:max_length] for t in texts]
    encoded = [e for e in encoded if len(e) >= 2]
    if not encoded:
        raise SafeneuronError("perplexity needs texts of at least two tokens")
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(e) for e in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, e in enumerate(chunk):
            input_ids[r, : len(e)] = torch.tensor(e)
            mask[r, : len(e)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1)  # [batch, width-1, vocab] predicts tokens 1..
        targets = input_ids[:, 1:].to(logp.device)
        nll = -logp.gather(-1, targets[..., None]).squeeze(-1)  # [batch, width-1]
        valid = mask[:, 1:].to(logp.device).bool()
        total_nll += float(nll[valid].double().sum())
        total_tokens += int(valid.sum())
    return math.exp(total_nll / total_tokens), total_tokens


#: The method's capability tasks and their few-shot counts (lm-evaluation-harness names).
LM_EVAL_FEWSHOT = {"arc_challenge": 25, "arc_easy": 25, "truthfulqa_mc1": 0, "truthfulqa_mc2": 0, "gsm8k": 5}


def run_lm_eval(model: nn.Module, tokenizer, tasks: Sequence[str], *, limit: int | None = None,
                batch_size: int = 8, num_fewshot: dict[str, int] | None = None,
                apply_chat_template: bool = False, out_dir: str | Path | None = None) -> dict[str, dict]:
    """Run lm-evaluation-harness tasks on an in-memory model (hooks stay active).

    Returns ``{task: {metric: value}}``. Few-shot counts default to
    :data:`LM_EVAL_FEWSHOT` (the method's protocol), else the task's own;
    ``apply_chat_template`` is passed to ``lm_eval.simple_evaluate`` as it is. With
    ``out_dir``, lm-eval's own output is kept there, as its ``--output_path --log_samples``
    would: ``results.json`` (its results, configs and versions) and ``samples_<task>.jsonl``
    (one record per example: doc, arguments, responses, metrics).
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise LmEvalMissingError(
            "lm-evaluation-harness is not installed: pip install 'safeneuron[eval]' (or lm-eval), "
            "or leave lm_eval_tasks unset"
        ) from None
    shots = dict(LM_EVAL_FEWSHOT, **(num_fewshot or {}))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out: dict[str, dict] = {}
    kept: dict[str, Any] = {}
    for task in tasks:
        res = lm_eval.simple_evaluate(model=lm, tasks=[task], num_fewshot=shots.get(task), limit=limit,
                                      log_samples=out_dir is not None, apply_chat_template=apply_chat_template)
        res = res or {}
        for name, metrics in res.get("results", {}).items():
            out[name] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if out_dir is not None:
            for name, records in (res.get("samples") or {}).items():
                write_jsonl(Path(out_dir) / f"samples_{_file_part(name)}.jsonl", [_plain(r) for r in records])
            for key in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples"):
                for name, value in (res.get(key) or {}).items():
                    kept.setdefault(key, {})[name] = _plain(value)
    if out_dir is not None:
        kept["apply_chat_template"] = apply_chat_template
        write_json(Path(out_dir) / "results.json", kept)
    return out


def _file_part(name: str) -> str:
    """A task name as a file-name part (lm-eval task names are identifiers, sub-tasks may hold ``/``)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _plain(value: Any) -> Any:
    """``value`` with anything JSON cannot hold (tensors, numpy scalars, functions) as text."""
    return json.loads(json.dumps(value, default=str))
