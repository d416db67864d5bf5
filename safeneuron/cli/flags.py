"""Config dataclasses as command-line flags: ``--tau-es`` sets ``IdentifyConfig.tau_es``.

Every flag of a stage is generated from its config dataclass, with the docstring
written under each field as its help, so the CLI and the library cannot drift apart.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing

from safeneuron.config import INHERITED, RUN_WIDE, ConfigError, from_dict, load_config_file, toml_literal

__all__ = ["field_docs", "add_config_flags", "config_from_args", "file_settings", "normalise_flag_spelling",
           "table_fields", "take_table_flags"]


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each dataclass field (TRL style), by name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                        and isinstance(nxt.value.value, str):
                    docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    if origin in (list, tuple):
        return list
    return tp


def _add_flag(parser: argparse.ArgumentParser, options: list[str], dest: str, tp, default, help_text: str) -> None:
    help_text = help_text.replace("%", "%%")  # argparse formats help with %
    if tp is bool:
        parser.add_argument(*options, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                            help=f"{help_text} (default: {default})")
    elif tp is list:
        parser.add_argument(*options, dest=dest, nargs="+", default=None, help=help_text)
    else:
        parser.add_argument(*options, dest=dest, type=tp if tp in (int, float) else str, default=None,
                            metavar=dest.rsplit(".", 1)[-1].upper(), help=f"{help_text} (default: {default})")


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default if f.default is not dataclasses.MISSING else None


def add_config_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Add ``--field-name`` flags for every field of a config dataclass, ``--identify.field-name`` for a
    nested config's fields (those the stage does not set itself), and ``--old-name`` for each of its
    ``ALIASES``."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    aliases: dict[str, list[str]] = {}
    for old, new in getattr(cls, "ALIASES", {}).items():
        aliases.setdefault(new, []).append("--" + old.replace("_", "-"))
    for f in dataclasses.fields(cls):
        if f.name in skip or hints[f.name] is dict:  # a table field is given as --<field>.KEY VALUE
            continue
        if dataclasses.is_dataclass(hints[f.name]):  # a nested config: one flag per field
            sub, sub_docs, sub_hints = hints[f.name], field_docs(hints[f.name]), typing.get_type_hints(hints[f.name])
            nested_default = _default(f)
            for g in dataclasses.fields(sub):
                if g.name in INHERITED:
                    continue
                dest = f"{f.name}.{g.name}"
                _add_flag(parser, [f"--{f.name}.{g.name.replace('_', '-')}", *aliases.get(dest, [])], dest,
                          _base_type(sub_hints[g.name]), getattr(nested_default, g.name),
                          f"[{f.name}] {sub_docs.get(g.name, '')}")
            continue
        _add_flag(parser, ["--" + f.name.replace("_", "-"), *aliases.get(f.name, [])], f.name,
                  _base_type(hints[f.name]), _default(f), docs.get(f.name, ""))


def file_settings(path, stage: str, cls) -> dict:
    """A stage's settings from a TOML/YAML file given to ``--config``: the file's ``[<stage>]`` table with the
    run-wide keys (``model``, ``seed``, ``dtype``, ``device``) the stage takes, when the file is a run config
    holding one; else the file's top-level keys, TRL style (``align.yaml`` holding ``learning_rate: 1e-5``)."""
    data = load_config_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings at the top, got {type(data).__name__}")
    section = data.get(stage)
    if not isinstance(section, dict) or stage in {f.name for f in dataclasses.fields(cls)}:
        return data
    names = {f.name for f in dataclasses.fields(cls)}
    return {**{k: v for k, v in data.items() if k in RUN_WIDE and k in names}, **section}


def normalise_flag_spelling(argv: list[str]) -> list[str]:
    """``--lora_r 8`` read as ``--lora-r 8`` (TRL and HfArgumentParser spell flags with underscores): the option
    name of every ``--name[=value]`` token with ``_`` in it; values are left as they are, ``--`` ends options."""
    out: list[str] = []
    for i, token in enumerate(argv):
        if token == "--":
            return out + argv[i:]
        if token.startswith("--") and "_" in token.partition("=")[0]:
            name, eq, value = token.partition("=")
            token = name.replace("_", "-") + eq + value
        out.append(token)
    return out


def table_fields(cls) -> list[str]:
    """The config's free-form table fields (``AlignConfig.dpo``), given on the command line as ``--dpo.KEY VALUE``."""
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if hints[f.name] is dict]


def take_table_flags(argv: list[str], tables: list[str]) -> tuple[list[str], dict[str, dict]]:
    """``argv`` without its ``--<table>.KEY VALUE`` / ``--<table>.KEY=VALUE`` pairs, and those pairs by table
    (``--dpo.loss-type ipo`` -> ``{"dpo": {"loss_type": "ipo"}}``)."""
    rest: list[str] = []
    taken: dict[str, dict] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        table, dot, key = token[2:].partition(".") if token.startswith("--") else ("", "", "")
        if dot and table in tables and key:
            key, eq, value = key.partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{token} needs a value")
                value, i = argv[i + 1], i + 1
            taken.setdefault(table, {})[key.replace("-", "_")] = toml_literal(value)
        else:
            rest.append(token)
        i += 1
    return rest, taken


def config_from_args(cls, args: argparse.Namespace, base: dict | None = None):
    """Config from a base dict, else the command's ``--config`` file (:func:`file_settings`), overridden by the
    flags given; what neither sets keeps the dataclass default."""
    if base is None and getattr(args, "config", None):
        base = file_settings(args.config, getattr(args, "command", None) or "", cls)
    values = dict(base or {})
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            given = {g.name: getattr(args, f"{f.name}.{g.name}") for g in dataclasses.fields(hints[f.name])
                     if getattr(args, f"{f.name}.{g.name}", None) is not None}
            if given:
                values[f.name] = {**values.get(f.name, {}), **given}
            continue
        if f.name in table_fields(cls):
            given = getattr(args, "tables", {}).get(f.name)
            if given:
                values[f.name] = {**values.get(f.name, {}), **given}
            continue
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return from_dict(cls, values, where=cls.__name__)
