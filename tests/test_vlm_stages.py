"""VLMs through the stages: identify (CLI and library) on image+text prompt files and
built-in multimodal sets, align() on preference pairs with images, evaluation with image
inputs (ASR, pruned ASR, over-refusal) and the report's section, on the tiny random
VLMs of test_vlm.py (LLaVA, Qwen2-VL, Idefics3).

Only the LLaVA test processor can be saved and reopened here (the Qwen2-VL and Idefics3
test processors lack a video processor without torchvision), so the CLI and the align()
round trip run on LLaVA; the other families go through the same library calls with a
loaded model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import keep_tiny_run_sizes, write_tiny_run_config
from test_vlm import small_sets, tiny_vlm
from safeneuron.arch import find_mlps
from safeneuron.masks import SafetyNeuronMask
from safeneuron.activations import record_activations
from safeneuron.data.images import MultimodalPromptError, load_multimodal_set
from safeneuron.models import LoadedModel


pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(folder, name, prompts):
    """Save each prompt's image as a PNG beside a JSONL of relative paths (image, text, category)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, p in enumerate(prompts):
        p.load_image().save(folder / f"{name}{i}.png")
        rows.append({"image": f"{name}{i}.png", "text": p.text, "category": p.category})
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def loaded_vlm(family, seed=0):
    model, processor = tiny_vlm(family, seed)
    return LoadedModel(model, processor.tokenizer, f"tiny-{family}", f"tiny-{family}", processor=processor)


# --------------------------------------------------------------------------- prompt sources
def test_load_multimodal_set_sources(tmp_path):
    from safeneuron.data.prompts import load_prompts

    harmless = load_multimodal_set(None, default="harmless", limit=5, seed=3)
    text = load_prompts(None, default="harmless", limit=5, seed=3)
    assert harmless.source == "builtin:harmless_typographic (typographic)"
    assert [p.category for p in harmless] == text.categories, "the same seeded sample as the text loader"
    scenes = load_multimodal_set("builtin:harmless", default="harmless", limit=4)
    assert len(scenes) == 4 and set(scenes.category_names()) <= {"shapes", "chart", "scene"}
    assert load_multimodal_set(None, default="harmful", limit=4).sha256 == \
        load_multimodal_set("builtin:harmful", limit=4).sha256
    # a JSONL without an image column is a text set, typeset
    (tmp_path / "text.jsonl").write_text('{"prompt": "describe a cat"}\n{"prompt": "describe a dog"}\n')
    typeset = load_multimodal_set(tmp_path / "text.jsonl")
    assert typeset.texts[0] != "describe a cat" and typeset.source.endswith("(typographic)")
    # a JSONL with images: the files' pixels are part of the hash
    scenes2 = small_sets(2)["harmless"]
    path = write_jsonl(tmp_path / "mm", "set", scenes2)
    first = load_multimodal_set(path)
    before = first.sha256
    assert first.source == str(path) and first.texts == [p.text for p in scenes2]
    assert np.array_equal(np.asarray(first[1].load_image()), np.asarray(scenes2[1].load_image()))
    Image.new("RGB", (64, 64), "red").save(tmp_path / "mm" / "set0.png")
    assert load_multimodal_set(path).sha256 != before
    assert len(first.subset([1])) == 1 and first.limit(1, seed=0).source == f"{path}[1]"


