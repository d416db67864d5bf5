"""Scoring neurons and selecting safety neurons (pure functions on tensors).

For neuron j with harmful (unsafe, u) and harmless (safe, s) activations:

* Activation Effect Size (Cohen's d):
  ``d_j = (mean_u - mean_s) / s_pooled``,
  ``s_pooled = sqrt(((n_u-1) var_u + (n_s-1) var_s) / (n_u + n_s - 2))``;
  selected when ``d_j > tau_ES`` (one-sided). A zero pooled deviation (dead or
  constant neuron) gives ``d_j = 0``, never inf/NaN.
* Its test statistic ``T_j = d_j * sqrt(n_u n_s / (n_u + n_s))``. For a neuron with
  no real difference, ``P(T_j > tau) <= 1 - Phi(tau) + o(1)`` (Theorem 3.1), so the
  expected number of false selections at a threshold is at most
  ``n_neurons * (1 - Phi(tau))``.
* Safety Activation Shift: ``delta_j = mean_u - mean_s`` z-scored within its layer;
  selected when ``z_j > tau_SAS`` and ``delta_j > 0``.

The safety neurons are the union of the ES and SAS sets, per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.stats import norm

from safeneuron.activations import NeuronStats

__all__ = [
    "NeuronScores",
    "mlp_probe_attribution",
    "score_neurons",
    "effect_size",
    "t_statistic",
    "one_sided_p",
    "activation_shift_z",
    "false_selection_bound",
    "expected_false_selections",
    "select_by_t",
    "cap_top_frac",
    "default_tau_es",
    "neurostrike_probe",
    "neurostrike_select",
]


@dataclass
class NeuronScores:
    """Scores of one MLP's neurons; every tensor is float32 [d_ff]."""

    mean_harmful: torch.Tensor
    mean_harmless: torch.Tensor
    var_harmful: torch.Tensor
    var_harmless: torch.Tensor
    es: torch.Tensor
    t: torch.Tensor
    shift: torch.Tensor
    sas: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def effect_size(harmful: NeuronStats, harmless: NeuronStats) -> torch.Tensor:
    """Cohen's d [d_ff], float64; 0 where the pooled standard deviation is 0."""
    n_u, n_s = harmful.count, harmless.count
    if n_u < 2 or n_s < 2:
        raise ValueError(
            f"need at least 2 prompts per class for variances (got {n_u} harmful, {n_s} harmless)"
        )
    pooled_var = (harmful.m2 + harmless.m2) / (n_u + n_s - 2)
    s_pooled = pooled_var.clamp_min(0).sqrt()
    diff = harmful.mean - harmless.mean
    # A deviation at float64 rounding level of the means is a constant neuron.
    scale = torch.maximum(harmful.mean.abs(), harmless.mean.abs())
    varies = s_pooled > 1e-12 * scale
    return torch.where(varies, diff / torch.where(varies, s_pooled, torch.ones_like(s_pooled)), torch.zeros_like(diff))


def t_statistic(d: torch.Tensor, n_harmful: int, n_harmless: int) -> torch.Tensor:
    """``T = d * sqrt(n_u n_s / (n_u + n_s))``."""
    return d * math.sqrt(n_harmful * n_harmless / (n_harmful + n_harmless))


def one_sided_p(t: torch.Tensor, df: int | None = None) -> torch.Tensor:
    """One-sided p-value of ``t``: Student's t with ``df`` degrees of freedom (``n_u + n_s - 2`` for the pooled
    two-sample statistic T), or ``1 - Phi(t)`` (the normal approximation) when ``df`` is None."""
    if df is not None:
        from scipy.stats import t as student_t

        return torch.from_numpy(student_t.sf(t.double().numpy(), df))
    return torch.from_numpy(norm.sf(t.double().numpy()))


def activation_shift_z(shift: torch.Tensor) -> torch.Tensor:
    """Z-score of the mean shift within the layer (population std); 0 for a constant layer."""
    std = shift.std(unbiased=False)
    if not torch.isfinite(std) or std == 0:
        return torch.zeros_like(shift)
    return (shift - shift.mean()) / std


def false_selection_bound(tau_t: float) -> float:
    """Theorem 3.1: asymptotic bound ``1 - Phi(tau)`` on ``P(T_j > tau)`` for a null neuron."""
    return float(norm.sf(tau_t))


def es_threshold_as_t(tau_es: float, n_harmful: int, n_harmless: int) -> float:
    """The T threshold equivalent to ``d > tau_es``."""
    return tau_es * math.sqrt(n_harmful * n_harmless / (n_harmful + n_harmless))


def expected_false_selections(n_neurons: int, tau_es: float, n_harmful: int, n_harmless: int) -> float:
    """Upper bound on the expected number of null neurons selected by ``d > tau_es``."""
    return n_neurons * false_selection_bound(es_threshold_as_t(tau_es, n_harmful, n_harmless))


