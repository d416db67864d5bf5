"""Scores and selection as pure functions: formulas, the false-selection bound, edge cases."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from safeneuron.activations import NeuronStats
from safeneuron.stages.identify import select_safety_neurons
from safeneuron.scoring import (
    activation_shift_z,
    cap_top_frac,
    default_tau_es,
    effect_size,
    expected_false_selections,
    false_selection_bound,
    neurostrike_probe,
    neurostrike_select,
    score_neurons,
    select_by_t,
    t_statistic,
)


def test_effect_size_matches_numpy_cohens_d():
    rng = np.random.default_rng(1)
    u, s = rng.normal(1.0, 2.0, (40, 5)), rng.normal(0.0, 1.5, (60, 5))
    d = effect_size(NeuronStats.of(torch.from_numpy(u)), NeuronStats.of(torch.from_numpy(s))).numpy()
    pooled = np.sqrt(((40 - 1) * u.var(0, ddof=1) + (60 - 1) * s.var(0, ddof=1)) / (40 + 60 - 2))
    np.testing.assert_allclose(d, (u.mean(0) - s.mean(0)) / pooled, rtol=1e-10)
    t = t_statistic(torch.from_numpy(d), 40, 60).numpy()
    np.testing.assert_allclose(t, d * math.sqrt(40 * 60 / 100), rtol=1e-12)


def test_zero_variance_neurons_give_zero_not_nan():
    u = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 3.0]])
    s = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    scores = score_neurons(NeuronStats.of(u), NeuronStats.of(s))
    for value in scores.as_dict().values():
        assert torch.isfinite(value).all()
    assert scores.es[0] == 0 and scores.es[1] == 0 and scores.es[2] > 0


def test_fewer_than_two_prompts_is_a_clear_error():
    one = NeuronStats.of(torch.ones(1, 3))
    with pytest.raises(ValueError, match="at least 2 prompts per class"):
        effect_size(one, NeuronStats.of(torch.ones(5, 3)))


def test_false_selection_rate_on_null_data_matches_theorem():
    # Both classes from one distribution: every selection is false.
    rng = np.random.default_rng(0)
    n_u, n_s, neurons = 64, 64, 20000
    u = torch.from_numpy(rng.normal(0, 1, (n_u, neurons)))
    s = torch.from_numpy(rng.normal(0, 1, (n_s, neurons)))
    t = t_statistic(effect_size(NeuronStats.of(u), NeuronStats.of(s)), n_u, n_s)
    for tau in (1.0, 1.645, 2.0):
        bound = false_selection_bound(tau)
        rate = float((t > tau).double().mean())
        se = math.sqrt(bound * (1 - bound) / neurons)
        # Within sampling error (4 SE) of 1 - Phi(tau), plus the small-sample o(1) slack of a t vs normal law.
        assert abs(rate - bound) < 4 * se + 0.004, (tau, rate, bound)
    # The expected number of false selections at an ES threshold uses the equivalent T threshold.
    tau_es = 0.3
    expected = expected_false_selections(neurons, tau_es, n_u, n_s)
    assert expected == pytest.approx(neurons * norm.sf(tau_es * math.sqrt(n_u * n_s / (n_u + n_s))))
    observed = int((effect_size(NeuronStats.of(u), NeuronStats.of(s)) > tau_es).sum())
    assert abs(observed - expected) < 4 * math.sqrt(expected) + 0.004 * neurons


def test_sas_is_layer_zscore_and_requires_positive_shift():
    shift = torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0, -10.0])
    z = activation_shift_z(shift)
    np.testing.assert_allclose(z.numpy(), ((shift - shift.mean()) / shift.std(unbiased=False)).numpy(), rtol=1e-6)
    assert torch.equal(activation_shift_z(torch.zeros(4)), torch.zeros(4))
    # by hand: mean 0, population sd sqrt(200 / 6) = 5.7735; z = +-10 / 5.7735 = +-1.7321
    np.testing.assert_allclose(z.numpy()[4:], [1.7320508, -1.7320508], rtol=1e-6)
    assert z[4] > 0 > z[5]  # the sign follows the shift: harmful above harmless is positive


def test_selection_union_and_sets():
    rng = np.random.default_rng(0)
    s = rng.normal(0, 1, (50, 100))
    u = rng.normal(0, 1, (50, 100))
    u[:, 3] += 5.0  # large effect, large shift
    u[:, 7] += 0.9 * 0  # nothing
    u[:, 9] = u[:, 9] * 0.01 + 0.6  # tiny variance: large d, small shift
    scores = {"m": score_neurons(NeuronStats.of(torch.from_numpy(u)), NeuronStats.of(torch.from_numpy(s)))}
    sets = select_safety_neurons(scores, 50, 50, tau_es=2.0, tau_sas=2.0)
    assert sets["es"].masks["m"][3] and sets["sas"].masks["m"][3]
    assert not sets["union"].masks["m"][7]
    assert torch.equal(sets["union"].masks["m"], sets["es"].masks["m"] | sets["sas"].masks["m"])
    by_t = select_safety_neurons(scores, 50, 50, tau_es=2.0, tau_sas=2.0, select="t", alpha=0.01, correction="bonferroni")
    assert by_t["es"].masks["m"][3]
    capped = select_safety_neurons(scores, 50, 50, tau_es=0.01, tau_sas=2.0, top_frac=0.02)
    assert int(capped["es"].masks["m"].sum()) == 2


def test_bonferroni_and_bh():
    p = torch.tensor([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216])
    assert select_by_t(p, 0.05, "bonferroni").tolist() == [True] + [False] * 9
    # Classic BH example: k = 2 at alpha 0.05 (0.008 <= 0.01; 0.039 > 0.015, ..., none later pass).
    assert select_by_t(p, 0.05, "bh").tolist() == [True, True] + [False] * 8
    with pytest.raises(ValueError, match="alpha"):
        select_by_t(p, 1.5, "bh")


def test_cap_top_frac_and_default_thresholds():
    sel = torch.tensor([True, True, True, False])
    assert cap_top_frac(sel, torch.tensor([0.1, 0.9, 0.5, 9.0]), 0.5).tolist() == [False, True, True, False]
    assert default_tau_es("qwen2") == 3.0 and default_tau_es("llama") == 2.0


def test_neurostrike_probe_finds_the_informative_neuron():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 40, generator=g)
    y = (torch.arange(200) < 100).float()
    x[:100, 5] += 3.0
    w = neurostrike_probe(x, y, epochs=300, lr=0.01)
    chosen = neurostrike_select(w, 3.0)
    assert chosen[5] and int(chosen.sum()) <= 3


def test_sas_never_selects_a_neuron_whose_harmful_mean_is_lower():
    """|z| is large for both a strongly raised and a strongly lowered neuron; only the raised one is a
    safety neuron by SAS (and neither sign can be mistaken by ES, which is one-sided too)."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(40, 30, generator=g)
    s = torch.randn(40, 30, generator=g)
    u[:, 0] += 4.0  # harmful far above harmless
    u[:, 1] -= 4.0  # harmful far below harmless
    scores = {"m": score_neurons(NeuronStats.of(u), NeuronStats.of(s))}
    assert scores["m"].shift[0] > 0 > scores["m"].shift[1]
    assert scores["m"].sas[0] > 2.0 and scores["m"].sas[1] < -2.0
    sets = select_safety_neurons(scores, 40, 40, tau_es=2.0, tau_sas=2.0)
    assert sets["sas"].masks["m"][0] and not sets["sas"].masks["m"][1]
    assert sets["es"].masks["m"][0] and not sets["es"].masks["m"][1]


def test_one_sided_p_uses_students_t_with_the_pooled_degrees_of_freedom():
    from safeneuron.scoring import one_sided_p

    t = torch.tensor([2.0, 0.0])
    student = one_sided_p(t, df=10)
    assert student[0].item() == pytest.approx(0.036694, abs=1e-5)  # t table: P(T_10 > 2)
    assert student[1].item() == pytest.approx(0.5)
    assert one_sided_p(t)[0].item() == pytest.approx(0.022750, abs=1e-5)  # the normal tail is thinner
