"""The report: matplotlib figures (:mod:`.figures`) and one self-contained HTML page (:mod:`.build`).

``safeneuron report DIR`` writes ``DIR/report.html`` and ``DIR/summary.md`` from
whatever artifacts DIR holds; :func:`build_report` is the library entry point.
"""

from __future__ import annotations

__all__ = ["build_report", "register_cli"]


def build_report(run_dir, out=None):
    """See :func:`safeneuron.report.build.build_report`."""
    from safeneuron.report.build import build_report as build

    return build(run_dir, out)


def register_cli(subparsers) -> None:
    """Add ``safeneuron report DIR [--out FILE]``."""
    from safeneuron.report.build import cmd_report

    p = subparsers.add_parser("report", help="build report.html and summary.md from a run directory's artifacts")
    p.add_argument("dir", help="main-job directory (or one stage's output directory)")
    p.add_argument("--out", default=None, help="HTML file to write (default: DIR/report.html; summary.md beside it)")
    p.set_defaults(func=cmd_report)