def select_by_t(p_values: torch.Tensor, alpha: float, correction: str) -> torch.Tensor:
    """Select by one-sided p-value with family-wise or false-discovery control.

    ``p_values``: all neurons of all layers, flattened [N]. ``correction``:
    ``bonferroni`` (p < alpha / N) or ``bh`` (Benjamini-Hochberg at level alpha).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    p = p_values.double().flatten()
    n = p.numel()
    if correction == "bonferroni":
        return p < alpha / n
    if correction == "bh":  # Benjamini-Hochberg adjusted p-values (scipy), selected at alpha
        from scipy.stats import false_discovery_control

        return torch.from_numpy(false_discovery_control(p.numpy(), method="bh") <= alpha)
    raise ValueError(f"unknown correction {correction!r}; choose 'bonferroni' or 'bh'")


def cap_top_frac(selected: torch.Tensor, score: torch.Tensor, frac: float) -> torch.Tensor:
    """Keep at most ``ceil(frac * d_ff)`` of the selected neurons, those of highest score."""
    k = math.ceil(frac * selected.numel())
    if int(selected.sum()) <= k:
        return selected
    masked = torch.where(selected, score.double(), torch.tensor(-math.inf, dtype=torch.float64))
    keep = torch.zeros_like(selected)
    keep[torch.topk(masked, k).indices] = True
    return keep


def default_tau_es(model_type: str) -> float:
    """The method's tuned ES threshold: 3 for Qwen models, 2 for Llama and others."""
    return 3.0 if model_type.startswith("qwen") else 2.0


def score_neurons(harmful: NeuronStats, harmless: NeuronStats) -> NeuronScores:
    """All per-neuron scores of one MLP from the two classes' statistics."""
    d = effect_size(harmful, harmless)
    shift = harmful.mean - harmless.mean
    return NeuronScores(
        mean_harmful=harmful.mean.float(),
        mean_harmless=harmless.mean.float(),
        var_harmful=harmful.var.float(),
        var_harmless=harmless.var.float(),
        es=d.float(),
        t=t_statistic(d, harmful.count, harmless.count).float(),
        shift=shift.float(),
        sas=activation_shift_z(shift).float(),
    )


# --------------------------------------------------------------------------- NeuroStrike
def neurostrike_probe(
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 5000,
    lr: float = 1e-3,
    weight_decay: float = 1e-3,
    seed: int = 1234,
) -> torch.Tensor:
    """NeuroStrike's safety probe: logistic regression, full batch, Adam.

    Args:
        x: pooled activations [n, d] (one module).
        labels: [n], 1 for harmful and 0 for harmless.
    Returns:
        The probe weights [d] (positive: evidence for harmful).
    """
    g = torch.Generator().manual_seed(seed)
    keep = ~torch.isnan(x).any(1)
    x, labels = x[keep].float(), labels[keep].float()
    perm = torch.randperm(x.shape[0], generator=g)
    x, y = x[perm], labels[perm].unsqueeze(1)
    torch.manual_seed(seed)
    clf = torch.nn.Linear(x.shape[1], 1).to(x.device)
    opt = torch.optim.Adam(clf.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        loss_fn(clf(x), y).backward()
        opt.step()
    return clf.weight.detach().flatten().cpu()


def neurostrike_select(weights: torch.Tensor, z_threshold: float = 3.0) -> torch.Tensor:
    """NeuroStrike's selection: probe weight > 0 and |z-score| > threshold within the module."""
    w = weights.double()
    std = w.std(unbiased=False)
    z = (w - w.mean()) / std if std > 0 else torch.zeros_like(w)
    return (z.abs() > z_threshold) & (w > 0)


def mlp_probe_attribution(
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    hidden: int = 64,
    epochs: int = 300,
    lr: float = 1e-3,
    weight_decay: float = 1e-3,
    seed: int = 1234,
) -> tuple[torch.Tensor, float]:
    """A 2-layer MLP safety probe on one layer's pooled neuron activations, and each neuron's attribution.

    The features are standardised; the probe (d -> ``hidden`` -> 1, ReLU) is trained full batch with Adam on
    binary cross-entropy. A neuron's attribution is its mean gradient x input (standardised units) over the
    harmful prompts: positive = its activation pushes the probe towards "harmful".

    Args:
        x: pooled activations [n, d].
        labels: [n], 1 for harmful and 0 for harmless.
    Returns:
        ``(attribution [d], training accuracy)``.
    """
    g = torch.Generator().manual_seed(seed)
    keep = ~torch.isnan(x).any(1)
    x, labels = x[keep].float(), labels[keep].float()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    torch.manual_seed(seed)
    probe = torch.nn.Sequential(torch.nn.Linear(z.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    perm = torch.randperm(z.shape[0], generator=g)
    zs, ys = z[perm], labels[perm].unsqueeze(1)
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        loss_fn(probe(zs), ys).backward()
        opt.step()
    harmful = z[labels > 0.5].clone().requires_grad_(True)
    probe(harmful).sum().backward()
    attribution = (harmful.grad * harmful.detach()).mean(0)
    with torch.no_grad():
        accuracy = float(((probe(z) > 0).float().squeeze(1) == labels).float().mean())
    return attribution.detach(), accuracy
