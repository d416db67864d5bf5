"""The identify stage end to end on tiny models: artifacts, reload, resume, bad input."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import make_tokenizer, tiny_model
from safeneuron.activations import record_activations
from safeneuron.arch import UnsupportedArchitectureError, find_mlps
from safeneuron.artifacts import ArtifactError, load_tensors
from safeneuron.config import ConfigError, IdentifyConfig
from safeneuron.data.prompts import PromptFileError, load_prompts
from safeneuron.stages.identify import Identification, OutputDirError, identify
from safeneuron.masks import MaskMismatchError, SafetyNeuronMask
from safeneuron.models import LoadedModel


def loaded(family="llama", seed=0):
    return LoadedModel(tiny_model(family, seed), make_tokenizer(), f"tiny-{family}", "<memory>")


def config(**kw):
    base = dict(max_prompts=24, batch_size=8, tau_es=0.5, tau_sas=2.0)
    base.update(kw)
    return IdentifyConfig(**base)


def test_identify_writes_the_artifact_contract(tmp_path):
    result = identify(config(by_category=True), tmp_path / "id", loaded=loaded(), progress=False)
    out = tmp_path / "id"
    scores = load_tensors(out / "scores.safetensors")
    sets = load_tensors(out / "safety_neurons.safetensors")
    for mlp in ("model.layers.0.mlp", "model.layers.2.mlp"):
        for k in ("mean_harmful", "mean_harmless", "var_harmful", "var_harmless", "es", "t", "shift", "sas"):
            assert scores[f"{mlp}.{k}"].dtype == torch.float32 and scores[f"{mlp}.{k}"].shape == (48,)
            assert torch.isfinite(scores[f"{mlp}.{k}"]).all()
        for k in ("es", "sas", "union"):
            assert sets[f"{mlp}.{k}"].dtype == torch.bool
        assert torch.equal(sets[f"{mlp}.union"], sets[f"{mlp}.es"] | sets[f"{mlp}.sas"])
        assert torch.equal(sets[f"{mlp}.es"], scores[f"{mlp}.es"] > 0.5)
    manifest = json.loads((out / "identify.json").read_text())
    for key in ("n_harmful", "n_harmless", "tau_es", "tau_sas", "position", "method", "model", "weights_sha256",
                "harmful", "harmless", "settings", "selected_per_layer", "selected_total", "expected_false_selections",
                "wall_time_s"):
        assert key in manifest
    assert manifest["n_harmful"] == 24 and manifest["harmful"]["sha256"]
    assert manifest["selected_total"]["union"] == result.union.count() > 0
    assert manifest["categories"], "per-category sets were asked for"
    some = next(iter(manifest["categories"].values()))
    assert (out / some["file"]).exists()
    again = Identification.load(out)
    assert torch.equal(again.union.masks["model.layers.1.mlp"], result.union.masks["model.layers.1.mlp"])


def test_scores_match_a_direct_computation(tmp_path):
    lm = loaded("gemma")
    cfg = config(max_prompts=16)
    result = identify(cfg, tmp_path / "id", loaded=lm, progress=False)
    harmful = load_prompts(None, default="harmful", limit=16)
    harmless = load_prompts(None, default="harmless", limit=16)
    from safeneuron.activations import collect_activations

    assert (result.manifest["position"], result.manifest["span"]) == ("mean", "post")  # the default pooling
    u = collect_activations(lm.model, lm.tokenizer, harmful.prompts, position="mean", span="post", progress=False)
    s = collect_activations(lm.model, lm.tokenizer, harmless.prompts, position="mean", span="post", progress=False)
    for mlp in u:
        a, b = u[mlp].double(), s[mlp].double()
        pooled = (((16 - 1) * a.var(0) + (16 - 1) * b.var(0)) / 30).sqrt()
        d = torch.nan_to_num((a.mean(0) - b.mean(0)) / pooled, nan=0.0)  # constant neurons: ES = 0
        torch.testing.assert_close(result.scores[mlp]["es"].double(), d, rtol=1e-4, atol=1e-5)


def test_rerun_is_skipped_and_other_settings_refused(tmp_path):
    lm = loaded()
    first = identify(config(), tmp_path / "id", loaded=lm, progress=False)
    stamp = (tmp_path / "id" / "identify.json").stat().st_mtime_ns
    identify(config(batch_size=3), tmp_path / "id", loaded=lm, progress=False)  # batch size does not change results
    assert (tmp_path / "id" / "identify.json").stat().st_mtime_ns == stamp
    with pytest.raises(OutputDirError, match="other settings"):
        identify(config(tau_es=0.7), tmp_path / "id", loaded=lm, progress=False)
    second = identify(config(tau_es=0.7), tmp_path / "id", loaded=lm, overwrite=True, progress=False)
    assert second.manifest["tau_es"] == 0.7 and first.manifest["tau_es"] == 0.5


def test_resume_from_partial_statistics(tmp_path, monkeypatch):
    lm = loaded()
    cfg = config(checkpoint_every=1, batch_size=4)
    reference = identify(cfg, tmp_path / "ref", loaded=lm, progress=False)

    import safeneuron.stages.identify as ident

    calls = {"n": 0}
    real = ident.record_activations

    def crash_after_three_batches(*args, on_batch=None, **kw):
        def hook(done, stats):
            on_batch(done, stats)
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt

        return real(*args, on_batch=hook, **kw)

    monkeypatch.setattr(ident, "record_activations", crash_after_three_batches)
    with pytest.raises(KeyboardInterrupt):
        identify(cfg, tmp_path / "id", loaded=lm, progress=False)
    assert not (tmp_path / "id" / "identify.json").exists()
    assert json.loads((tmp_path / "id" / ".partial" / "progress.json").read_text())["batches_done"] == 3
    monkeypatch.setattr(ident, "record_activations", real)
    seen = {}

    def spy(*args, skip_batches=0, **kw):
        seen["skip"] = skip_batches
        return real(*args, skip_batches=skip_batches, **kw)

    monkeypatch.setattr(ident, "record_activations", spy)
    resumed = identify(cfg, tmp_path / "id", loaded=lm, progress=False)
    assert seen["skip"] == 3
    for mlp, scores in reference.scores.items():
        torch.testing.assert_close(resumed.scores[mlp]["es"], scores["es"], rtol=1e-5, atol=1e-6)
        assert torch.equal(resumed.union.masks[mlp], reference.union.masks[mlp])
    assert not (tmp_path / "id" / ".partial").exists()


def test_neurostrike_method(tmp_path):
    result = identify(config(method="neurostrike", neurostrike_epochs=50, neurostrike_z=2.0), tmp_path / "ns",
                      loaded=loaded("phi3"), progress=False)
    sets = load_tensors(tmp_path / "ns" / "safety_neurons.safetensors")
    assert {"model.layers.0.mlp.probe_gate", "model.layers.0.mlp.probe_up", "model.layers.0.mlp.union"} <= set(sets)
    assert result.union.count() > 0
    assert result.manifest["timings"]["probe_s"] > 0


def test_mask_from_another_model_is_refused(tmp_path):
    identify(config(), tmp_path / "id", loaded=loaded("llama"), progress=False)
    mask = SafetyNeuronMask.load(tmp_path / "id" / "safety_neurons.safetensors")
    mask.check(tiny_model("llama"))
    with pytest.raises(MaskMismatchError, match="mask has no entry for 'transformer.h.0.mlp'"):
        mask.check(tiny_model("gpt2"))
    from transformers import AutoModelForCausalLM
    from conftest import tiny_config

    deeper = tiny_config("llama")
    deeper.num_hidden_layers = 4
    with pytest.raises(MaskMismatchError, match="mask has 3 layers, model has 4"):
        mask.check(AutoModelForCausalLM.from_config(deeper))
    wider = tiny_config("llama")
    wider.intermediate_size = 64
    with pytest.raises(MaskMismatchError, match="width 48, model MLP has d_ff=64"):
        mask.check(AutoModelForCausalLM.from_config(wider))


def test_bad_mask_files(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"definitely not safetensors")
    with pytest.raises(ArtifactError, match="not a safetensors file"):
        SafetyNeuronMask.load(tmp_path / "m.safetensors")
    from safetensors.torch import save_file

    save_file({"model.layers.0.mlp.union": torch.zeros(4)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(ArtifactError, match="dtype torch.float32, expected bool"):
        SafetyNeuronMask.load(tmp_path / "f.safetensors")


def test_unknown_architecture_is_a_clear_error():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("opt", hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                               word_embed_proj_dim=16, vocab_size=64)
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'opt'.*safeneuron/arch.py"):
        find_mlps(AutoModelForCausalLM.from_config(cfg))


def test_bad_config_values():
    with pytest.raises(ConfigError, match="tau_es must be > 0"):
        IdentifyConfig(tau_es=-1).validate()
    with pytest.raises(ConfigError, match="position must be"):
        IdentifyConfig(position="first").validate()
    from safeneuron.config import from_dict

    with pytest.raises(ConfigError, match="unknown key 'tau_ess'; did you mean 'tau_es'"):
        from_dict(IdentifyConfig, {"tau_ess": 2})


def test_too_few_prompts(tmp_path):
    (tmp_path / "one.txt").write_text("only one prompt\n")
    with pytest.raises(PromptFileError, match="1 harmful prompt.*at least 2"):
        identify(config(harmful=str(tmp_path / "one.txt")), tmp_path / "id", loaded=loaded(), progress=False)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "safeneuron.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    res = run_cli("identify", "--harmful", str(tmp_path / "empty.csv"), "--out", str(tmp_path / "o"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].endswith("empty.csv: no prompts (empty file)")
    assert "Traceback" not in res.stderr
    res = run_cli("identify", "--tau-es", "-3", "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "tau_es must be > 0" in res.stderr
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"}')
    res = run_cli("identify", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "model directory has no weights" in res.stderr
    res = run_cli("identify", "--position", "--out")
    assert res.returncode == 2  # argparse usage error
