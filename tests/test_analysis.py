"""Analysis: overlap ratio on masks with known intersections, probes on synthetic data,
layer distribution from manifests, and the analyze stage on a tiny random model."""

import itertools
import json
import math

import pytest
import torch

from conftest import make_tokenizer, tiny_model
from safeneuron.analysis import (
    category_composition,
    find_identifications,
    fit_logistic,
    layer_distribution,
    layer_fractions,
    layer_separability,
    overlap_curve,
    overlap_ratios,
    probe_accuracy,
    stratified_split,
)
from safeneuron.artifacts import ArtifactError
from safeneuron.cli import main
from safeneuron.config import AnalyzeConfig, ConfigError, IdentifyConfig
from safeneuron.masks import SafetyNeuronMask
from safeneuron.models import LoadedModel
from safeneuron.stages.analyze import analyze
from safeneuron.stages.identify import identify

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- overlap ratio
def core_plus_private(k=5, n=1000, core=10, private=30):
    """k sets: one shared core of ``core`` neurons plus ``private`` neurons of their own each."""
    sets = torch.zeros(k, n, dtype=torch.bool)
    sets[:, :core] = True
    for i in range(k):
        start = core + i * private
        sets[i, start : start + private] = True
    return sets


def reference_ratios(sets, order):
    """Overlap ratios with Python sets, straight from the definition."""
    members = [set(torch.nonzero(sets[i]).flatten().tolist()) for i in order]
    out = []
    for k in range(1, len(members) + 1):
        shared = set.intersection(*members[:k])
        mean = sum(len(m) for m in members[:k]) / k
        out.append(len(shared) / mean if mean else math.nan)
    return out


def test_overlap_ratio_of_a_shared_core_is_core_over_set_size():
    sets = core_plus_private()
    assert overlap_ratios(sets).tolist() == pytest.approx([1.0, 0.25, 0.25, 0.25, 0.25])
    curve = overlap_curve(sets, n_orders=50, seed=3)
    assert curve["k"] == [1, 2, 3, 4, 5]
    assert curve["mean"] == pytest.approx([1.0, 0.25, 0.25, 0.25, 0.25])
    assert curve["low"] == pytest.approx(curve["high"])  # every order gives the same curve
    assert curve["shared_all"] == 10 and curve["sizes"] == [40] * 5
    assert not curve["exhaustive"] and curve["n_orders"] == 50


def test_overlap_curve_averages_all_orders_exactly_when_few():
    g = torch.Generator().manual_seed(0)
    sets = torch.rand(4, 300, generator=g) < torch.tensor([0.2, 0.4, 0.6, 0.8])[:, None]
    curve = overlap_curve(sets, n_orders=1000, band=(10, 90))
    assert curve["exhaustive"] and curve["n_orders"] == 24
    expected = torch.tensor([reference_ratios(sets, order) for order in itertools.permutations(range(4))])
    assert curve["mean"] == pytest.approx(expected.mean(0).tolist())
    assert curve["std"] == pytest.approx(expected.std(0, unbiased=False).tolist())
    for lo, mean, hi in zip(curve["low"], curve["mean"], curve["high"]):
        assert lo <= mean + 1e-12 and mean <= hi + 1e-12
    assert curve["mean"][0] == 1.0
    # Nested-ish sets: the ratio falls as categories are added.
    assert curve["mean"][-1] < curve["mean"][1] < 1.0


def test_overlap_curve_random_orders_are_seeded_and_match_the_reference():
    g = torch.Generator().manual_seed(1)
    sets = torch.rand(7, 200, generator=g) < 0.5
    a = overlap_curve(sets, n_orders=30, seed=5)
    b = overlap_curve(sets, n_orders=30, seed=5)
    assert a == b and not a["exhaustive"]
    for order in ([0, 1, 2, 3, 4, 5, 6], [6, 2, 4, 0, 1, 3, 5]):
        assert overlap_ratios(sets[order]).tolist() == pytest.approx(reference_ratios(sets, order))


def test_overlap_accepts_masks_and_reports_empty_sets_as_none():
    layers = ["model.layers.0.mlp", "model.layers.1.mlp"]
    flat = core_plus_private(k=3, n=96, core=4, private=8)
    masks = [SafetyNeuronMask({layers[0]: row[:48].clone(), layers[1]: row[48:].clone()}) for row in flat]
    assert overlap_curve(masks)["mean"] == overlap_curve(flat)["mean"]
    empty = torch.zeros(3, 10, dtype=torch.bool)
    curve = overlap_curve(empty)
    assert curve["mean"] == [None, None, None]  # 0 / 0 is not a ratio
    json.dumps(curve, allow_nan=False)  # valid JSON
    composition = category_composition(dict(zip("abc", masks)))
    assert composition["counts"]["a"] == [12, 0] and composition["shared_all"] == [4, 0]
    assert composition["sizes"] == {"a": 12, "b": 12, "c": 12} and composition["d_ff"] == [48, 48]
    with pytest.raises(ValueError, match="different numbers of neurons"):
        overlap_ratios([torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool)])


