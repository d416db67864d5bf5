"""Masked DPO with TRL: loss falls, frozen neurons bit-exact (full and LoRA), iterative rounds,
artifacts loadable by plain transformers, resume equals an uninterrupted run, clear errors."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import TrainerCallback

from conftest import make_tokenizer, tiny_model
from safeneuron.arch import find_mlps
from safeneuron.cli import main
from safeneuron.config import QUICK, AlignConfig, ConfigError
from safeneuron.data.preferences import PreferenceDataError, PreferenceSet
from safeneuron.masks import MaskMismatchError, SafetyNeuronMask
from safeneuron.models import load_model
from safeneuron.stages.align import AlignOutputError, align
from safeneuron.trainer import SafeNeuronDPOTrainer, dpo_config, lora_config

PAIRS = [{"prompt": f"Tell me how to do harmful thing number {i}.", "chosen": "I can't help with that.",
          "rejected": f"Sure! Step {i}: first you do it."} for i in range(8)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model_dir(tmp_path):
    """A tiny llama saved as a model directory (what align starts from)."""
    path = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def quick_config(**kw):
    base = dict(max_steps=4, learning_rate=1e-3, max_prompts=8, save_steps=2, per_device_train_batch_size=2,
                gradient_accumulation_steps=2, device="cpu")
    base.update(kw)
    return AlignConfig(**base)


def frozen_entries_equal(model, reference, mask):
    """Every row/column owned by the masked neurons equals the reference's."""
    ref_params = dict(reference.named_parameters())
    for site in find_mlps(model):
        neurons = mask.indices(site.name)
        for s in site.slices:
            a = model.get_parameter(s.param_name).detach().index_select(s.dim, neurons + s.offset)
            b = ref_params[s.param_name].detach().index_select(s.dim, neurons + s.offset)
            if not torch.equal(a, b):
                return False
    return True


def trainer(tmp_path, model, mask, **kw):
    args = dpo_config(quick_config(weight_decay=0.1, max_steps=kw.pop("max_steps", 8)), tmp_path / "t",
                      progress=False)
    args.save_strategy = "no"
    ds = PreferenceSet(PAIRS).to_trl(make_tokenizer())
    return SafeNeuronDPOTrainer(model=model, args=args, train_dataset=ds, processing_class=make_tokenizer(),
                                frozen=mask, **kw)


def test_dpo_loss_falls_margin_grows_and_frozen_stay_exact(tmp_path):
    import copy

    model = tiny_model("llama")
    start = copy.deepcopy(model)
    mask = SafetyNeuronMask.random(model, frac=0.2, seed=0)
    t = trainer(tmp_path, model, mask, ref_model=copy.deepcopy(model))
    t.train()
    logs = [h for h in t.state.log_history if "loss" in h and "rewards/margins" in h]
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.05
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.1
    summary = t.remove_freezing()
    assert summary["exact"] and summary["neurons_frozen"] == mask.count()
    assert frozen_entries_equal(model, start, mask)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), start.parameters()))


def test_lora_trainer_merged_frozen_neurons_equal_originals(tmp_path):
    import copy

    model = tiny_model("gpt2")
    start = copy.deepcopy(model)
    mask = SafetyNeuronMask.random(model, frac=0.2, seed=1)
    cfg = quick_config(lora=True, lora_r=4)
    t = trainer(tmp_path, model, mask, peft_config=lora_config(cfg), max_steps=4)
    t.train()
    assert t.remove_freezing()["exact"]
    merged = t.model.merge_and_unload()
    assert frozen_entries_equal(merged, start, mask)
    moved = [n for n, p in merged.named_parameters() if ".mlp." in n and not torch.equal(p, start.get_parameter(n))]
    assert moved  # the adapter trained the other neurons


