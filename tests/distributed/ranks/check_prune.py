"""Minitron importance measured on the teacher at three layouts, in one launch of 2 ranks.

argv: OUT_DIR WORK_DIR. WORK_DIR holds `config.yaml` (prepared data, a teacher, a `prune` section). The
scores are measured at tp1 x dp2, tp2 and pp2 into `WORK_DIR/prune_tp{tp}pp{pp}/importance.json`; rank 0
reports those directories (the test compares them with each other and with `transformers` hooks).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

from distill.config import load_config
from distill.prune.stage import measure_importance
from parallel.distributed import init_parallel, shutdown
from tests.distributed import report

LAYOUTS = ((1, 1), (2, 1), (1, 2))


def main() -> None:
    out, work = sys.argv[1], Path(sys.argv[2])
    found: dict[str, str] = {}
    for tp, pp in LAYOUTS:
        directory = work / f"prune_tp{tp}pp{pp}"
        config = load_config(
            work / "config.yaml",
            [f"prune.dir={directory}", f"teacher.parallel.tp={tp}", f"teacher.parallel.pp={pp}"],
        )
        measure_importance(config, init_parallel(tp, pp, seed=0))
        dist.barrier()
        found[f"tp{tp}pp{pp}"] = str(directory)
    report(out, dist.get_rank(), found)
    shutdown()


if __name__ == "__main__":
    main()
