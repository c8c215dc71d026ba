"""Arguments shared by the subcommands that take a campaign config."""

from __future__ import annotations

import argparse

from distill.config import CampaignConfig, load_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="campaign YAML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set data.seq_len=512 (repeatable)",
    )


def config_from(args: argparse.Namespace) -> CampaignConfig:
    return load_config(args.config, args.overrides)


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an output directory that holds a different configuration's result",
    )


def add_quiet_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