def test_align_rounds_artifacts_and_plain_transformers_load(tmp_path, model_dir):
    out = tmp_path / "run"
    start = load_model(str(model_dir), device="cpu").model
    result = align(quick_config(rounds=2), PAIRS, out, loaded=load_model(str(model_dir), device="cpu"),
                   progress=False)
    for r in (1, 2):
        rdir = out / f"round_{r}"
        for name in ("model/config.json", "model/model.safetensors", "frozen.safetensors", "metrics.json",
                     "identify/identify.json"):
            assert (rdir / name).is_file(), name
        assert not (rdir / "trainer").exists()  # checkpoints removed once the round is complete
        metrics = json.loads((rdir / "metrics.json").read_text())
        assert metrics["freezing"]["exact"] and metrics["ablate"]
        assert {"loss_first", "loss_last", "reward_margin_first", "reward_margin_last"} <= set(metrics["training"])
    manifest = json.loads((out / "align.json").read_text())
    assert [s["round"] for s in manifest["summary"]] == [1, 2] and (out / "model" / "model.safetensors").is_file()
    # frozen.safetensors: bool [d_ff] per MLP, keyed by module name; union grows over rounds
    f1 = SafetyNeuronMask.load(out / "round_1" / "frozen.safetensors", neuron_set=None)
    f2 = SafetyNeuronMask.load(out / "round_2" / "frozen.safetensors", neuron_set=None)
    assert set(f1.masks) == {s.name for s in find_mlps(start)}
    assert all(m.dtype == torch.bool and m.numel() == 48 for m in f1.masks.values())
    assert (f1 & f2).count() == f1.count()
    # round-1 neurons are unchanged in the final model (union: frozen in both rounds)
    final = load_model(str(out / "model"), device="cpu").model
    assert frozen_entries_equal(final, start, f1)
    assert frozen_entries_equal(result.model, start, f1)
    # the saved model generates with plain transformers, without safeneuron importable
    code = (
        "import sys; sys.modules['safeneuron'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"path = {str(out / 'model')!r}\n"
        "m = AutoModelForCausalLM.from_pretrained(path); t = AutoTokenizer.from_pretrained(path)\n"
        "ids = t.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True, "
        "return_tensors='pt', return_dict=True)\n"
        "out = m.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=0)\n"
        "print(out.shape[1] - ids['input_ids'].shape[1])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "4"


class Crash(TrainerCallback):
    """Simulate a kill: raise at a given step of the n-th trainer (checkpoint saved before it)."""

    def __init__(self, trainer_index, step):
        self.trainer_index, self.step, self.begun = trainer_index, step, 0

    def on_train_begin(self, args, state, control, **kw):
        self.begun += 1

    def on_step_end(self, args, state, control, **kw):
        if self.begun == self.trainer_index and state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


def test_interrupt_and_resume_equals_uninterrupted(tmp_path, model_dir):
    config = quick_config(rounds=2, save_steps=2, max_steps=4)
    straight = align(config, PAIRS, tmp_path / "a", loaded=load_model(str(model_dir), device="cpu"), progress=False)
    with pytest.raises(KeyboardInterrupt):
        align(config, PAIRS, tmp_path / "b", loaded=load_model(str(model_dir), device="cpu"), progress=False,
              callbacks=[Crash(trainer_index=2, step=3)])
    assert (tmp_path / "b" / "round_1" / "metrics.json").is_file()
    assert not (tmp_path / "b" / "round_2" / "metrics.json").exists()
    assert (tmp_path / "b" / "round_2" / "trainer" / "checkpoint-2").is_dir()
    resumed = align(config, PAIRS, tmp_path / "b", loaded=load_model(str(model_dir), device="cpu"), progress=False)
    assert resumed.rounds[1]["resumed_from_checkpoint"].endswith("checkpoint-2")
    a, b = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a finished run is not trained again
    again = align(config, PAIRS, tmp_path / "b", loaded=load_model(str(model_dir), device="cpu"), progress=False)
    assert all(torch.equal(p, dict(again.model.named_parameters())[k]) for k, p in b.items())


def test_baseline_modes_and_lora_align(tmp_path, model_dir):
    start = load_model(str(model_dir), device="cpu").model
    dpo = align(quick_config(rounds=1, mode="dpo", max_steps=2), PAIRS, tmp_path / "dpo",
                loaded=load_model(str(model_dir), device="cpu"), progress=False)
    assert SafetyNeuronMask.load(tmp_path / "dpo" / "round_1" / "frozen.safetensors", neuron_set=None).count() == 0
    assert not (tmp_path / "dpo" / "round_1" / "identify").exists() and dpo.rounds[0]["freezing"] is None

    sn = align(quick_config(rounds=1, mode="sn-tune", max_steps=2), PAIRS, tmp_path / "sn",
               loaded=load_model(str(model_dir), device="cpu"), progress=False)
    trained = SafetyNeuronMask.load(tmp_path / "sn" / "round_1" / "frozen.safetensors", neuron_set=None)
    assert trained.count() > 0 and sn.rounds[0]["neurons_trained_only"] == trained.count()
    mlp_params = {s.param_name for site in find_mlps(start) for s in site.slices}
    for name, p in sn.model.named_parameters():
        if name not in mlp_params:
            assert torch.equal(p, start.get_parameter(name)), f"sn-tune moved {name}"

    lora = align(quick_config(rounds=1, lora=True, lora_r=4, freeze_only=True), PAIRS, tmp_path / "lora",
                 loaded=load_model(str(model_dir), device="cpu"), progress=False)
    frozen = SafetyNeuronMask.load(tmp_path / "lora" / "round_1" / "frozen.safetensors", neuron_set=None)
    assert lora.rounds[0]["freezing"]["exact"] and not lora.rounds[0]["ablate"]
    assert frozen_entries_equal(lora.model, start, frozen)
    assert not any("lora" in n for n, _ in lora.model.named_parameters())  # merged


def test_lora_rounds_saved_as_adapters_load_as_the_merged_models_bit_exactly(tmp_path, model_dir):
    """save_merged = false: each round's model/ is its adapter alone (its base the round's start model), and
    load_model gives back exactly the merged model a save_merged run saves, through the two-round chain; a finished
    run resumes from the adapter directories, and the adapters' hash follows their base."""
    from safeneuron.models import adapter_base, is_model_dir, weights_hash

    config = dict(rounds=2, lora=True, lora_r=4, max_steps=2)
    merged = align(quick_config(**config), PAIRS, tmp_path / "merged", loaded=load_model(str(model_dir), device="cpu"),
                   progress=False)
    lean = align(quick_config(**config, save_merged=False), PAIRS, tmp_path / "lean",
                 loaded=load_model(str(model_dir), device="cpu"), progress=False)
    for r, base in ((1, model_dir), (2, tmp_path / "lean" / "round_1" / "model")):
        rdir = tmp_path / "lean" / f"round_{r}" / "model"
        assert sorted(f.name for f in rdir.glob("*.safetensors")) == ["adapter_model.safetensors"]
        assert not (rdir / "config.json").exists() and is_model_dir(rdir)
        assert adapter_base(rdir) == str(base.resolve())
        assert (rdir / "adapter_model.safetensors").stat().st_size < (
            tmp_path / "merged" / f"round_{r}" / "model" / "model.safetensors").stat().st_size / 3
        for dtype in ("float32", "bfloat16"):  # bfloat16: merged at the training precision, then cast
            want_model = load_model(str(tmp_path / "merged" / f"round_{r}" / "model"), device="cpu", dtype=dtype).model
            got_model = load_model(str(rdir), device="cpu", dtype=dtype).model
            want = dict(want_model.state_dict()) | {f"buffer:{k}": b for k, b in want_model.named_buffers()}
            got = dict(got_model.state_dict()) | {f"buffer:{k}": b for k, b in got_model.named_buffers()}
            assert got.keys() == want.keys(), f"round {r}, {dtype}"
            assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want), f"round {r}, {dtype}"
            assert got_model.config.dtype == want_model.config.dtype
            assert all(p.requires_grad for p in got_model.parameters())  # as from_pretrained leaves them
        assert json.loads((rdir / "merge.json").read_text()) == {"merge_dtype": "float32"}
    final = load_model(str(tmp_path / "lean" / "model"), device="cpu")  # the final model: round 2's adapter
    assert not any("lora" in n for n, _ in final.model.named_parameters())
    assert all(torch.equal(p, dict(merged.model.named_parameters())[k]) for k, p in lean.model.named_parameters())
    assert final.tokenizer("harmful thing")["input_ids"] == make_tokenizer()("harmful thing")["input_ids"]
    stamps = [f.stat().st_mtime_ns for f in sorted((tmp_path / "lean").glob("round_*/model/adapter_model.safetensors"))]
    again = align(quick_config(**config, save_merged=False), PAIRS, tmp_path / "lean",
                  loaded=load_model(str(model_dir), device="cpu"), progress=False)  # reused, not trained again
    assert [f.stat().st_mtime_ns for f in sorted((tmp_path / "lean").glob("round_*/model/adapter_model.safetensors"))
            ] == stamps
    assert [m["round"] for m in again.rounds] == [1, 2]
    assert all(torch.equal(p, dict(again.model.named_parameters())[k]) for k, p in lean.model.named_parameters())
    h2 = weights_hash(str(tmp_path / "lean" / "round_2" / "model"))
    assert h2 != weights_hash(str(tmp_path / "lean" / "round_1" / "model"))
    other_base = tmp_path / "other"
    tiny_model("llama", seed=1).save_pretrained(other_base)  # same shapes, other weights
    cfg_file = tmp_path / "lean" / "round_2" / "model" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = str(other_base)
    cfg_file.write_text(json.dumps(cfg))
    assert weights_hash(str(tmp_path / "lean" / "round_2" / "model")) != h2  # the base is part of the hash
    with pytest.raises(ConfigError, match="save_merged = false .* needs lora"):
        AlignConfig(save_merged=False).validate()


