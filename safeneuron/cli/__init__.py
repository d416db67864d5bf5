"""The ``safeneuron`` command line: one subcommand per stage, flags mirror the configs.

Every flag of a stage is generated from its config dataclass (``--tau-es`` sets
``IdentifyConfig.tau_es``; :mod:`.flags`), the commands are one table
(:mod:`.commands`) and each prints its stage's summary (:mod:`.summaries`). Bad input
exits with code 2 and one line naming the problem.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from safeneuron.errors import SafeneuronError

__all__ = ["main", "build_parser"]

logger = logging.getLogger("safeneuron")


def build_parser() -> argparse.ArgumentParser:
    from safeneuron import __version__
    from safeneuron.cli.commands import add_commands

    parser = argparse.ArgumentParser(prog="safeneuron", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"safeneuron {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="<stage>"))
    return parser


def _flag_spelling(err: SafeneuronError) -> str:
    """The flags of the config fields an error names (the library speaks of fields, the user typed flags)."""
    fields = getattr(err, "fields", ())
    return f" ({', '.join('--' + f.replace('_', '-') for f in fields)})" if fields else ""


def main(argv: list[str] | None = None) -> int:
    from safeneuron.cli.commands import COMMANDS
    from safeneuron.cli.flags import normalise_flag_spelling, table_fields, take_table_flags

    parser = build_parser()
    argv = normalise_flag_spelling(sys.argv[1:] if argv is None else [str(a) for a in argv])
    try:
        argv, tables = take_table_flags(argv, sorted({t for c in COMMANDS if c.config for t in table_fields(c.config)}))
    except SafeneuronError as err:
        parser.error(str(err))
    args = parser.parse_args(argv)
    config = next((c.config for c in COMMANDS if c.name == args.command), None)
    unknown = [f"--{t}.*" for t in tables if config is None or t not in table_fields(config)]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} ({args.command} takes no such table)")
    args.tables = tables
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except SafeneuronError as err:
        print(f"safeneuron {args.command}: error: {err}{_flag_spelling(err)}", file=sys.stderr)
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
