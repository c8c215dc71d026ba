"""The one way distillery tells a person what it is doing: `say("train", "resumed from ...")`.

Why one helper: under `torchrun` or Slurm every rank runs the same code, so a bare `print` shows each line
once per rank; status lines on stdout would also mix with the data a command prints there (JSON from
`cache inspect`, YAML from `config`). So a message goes to stderr, flushed at once (a job's log shows
progress as it happens), from the main rank only unless the caller says every rank has something of its
own to say, in which case the line names its rank.

The rank is read from `torch.distributed` when a process group is up, else from the launcher's `RANK`
environment variable (set by torchrun and by our Slurm scripts before the group exists). torch is not
imported here: a tokenizer worker process that never loaded it stays light.
"""

from __future__ import annotations

import os
import sys


def process_rank() -> int:
    """This process's global rank: the process group's if one is up, else `RANK`, else 0."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return int(os.environ.get("RANK", "0"))


def say(who: str, message: str, *, all_ranks: bool = False) -> None:
    """Print `who: message` on stderr; from the main rank only unless `all_ranks` (then `who [rank r]: ...`).

    `who` names the stage or component speaking (`prepare`, `cache`, `train`, `campaign demo`), so a log
    that interleaves several stages stays readable.
    """
    rank = process_rank()
    if all_ranks:
        who = f"{who} [rank {rank}]"
    elif rank != 0:
        return
    print(f"{who}: {message}" if who else message, file=sys.stderr, flush=True)
