"""The report: builds from the artifacts of a tiny random model plus a synthetic results.json,
every embedded image is a decodable, non-blank PNG, and missing or broken artifacts are skipped."""

import base64
import io
import json
import re
import shutil

import pytest
import torch
from PIL import Image

from conftest import make_tokenizer, tiny_model
from safeneuron.config import AnalyzeConfig
from safeneuron.stages.analyze import analyze
from safeneuron.cli import main
from safeneuron.config import IdentifyConfig
from safeneuron.stages.identify import identify
from safeneuron.models import LoadedModel
from safeneuron.report import build_report
from safeneuron.report.build import ReportError


pytestmark = pytest.mark.usefixtures("one_thread")


FRACS = [0.0, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05]


def model_results(name, ori, full, slope, **over):
    """One entry of evaluate/results.json (issue 5's schema)."""
    curve = [[f, min(1.0, ori + slope * f)] for f in FRACS]
    entry = {
        "name": name, "path": f"/models/{name}", "judge": "refusal-phrases", "n_harmful": 50, "n_harmless": 50,
        "asr": {"ori": ori, "es": (ori + full) / 2, "sas": ori + 0.05, "full": full},
        "asr_ci95": {k: [max(0.0, v - 0.1), min(1.0, v + 0.1)] for k, v in
                     {"ori": ori, "es": (ori + full) / 2, "sas": ori + 0.05, "full": full}.items()},
        "asr_templates": {"prefix_injection": ori + 0.1, "role_play": ori + 0.2, "hypothetical": ori},
        "curve": curve, "over_refusal": 0.04, "mc_accuracy": 0.41, "perplexity": 12.5, "redteam_compliance": 0.3,
        "pruned_counts": {"es": 120, "sas": 80, "full": 170}, "curve_score": "es",
        "attacker": {"mode": "adaptive", "method": "stats", "identify_prompts": {"harmful": 32, "harmless": 32}},
    }
    entry.update(over)
    return entry


def round_metrics(mode, r):
    """One round's align metrics.json (issue 4's schema, as the align stage writes it)."""
    frozen = 34 if mode == "safeneuron" else 0
    history = [{"loss": 0.69 * 0.8 ** (s + 4 * (r - 1)), "rewards/margins": 0.1 * (s + 4 * (r - 1)), "step": s + 1}
               for s in range(4)] + [{"train_runtime": 3.0, "train_loss": 0.5, "step": 4}]
    return {
        "round": r, "run_key": "abc", "mode": mode, "lora": False, "n_pairs": 12, "neurons_frozen": frozen,
        "neurons_trained_only": None, "neurons_total": 144, "frozen_per_mlp": {f"model.layers.{i}.mlp": 10 for i in range(3)},
        "identification": {"new_neurons": 30, "overlap_with_previous": 20 if r > 1 else None} if frozen else None,
        "freezing": {"exact": True, "changed": 0} if frozen else None,
        "training": {"steps_logged": 4, "loss_first": history[0]["loss"], "loss_last": history[3]["loss"],
                     "reward_margin_first": 0.0, "reward_margin_last": 0.3, "reward_accuracy_last": 1.0},
        "log_history": history, "timings": {"identify_s": 1.0, "train_s": 3.0, "save_s": 0.1, "wall_s": 4.1},
    }


