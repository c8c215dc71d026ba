"""Write the teacher cache at several teacher layouts and compare what they decode to.

argv: OUT_DIR WORK_DIR LAYOUTS... (`tp,pp`; dp follows from the world size). For each signal (top-k,
sampled, and top-k of the Qwen3 teacher at WORK_DIR/qwen3) and layout a cache is written under WORK_DIR; rank 0 reports, per layout, the differences
to the first layout's cache (ids, log-probs, tails, draws).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist

from distill.cache.reader import CacheReader
from distill.cache.writer import CacheWriter
from distill.config import load_config
from distill.data.prepared import SPLITS, PreparedData
from distill.engine import teacher_job
from parallel.distributed import init_parallel, shutdown
from tests.distributed import report


def main() -> None:
    out, work, *layouts = sys.argv[1:]
    results: dict[str, dict[str, float]] = {}
    qwen3 = [f"teacher.path={Path(work) / 'qwen3'}"]  # a top-k cache of a Qwen3 teacher (q/k norms)
    for signal_name, mode, teacher in (
        ("topk", "topk", []),
        ("sampled", "sampled", []),
        ("qwen3", "topk", qwen3),
    ):
        dirs = []
        for layout in layouts:
            tp, pp = map(int, layout.split(","))
            cache_dir = Path(work) / f"cache_{signal_name}_{tp}{pp}"
            overrides = [
                f"cache.dir={cache_dir}",
                f"cache.mode={mode}",
                f"teacher.parallel.tp={tp}",
                f"teacher.parallel.pp={pp}",
                *teacher,
            ]
            config = load_config(Path(work) / "config.yaml", overrides)
            ctx = init_parallel(tp, pp, seed=0)
            CacheWriter(config, teacher_job(config, ctx), overwrite=False).run()
            dist.barrier()
            dirs.append(
                (
                    f"{signal_name}_tp{tp}pp{pp}dp{int(os.environ['WORLD_SIZE']) // (tp * pp)}",
                    cache_dir,
                    config,
                )
            )
        if dist.get_rank() == 0:
            data = PreparedData(dirs[0][2].data.dir)
            signals = [
                CacheReader(d, prepared=data, tokenizer_sha256=data.tokenizer_sha256, vocab_size=640)
                for _, d, _ in dirs
            ]
            keys = [(d, s, i) for d in data.domains for s in SPLITS for i in range(data.num_sequences(d, s))]
            reference = [signals[0].sequence(k) for k in keys]
            for (name, _, _), signal in zip(dirs, signals, strict=True):
                other = [signal.sequence(k) for k in keys]
                if mode == "topk":
                    results[name] = {
                        "id_mismatch": float(
                            np.mean(
                                [np.mean(a["ids"] != b["ids"]) for a, b in zip(reference, other, strict=True)]
                            )
                        ),
                        "max_logprob_diff": float(
                            max(
                                np.abs(a["logprobs"] - b["logprobs"]).max()
                                for a, b in zip(reference, other, strict=True)
                            )
                        ),
                        "max_tail_diff": float(
                            max(
                                np.abs(a["tail"] - b["tail"]).max()
                                for a, b in zip(reference, other, strict=True)
                            )
                        ),
                    }
                else:
                    same = [
                        np.array_equal(a["ids"], b["ids"]) and np.array_equal(a["counts"], b["counts"])
                        for a, b in zip(reference, other, strict=True)
                    ]
                    results[name] = {"identical_sequences": float(np.mean(same))}
                results[name]["max_target_diff"] = float(
                    max(
                        np.abs(a["target_logprob"] - b["target_logprob"]).max()
                        for a, b in zip(reference, other, strict=True)
                    )
                )
    report(out, dist.get_rank(), {"results": results})
    shutdown()


if __name__ == "__main__":
    main()