def test_a_disk_too_small_for_the_rounds_model_is_an_error_before_training(tmp_path, model_dir, monkeypatch):
    import shutil
    from collections import namedtuple

    loaded = load_model(str(model_dir), device="cpu")
    size = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * size, 10 * size - size // 2, size // 2))
    with pytest.raises(AlignOutputError, match=r"round 1: .* GiB free, the round's model needs about .* GiB.*"
                                               "save_merged = false"):
        align(quick_config(rounds=1), PAIRS, tmp_path / "full", loaded=loaded, progress=False)
    assert not (tmp_path / "full" / "round_1" / "trainer").exists()  # nothing trained
    lean = align(quick_config(rounds=1, lora=True, lora_r=4, max_steps=1, save_merged=False), PAIRS,
                 tmp_path / "lean", loaded=loaded, progress=False)  # an adapter needs no room for a model
    assert lean.rounds[0]["round"] == 1


def test_bad_input_gives_clear_errors(tmp_path, model_dir):
    loaded = load_model(str(model_dir), device="cpu")
    with pytest.raises(ConfigError, match="rounds must be >= 1, got 0"):
        align(quick_config(rounds=0), PAIRS, tmp_path / "x", loaded=loaded)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    with pytest.raises(PreferenceDataError, match="no chosen/rejected columns"):
        align(quick_config(), bad, tmp_path / "x", loaded=loaded)
    other = tmp_path / "other_mask.safetensors"
    SafetyNeuronMask.random(tiny_model("gpt2"), frac=0.1).save(other)
    with pytest.raises(MaskMismatchError, match="mask from another model"):
        align(quick_config(mask=str(other)), PAIRS, tmp_path / "x", loaded=loaded, progress=False)
    with pytest.raises(ConfigError, match="mode must be one of"):
        align(quick_config(mode="ppo"), PAIRS, tmp_path / "x", loaded=loaded)


