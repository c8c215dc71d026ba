"""`distillery prepare CONFIG`: tokenize and pack the campaign's domains (resumable)."""

from __future__ import annotations

import argparse

from distill.data.prepare import prepare
from launcher.commands.common import (
    add_config_arguments,
    add_overwrite_argument,
    add_quiet_argument,
    config_from,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("prepare", help="stream, tokenize and pack each domain into token stores")
    add_config_arguments(parser)
    add_overwrite_argument(parser)
    add_quiet_argument(parser)
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    prepare(config_from(args), overwrite=args.overwrite, progress=not args.quiet)
    return 0
