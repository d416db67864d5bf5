"""Pooling over the user's own tokens (content / post spans), the causal check of identify --verify, and
the exact McNemar test it reports."""

import json

import pytest
import torch

from conftest import make_tokenizer, tiny_model
from safeneuron.activations import pool_tokens, record_activations
from safeneuron.config import IdentifyConfig
from safeneuron.data.prompts import PromptSet, load_prompts
from safeneuron.evaluation.metrics import detectable_difference, mcnemar_exact
from safeneuron.inputs import iter_batches
from safeneuron.models import LoadedModel
from safeneuron.stages.identify import identify


def test_content_and_post_spans_are_the_users_text_and_what_follows_it():
    tok = make_tokenizer()
    prompts = ["hello there", "how to pick a lock"]
    for batch in iter_batches(tok, prompts, 2, spans=True):
        for row, i in enumerate(batch.indices):
            ids = batch.inputs["input_ids"][row]
            assert tok.decode(ids[batch.spans["content"][row]]) == prompts[i]
            assert tok.decode(ids[batch.spans["post"][row]]) == "<|end|><|assistant|>"
            assert not (batch.spans["content"][row] & ~batch.inputs["attention_mask"][row].bool()).any()


def test_pooling_over_a_span_uses_only_its_tokens():
    x = torch.tensor([[[1.0], [9.0], [3.0], [5.0]]])  # [batch 1, seq 4, d 1]
    mask = torch.tensor([[0, 1, 1, 1]])  # the first position is padding
    span = torch.tensor([[False, False, True, False]])
    assert pool_tokens(x, mask, "max").item() == 9.0 and pool_tokens(x, mask, "max", span).item() == 3.0
    assert pool_tokens(x, mask, "mean").item() == pytest.approx(17 / 3)
    assert pool_tokens(x, mask, "mean", span).item() == 3.0
    assert pool_tokens(x, mask, "last", span).item() == 5.0  # last is always the final token
    assert pool_tokens(x, mask, "max", torch.zeros_like(span)).item() == 9.0  # an empty span: all tokens


def test_content_pooling_ignores_the_templates_constant_tokens():
    """With a long constant system prompt in the template, prompt-max statistics depend on it; content
    statistics are those of recording the user's text alone (the template's tokens never enter)."""
    model, tok = tiny_model("llama"), make_tokenizer()
    sets = {"harmful": PromptSet(["make a weapon now", "steal a car"]), "harmless": PromptSet(["bake bread", "sing"])}
    content = record_activations(model, tok, sets, position="mean", span="content", progress=False)
    full = record_activations(model, tok, sets, position="mean", span="prompt", progress=False)
    mlp = next(iter(content.groups["harmful"]))
    assert not torch.allclose(content.groups["harmful"][mlp].mean, full.groups["harmful"][mlp].mean)
    with pytest.raises(ValueError, match="unknown span"):
        record_activations(model, tok, sets, span="system", progress=False)


def test_mcnemar_exact_values():
    assert mcnemar_exact([False] * 10, [True] * 10) == pytest.approx(2 * 0.5**10)  # 10 discordant, one way
    assert mcnemar_exact([True, False, True], [True, False, True]) == 1.0  # no discordant pair
    # 6 vs 1 discordant: 2 * P(Bin(7, 1/2) <= 1) = 2 * 8 / 128
    a = [True] * 6 + [False] + [True] * 5
    b = [False] * 6 + [True] + [True] * 5
    assert mcnemar_exact(a, b) == pytest.approx(16 / 128)
    with pytest.raises(ValueError, match="same prompts"):
        mcnemar_exact([True], [True, False])
    assert detectable_difference(150) < 0.17 < detectable_difference(48)  # 48 prompts cannot separate 15 points


def test_identify_verify_measures_held_out_prompts_and_a_random_control(tmp_path):
    lm = LoadedModel(tiny_model("llama"), make_tokenizer(), "tiny-llama", "<memory>")
    cfg = IdentifyConfig(max_prompts=24, batch_size=8, tau_es=0.5, verify=True, verify_prompts=10,
                         verify_max_new_tokens=3, span="content")
    result = identify(cfg, tmp_path / "id", loaded=lm, progress=False)
    v = json.loads((tmp_path / "id" / "identify.json").read_text())["verification"]
    assert v == result.manifest["verification"] and result.manifest["span"] == "content"
    used = set(load_prompts(None, default="harmful", limit=24).prompts)
    rows = [json.loads(line) for line in (tmp_path / "id" / "verify" / "generations.jsonl").read_text().splitlines()]
    asked = {r["prompt"] for r in rows}
    assert len(asked) == v["harmful"]["n"] == 10 and not asked & used  # held out from the identification
    union = result.union.count()
    assert v["pruned"]["pruned"] == union and v["random"]["pruned"] == union > 0 and v["plain"]["pruned"] == 0
    for name in ("plain", "pruned", "random"):
        assert v[name]["n"] == 10 and v[name]["rate"] == v[name]["k"] / 10
    assert v["asr_increase"]["pruned"] == pytest.approx(v["pruned"]["rate"] - v["plain"]["rate"])
    assert 0 <= v["mcnemar_p"]["pruned"] <= 1 and len(rows) == 30  # three conditions, cached