def test_cli_align_and_foreign_out_dir(tmp_path, model_dir, capsys):
    out = tmp_path / "cli"
    prefs = tmp_path / "p.jsonl"
    prefs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    argv = ["align", "--model", str(model_dir), "--prefs", str(prefs), "--rounds", "1", "--max-steps", "2",
            "--max-prompts", "8", "--device", "cpu", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "round" in text and "margin last" in text and (out / "model" / "config.json").is_file()
    # same directory, other settings: refused with a one-line error (exit 2)
    assert main(argv + ["--beta", "0.2"]) == 2
    assert "holds an alignment run with other settings" in capsys.readouterr().err
    assert main(["align", "--rounds", "0", "--out", str(out)]) == 2
    assert "rounds must be >= 1" in capsys.readouterr().err
    with pytest.raises(AlignOutputError):
        align(quick_config(rounds=1, max_steps=2, beta=0.3), prefs, out,
              loaded=load_model(str(model_dir), device="cpu"), progress=False)


def test_align_without_prefs_synthesises_them(tmp_path, model_dir):
    out = tmp_path / "syn"
    config = quick_config(quick=True, max_steps=2, max_prompts=8)
    result = align(config, None, out, loaded=load_model(str(model_dir), device="cpu"), progress=False)
    prefs = out / "prefs" / "prefs.jsonl"
    assert prefs.is_file() and (out / "prefs" / "prefs.manifest.json").is_file()
    rows = [json.loads(line) for line in prefs.read_text().splitlines()]
    assert result.manifest["prefs"]["n_pairs"] == min(len(rows), QUICK["align"]["max_pairs"]) > 0  # quick.toml caps
    assert {r["kind"] for r in rows} <= {"harmful", "harmless"} and result.manifest["rounds"] == 1  # quick profile


def test_warmup_is_whole_steps_of_the_rounds_length_and_full_training_keeps_fp32(tmp_path):
    from safeneuron.trainer import optimizer_steps, training_dtype, warmup_steps

    config = AlignConfig(per_device_train_batch_size=2, gradient_accumulation_steps=4, num_train_epochs=3.0)
    assert optimizer_steps(config, 90) == 36  # ceil(ceil(90 / 2) / 4) * 3
    assert optimizer_steps(config, 90, world_size=2) == 18
    assert optimizer_steps(AlignConfig(max_steps=5), 90) == 5
    assert warmup_steps(config, 36) == 3 and warmup_steps(config, 8) == 0  # no step at lr 0 in a short round
    args = dpo_config(config, tmp_path / "t", progress=False, n_pairs=90)
    assert args.warmup_steps == 3 and args.get_warmup_steps(36) == 3
    short = dpo_config(AlignConfig(max_steps=8), tmp_path / "s", progress=False)
    assert short.warmup_steps == 0 and short.get_warmup_steps(8) == 0  # was a ratio: one step at lr 0
    assert training_dtype(AlignConfig()) == "float32"  # full-parameter: fp32 master weights, bf16 autocast on GPU
    assert training_dtype(AlignConfig(lora=True)) == "auto" and training_dtype(AlignConfig(dtype="bfloat16")) == "bfloat16"


@pytest.mark.parametrize("lora", [True, False])
def test_an_ablated_reference_gives_loss_ln2_at_step_0_and_an_intact_one_does_not(tmp_path, lora):
    import copy
    import math

    losses = {}
    for ablated in (True, False):
        model = tiny_model("llama")
        mask = SafetyNeuronMask.random(model, frac=0.9, seed=0)
        kw = dict(peft_config=lora_config(quick_config(lora=True, lora_r=4))) if lora else \
            dict(ref_model=copy.deepcopy(model))
        t = trainer(tmp_path / str(ablated), model, mask, max_steps=1, ablate_reference=ablated, **kw)
        t.args.learning_rate = 0.0  # step 0's loss, whatever the step does
        t.beta = 20.0  # a sharp loss: the tiny model's ablation moves log-probs by little
        t.train()
        losses[ablated] = next(h["loss"] for h in t.state.log_history if "loss" in h)
        t.remove_freezing()
    assert losses[True] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(losses[False] - math.log(2)) > 1e-3


def test_the_consistency_term_is_the_weighted_kl_and_zero_without_ablation(tmp_path):
    import copy

    from torch.utils.data import DataLoader

    def loss_of(mask, weight):
        model = tiny_model("llama")
        t = trainer(tmp_path / f"{weight}-{mask.count()}", model, mask, ref_model=copy.deepcopy(model),
                    consistency_weight=weight)
        batch = next(iter(DataLoader(t.train_dataset, batch_size=2, collate_fn=t.data_collator)))
        model.train()
        loss = t.compute_loss(model, batch)
        kl = t._metrics["train"]["consistency_kl"][-1] if weight and t.freezer.ablated is not None else None
        t.remove_freezing()
        return float(loss), kl

    mask = SafetyNeuronMask.random(tiny_model("llama"), frac=0.5, seed=2)
    base, _ = loss_of(mask, 0.0)
    with_term, kl = loss_of(mask, 2.0)
    assert kl > 1e-6 and with_term == pytest.approx(base + 2.0 * kl, rel=1e-6, abs=1e-7)
    assert with_term > base
    # nothing ablated: the intact and ablated passes are the same network, so the term adds exactly nothing
    empty = SafetyNeuronMask.empty_like(find_mlps(tiny_model("llama")))
    assert loss_of(empty, 2.0)[0] == loss_of(empty, 0.0)[0]
    model = tiny_model("llama")
    t = trainer(tmp_path / "empty", model, SafetyNeuronMask.random(model, frac=0.5, seed=2), ablate=False,
                ref_model=copy.deepcopy(model), consistency_weight=2.0)
    batch = next(iter(DataLoader(t.train_dataset, batch_size=2, collate_fn=t.data_collator)))
    model.train()
    assert t.consistency_kl(model, batch).item() == 0.0
    t.remove_freezing()


def test_the_consistency_term_is_on_by_default_where_the_policy_is_ablated():
    """The recipe search's winner is the default: weight 1.0 in safeneuron mode, off where nothing is ablated."""
    from safeneuron.config import load_run_config

    assert AlignConfig().consistency == 1.0
    assert AlignConfig(mode="dpo").consistency == 0.0 and AlignConfig(mode="sn-tune").consistency == 0.0
    assert AlignConfig(freeze_only=True).consistency == 0.0
    assert AlignConfig(consistency_weight=0.0).consistency == 0.0
    assert AlignConfig(consistency_weight=2.5).consistency == 2.5
    assert AlignConfig(mode="dpo", consistency_weight=2.5).consistency == 0.0
    AlignConfig(freeze_only=True).validate()  # the default does not conflict with freeze_only; a weight does
    with pytest.raises(ConfigError, match="freeze_only has none"):
        AlignConfig(freeze_only=True, consistency_weight=1.0).validate()
    for value in (-1.0, float("nan"), True):
        with pytest.raises(ConfigError, match="consistency_weight must be a finite number"):
            AlignConfig(consistency_weight=value).validate()
    assert load_run_config().stage_config("align").consistency == 1.0  # the main job's


def test_align_with_every_lever_on_lora(tmp_path, model_dir):
    """Dynamic re-identification, stochastic ablation over a wider candidate set, the consistency term and an
    ablated reference, together in one LoRA round: the round records the re-identifications and stays exact."""
    cfg = quick_config(rounds=1, lora=True, lora_r=4, max_steps=4, reidentify_every=2, stochastic_ablation=0.5,
                       candidate_frac=0.1, consistency_weight=0.5, ref_ablated=True, tau_es=0.5)
    result = align(cfg, PAIRS, tmp_path / "levers", loaded=load_model(str(model_dir), device="cpu"), progress=False)
    freezing = result.rounds[0]["freezing"]
    assert freezing["exact"] and freezing["ablate_fraction"] == 0.5 and freezing["ablate_reference"]
    (switch,) = freezing["reidentified"]  # step 2 of 4
    assert switch["step"] == 2 and (tmp_path / "levers" / "round_1" / "reidentify" / "1" / "identify.json").is_file()
    total = sum(s.d_ff for s in find_mlps(result.model))
    assert switch["frozen"] >= round(0.1 * total)  # the top 10 % by t, joined with the round's starting set
    training = json.loads((tmp_path / "levers" / "round_1" / "metrics.json").read_text())["training"]
    assert training["consistency_kl_first"] >= 0 and training["consistency_kl_mean"] >= 0  # the term was logged
