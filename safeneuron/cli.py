"""The ``safeneuron`` command line: one subcommand per stage, flags mirror the configs.

Every flag of a stage is generated from its config dataclass (``--tau-es`` sets
``IdentifyConfig.tau_es``), so the CLI and the library cannot drift apart. Bad input
exits with code 2 and one line naming the problem.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import errno
import inspect
import logging
import sys
import textwrap
import types
import typing
from pathlib import Path

from safeneuron.errors import SafeneuronError

logger = logging.getLogger("safeneuron")


# --------------------------------------------------------------------------- config -> flags
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


def add_config_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Add ``--field-name`` flags for every field of a config dataclass."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = docs.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} (default: {default})")
        elif tp is list:
            parser.add_argument(flag, dest=f.name, nargs="+", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=tp if tp in (int, float) else str, default=None,
                                metavar=f.name.upper(), help=f"{help_text} (default: {default})")


def config_from_args(cls, args: argparse.Namespace, base: dict | None = None):
    """Config from a base dict (e.g. a config file) overridden by the flags given."""
    from safeneuron.config import from_dict

    values = dict(base or {})
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    return from_dict(cls, values, where=cls.__name__)


# --------------------------------------------------------------------------- commands
def cmd_identify(args: argparse.Namespace) -> int:
    from safeneuron.config import IdentifyConfig
    from safeneuron.identify import identify

    config = config_from_args(IdentifyConfig, args)
    result = identify(config, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    print(identify_summary(result, top=args.top))
    print(f"\nartifacts: {Path(args.out).resolve()}")
    return 0


def identify_summary(result, top: int = 10) -> str:
    """Neurons per layer and the top neurons by effect size, as a text table."""
    m = result.manifest
    sets = m["sets"]
    lines = [
        f"model {m['model']} ({m['model_type']}), method {m['method']}, position {m['position']}, "
        f"{m['n_harmful']} harmful / {m['n_harmless']} harmless prompts, {m['wall_time_s']:.1f} s",
        "",
        f"{'layer':<28}" + "".join(f"{s:>12}" for s in sets),
    ]
    for mlp, counts in m["selected_per_layer"].items():
        lines.append(f"{mlp:<28}" + "".join(f"{counts[s]:>12}" for s in sets))
    lines.append(f"{'total':<28}" + "".join(f"{m['selected_total'][s]:>12}" for s in sets))
    lines.append(f"{'fraction of neurons':<28}" + "".join(f"{m['selected_fraction'][s]:>12.4%}" for s in sets))
    if m.get("expected_false_selections") is not None:
        lines.append(f"expected false selections at tau_ES={m['tau_es']}: {m['expected_false_selections']:.3g} "
                     f"(bound 1-Phi({m['tau_t']:.2f}) per neuron)")
    if m["method"] == "stats" and top:
        import torch

        flat = [(float(v["es"][j]), mlp, j) for mlp, v in result.scores.items()
                for j in torch.topk(v["es"], min(top, v["es"].numel())).indices.tolist()]
        flat.sort(reverse=True)
        lines += ["", f"top {top} neurons by effect size:", f"{'mlp':<28}{'neuron':>8}{'ES':>8}{'SAS z':>8}"]
        for es, mlp, j in flat[:top]:
            lines.append(f"{mlp:<28}{j:>8}{es:>8.2f}{float(result.scores[mlp]['sas'][j]):>8.2f}")
    return "\n".join(lines)


def cmd_models(args: argparse.Namespace) -> int:
    from safeneuron import embedded

    if args.action == "list":
        for name, spec in embedded.EMBEDDED_MODELS.items():
            state = "pulled" if embedded.is_pulled(name) else "not pulled"
            default = " (default)" if name == embedded.DEFAULT_MODEL else ""
            print(f"{name}{default}: {spec.description} [{state}]")
        return 0
    path = embedded.pull(args.name or embedded.DEFAULT_MODEL, force=args.force)
    print(path)
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from safeneuron import __version__
    from safeneuron.config import IdentifyConfig

    parser = argparse.ArgumentParser(prog="safeneuron", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"safeneuron {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")

    p = sub.add_parser("identify", help="find safety neurons (ES + SAS, or NeuroStrike probes)")
    add_config_flags(p, IdentifyConfig)
    p.add_argument("--out", default="identify", help="output directory (default: identify)")
    p.add_argument("--overwrite", action="store_true", help="replace another run's artifacts in --out")
    p.add_argument("--top", type=int, default=10, help="top neurons to list in the summary")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_identify)

    p = sub.add_parser("models", help="list or pull the embedded models")
    p.add_argument("action", choices=["list", "pull"])
    p.add_argument("name", nargs="?", help="embedded model name (default: the embedded default)")
    p.add_argument("--force", action="store_true", help="convert again even if cached")
    p.set_defaults(func=cmd_models)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


#: Stage modules append ``register(subparsers)`` functions here (see their ``cli_*`` helpers).
_EXTRA_COMMANDS: list = []


def _load_extra_commands() -> None:
    import importlib

    for module in ("safeneuron.training", "safeneuron.attacks", "safeneuron.evaluation", "safeneuron.report",
                   "safeneuron.pipeline", "safeneuron.analysis"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name == module or (err.name and module.startswith(err.name)):
                continue
            raise
        register = getattr(mod, "register_cli", None)
        if register is not None and register not in _EXTRA_COMMANDS:
            _EXTRA_COMMANDS.append(register)


def main(argv: list[str] | None = None) -> int:
    _load_extra_commands()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except SafeneuronError as err:
        print(f"safeneuron {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM):
            raise
        where = f" {err.filename}" if err.filename else ""
        print(f"safeneuron {args.command}: error: cannot write{where}: {err.strerror}; free space or choose "
              "another --out (finished artifacts are kept)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"safeneuron {args.command}: interrupted; finished artifacts are kept, run again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
