"""`distillery tokenizer train CONFIG`: train the campaign's tokenizer (byte-level BPE or Unigram) on its own domains."""

from __future__ import annotations

import argparse

from distill.data.tokenizer import ensure_tokenizer
from distill.errors import ConfigError
from launcher.commands.common import (
    add_config_arguments,
    add_overwrite_argument,
    config_from,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tokenizer", help="train a tokenizer")
    actions = parser.add_subparsers(title="actions", metavar="ACTION", required=True)
    train = actions.add_parser(
        "train",
        help="train a byte-level BPE or a Unigram (data.tokenizer.train.algorithm) on the config's domains into data.tokenizer.path",
    )
    add_config_arguments(train)
    add_overwrite_argument(train)
    train.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    config = config_from(args)
    if config.data.tokenizer.train is None:
        raise ConfigError(
            f"{args.config}: data.tokenizer.train is not set; add it (e.g. vocab_size: 8192) to train"
        )
    ensure_tokenizer(config.data, overwrite=args.overwrite)
    return 0
