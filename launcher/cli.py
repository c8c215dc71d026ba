"""The `distillery` command line: parse, dispatch to a subcommand, turn user errors into exit code 2.

Each subcommand lives in `launcher/commands/<name>.py` with a `register(subparsers)` that adds its
parser and sets `handler`; heavy imports (torch, megatron-core) happen inside handlers, so `--help`
stays fast. Later stages (cache, slurm, ...) add their module to `COMMANDS`.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import traceback
from collections.abc import Sequence
from pathlib import Path

from distill.errors import UserError
from distill.messages import say
from distill.stop import EXIT_STOPPED, StopRequested
from launcher.commands import (
    cache_cmd,
    config_cmd,
    convert_cmd,
    corpus_cmd,
    eval_cmd,
    launch_cmd,
    plan_cmd,
    prepare_cmd,
    prune_cmd,
    report_cmd,
    run_cmd,
    submit_cmd,
    tokenizer_cmd,
    train_cmd,
)
from launcher.local import AGENT_PID, RANK_REPORTS, LaunchFailed
from parallel.errors import ParallelConfigError

COMMANDS = (
    run_cmd,
    config_cmd,
    corpus_cmd,
    tokenizer_cmd,
    prepare_cmd,
    cache_cmd,
    prune_cmd,
    train_cmd,
    convert_cmd,
    eval_cmd,
    report_cmd,
    plan_cmd,
    submit_cmd,
    launch_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distillery",
        description="Pretraining distillation campaigns: prepare -> cache -> train -> export -> eval -> report.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    reports = _rank_reports()
    if reports is not None:
        _die_with_agent()
    try:
        return int(args.handler(args) or 0)
    except (UserError, ParallelConfigError) as exc:
        if args.debug:
            traceback.print_exc()
        if reports is not None:  # a launched rank: the launcher prints it once for all ranks
            reports.with_suffix(".user").write_text(str(exc))
        else:
            say("distillery", _paragraph(exc), all_ranks=_one_of_several())
        return 2
    except StopRequested as exc:
        if reports is not None:  # a launched rank: the launcher says it once
            reports.with_suffix(".stopped").write_text(str(exc))
        else:
            say("distillery", str(exc), all_ranks=_one_of_several())
        return EXIT_STOPPED
    except LaunchFailed as exc:
        say("distillery", str(exc) if exc.code == EXIT_STOPPED else _paragraph(exc))
        return exc.code
    except KeyboardInterrupt:
        say("distillery", "interrupted")
        return 130
    except Exception:
        if reports is None:
            raise
        reports.with_suffix(".crash").write_text(traceback.format_exc())
        return 1


def _rank_reports() -> Path | None:
    """Under `distillery launch`: where this rank reports how it ended (`rank_N.user` / `.crash`)."""
    directory, rank = os.environ.get(RANK_REPORTS), os.environ.get("RANK")
    if not directory or rank is None or not Path(directory).is_dir():
        return None
    return Path(directory) / f"rank_{int(rank):05d}"


def _die_with_agent() -> None:
    """A launched rank ends when its agent does (Linux PR_SET_PDEATHSIG): the agent runs in its own
    session, so a SIGKILL of the job's process group at the end of Slurm's KillWait would otherwise
    leave the ranks running. An agent killed while the rank was still starting, before this call, is
    caught by the parent check after it (the rank was handed to init and would wait forever)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    agent = os.environ.get(AGENT_PID)
    if agent is not None and os.getppid() != int(agent):
        raise SystemExit(f"distillery: rank {os.environ.get('RANK')}: its launcher (pid {agent}) is gone")


def _one_of_several() -> bool:
    """Whether this process is one rank of several that were not started by `distillery launch` (plain
    torchrun): each says its own end, naming its rank, since no launcher gathers them."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _paragraph(exc: Exception) -> str:
    """`error: ...` (said after `distillery: `) with the first line wrapped at 100 columns, prefix
    included; indented detail lines kept as they are."""
    first, *rest = str(exc).splitlines() or [""]
    head = textwrap.fill(
        f"distillery: error: {first}",
        width=100,
        subsequent_indent="  ",
        break_long_words=False,  # paths stay whole, so they can be copied
        break_on_hyphens=False,
    )
    return "\n".join([head.removeprefix("distillery: "), *rest])


if __name__ == "__main__":
    sys.exit(main())
