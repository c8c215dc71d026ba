"""`distillery train CONFIG`: the training stage, one process per rank (use `launch` or torchrun)."""

from __future__ import annotations

import argparse

from launcher.commands.common import add_config_arguments, config_from


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train the student (run under `distillery launch --nproc N --` or torchrun for several ranks)",
    )
    add_config_arguments(parser)
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from distill.training.train import train  # torch + megatron-core: imported only when training

    train(config_from(args))
    return 0
