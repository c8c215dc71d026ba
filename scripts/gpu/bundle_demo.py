"""The demo part of a GPU bundle: the campaign's prepared data and this machine's float32 reference.

    python scripts/gpu/bundle_demo.py BUNDLE/demo --mode full|rehearse

`full`: the default campaign (`configs/demo.yaml`) as run on this CPU: its run directory is completed
first if needed (`distillery run`, complete stages skipped), then its prepared data and reference numbers
are copied. `rehearse`: the same campaign shrunk (`REHEARSAL_OVERRIDES`, what CI can afford), run from
scratch into `BUNDLE-cpu-run` beside the bundle. Either way `BUNDLE/demo` then holds:

- `prepared/`: the prepared token stores (the GPU run starts its campaign at the cache stage);
- `reference/metrics.jsonl`, `reference/baseline_metrics.jsonl`, `reference/eval.json`: the distilled
  and CE-only students' training metrics and the held-out bits per byte of teacher, student, baseline;
- `reference/reference.json`: the overrides the campaign ran with (the GPU run uses the same), the
  device and versions, so the comparison says what it compares against.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/demo.yaml"
# the shrunk campaign of the rehearsal: every stage, seconds each (tests/e2e/test_gpu_kit.py checks its
# hand-off)
REHEARSAL_OVERRIDES = (
    "data.demo_corpus.max_bytes_per_domain=24000",
    "data.demo_corpus.max_doc_chars=4000",
    "data.seq_len=64",
    "training.steps=4",
    "training.warmup_steps=1",
    "training.global_batch=4",
    "training.micro_batch=2",
    "checkpoint.interval=2",
    "data.heldout_sequences=4",
    "data.heldout_fraction=1.0",  # tiny domains: the first document fills held-out
)


def run_campaign(run_dir: Path, overrides: tuple[str, ...], log: Path) -> None:
    """`distillery run configs/demo.yaml` into `run_dir` (complete stages skip themselves)."""
    command = [sys.executable, "-m", "launcher", "run", CONFIG, "--quiet", "--set", f"run.dir={run_dir}"]
    for item in overrides:
        command += ["--set", item]
    print(f"gpu_bundle: the demo campaign on this CPU into {run_dir} (log: {log})", file=sys.stderr)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"gpu_bundle: the demo campaign failed (exit {done.returncode}):\n{tail}")


def copy_demo(run_dir: Path, out: Path, overrides: tuple[str, ...]) -> None:
    """Copy what the GPU run needs from a complete CPU run of the demo campaign into `out`."""
    import torch

    sources = {
        "prepared": run_dir / "prepared",
        "reference/metrics.jsonl": run_dir / "metrics.jsonl",
        "reference/baseline_metrics.jsonl": run_dir / "baseline" / "metrics.jsonl",
        "reference/eval.json": run_dir / "eval" / "eval.json",
    }
    missing = [str(p) for p in sources.values() if not p.exists()]
    if missing:
        raise SystemExit(
            f"gpu_bundle: the CPU run in {run_dir} is not complete: missing {', '.join(missing)}"
        )
    if out.exists():
        shutil.rmtree(out)
    for name, source in sources.items():
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():  # not the eval stage's scores kept there: the GPU run scores the teacher itself
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("eval"))
        else:
            shutil.copy2(source, target)
    facts = {
        "config": CONFIG,
        "overrides": list(overrides),
        "device": "cpu",
        "precision": "float32",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.node(),
    }
    (out / "reference" / "reference.json").write_text(json.dumps(facts, indent=2) + "\n")
    print(f"gpu_bundle: demo data and CPU reference in {out}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="BUNDLE/demo")
    parser.add_argument("--mode", choices=["full", "rehearse"], default="full")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.mode == "full":
        from distill.config import load_config

        run_dir, overrides = load_config(REPO / CONFIG).run.dir, ()
        if not (run_dir / "eval" / "eval.json").is_file():
            run_campaign(run_dir, overrides, run_dir / "campaign.log")
    else:
        bundle = args.out.resolve().parent  # the CPU run stays beside the bundle (it does not travel)
        run_dir, overrides = bundle.parent / f"{bundle.name}-cpu-run", REHEARSAL_OVERRIDES
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_campaign(run_dir.resolve(), overrides, run_dir / "campaign.log")
    copy_demo(run_dir, args.out, overrides)


if __name__ == "__main__":
    main()
