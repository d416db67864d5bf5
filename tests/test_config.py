"""Configs: choices checked in one place, the embedded IdentifyConfig and its old flat keys, the quick
profile file, and errors that name fields (the CLI adds the flags)."""

import pytest

from safeneuron.artifacts import StageDir, write_json
from safeneuron.cli import main
from safeneuron.cli.flags import config_from_args
from safeneuron.config import (
    QUICK,
    AlignConfig,
    AttackConfig,
    ConfigError,
    EvalConfig,
    IdentifyConfig,
    PrefsConfig,
    from_dict,
    load_run_config,
)
from safeneuron.errors import SafeneuronError


def test_literal_fields_take_only_their_values():
    for config, field, value in ((IdentifyConfig, "position", "first"), (AlignConfig, "mode", "ppo"),
                                 (AttackConfig, "neuron_set", "both"), (EvalConfig, "mc_scoring", "cloze"),
                                 (PrefsConfig, "format", "csv")):
        with pytest.raises(ConfigError, match=f"{field} must be one of .*got '{value}'"):
            config(**{field: value}).validate()
    IdentifyConfig(position=None).validate()  # Literal | None: None passes
    with pytest.raises(ConfigError, match="method must be one of 'stats', 'neurostrike'"):
        AlignConfig(identify=IdentifyConfig(method="probe")).validate()  # the embedded config is checked too


def test_stages_embed_identify_config_and_keep_their_old_keys():
    align = AlignConfig(tau_es=2.5, max_prompts=8, harmful="h.csv")
    assert (align.identify.tau_es, align.identify.max_prompts, align.identify.harmful) == (2.5, 8, "h.csv")
    attack = AttackConfig(method="neurostrike", identify_prompts=12, set="sas")
    assert attack.neuron_set == "sas" and attack.identify.method == "neurostrike"
    assert attack.identify.max_prompts == 12 and attack.identify.position is None  # the defender's default pooling
    assert AttackConfig(identify_prompts=12).identify.max_prompts == 12 == AttackConfig(
        identify={"max_prompts": 12}).identify.max_prompts
    evaluate = EvalConfig(attack_position="max", identify_harmful="x.csv")
    assert (evaluate.identify.position, evaluate.identify.harmful, evaluate.identify.max_prompts) == ("max", "x.csv", 64)
    assert PrefsConfig(identify_max_prompts=4).identify.max_prompts == 4
    nested = from_dict(AlignConfig, {"rounds": 3, "identify": {"top_frac": 0.1}, "tau_sas": 1.5})
    assert (nested.rounds, nested.identify.top_frac, nested.identify.tau_sas) == (3, 0.1, 1.5)
    with pytest.raises(ConfigError, match="'tau_es' and 'identify.tau_es' are the same setting"):
        from_dict(AlignConfig, {"tau_es": 2, "identify": {"tau_es": 3}})
    with pytest.raises(ConfigError, match=r"\[align\].identify: unknown key 'tau'; did you mean 'tau_es'"):
        from_dict(AlignConfig, {"identify": {"tau": 2}}, where="[align]")


def test_flags_reach_the_embedded_config_by_old_and_new_names():
    import argparse

    from safeneuron.cli.flags import add_config_flags

    parser = argparse.ArgumentParser()
    add_config_flags(parser, EvalConfig)
    old = config_from_args(EvalConfig, parser.parse_args(["--identify-prompts", "9", "--attack-position", "last"]))
    new = config_from_args(EvalConfig, parser.parse_args(["--identify.max-prompts", "9", "--identify.position",
                                                          "last"]))
    assert old == new and old.identify.max_prompts == 9 and old.identify.position == "last"
    assert "--identify.model" not in parser.format_help()  # the stage sets its own model, seed, dtype, device


def test_quick_profile_is_one_file_for_run_align_and_prefs():
    quick_align = AlignConfig(quick=True).resolved()
    assert quick_align.rounds == QUICK["align"]["rounds"] == 1
    assert quick_align.identify.max_prompts == QUICK["align"]["identify"]["max_prompts"]
    assert AlignConfig(quick=True, rounds=3).resolved().rounds == 3  # a field the user set stays
    assert PrefsConfig(quick=True).resolved().n_harmful == QUICK["prefs"]["n_harmful"]
    run = load_run_config(quick=True)
    assert run.stage_config("align").identify.max_prompts == QUICK["align"]["identify"]["max_prompts"]
    assert run.stage_config("evaluate").n_harmful == QUICK["evaluate"]["n_harmful"]
    assert load_run_config().stage_config("evaluate").identify.max_prompts == 48  # the main job's default.toml


def test_library_errors_name_fields_and_the_cli_adds_flags(capsys):
    with pytest.raises(ConfigError, match=r"set lora$") as err:
        AlignConfig(load_in_4bit=True).validate()
    assert err.value.fields == ("lora",)
    assert main(["align", "--load-in-4bit"]) == 2
    assert capsys.readouterr().err.strip().endswith("trains adapters only: set lora (--lora)")


def test_stage_dir_refuses_another_run_and_overwrite_removes_it(tmp_path):
    (tmp_path / "round_1").mkdir()
    write_json(tmp_path / "align.json", {"run_key": "old"})
    write_json(tmp_path / "round_1" / "metrics.json", {"run_key": "old"})
    stage = StageDir(tmp_path, "align.json", "new", "an alignment run", SafeneuronError)
    assert not stage.complete() and stage.foreign(["round_*/metrics.json"]) == [tmp_path / "align.json",
                                                                                tmp_path / "round_1" / "metrics.json"]
    with pytest.raises(SafeneuronError, match="holds an alignment run with other settings") as err:
        stage.claim(patterns=["round_*/metrics.json"])
    assert err.value.fields == ("overwrite", "out")
    stage.claim(True, patterns=["round_*/metrics.json"], remove=["round_*"])
    assert not (tmp_path / "align.json").exists() and not (tmp_path / "round_1").exists()
    stage.write_manifest({"rounds": 1})
    assert stage.complete() and StageDir(tmp_path, "align.json", "other").foreign() == [tmp_path / "align.json"]
    (tmp_path / "align.json").write_text("{torn")  # an unreadable manifest is another run's, not ours
    assert not stage.complete() and stage.foreign() == [tmp_path / "align.json"]
