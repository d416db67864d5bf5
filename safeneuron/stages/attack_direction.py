"""Refusal-direction ablation (Arditi et al. 2024), re-extracted on the model under attack.

In steps, each a function::

    extract_candidates   difference in means of the residual stream, harmful minus harmless
                         attacker prompts, at every layer and post-instruction position
    score_candidates     the most separating (layer, position) candidates, each ablated on held-out
                         attacker prompts: refusal score (log-odds of a refusal opening) and KL on
                         harmless prompts
    choose_directions    the best candidates within the KL budget
    direction_plan       one condition per rank k: the top k directions, orthonormalised, projected
                         out of every layer's residual stream (hooks)
    save_orthogonalized  the same edit in the weights, written as a model (``--save``)
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from safeneuron.directions import (ablate_directions, orthogonalize_weights, orthonormal, residual_activations,
                                   residual_layers, stream_writing_parameters)
from safeneuron.models import save_model_dir
from safeneuron.next_token import kl_divergence, next_token_logprobs, refusal_scores, refusal_token_ids
from safeneuron.stages.conditions import AttackContext, AttackPlan, Condition

logger = logging.getLogger(__name__)

__all__ = ["Candidate", "extract_candidates", "score_candidates", "choose_directions", "direction_plan",
           "save_orthogonalized"]


@dataclass
class Candidate:
    """A candidate refusal direction: layer, position (negative: counted from the prompt's end), the unit
    vector [d_model] and how it was scored."""

    layer: int
    position: int
    direction: torch.Tensor
    separation: float
    refusal_score: float | None = None
    kl: float | None = None

    def row(self) -> dict:
        return {"layer": self.layer, "position": self.position, "separation": round(self.separation, 4),
                "refusal_score": None if self.refusal_score is None else round(self.refusal_score, 4),
                "kl": None if self.kl is None else round(self.kl, 5)}


def extract_candidates(loaded, harmful: list[str], harmless: list[str], *, positions: int, max_layer: float,
                       batch_size: int) -> list[Candidate]:
    """Difference-in-means directions (unit vectors) at every layer below ``max_layer`` of the depth and each of
    the last ``positions`` tokens, ranked by separation: the gap between the classes' mean projections over
    their pooled standard deviation (on the extraction prompts). Where the class means agree exactly (the
    embedding of a constant template token entering layer 0) there is no direction and no candidate."""
    acts_h = residual_activations(loaded.model, loaded.tokenizer, harmful, positions=positions,
                                  batch_size=batch_size).double()
    acts_n = residual_activations(loaded.model, loaded.tokenizer, harmless, positions=positions,
                                  batch_size=batch_size).double()
    diff = acts_h.mean(0) - acts_n.mean(0)  # [layers, positions, d]
    unit = diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    proj_h, proj_n = (acts_h * unit).sum(-1), (acts_n * unit).sum(-1)  # [n, layers, positions]
    pooled = ((proj_h.var(0) + proj_n.var(0)) / 2).sqrt().clamp_min(1e-12)
    separation = (proj_h.mean(0) - proj_n.mean(0)) / pooled
    n_layers = diff.shape[0]
    out = []
    for layer in range(max(1, int(max_layer * n_layers))):
        for p in range(positions):
            if float(diff[layer, p].norm()) < 1e-6:  # the classes agree exactly here (e.g. layer 0 at template tokens)
                continue
            out.append(Candidate(layer, p - positions, unit[layer, p].float(), float(separation[layer, p])))
    return sorted(out, key=lambda c: -c.separation)


def score_candidates(loaded, candidates: list[Candidate], harmful: list[str], harmless: list[str], *,
                     batch_size: int) -> float:
    """Ablate each candidate on its own: mean refusal score on ``harmful`` and mean KL(plain || ablated) of the
    next-token distribution on ``harmless`` (filled in place). Returns the unablated refusal score."""
    ids = refusal_token_ids(loaded.tokenizer)
    model, tok = loaded.model, loaded.tokenizer
    base_h = next_token_logprobs(model, tok, harmful, batch_size=batch_size)
    base_n = next_token_logprobs(model, tok, harmless, batch_size=batch_size)
    for c in candidates:
        with ablate_directions(model, c.direction):
            lp_h = next_token_logprobs(model, tok, harmful, batch_size=batch_size)
            lp_n = next_token_logprobs(model, tok, harmless, batch_size=batch_size)
        c.refusal_score = float(refusal_scores(lp_h, ids).mean())
        c.kl = float(kl_divergence(base_n, lp_n).mean())
    return float(refusal_scores(base_h, ids).mean())


def choose_directions(candidates: list[Candidate], kl_budget: float) -> tuple[list[Candidate], bool]:
    """The scored candidates within the KL budget, lowest refusal score first; when none is within it, all of
    them by refusal score (the second value says whether the budget held)."""
    scored = [c for c in candidates if c.refusal_score is not None]
    within = [c for c in scored if c.kl is not None and c.kl <= kl_budget]
    pool = within or scored
    return sorted(pool, key=lambda c: c.refusal_score), bool(within)


def _digest(basis: torch.Tensor) -> str:
    return hashlib.sha256(basis.double().cpu().numpy().tobytes()).hexdigest()[:16]


def direction_plan(ctx: AttackContext) -> AttackPlan:
    """The direction attack on the model under attack: extraction on the attacker's prompts, the candidate chosen
    on a held-out share of them, one condition per rank in ``direction_ranks``."""
    cfg, loaded = ctx.config, ctx.loaded
    t0 = time.perf_counter()
    harmful, harmless = ctx.id_harmful.prompts, ctx.id_harmless.prompts
    n_sel = max(1, round(cfg.direction_selection_share * min(len(harmful), len(harmless))))
    if min(len(harmful), len(harmless)) - n_sel < 2:
        raise ValueError(f"the direction attack needs more attacker prompts than {min(len(harmful), len(harmless))}")
    batch = ctx.settings.batch_size
    candidates = extract_candidates(loaded, harmful[n_sel:], harmless[n_sel:], positions=cfg.direction_positions,
                                    max_layer=cfg.direction_max_layer, batch_size=batch)
    extract_s = time.perf_counter() - t0
    top = candidates[: cfg.direction_candidates]
    base_score = score_candidates(loaded, top, harmful[:n_sel], harmless[:n_sel], batch_size=batch)
    chosen, within = choose_directions(top, cfg.direction_kl_budget)
    conditions = []
    for k in cfg.direction_ranks:
        basis = orthonormal(torch.stack([c.direction for c in chosen[:k]]))
        conditions.append(Condition(k, f"rank {k}", tag=f"|direction:{_digest(basis)}",
                                    edit=lambda b=basis: ablate_directions(loaded.model, b), payload=basis,
                                    details={"rank": int(basis.shape[0]),
                                             "directions": [(c.layer, c.position) for c in chosen[:k]]}))
    details = {"extraction_prompts": {"harmful": len(harmful) - n_sel, "harmless": len(harmless) - n_sel},
               "selection_prompts": {"harmful": n_sel, "harmless": n_sel}, "n_layers": len(residual_layers(loaded.model)),
               "refusal_score_plain": round(base_score, 4), "kl_budget": cfg.direction_kl_budget,
               "within_kl_budget": within, "chosen": [c.row() for c in chosen[: max(cfg.direction_ranks)]],
               "candidates": [c.row() for c in top], "extract_s": round(extract_s, 2),
               "select_s": round(time.perf_counter() - t0 - extract_s, 2)}
    if not within:
        logger.warning("direction attack: no candidate within the KL budget %.3g; the lowest refusal scores are used",
                       cfg.direction_kl_budget)
    return AttackPlan("direction", "rank", conditions, details)


@torch.no_grad()
def save_orthogonalized(loaded, basis: torch.Tensor, path: str | Path, *, metadata: dict | None = None) -> Path:
    """Write ``loaded``'s model with ``basis`` orthogonalised out of its weights
    (:func:`~safeneuron.directions.orthogonalize_weights`) to ``path``; the in-memory model is restored."""
    from safeneuron.artifacts import write_json
    from safeneuron.cards import write_model_card

    model = loaded.model
    edited = stream_writing_parameters(model)
    backup = [t.detach().clone() for t in edited]
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    try:
        orthogonalize_weights(model, basis)

        def extra(folder: Path) -> None:
            write_json(folder / "safeneuron_direction_ablation.json",
                       {"source_model": loaded.name, "source_path": loaded.path, "rank": int(basis.shape[0]),
                        "basis": basis.double().tolist(), **(metadata or {})})
            write_model_card(folder, {"base_model": loaded.name, "method": "refusal-direction ablation",
                                      "title": f"{loaded.name} with a rank-{int(basis.shape[0])} refusal direction "
                                               "projected out of its weights",
                                      "note": "An attack artifact (safeneuron attack --kind direction --save): the "
                                              "weights that write the residual stream orthogonalised against the "
                                              "refusal direction, for red-teaming, not for deployment."})

        save_model_dir(model, loaded.processor or loaded.tokenizer, path, write_extra=extra)
    finally:
        for tensor, saved in zip(edited, backup):
            tensor.copy_(saved)
        if tied:
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
            model.config.tie_word_embeddings = True
    return Path(path)