def write_results(path, models):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"models": models}))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A main-job directory: identify (by category), analysis, results, run.json and align rounds."""
    root = tmp_path_factory.mktemp("run")
    lm = LoadedModel(tiny_model("llama"), make_tokenizer(), "tiny-llama", "<memory>")
    identify(IdentifyConfig(max_prompts=40, batch_size=16, tau_es=0.5, by_category=True), root / "identify",
             loaded=lm, progress=False)
    for mode in ("safeneuron", "dpo"):
        for r in (1, 2):
            round_dir = root / "align" / mode / f"round_{r}"
            round_dir.mkdir(parents=True)
            (round_dir / "metrics.json").write_text(json.dumps(round_metrics(mode, r)))
        shutil.copytree(root / "identify", root / "align" / mode / "round_1" / "identify")
        (root / "align" / mode / "align.json").write_text(json.dumps({
            "model": "tiny-llama", "mode": mode, "rounds": 2, "prefs": {"source": "prefs.jsonl", "n_pairs": 12},
            "settings": {"beta": 0.1, "lora": False}}))
    other = LoadedModel(tiny_model("llama", seed=1), make_tokenizer(), "tiny-aligned", "<memory>")
    analyze(AnalyzeConfig(identify=[f"base={root / 'identify'}"], max_prompts=16, n_splits=1, probe_max_iter=20,
                          figures=False), root / "analysis", loaded=lm, compare={"safeneuron": other}, progress=False)
    write_results(root / "evaluate" / "results.json", [
        model_results("base", 0.35, 0.9, 12.0),
        model_results("dpo", 0.1, 0.7, 10.0),
        model_results("safeneuron", 0.05, 0.15, 2.0, perplexity=None, redteam_compliance=None),
    ])
    (root / "run.json").write_text(json.dumps({
        "model": "tiny-llama", "quick": True,
        "settings": {"identify": {"max_prompts": 40}, "align": {"rounds": 2}},
        "timings": {"identify": {"wall_s": 1.2, "status": "done"}, "align": 33.0},
        "versions": {"safeneuron": "0.1.0"},
    }))
    return root


def embedded_pngs(page: str) -> list[Image.Image]:
    images = []
    for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page):
        raw = base64.b64decode(data, validate=True)
        assert raw, "empty image"
        Image.open(io.BytesIO(raw)).verify()  # a well-formed PNG
        images.append(Image.open(io.BytesIO(raw)).convert("L"))
    return images


@pytest.fixture(scope="module")
def built(run_dir):
    return build_report(run_dir)


def test_report_builds_with_every_image_a_nonempty_png(run_dir, built):
    path = built
    assert path == run_dir / "report.html"
    page = path.read_text()
    assert "<img" in page and "src=\"http" not in page and "src='http" not in page  # self-contained
    images = embedded_pngs(page)
    # pruning curve, ASR bars, capability, neurons per layer, depth heatmap, 2 category, separability, align
    assert page.count("<img") == len(images) == 9
    for image in images:
        assert image.width > 200 and image.height > 100
        low, high = image.getextrema()
        assert high - low > 50, "a blank image"
    for section in ("Settings", "Comparison", "Robustness to neuron pruning", "Over-refusal and capability",
                    "Safety neurons per layer", "Harm categories", "Layer-wise separability", "Alignment rounds"):
        assert f">{section}</h2>" in page, section
    assert "Quick run." in page
    assert "prefix_injection" not in page or "role_play" in page  # the worst template is named
    assert "role_play" in page


def test_summary_markdown_has_the_headline_numbers(run_dir, built):
    md = (run_dir / "summary.md").read_text()
    assert md.startswith("# safeneuron report: tiny-llama")
    assert "**Quick run**" in md
    assert "safeneuron: ASR 5.0%, 15.0% after pruning its safety neurons (FULL)" in md
    assert "| base | refusal-phrases | adaptive (stats) | 50 / 50 | 35.0% [25.0, 45.0] |" in md
    assert "## Layer-wise separability" in md and "## Harm categories" in md and "## Alignment rounds" in md


def test_align_table_and_figure_follow_the_round_metrics(run_dir):
    from safeneuron.report import figures
    from safeneuron.report.build import _round_metrics, _round_table

    headers, rows = _round_table(_round_metrics(run_dir / "align" / "safeneuron"))
    assert headers[:3] == ["round", "pairs", "neurons frozen"] and "frozen weights unchanged" in headers
    assert rows[1][headers.index("overlap with previous round")] == "20"
    assert rows[0][headers.index("DPO loss (first → last step)")] == "0.69 → 0.353"
    assert not any("model.layers" in h for h in headers)
    # Another schema: flat numbers per round, plotted against the round.
    flat = {"a": [{"round": 1, "loss": 0.7, "time_s": 3.0}, {"round": 2, "loss": 0.5, "time_s": 2.0}]}
    assert _round_table(flat["a"])[0] == ["round", "loss", "time_s"]
    image = Image.open(io.BytesIO(figures.png_bytes(figures.plot_align_metrics(flat)))).convert("L")
    assert image.getextrema()[1] - image.getextrema()[0] > 50


def test_sections_are_optional(tmp_path):
    with pytest.raises(ReportError, match="no safeneuron artifacts"):
        build_report(tmp_path)
    with pytest.raises(ReportError, match="no such directory"):
        build_report(tmp_path / "missing")
    only_results = tmp_path / "results_only"
    write_results(only_results / "evaluate" / "results.json", [
        {"name": "base", "asr": {"ori": 0.5, "es": None, "sas": None, "full": None}, "curve": None,
         "over_refusal": None, "mc_accuracy": None},
        {"name": "nothing measured"},
    ])
    page = build_report(only_results).read_text()
    assert ">Comparison</h2>" in page and "Harm categories" not in page and "Quick run" not in page
    for image in embedded_pngs(page):
        assert image.getextrema()[1] - image.getextrema()[0] > 50


def test_a_stage_directory_and_a_broken_artifact(run_dir, tmp_path):
    page = build_report(run_dir / "identify", tmp_path / "id.html").read_text()  # identify's own --out dir
    assert ">Safety neurons per layer</h2>" in page and ">Harm categories</h2>" in page
    assert (tmp_path / "summary.md").is_file()
    broken = tmp_path / "broken"
    shutil.copytree(run_dir / "identify", broken / "identify")
    (broken / "evaluate").mkdir()
    (broken / "evaluate" / "results.json").write_text("{not json")
    page = build_report(broken).read_text()
    assert "Some artifacts could not be read" in page and "not valid JSON" in page
    assert ">Safety neurons per layer</h2>" in page


def test_report_cli(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir / "identify"), "--out", str(tmp_path / "r.html")]) == 0
    assert str(tmp_path / "r.html") in capsys.readouterr().out
    assert (tmp_path / "r.html").is_file() and (tmp_path / "summary.md").is_file()
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_the_report_shows_the_causal_check():
    from safeneuron.report.build import _verification

    rate = lambda r, k: {"rate": r, "k": k, "n": 48, "ci95": [max(0, r - 0.1), min(1, r + 0.1)]}  # noqa: E731
    v = {"neuron_set": "union", "judge": "refusal-phrases", "harmful": {"source": "prefs part", "n": 48},
         "plain": {**rate(0.25, 12), "pruned": 0}, "pruned": {**rate(0.75, 36), "pruned": 3200},
         "random": {**rate(0.3, 14), "pruned": 3200}, "mcnemar_p": {"pruned": 1e-6, "random": 0.5}}
    html, md = _verification(v)
    assert "75.0%" in html and "3,200" in html and "1e-06" in html and "48 held-out" in md
