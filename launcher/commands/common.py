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


def part_argument(text: str) -> tuple[int, int]:
    """`I/N` -> (I, N) with integers 0 <= I < N: this job's part of a stage split into N (a Slurm array
    task); argparse names --part in its error."""
    index, slash, count = text.partition("/")
    if not slash or not index.strip().isdigit() or not count.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected I/N, two integers such as 0/4, got {text!r}")
    if not 0 <= int(index) < int(count):
        raise argparse.ArgumentTypeError(f"{text!r}: part I of N must satisfy 0 <= I < N (0-based)")
    return int(index), int(count)


def add_part_argument(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--part", type=part_argument, metavar="I/N", help=help)
