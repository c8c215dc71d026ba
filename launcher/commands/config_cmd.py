"""`distillery config validate|show CONFIG`: check a campaign file, print it fully resolved."""

from __future__ import annotations

import argparse

from distill.config import config_to_yaml
from launcher.commands.common import add_config_arguments, config_from


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="validate or show a campaign config")
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)
    validate = actions.add_parser(
        "validate", help="check a config; exit 2 with the offending keys if invalid"
    )
    add_config_arguments(validate)
    validate.set_defaults(handler=_validate)
    show = actions.add_parser("show", help="print the resolved config (defaults, references, absolute paths)")
    add_config_arguments(show)
    show.set_defaults(handler=_show)


def _validate(args: argparse.Namespace) -> int:
    config = config_from(args)
    print(f"{args.config}: valid ({len(config.data.domains)} domains, seq_len {config.data.seq_len})")
    return 0


def _show(args: argparse.Namespace) -> int:
    print(config_to_yaml(config_from(args)), end="")
    return 0
