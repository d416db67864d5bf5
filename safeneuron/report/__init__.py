"""The report: matplotlib figures (:mod:`.figures`) and one self-contained HTML page (:mod:`.build`).

``safeneuron report DIR`` writes ``DIR/report.html`` and ``DIR/summary.md`` from
whatever artifacts DIR holds; :func:`build_report` is the library entry point.
"""

from __future__ import annotations

from safeneuron.report.build import build_report

__all__ = ["build_report"]
