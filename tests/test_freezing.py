"""Frozen neurons stay bit-exact under AdamW (weight decay, accumulation), full and LoRA;
ablation only in training forward passes; clear errors."""

import copy
import pytest
import torch

from conftest import tiny_model
from safeneuron.arch import find_mlps
from safeneuron.freezing import FreezeError, NeuronFreezer
from safeneuron.hooks import prune_weights
from safeneuron.masks import MaskMismatchError, SafetyNeuronMask

FAMILIES = ["llama", "gemma", "phi3", "gpt2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def owned_index(site, mask, param_name):
    """(dim, indices) of ``param_name`` owned by the masked neurons of ``site`` (union over its slices)."""
    neurons = mask.indices(site.name)
    parts = [(s.dim, neurons + s.offset) for s in site.slices if s.param_name == param_name]
    return parts[0][0], torch.cat([p for _, p in parts])


def split(param, dim, own):
    keep = torch.ones(param.shape[dim], dtype=torch.bool)
    keep[own] = False
    return param.index_select(dim, own), param.index_select(dim, torch.nonzero(keep).flatten())


def adamw_steps(model, freezer, steps=4, accumulation=2, lr=1e-2, weight_decay=0.1, seed=0):
    """AdamW with weight decay and gradient accumulation; restore after each step via ``attach``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    freezer.attach(opt)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        for _ in range(accumulation):
            ids = torch.randint(7, 100, (2, 10), generator=g)
            (model(input_ids=ids, labels=ids).loss / accumulation).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("family", FAMILIES)
def test_full_finetune_frozen_rows_and_columns_bit_exact(family):
    model = tiny_model(family)
    mask = SafetyNeuronMask.random(model, frac=0.25, seed=1)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with NeuronFreezer(model, mask) as freezer:
        adamw_steps(model, freezer)
        assert freezer.changed() == []
    for site in find_mlps(model):
        for name in {s.param_name for s in site.slices}:
            dim, own = owned_index(site, mask, name)
            frozen_now, other_now = split(model.get_parameter(name).detach(), dim, own)
            frozen_0, other_0 = split(start[name], dim, own)
            assert torch.equal(frozen_now, frozen_0), f"{name}: frozen entries moved"
            assert not torch.equal(other_now, other_0), f"{name}: the other entries did not train"
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, start[n])]
    assert len(moved) == len(start)  # everything else trained (no parameter silently frozen)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_frozen_neurons_merge_to_original_weights(family):
    from peft import LoraConfig, get_peft_model

    model = tiny_model(family)
    mask = SafetyNeuronMask.random(model, frac=0.25, seed=2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    # init_lora_weights=False: B starts non-zero, so the freezer must zero the frozen rows itself
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    with NeuronFreezer(peft_model, mask) as freezer:
        adamw_steps(peft_model, freezer)
        assert freezer.changed() == []
    merged = peft_model.merge_and_unload()
    for site in find_mlps(merged):
        for name in {s.param_name for s in site.slices if s.param_name.endswith(".weight")}:
            dim, own = owned_index(site, mask, name)
            frozen_now, other_now = split(merged.get_parameter(name).detach(), dim, own)
            frozen_0, other_0 = split(start[name], dim, own)
            assert torch.equal(frozen_now, frozen_0), f"{name}: merged frozen entries differ from the original"
            assert not torch.equal(other_now, other_0), f"{name}: the adapter changed nothing"


def test_sn_tune_changes_only_the_safety_neurons():
    model = tiny_model("llama")
    mask = SafetyNeuronMask.random(model, frac=0.25, seed=3)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with NeuronFreezer(model, mask, invert=True) as freezer:
        assert not freezer.ablate
        adamw_steps(model, freezer)
        assert freezer.changed() == []
    owned = set()
    for site in find_mlps(model):
        for name in {s.param_name for s in site.slices}:
            owned.add(name)
            dim, own = owned_index(site, mask, name)
            trained_now, rest_now = split(model.get_parameter(name).detach(), dim, own)
            trained_0, rest_0 = split(start[name], dim, own)
            assert torch.equal(rest_now, rest_0)
            assert not torch.equal(trained_now, trained_0)
    for name, p in model.named_parameters():
        assert p.requires_grad  # given back on exit
        if name not in owned:
            assert torch.equal(p, start[name]), name


def test_ablation_only_in_training_forward_passes():
    model = tiny_model("llama")
    mask = SafetyNeuronMask.random(model, frac=0.3, seed=4)
    ids = torch.randint(7, 100, (2, 9))
    with torch.no_grad():
        intact = model(input_ids=ids).logits
    edited = copy.deepcopy(model)  # the intact model with the masked neurons' down-projection columns zeroed
    prune_weights(edited, mask)
    with NeuronFreezer(model, mask, ablate=True):
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, intact)  # eval / generation: intact
        model.train()
        with torch.no_grad():
            ablated = model(input_ids=ids).logits
        assert not torch.allclose(ablated, intact)
        # the value: a training pass is the intact model with the masked neurons removed
        edited.train()
        with torch.no_grad():
            torch.testing.assert_close(ablated, edited(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    model.train()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, intact)  # hooks removed on exit
    with NeuronFreezer(model, mask, ablate=False):  # --freeze-only
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, intact)


def test_ablation_skips_the_peft_reference_pass():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear"))
    mask = SafetyNeuronMask.random(model.get_base_model(), frac=0.3, seed=5)
    ids = torch.randint(7, 100, (2, 9))
    model.train()
    with torch.no_grad():
        intact = model(input_ids=ids).logits
    with NeuronFreezer(model, mask), torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, intact)
        with model.disable_adapter():  # how TRL computes the reference with LoRA
            assert torch.equal(model(input_ids=ids).logits, intact)


def test_module_freezing_options_and_requires_grad_restored():
    model = tiny_model("llama")
    mask = SafetyNeuronMask.empty_like(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with NeuronFreezer(model, mask, freeze_embeddings=True, freeze_attention=True, freeze_layers=[2]) as freezer:
        adamw_steps(model, freezer, steps=2)
    for name, p in model.named_parameters():
        assert p.requires_grad
        frozen = "embed_tokens" in name or "self_attn" in name or name.startswith("model.layers.2.")
        assert torch.equal(p, start[name]) == frozen, name


def test_mask_from_another_model_is_rejected():
    mask = SafetyNeuronMask.random(tiny_model("gpt2"), frac=0.1)
    with pytest.raises(MaskMismatchError, match="mask from another model"):
        NeuronFreezer(tiny_model("llama"), mask)


def test_bad_freezing_requests():
    model = tiny_model("llama")
    with pytest.raises(FreezeError, match="selects none"):
        NeuronFreezer(model, SafetyNeuronMask.empty_like(model), invert=True)
    with pytest.raises(FreezeError, match="exclude|nothing to learn"):
        NeuronFreezer(model, SafetyNeuronMask.random(model, frac=0.1), invert=True, ablate=True)
    with pytest.raises(FreezeError, match="layers 0..2"):
        NeuronFreezer(model, SafetyNeuronMask.empty_like(model), freeze_layers=[7]).install()


def test_dora_is_refused():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    with pytest.raises(FreezeError, match="DoRA"):
        NeuronFreezer(model, SafetyNeuronMask.random(model.get_base_model(), frac=0.1)).install()


def test_reinstall_and_restore_after_remove():
    model = tiny_model("llama")
    freezer = NeuronFreezer(model, SafetyNeuronMask.random(model, frac=0.2, seed=6)).install()
    n = len(freezer.entries)
    freezer.remove()
    name = freezer.entries[0].name
    with torch.no_grad():
        model.get_parameter(name).add_(1.0)
    freezer.restore()  # removed: a no-op, the model is the user's again
    assert freezer.changed()
    freezer.install()  # snapshots taken afresh, not duplicated
    assert len(freezer.entries) == n and not freezer.changed()
    freezer.remove()


def test_stochastic_ablation_zeroes_exactly_the_sampled_neurons_each_step():
    from safeneuron.freezing import NeuronFreezer, RestoreFrozenCallback
    from safeneuron.hooks import neuron_hooks

    model = tiny_model("llama")
    model.train()
    mask = SafetyNeuronMask.random(model, frac=0.5, seed=3)
    freezer = NeuronFreezer(model, mask, ablate_fraction=0.25, seed=7).install()
    callback = RestoreFrozenCallback(freezer)
    ids = torch.tensor([[5, 9, 12, 40, 41, 42]])
    samples = []
    try:
        for step in range(3):
            callback.on_step_begin(None, type("S", (), {"global_step": step})(), None)
            seen = {}
            with neuron_hooks(model, lambda s, a: seen.__setitem__(s.name, a.detach().clone())):
                model(input_ids=ids)
            sampled = {n: m.clone() for n, m in freezer.ablated.masks.items()}
            samples.append(sampled)
            for name, acts in seen.items():
                chosen, candidates = sampled[name], mask.masks[name]
                k = int(candidates.sum())
                assert int(chosen.sum()) == max(1, round(0.25 * k)) and not (chosen & ~candidates).any()
                assert torch.count_nonzero(acts[..., chosen]) == 0  # the sampled channels read zero
                rest = candidates & ~chosen
                assert torch.count_nonzero(acts[..., rest]) == acts[..., rest].numel()  # the other candidates do not
    finally:
        freezer.remove()
    # each step draws another subset, reproducibly from the seed and the step
    assert any(not torch.equal(samples[0][n], samples[1][n]) for n in samples[0])
    again = NeuronFreezer(model, mask, ablate_fraction=0.25, seed=7)
    again.ablated = SafetyNeuronMask({k: v.clone() for k, v in mask.masks.items()})
    again.resample(1)
    assert all(torch.equal(again.ablated.masks[n], samples[1][n]) for n in samples[1])


def test_reidentification_retargets_the_set_mid_round_and_each_set_is_exact_while_frozen(tmp_path):
    from transformers import TrainerCallback

    from safeneuron.data.preferences import PreferenceSet
    from safeneuron.freezing import ReidentifyCallback
    from safeneuron.trainer import SafeNeuronDPOTrainer, dpo_config
    from safeneuron.config import AlignConfig
    from conftest import make_tokenizer

    model = tiny_model("llama")
    first = SafetyNeuronMask.random(model, frac=0.2, seed=1)
    second = SafetyNeuronMask.random(model, frac=0.2, seed=2)
    pairs = [{"prompt": f"Tell me harmful thing {i}.", "chosen": "I can't help with that.",
              "rejected": f"Sure! Step {i}: do it."} for i in range(8)]
    args = dpo_config(AlignConfig(max_steps=4, learning_rate=1e-2, per_device_train_batch_size=2,
                                  gradient_accumulation_steps=1, device="cpu"), tmp_path / "t", progress=False)
    args.save_strategy = "no"
    t = SafeNeuronDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                             train_dataset=PreferenceSet(pairs).to_trl(make_tokenizer()),
                             processing_class=make_tokenizer(), frozen=first)
    snapshots, modes = {}, []

    def owned(mask):
        return {s.param_name: model.get_parameter(s.param_name).detach().index_select(
            s.dim, mask.indices(site.name) + s.offset).clone() for site in find_mlps(model) for s in site.slices}

    def identify(net):
        modes.append(net.training)
        snapshots["first_at_switch"] = owned(first)
        return second

    snapshots["first_at_start"] = owned(first)
    t.add_callback(ReidentifyCallback(t.freezer, 2, identify))

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                snapshots["second_at_switch"] = owned(second)
    t.add_callback(Watch())
    t.train()
    assert modes == [False]  # identified once (step 2 of 4; not at the end), in eval mode
    assert t.freezer.mask is second and t.freezer.history[0]["step"] == 2
    assert t.freezer.history[0]["added"] == second.count() - (first & second).count()
    # the first set was bit-exact while frozen (steps 0-2), the second from its switch to the end
    for name, value in snapshots["first_at_start"].items():
        assert torch.equal(value, snapshots["first_at_switch"][name])
    for name, value in owned(second).items():
        assert torch.equal(value, snapshots["second_at_switch"][name])
    assert t.freezer.ablated is not None and all(torch.equal(t.freezer.ablated.masks[n], second.masks[n])
                                                  for n in second.masks)
    summary = t.remove_freezing()
    assert summary["exact"] and summary["reidentified"][0]["frozen"] == second.count()
