"""Provenance that travels with the artifacts: model cards for output model directories, ``__metadata__`` for
mask files, and publishing a directory to the Hugging Face hub.

A card is the ``README.md`` the hub shows: YAML front matter (``base_model``, ``library_name``, ``tags``) and a
short body naming the method, the rounds, the frozen neurons, the data, the settings hash and, once the model is
evaluated, its headline numbers. Every value comes from the stage's own manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from safeneuron.artifacts import write_text
from safeneuron.errors import SafeneuronError

__all__ = ["model_card", "write_model_card", "evaluation_summary", "mask_metadata", "push_to_hub", "HubError"]

METHODS = {
    "safeneuron": "SafeNeuron: DPO with the safety neurons ablated and frozen, so refusal has to grow new, redundant "
                  "pathways (the frozen neurons keep their weights bit for bit)",
    "dpo": "plain DPO on the same preference pairs (the baseline)",
    "sn-tune": "SN-Tune: only the safety neurons are trained",
}


class HubError(SafeneuronError):
    """Publishing to the Hugging Face hub failed (no token, no network, no such repository)."""


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def evaluation_summary(entry: Mapping[str, Any]) -> dict:
    """The headline numbers of one model's results entry (evaluate's ``results.json``)."""
    asr = entry.get("asr") or {}
    iterative = entry.get("asr_iterative") or []
    return {"n_harmful": entry.get("n_harmful"), "asr_plain": asr.get("ori"), "asr_full_pruned": asr.get("full"),
            "asr_iterative_last": iterative[-1]["asr"] if iterative else None,
            "over_refusal": entry.get("over_refusal"), "over_refusal_xstest": entry.get("over_refusal_xstest"),
            "mc_accuracy": entry.get("mc_accuracy"), "judge": entry.get("judge")}


def model_card(info: Mapping[str, Any]) -> str:
    """The card's text. ``info``: ``base_model``, ``method`` (a mode), ``rounds`` ([{round, neurons_frozen,
    loss_last, ...}]), ``prefs`` ({source, n_pairs, sha256}), ``settings_hash``, ``weights_sha256``, optionally
    ``evaluation`` (:func:`evaluation_summary`) and ``note`` (e.g. "attack artifact")."""
    base = info.get("base_model") or "unknown"
    method = info.get("method", "safeneuron")
    front = ["---", "library_name: transformers", f"base_model: {json.dumps(str(base))}",
             "tags:", "- safeneuron", "- safety", f"- {method}", "---", ""]
    lines = [f"# {info.get('title') or f'{base}, aligned with safeneuron ({method})'}", ""]
    if info.get("note"):
        lines += [f"> {info['note']}", ""]
    lines += [f"- **Base model:** `{base}` (weights sha256 `{info.get('weights_sha256') or 'n/a'}`)",
              f"- **Method:** {METHODS.get(method, method)}"]
    rounds = info.get("rounds") or []
    if rounds:
        lines.append(f"- **Rounds:** {len(rounds)}; frozen neurons per round: "
                     + ", ".join(str(r.get("neurons_frozen", 0)) for r in rounds))
    prefs = info.get("prefs")
    if prefs:
        lines.append(f"- **Data:** {prefs.get('n_pairs')} preference pairs from `{prefs.get('source')}` "
                     f"(sha256 `{str(prefs.get('sha256', ''))[:16]}`)")
    if info.get("settings_hash"):
        lines.append(f"- **Settings:** run key `{info['settings_hash']}` (every setting is in `align.json` beside "
                     "the rounds)")
    ev = info.get("evaluation")
    if ev:
        lines += ["", "## Evaluation", "",
                  f"On {ev.get('n_harmful')} held-out harmful prompts (judge: {ev.get('judge')}):", "",
                  "| ASR plain | ASR, safety neurons pruned | ASR, iterative pruning | over-refusal | XSTest-style | "
                  "MC accuracy |", "|---|---|---|---|---|---|",
                  f"| {_pct(ev.get('asr_plain'))} | {_pct(ev.get('asr_full_pruned'))} | "
                  f"{_pct(ev.get('asr_iterative_last'))} | {_pct(ev.get('over_refusal'))} | "
                  f"{_pct(ev.get('over_refusal_xstest'))} | {_pct(ev.get('mc_accuracy'))} |"]
    lines += ["", "Made with safeneuron (neuron-level safety alignment: find the safety neurons, freeze them, train "
              "redundant refusal, attack and evaluate). Weights are safetensors; no remote code is needed to load "
              "them.", ""]
    return "\n".join(front + lines)


def write_model_card(model_dir: str | Path, info: Mapping[str, Any]) -> Path:
    """Write ``model_dir/README.md`` (atomically) and return its path."""
    path = Path(model_dir) / "README.md"
    write_text(path, model_card(info))
    return path


def mask_metadata(**values: Any) -> dict[str, str]:
    """A mask file's ``__metadata__`` (safetensors keeps ``str -> str``): ``None`` left out, the rest as text."""
    return {"format": "safeneuron-mask/1",
            **{k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items() if v is not None}}


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False, message: str = "safeneuron") -> str:
    """Upload ``folder`` to the hub repository ``repo_id`` (created if missing); returns its URL."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    except Exception as err:  # hub errors have many types (offline, auth, HTTP); one line names the problem
        raise HubError(f"push to {repo_id} failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                       ) from None
    return f"https://huggingface.co/{repo_id}"