# --------------------------------------------------------------------------- probes
def separable(n=200, d=20, seed=0, gap=3.0, informative=1):
    """Gaussian noise with the classes shifted by +-gap on the first ``informative`` features."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 2).double()
    x = torch.randn(n, d, generator=g)
    x[:, :informative] += gap * (2 * y - 1)[:, None]
    return x, y


def test_probe_is_near_perfect_on_separable_data():
    x, y = separable()
    assert probe_accuracy(x, y, seed=0, n_splits=3) >= 0.95
    # More features than prompts with a signal spread over many of them, as in MLP activations.
    wide_x, wide_y = separable(n=80, d=500, gap=0.5, informative=50)
    assert probe_accuracy(wide_x, wide_y, n_splits=2) >= 0.95


def test_probe_on_shuffled_labels_is_at_chance():
    x, y = separable(n=400)
    labels = y[torch.randperm(400, generator=torch.Generator().manual_seed(2))]
    assert abs(probe_accuracy(x, labels, n_splits=5) - 0.5) < 0.1


def test_logistic_fit_reaches_the_optimum():
    x, y = separable(n=120, d=8, gap=1.0)
    l2 = 0.05
    w, b = fit_logistic(x, y, l2=l2)
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(x.double() @ w + b, y) + 0.5 * l2 * (w @ w)
    loss.backward()
    assert w.grad.abs().max() < 1e-4 and b.grad.abs() < 1e-4  # stationary point of a convex objective


def test_stratified_split_is_seeded_disjoint_and_balanced():
    y = torch.tensor([1.0] * 30 + [0.0] * 70)
    train, test = stratified_split(y, 0.3, seed=4)
    assert set(train.tolist()).isdisjoint(test.tolist()) and len(train) + len(test) == 100
    assert int(y[test].sum()) == 9 and len(test) == 30
    again = stratified_split(y, 0.3, seed=4)
    assert torch.equal(train, again[0]) and torch.equal(test, again[1])
    with pytest.raises(ValueError, match="needs 2 per class"):
        stratified_split(torch.tensor([1.0, 0.0, 0.0]))


def test_safety_neuron_probes_see_the_signal_that_random_neurons_miss():
    n, d = 160, 40
    x, y = separable(n=n, d=d, gap=4.0)
    neurons = {"l0": x, "l1": torch.randn(n, d, generator=torch.Generator().manual_seed(9))}
    mask = SafetyNeuronMask({"l0": torch.arange(d) == 0, "l1": torch.zeros(d, dtype=torch.bool)})
    random = SafetyNeuronMask({"l0": torch.arange(d) == 7, "l1": torch.zeros(d, dtype=torch.bool)})
    out = layer_separability(None, neurons, y, mask=mask, random_mask=random, n_splits=2)
    assert out["safety_neurons"][0] > 0.95 and abs(out["random_neurons"][0] - 0.5) < 0.2
    assert out["safety_neurons"][1] is None and out["n_safety"] == [1, 0]
    assert out["neurons"][0] > 0.9 and abs(out["neurons"][1] - 0.5) < 0.2
    assert out["all_layers"]["safety_neurons"] > 0.95 and out["all_layers"]["n"] == 1
    assert "residual" not in out


# --------------------------------------------------------------------------- layer distribution
def manifest(n_layers, d_ff, counts):
    return {"d_ff": d_ff, "sets": ["es", "sas", "union"], "model": f"m{n_layers}",
            "selected_per_layer": {f"model.layers.{i}.mlp": {"es": c, "sas": 0, "union": c}
                                   for i, c in enumerate(counts)}}


def test_layer_distribution_puts_models_of_different_depth_on_one_axis():
    dist = layer_distribution({"small": manifest(2, 10, [1, 5]), "deep": manifest(4, 20, [0, 2, 4, 20])})
    small, deep = dist["rows"]
    assert small["fraction"] == [0.1, 0.5] and small["depth_edges"] == [0.0, 0.5, 1.0]
    assert deep["fraction"] == [0.0, 0.1, 0.2, 1.0] and deep["depth_edges"][-1] == 1.0 and len(deep["depth_edges"]) == 5
    assert deep["selected"] == [0, 2, 4, 20]
    with pytest.raises(ArtifactError, match="no 'probe_up' set"):
        layer_fractions(manifest(2, 10, [1, 1]), "probe_up")


def test_find_identifications_lists_base_and_rounds_in_order(tmp_path):
    for sub in ("identify", "align/safeneuron/round_2/identify", "align/safeneuron/round_10/identify",
                "align/dpo/round_1/identify"):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "identify.json").write_text("{}")
    (tmp_path / "align/dpo/round_2/identify").mkdir(parents=True)  # unfinished: no identify.json
    assert list(find_identifications(tmp_path)) == ["base", "dpo round 1", "safeneuron round 2", "safeneuron round 10"]


# --------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def identified(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    lm = LoadedModel(tiny_model("llama"), make_tokenizer(), "tiny-llama", "<memory>")
    identify(IdentifyConfig(max_prompts=40, batch_size=16, tau_es=0.5, by_category=True), root / "identify",
             loaded=lm, progress=False)
    return root, lm


def test_analyze_writes_the_artifact_contract(identified, tmp_path):
    root, lm = identified
    other = LoadedModel(tiny_model("llama", seed=1), make_tokenizer(), "tiny-llama-aligned", "<memory>")
    config = AnalyzeConfig(identify=[str(root / "identify")], max_prompts=16, n_splits=1, probe_max_iter=30)
    result = analyze(config, tmp_path / "analysis", loaded=lm, compare={"safeneuron": other}, progress=False)
    out = tmp_path / "analysis"
    for name in ("layer_distribution.json", "categories.json", "separability.json", "analysis.json",
                 "layer_distribution.png", "category_composition.png", "category_overlap.png", "separability.png"):
        assert (out / name).is_file(), name
    for name in ("layer_distribution.png", "separability.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    dist = json.loads((out / "layer_distribution.json").read_text())
    assert dist["rows"][0]["name"] == "base" and dist["rows"][0]["n_layers"] == 3
    cats = json.loads((out / "categories.json").read_text())
    assert len(cats["categories"]) == 10 and cats["overlap"]["k"] == list(range(1, 11))
    assert cats["overlap"]["mean"][0] == 1.0
    sep = json.loads((out / "separability.json").read_text())
    assert [m["name"] for m in sep["models"]] == ["base", "safeneuron"]
    assert sep["held_out_from_identification"] and sep["n_harmful"] == sep["n_harmless"] == 16
    identified = json.loads((root / "identify" / "identify.json").read_text())
    assert (sep["position"], sep["span"]) == (identified["position"], identified["span"]) == ("mean", "post")
    for m in sep["models"]:
        assert len(m["residual"]) == len(m["neurons"]) == len(m["safety_neurons"]) == len(m["random_neurons"]) == 3
        assert all(0.0 <= a <= 1.0 for a in m["residual"] + m["neurons"])
        assert m["n_safety"] == list(result.layer_distribution["rows"][0]["selected"])
    manifest = json.loads((out / "analysis.json").read_text())
    assert manifest["settings"]["max_prompts"] == 16 and "separability_s" in manifest["timings"]


def test_analyze_probes_prompts_held_out_from_identification(identified):
    from safeneuron.stages.analyze import _probe_prompts
    from safeneuron.data.prompts import load_prompts

    root, _ = identified
    m = json.loads((root / "identify" / "identify.json").read_text())
    harmful, harmless, held_out = _probe_prompts(AnalyzeConfig(max_prompts=50), m)
    used = set(load_prompts(None, default="harmful", limit=40).prompts)
    assert held_out and len(harmful) == len(harmless) == 50 and used.isdisjoint(harmful.prompts)


def test_separability_is_reused_for_a_model_on_disk(identified, tmp_path, monkeypatch):
    root, lm = identified
    model_dir = tmp_path / "model"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    config = AnalyzeConfig(model=str(model_dir), identify=[str(root / "identify")], max_prompts=12, n_splits=1,
                           probe_max_iter=20, figures=False, dtype="float32", device="cpu")
    first = analyze(config, tmp_path / "a", progress=False)
    assert first.separability["models"][0]["key"]
    import safeneuron.stages.analyze as analysis

    monkeypatch.setattr(analysis, "collect_features", lambda *a, **k: pytest.fail("recomputed a finished model"))
    monkeypatch.setattr(analysis, "_load", lambda *a, **k: pytest.fail("reloaded a finished model"))
    again = analyze(config, tmp_path / "a", progress=False)
    assert again.separability["models"] == first.separability["models"]
    assert not (tmp_path / "a" / "separability.png").exists()


def test_analyze_cli_and_bad_input(identified, tmp_path, capsys):
    root, _ = identified
    code = main(["analyze", "--identify", f"base={root / 'identify'}", f"again={root / 'identify'}",
                 "--no-separability", "--out", str(tmp_path / "cli")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "base: 3 layers" in printed and "overlap ratio" in printed
    assert not (tmp_path / "cli" / "separability.json").exists()
    assert json.loads((tmp_path / "cli" / "layer_distribution.json").read_text())["rows"][1]["name"] == "again"
    assert main(["analyze", "--identify", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "no identify.json" in capsys.readouterr().err
    assert main(["analyze", "--identify", str(root / "identify"), "--set", "bogus", "--out", str(tmp_path / "x")]) == 2
    with pytest.raises(ConfigError, match="band"):
        AnalyzeConfig(band=[90, 10]).validate()
