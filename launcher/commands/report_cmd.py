"""`distillery report RUN_DIR`: PNG plots and report.md of a run (see distill/report/build.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from distill.messages import say


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="plots (loss terms, held-out bits per byte, DDK weights, TAID tau, throughput) and report.md",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a campaign's run.dir")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: RUN_DIR/report)")
    parser.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    from distill.report.build import build_report

    out = build_report(args.run_dir, args.out)
    say("report", str(out / "report.md"))
    return 0
