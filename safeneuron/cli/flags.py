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

from safeneuron.config import INHERITED, from_dict

__all__ = ["field_docs", "add_config_flags", "config_from_args"]


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
        if f.name in skip:
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


def config_from_args(cls, args: argparse.Namespace, base: dict | None = None):
    """Config from a base dict (e.g. a config file) overridden by the flags given."""
    values = dict(base or {})
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            given = {g.name: getattr(args, f"{f.name}.{g.name}") for g in dataclasses.fields(hints[f.name])
                     if getattr(args, f"{f.name}.{g.name}", None) is not None}
            if given:
                values[f.name] = {**values.get(f.name, {}), **given}
            continue
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return from_dict(cls, values, where=cls.__name__)