# --------------------------------------------------------------------------- identify
def test_identify_cli_on_an_image_jsonl(tmp_path, capsys):
    """`safeneuron identify --model <vlm dir> --harmful a.jsonl --harmless b.jsonl`: the files' images are recorded
    (statistics equal a direct recording of them), position defaults to last, tau_ES to the backbone's default."""
    from safeneuron.activations import ActivationStats
    from safeneuron.artifacts import load_tensors
    from safeneuron.cli import main
    from safeneuron.scoring import default_tau_es

    model, processor = tiny_vlm("llava")
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    sets = small_sets(5)
    files = {label: write_jsonl(tmp_path / "data", label, ps) for label, ps in sets.items()}
    out = tmp_path / "id"
    code = main(["identify", "--model", str(tmp_path / "vlm"), "--harmful", str(files["harmful"]),
                 "--harmless", str(files["harmless"]), "--batch-size", "3", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and "position last" in printed and "5 harmful / 5 harmless" in printed
    manifest = json.loads((out / "identify.json").read_text())
    assert manifest["inputs"] == "image+text" and manifest["position"] == "last"
    assert manifest["backbone_model_type"] == "llama" and manifest["tau_es"] == default_tau_es("llama") == 2.0
    assert manifest["harmful"]["source"] == str(files["harmful"])
    stats = ActivationStats.from_tensors(load_tensors(out / "stats.safetensors"), "last")
    # the reference: the in-memory prompts the PNG files were saved from (not typeset text)
    reference = record_activations(model, processor, sets, position="last", batch_size=5, progress=False)
    for label in ("harmful", "harmless"):
        for name, s in reference.groups[label].items():
            torch.testing.assert_close(stats.groups[label][name].mean, s.mean, rtol=1e-5, atol=1e-6)
    # an explicit position is kept
    code = main(["identify", "--model", str(tmp_path / "vlm"), "--harmful", str(files["harmful"]),
                 "--harmless", str(files["harmless"]), "--position", "max", "--out", str(tmp_path / "id_max"),
                 "--no-progress", "--top", "0"])
    assert code == 0 and json.loads((tmp_path / "id_max" / "identify.json").read_text())["position"] == "max"


@pytest.mark.parametrize("family, backbone_tau", [("qwen2_vl", 3.0), ("idefics3", 2.0)])
def test_identify_on_image_files_and_builtin_scenes(family, backbone_tau, tmp_path):
    from safeneuron.config import IdentifyConfig
    from safeneuron.stages.identify import identify

    loaded = loaded_vlm(family)
    harmful = write_jsonl(tmp_path, "harmful", small_sets(4)["harmful"])
    config = IdentifyConfig(harmful=str(harmful), harmless="builtin:harmless", max_prompts=4, batch_size=4,
                            by_category=True)
    result = identify(config, tmp_path / "id", loaded=loaded, progress=False)
    m = result.manifest
    assert m["position"] == "last" and m["tau_es"] == backbone_tau and m["inputs"] == "image+text"
    assert m["harmless"]["source"] == "builtin:harmless (scenes)[4]" and m["n_harmless"] == 4
    assert set(m["categories"]) == {"a", "b"}, "categories of the JSONL rows"
    assert list(result.union.masks) == [s.name for s in find_mlps(loaded.model)]
    assert m["settings"]["position"] == "last"
    again = identify(config, tmp_path / "id", loaded=loaded, progress=False)  # same settings: reused
    assert again.manifest["run_key"] == m["run_key"] and again.manifest["created"] == m["created"]


def test_neurostrike_on_a_vlm_is_a_clear_error(tmp_path):
    from safeneuron.config import ConfigError, IdentifyConfig
    from safeneuron.stages.identify import identify

    with pytest.raises(ConfigError, match="neurostrike records text prompts only"):
        identify(IdentifyConfig(method="neurostrike", max_prompts=2), tmp_path / "id", loaded=loaded_vlm("llava"),
                 progress=False)


# --------------------------------------------------------------------------- align
def image_pairs(folder, n=4, with_text_pair=True):
    prompts = small_sets(n, size=(40, 40))["harmful"]
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, p in enumerate(prompts):
        p.load_image().save(folder / f"pair{i}.png")
        rows.append({"image": f"pair{i}.png", "prompt": p.text[:40], "chosen": "I can't help with that.",
                     "rejected": "Sure, here is how"})
    if with_text_pair:  # rows may lack an image
        rows.append({"prompt": "Say hello.", "chosen": "Hello! How can I help?", "rejected": "I cannot do that."})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_align_on_image_pairs_keeps_the_frozen_neurons_bit_exact(tmp_path):
    from safeneuron.config import AlignConfig
    from safeneuron.models import load_model
    from safeneuron.stages.align import AlignOutputError, align

    loaded = loaded_vlm("llava")
    model = loaded.model
    prefs = image_pairs(tmp_path / "data")
    mask = SafetyNeuronMask.random(model, frac=0.25, seed=1)
    mask.save(tmp_path / "mask.safetensors")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = AlignConfig(mask=str(tmp_path / "mask.safetensors"), rounds=1, max_steps=2, learning_rate=1e-2,
                         weight_decay=0.1, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                         max_length=None, warmup_ratio=0.0, device="cpu")
    result = align(config, str(prefs), tmp_path / "align", loaded=loaded, progress=False)
    m = result.manifest
    assert m["prefs"]["n_pairs"] == 5 and m["prefs"]["n_with_image"] == 4
    assert m["summary"][0]["frozen_exact"] is True and m["summary"][0]["neurons_frozen"] == mask.count() > 0
    reopened = load_model(str(tmp_path / "align" / "model"), dtype="float32", device="cpu")
    assert reopened.is_vlm and reopened.processor.chat_template, "saved with its processor"
    params = dict(reopened.model.named_parameters())
    for site in find_mlps(reopened.model):
        neurons = mask.indices(site.name)
        for s in site.slices:
            p, own = params[s.param_name].detach(), neurons + s.offset
            assert torch.equal(p.index_select(s.dim, own), start[s.param_name].index_select(s.dim, own))
            rest = torch.ones(p.shape[s.dim], dtype=torch.bool)
            rest[own] = False
            rest = torch.nonzero(rest).flatten()
            assert not torch.equal(p.index_select(s.dim, rest), start[s.param_name].index_select(s.dim, rest))
    projector = [n for n in params if "multi_modal_projector" in n]
    assert projector and any(not torch.equal(params[n], start[n]) for n in projector), "images reached the loss"
    # the images are part of the run's identity: other pixels are another run
    Image.new("RGB", (40, 40), "blue").save(tmp_path / "data" / "pair0.png")
    with pytest.raises(AlignOutputError, match="other settings, data or weights"):
        align(config, str(prefs), tmp_path / "align", loaded=loaded_vlm("llava"), progress=False)


def test_max_length_that_cuts_the_image_tokens_is_a_clear_error(tmp_path):
    from safeneuron.config import AlignConfig, ConfigError
    from safeneuron.stages.align import align

    prefs = image_pairs(tmp_path / "data", n=2)
    config = AlignConfig(mode="dpo", rounds=1, max_steps=1, max_length=16, device="cpu")
    with pytest.raises(ConfigError, match=r"max_length=16 cuts an image pair's prompt \(\d+ tokens") as err:
        align(config, str(prefs), tmp_path / "align", loaded=loaded_vlm("llava"), progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "align" / "round_1").exists()


def test_image_pairs_errors(tmp_path):
    from conftest import make_tokenizer, tiny_model
    from safeneuron.config import AlignConfig
    from safeneuron.data.preferences import PreferenceDataError
    from safeneuron.errors import SafeneuronError
    from safeneuron.models import LoadedModel
    from safeneuron.stages.align import align

    prefs = image_pairs(tmp_path / "data", n=2, with_text_pair=False)
    config = AlignConfig(mode="dpo", rounds=1, max_steps=1, device="cpu")
    text_model = LoadedModel(tiny_model("llama"), make_tokenizer(), "tiny-llama", "tiny-llama")
    with pytest.raises(PreferenceDataError, match="pairs carry images but tiny-llama .* is a text model"):
        align(config, str(prefs), tmp_path / "a", loaded=text_model, progress=False)
    (tmp_path / "data" / "pair1.png").unlink()
    with pytest.raises(MultimodalPromptError, match=r"pair 1: image .*pair1.png not found") as err:
        align(config, str(prefs), tmp_path / "b", loaded=loaded_vlm("llava"), progress=False)
    assert isinstance(err.value, SafeneuronError) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- evaluate and report
def _eval_config(**kw):
    from safeneuron.config import EvalConfig

    base = dict(n_harmful=4, n_harmless=3, xstest="", templates=[], sweep=[], n_mc=0, n_ppl=0, redteam="",
                max_new_tokens=3, identify_prompts=6, batch_size=4)
    base.update(kw)
    return EvalConfig(**base)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_evaluate_measures_asr_and_over_refusal_with_images(family, tmp_path):
    from safeneuron.stages.evaluate import evaluate_models

    loaded = loaded_vlm(family)
    mask = SafetyNeuronMask.random(loaded.model, frac=0.5, seed=3)
    mask.save(tmp_path / "mask.safetensors")
    results = evaluate_models({"vlm": loaded}, _eval_config(mask=str(tmp_path / "mask.safetensors")), tmp_path / "eval",
                              progress=False)
    entry = json.loads((tmp_path / "eval" / "results.json").read_text())["models"][0]
    assert entry == json.loads(json.dumps(results["models"][0]))
    assert entry["n_harmful_multimodal"] == entry["n_harmful"] == 4 and entry["n_harmless_multimodal"] == 3
    asr, ci = entry["asr_multimodal"], entry["asr_multimodal_ci95"]
    assert set(asr) == {"ori", "es", "sas", "full"} and asr["es"] is None, "a plain mask file is FULL only"
    for key in ("ori", "full"):
        assert 0 <= ci[key][0] <= asr[key] <= ci[key][1] <= 1
    assert 0 <= entry["over_refusal_multimodal"] <= 1 and entry["over_refusal_multimodal_ci95"] is not None
    assert entry["sources"]["harmless_multimodal"] == "builtin:harmless (scenes)[3]"
    # answers came from image+text generation: plain, and with the FULL set pruned (its own cache tag)
    rows = [json.loads(line) for line in
            (tmp_path / "eval" / "generations" / "vlm" / "harmful_multimodal.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(len(r["image_sha256"]) == 64 for r in rows)
    assert sum("|prune:" in r["tag"] for r in rows) == 4
    md = (tmp_path / "eval" / "results.md").read_text()
    assert "Image+text inputs" in md


def test_report_shows_the_multimodal_rates(tmp_path):
    from safeneuron.stages.evaluate import evaluate_models
    from safeneuron.report import build_report

    run_dir = tmp_path / "run"
    evaluate_models({"tiny-vlm": loaded_vlm("idefics3")}, _eval_config(attack=False), run_dir / "evaluate",
                    progress=False)
    entry = json.loads((run_dir / "evaluate" / "results.json").read_text())["models"][0]
    page = build_report(run_dir).read_text()
    summary = (run_dir / "summary.md").read_text()
    assert 'id="multimodal"' in page and "Image+text inputs" in summary
    assert "ASR with typographic images" in summary
    expected = f"{100 * entry['asr_multimodal']['ori']:.1f}%"
    row = next(line for line in summary.splitlines() if line.startswith("| tiny-vlm | 4 / 3"))
    assert expected in row
    # a text model's results (multimodal keys null) have no such section
    entry.update(asr_multimodal=None, over_refusal_multimodal=None, name="text-only")
    (tmp_path / "text" / "evaluate").mkdir(parents=True)
    (tmp_path / "text" / "evaluate" / "results.json").write_text(json.dumps({"models": [entry]}))
    assert 'id="multimodal"' not in build_report(tmp_path / "text").read_text()


# --------------------------------------------------------------------------- attack and the main job
@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    """A tiny random LLaVA saved with its processor (the family whose processor reopens here)."""
    d = tmp_path_factory.mktemp("tiny-llava")
    model, processor = tiny_vlm("llava")
    model.save_pretrained(d)
    processor.save_pretrained(d)
    return d


def test_attack_cli_on_a_vlm_measures_the_asr_with_images(tmp_path, llava_dir, capsys):
    """`safeneuron attack --model <vlm>`: the adaptive attacker identifies on image+text prompts, and the ASR is
    measured with text and with the same harmful prompts typeset as images, plain, pruned and with random neurons
    pruned; answers of the image+text runs come from image+text generation."""
    from safeneuron.cli import main

    out = tmp_path / "attack"
    code = main(["attack", "--model", str(llava_dir), "--out", str(out), "--identify-prompts", "4", "--limit", "3",
                 "--max-new-tokens", "3", "--batch-size", "4", "--set", "union", "--save", str(tmp_path / "pruned"),
                 "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and "pruned (image+text)" in printed
    report = json.loads((out / "attack.json").read_text())
    assert report["pruned_count"] > 0
    mm, text = report["results_multimodal"], report["results"]
    assert set(mm) == set(text) == {"ori", "pruned", "random_control"}
    for key, r in mm.items():
        assert r["n"] == 3 and 0.0 <= r["asr"] <= 1.0 and r["ci95"][0] <= r["asr"] <= r["ci95"][1]
        assert r["pruned"] == text[key]["pruned"]
    assert report["harmful_multimodal"]["n"] == 3
    assert report["harmful_multimodal"]["source"] == f"{report['harmful']['source']} (typographic)"
    rows = [json.loads(line) for line in (out / "generations" / "harmful_multimodal.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and all(len(r["image_sha256"]) == 64 for r in rows)
    assert sum("|prune:" in r["tag"] for r in rows) == 6, "pruned and random control answers under their own tags"
    # the identification was on image+text prompts, and the pruned model is saved with its processor
    assert json.loads((out / "identify" / "identify.json").read_text())["inputs"] == "image+text"
    from safeneuron.models import load_model

    assert load_model(str(tmp_path / "pruned"), dtype="float32", device="cpu").is_vlm
    # "" skips the image+text measurement
    assert main(["attack", "--model", str(llava_dir), "--out", str(tmp_path / "a2"), "--identify-prompts", "4",
                 "--limit", "2", "--max-new-tokens", "2", "--multimodal-harmful", "", "--no-progress"]) == 0
    assert json.loads((tmp_path / "a2" / "attack.json").read_text())["results_multimodal"] is None


def test_main_job_on_a_tiny_vlm_by_config(tmp_path, llava_dir, monkeypatch):
    """`safeneuron run --config` with a VLM as the model: every stage runs on it and writes its artifacts."""
    from safeneuron.cli import main

    keep_tiny_run_sizes(monkeypatch)
    # align's max_length fits the typeset prompts with their image tokens (~150 with the test tokenizer) and answers
    cfg = write_tiny_run_config(tmp_path, llava_dir, max_length=320)
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    for path in ("identify/identify.json", "prefs.jsonl", "align/safeneuron/align.json", "align/dpo/align.json",
                 "align/safeneuron/model/config.json", "align/dpo/model/config.json", "evaluate/results.json",
                 "analysis/analysis.json", "report.html", "summary.md", "run.json"):
        assert (out / path).exists(), path
    assert json.loads((out / "identify" / "identify.json").read_text())["inputs"] == "image+text"
    pairs = [json.loads(line) for line in (out / "prefs.jsonl").read_text().splitlines()]
    harmful_pairs = [p for p in pairs if p["kind"] == "harmful"]
    assert harmful_pairs and all((out / p["image"]).is_file() for p in harmful_pairs), "image pairs, relative paths"
    assert all(p.get("image") and p["instruction"] for p in pairs), "harmless pairs typeset too (matched control)"
    for mode in ("safeneuron", "dpo"):  # trained on image pairs (max_pairs = 8)
        prefs = json.loads((out / "align" / mode / "align.json").read_text())["prefs"]
        assert prefs["n_with_image"] == prefs["n_pairs"] == min(8, len(pairs))
    results = json.loads((out / "evaluate" / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["base", "safeneuron", "dpo"]
    for m in results["models"]:
        assert m["model_type"] == "llava"
        assert 0.0 <= m["asr_multimodal"]["ori"] <= 1.0 and 0.0 <= m["over_refusal_multimodal"] <= 1.0
        assert m["n_harmful_multimodal"] == m["n_harmful"] == 6
    separability = json.loads((out / "analysis" / "separability.json").read_text())
    assert separability["inputs"] == "image+text"
    assert [m["name"] for m in separability["models"]] == ["base", "safeneuron", "dpo"]
    assert 'id="multimodal"' in (out / "report.html").read_text()
