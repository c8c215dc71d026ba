"""The GPU check: every step of the campaign and the benchmarks on one CUDA GPU, in order of value.

    python scripts/gpu/check.py OUT --bundle .gpu [--rehearse] [--work DIR] [--budget S] [--steps a,b]

(`scripts/gpu_check.sh` installs the bundle's wheels and calls this.) Each step runs its commands as
child processes with a time bound (the step's own, cut to what is left of `--budget`), and is recorded
in `OUT/summary.json` the moment it ends: `pass`, `fail` (with the reason and the numbers), `skipped`
(with the reason) or `interrupted`. A second call with the same `OUT` (or with a copy of the first
call's `summary.json` there) skips the steps that passed and runs the rest. Step logs are packed into
`OUT/logs.tar.gz` and each step's result files into `OUT/results.tar.gz` after every step, so a call cut
short still returns what it did; `OUT/summary.md` is the same summary as a table.

`--rehearse` runs the same steps, tiny, on this CPU (gloo, float32; `bf16` trains one step in bf16):
the bundle is `.gpu-rehearse` from `scripts/gpu_bundle.sh --rehearse`, and the sizes are the ones below.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import StepFailed, StepSkipped, compare_demo, compare_engine_run  # noqa: E402

DEMO_CONFIG = "configs/demo.yaml"
ZERO_CONFIG = "configs/demo_zero.yaml"
DEMO_STAGES = "cache,train,baseline,export,eval,report"


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    seconds: int  # its time bound on the GPU (the rehearsal's are in `REHEARSAL_SECONDS`)
    minimum: int  # seconds it needs on the GPU at the least: with less of the budget left it is skipped
    run: Callable[[Check], dict[str, Any]]


REHEARSAL_SECONDS = 300  # each step on a 2-core CPU


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.out: Path = args.out.resolve()
        self.bundle: Path = args.bundle.resolve()
        self.rehearse: bool = args.rehearse
        self.work: Path = (args.work or (self.out / "work")).resolve()
        self.deadline = time.monotonic() + args.budget
        self.logs = self.work / "logs"
        self.results = self.work / "results"
        for d in (self.out, self.work, self.logs, self.results):
            d.mkdir(parents=True, exist_ok=True)
        self.summary_path = self.out / "summary.json"
        self.summary: dict[str, Any] = (
            json.loads(self.summary_path.read_text()) if self.summary_path.is_file() else {"steps": {}}
        )
        self.child: subprocess.Popen | None = None
        self.current: str | None = None
        self.step_deadline = self.deadline
        import torch

        self.cuda = torch.cuda.is_available()
        if not self.rehearse and not self.cuda:
            raise SystemExit("gpu_check: CUDA is not available here; use --rehearse for the CPU rehearsal")
        self.python = sys.executable

    # -- running commands ---------------------------------------------------------------------------

    def run(self, name: str, args: list[str], *, env: dict[str, str] | None = None) -> str:
        """Run `python args...` in the repository with the step's time bound; its output goes to the step's
        log (appended) and is returned. A non-zero exit fails the step with the log's tail."""
        log = self.logs / f"{self.current}.log"
        remaining = self.step_deadline - time.monotonic()
        if remaining < 5:
            raise StepFailed(f"no time left for `{name}` within the step's bound")
        started = time.monotonic()
        with open(log, "a") as sink:
            sink.write(f"\n$ python {' '.join(args)}\n")
            sink.flush()
            self.child = subprocess.Popen(
                [self.python, *args],
                cwd=REPO,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                start_new_session=True,  # its own process group: a timeout kills its ranks too
            )
            try:
                code = self.child.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                self._kill_child()
                raise StepFailed(
                    f"`{name}` ran past the step's time bound ({remaining:.0f} s left when it started)"
                ) from None
            finally:
                self.child = None
        text = log.read_text(errors="replace")
        print(f"gpu_check:   {name}: exit {code} after {time.monotonic() - started:.1f} s", flush=True)
        if code != 0:
            raise StepFailed(f"`{name}` exited with {code}: {_tail(text)}")
        return text

    def launcher(self, name: str, *args: str) -> str:
        return self.run(name, ["-m", "launcher", *args])

    def _kill_child(self) -> None:
        if self.child is not None and self.child.poll() is None:
            try:
                os.killpg(self.child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.child.wait()

    # -- the summary --------------------------------------------------------------------------------

    def record(self, name: str, entry: dict[str, Any]) -> None:
        self.summary["steps"][name] = entry
        self.summary["updated"] = _now()
        tmp = self.summary_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.summary, indent=2) + "\n")
        os.replace(tmp, self.summary_path)
        (self.out / "summary.md").write_text(summary_table(self.summary))
        _pack(self.logs, self.out / "logs.tar.gz")
        _pack(self.results, self.out / "results.tar.gz")

    def interrupted(self, signum: int, frame: Any) -> None:
        self._kill_child()
        if self.current is not None:
            self.record(self.current, {"status": "interrupted", "reason": f"signal {signum}", "at": _now()})
        print(f"gpu_check: interrupted during {self.current}", flush=True)
        sys.exit(128 + signum)

    def execute(self, steps: list[Step], chosen: set[str] | None) -> int:
        signal.signal(signal.SIGTERM, self.interrupted)
        self.summary.setdefault("calls", []).append(
            {"started": _now(), "environment": environment(self.bundle)}
        )
        self.summary["mode"] = "rehearse" if self.rehearse else "gpu"
        env = self.summary["calls"][-1]["environment"]
        print(f"gpu_check: {env['device']} | torch {env['torch']} (CUDA {env['cuda']}, NCCL {env['nccl']})")
        print(f"gpu_check: python {env['python']} | {json.dumps(env['packages'])}", flush=True)
        for step in steps:
            previous = self.summary["steps"].get(step.name, {})
            if chosen is not None and step.name not in chosen:
                continue
            if previous.get("status") == "pass":
                print(f"gpu_check: {step.name}: passed in an earlier call, skipped", flush=True)
                continue
            bound = REHEARSAL_SECONDS if self.rehearse else step.seconds
            left = self.deadline - time.monotonic()
            if not self.rehearse and left < step.minimum:
                reason = f"{left:.0f} s of this call's budget left, the step needs {step.minimum}-{bound} s"
                self.record(step.name, {"status": "skipped", "reason": reason})
                print(f"gpu_check: {step.name}: skipped (budget)", flush=True)
                continue
            self.current, self.step_deadline = step.name, time.monotonic() + min(bound, left)
            print(f"gpu_check: {step.name}: {step.what} (bound {min(bound, left):.0f} s)", flush=True)
            started = time.monotonic()
            try:
                result = step.run(self)
                entry = {"status": "pass", "result": result}
            except StepSkipped as skip:
                entry = {"status": "skipped", "reason": str(skip)}
            except StepFailed as fail:
                entry = {"status": "fail", "reason": str(fail), "result": fail.result}
            except Exception as exc:  # a bug in the step itself: record it, go on with the next
                entry = {"status": "fail", "reason": f"{type(exc).__name__}: {exc}"}
            entry.update(seconds=round(time.monotonic() - started, 1), at=_now())
            self.record(step.name, entry)
            print(
                f"gpu_check: {step.name}: {entry['status'].upper()} in {entry['seconds']} s"
                + (f": {entry.get('reason')}" if entry.get("reason") else ""),
                flush=True,
            )
            self.current = None
        print(summary_table(self.summary), flush=True)
        failed = [n for n, e in self.summary["steps"].items() if e.get("status") in ("fail", "interrupted")]
        return 1 if failed else 0

    # -- what the steps share -----------------------------------------------------------------------

    @property
    def reference(self) -> Path:
        return self.bundle / "demo" / "reference"

    def demo_overrides(self) -> list[str]:
        return json.loads((self.reference / "reference.json").read_text())["overrides"]

    def demo_run(self) -> Path:
        """The demo campaign's run directory, with the bundle's prepared data in it."""
        run = self.work / "demo"
        prepared = run / "prepared"
        if not (prepared / "manifest.json").is_file():
            import shutil

            if prepared.exists():
                shutil.rmtree(prepared)
            shutil.copytree(self.bundle / "demo" / "prepared", prepared)
        return run

    def keep(self, source: Path, name: str) -> None:
        """Copy a result file into OUT/results.tar.gz (packed after the step)."""
        import shutil

        if source.is_file():
            shutil.copy2(source, self.results / name)


# -- the steps -------------------------------------------------------------------------------------


def step_demo(c: Check) -> dict[str, Any]:
    run = c.demo_run()
    sets = [f"run.dir={run}", *c.demo_overrides()]
    log = c.launcher(
        "the demo campaign", "run", DEMO_CONFIG, "--quiet", "--stages", DEMO_STAGES, *_sets(sets)
    )
    for name, path in (
        ("demo_metrics.jsonl", run / "metrics.jsonl"),
        ("demo_baseline_metrics.jsonl", run / "baseline" / "metrics.jsonl"),
        ("demo_eval.json", run / "eval" / "eval.json"),
    ):
        c.keep(path, name)
    return compare_demo(run, c.reference, log, expect_cuda=c.cuda)


def _engine_steps(c: Check) -> tuple[int, int]:
    """(steps to train, step to compare): within the warm-up, where the schedule does not depend on
    `training.steps`, unless the demo is as short as that."""
    overrides = dict(o.split("=", 1) for o in c.demo_overrides())
    demo_steps = int(overrides.get("training.steps", 150))
    return (demo_steps, demo_steps) if demo_steps <= 20 else (20, 10)


def _demo_sets(c: Check, run: Path, steps: int) -> list[str]:
    demo = c.demo_run()
    return [
        *c.demo_overrides(),
        f"run.dir={run}",
        f"data.dir={demo / 'prepared'}",
        f"cache.dir={demo / 'cache'}",
        f"data.demo_corpus.dir={demo / 'corpus'}",
        f"training.steps={steps}",
        "run.nproc=1",
    ]


def _train_stages(c: Check) -> str:
    """The demo step's cache is reused; a call without one (the demo passed in an earlier call, on another
    machine) makes it first. Not asking for the complete stage saves a launch that would only skip it."""
    return "train" if (c.work / "demo" / "cache" / "manifest.json").is_file() else "cache,train"


def step_zero(c: Check) -> dict[str, Any]:
    steps, at = _engine_steps(c)
    found: dict[str, Any] = {}
    for stage in (2, 3):
        run = c.work / f"zero{stage}"
        sets = [*_demo_sets(c, run, steps), f"deepspeed.zero_stage={stage}"]
        c.launcher(f"ZeRO-{stage}", "run", ZERO_CONFIG, "--quiet", "--stages", _train_stages(c), *_sets(sets))
        c.keep(run / "metrics.jsonl", f"zero{stage}_metrics.jsonl")
        found[f"zero{stage}"] = compare_engine_run(
            run / "metrics.jsonl", c.work / "demo", c.reference, at, expect_cuda=c.cuda
        )
    bad = {k: v for k, v in found.items() if not v["ok"]}
    if bad:
        raise StepFailed(f"the DeepSpeed engine's loss differs from the megatron engine's: {bad}", found)
    return found


def step_distributed_optimizer(c: Check) -> dict[str, Any]:
    if not c.cuda:
        raise StepSkipped("megatron-core's DistributedOptimizer needs CUDA (it asserts CUDA tensors)")
    steps, at = _engine_steps(c)
    run = c.work / "distopt"
    sets = [*_demo_sets(c, run, steps), "training.distributed_optimizer=true", "checkpoint.interval=10"]
    c.launcher(
        "distributed optimizer", "run", DEMO_CONFIG, "--quiet", "--stages", _train_stages(c), *_sets(sets)
    )
    result = compare_engine_run(run / "metrics.jsonl", c.work / "demo", c.reference, at, expect_cuda=True)
    # resume from its step-10 checkpoint... the last one is step `steps`: train 5 more from it
    sets[sets.index(f"training.steps={steps}")] = f"training.steps={steps + 5}"
    c.launcher(
        "distributed optimizer, resumed", "run", DEMO_CONFIG, "--quiet", "--stages", "train", *_sets(sets)
    )
    c.keep(run / "metrics.jsonl", "distopt_metrics.jsonl")
    result["resumed_to"] = steps + 5
    if not result["ok"]:
        raise StepFailed("the distributed optimizer's loss differs from our optimizer's", result)
    return result


def step_bf16(c: Check) -> dict[str, Any]:
    """The rehearsal's bf16 training (the demo's steps, megatron engine, bf16 weights with fp32 masters)
    against the demo step's float32 run: what the GPU does by default, on this CPU."""
    if c.cuda:
        raise StepSkipped("the demo step already trains in bf16 on CUDA")
    steps, at = _engine_steps(c)
    run = c.work / "bf16"
    sets = [*_demo_sets(c, run, steps), "training.precision=bf16", "training.eval_sequences=0"]
    c.launcher("bf16 training", "run", DEMO_CONFIG, "--quiet", "--stages", _train_stages(c), *_sets(sets))
    result = compare_engine_run(run / "metrics.jsonl", c.work / "demo", c.reference, at, expect_cuda=False)
    if not result["ok"]:
        raise StepFailed("bf16 training differs from float32 training", result)
    return result


def step_loss_memory(c: Check) -> dict[str, Any]:
    out = c.results / "loss_memory.json"
    size = ["--tokens", "512", "--hidden", "64", "--vocab", "4096"] if c.rehearse else []
    c.run("fused vs naive loss", ["bench/loss_memory.py", "--out", str(out), *size])
    result = json.loads(out.read_text())
    if not result["agree"]:
        raise StepFailed("the fused loss does not agree with the naive one", result)
    return result


def step_scale(c: Check, engine: str = "megatron") -> dict[str, Any]:
    out = c.results / f"scale_{engine}.json"
    size = "tiny" if c.rehearse else "1b"
    c.run(
        f"{size} student ({engine})",
        [
            "bench/scale.py",
            "--size",
            size,
            "--engine",
            engine,
            "--work",
            str(c.work / "scale"),
            "--out",
            str(out),
        ],
    )
    return json.loads(out.read_text())


STEPS = (
    Step(
        "demo",
        "the demo campaign (cache, train, baseline, export, eval, report) vs the CPU reference",
        240,
        150,
        step_demo,
    ),
    Step(
        "zero",
        "the DeepSpeed engine, ZeRO-2 and ZeRO-3 on one rank, vs the megatron engine",
        150,
        100,
        step_zero,
    ),
    Step(
        "loss_memory",
        "fused vs naive output-layer loss: peak memory and time at V = 128k",
        60,
        20,
        step_loss_memory,
    ),
    Step(
        "scale",
        "a ~1B student at seq 2048: cache write, CE / cached KD / online KD step time and MFU",
        240,
        130,
        step_scale,
    ),
    Step(
        "distributed_optimizer",
        "megatron-core's DistributedOptimizer vs ours, and a resume",
        120,
        60,
        step_distributed_optimizer,
    ),
    Step("bf16", "the demo's training in bf16 on CPU vs float32", 120, 0, step_bf16),
    Step(
        "scale_deepspeed",
        "the ~1B student under the DeepSpeed engine (ZeRO-2)",
        150,
        120,
        lambda c: step_scale(c, "deepspeed"),
    ),
)


# -- helpers ---------------------------------------------------------------------------------------


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _pack(directory: Path, archive: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(directory.iterdir()):
            tar.add(path, arcname=path.name)
    tmp = archive.with_suffix(".tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, archive)


def environment(bundle: Path) -> dict[str, Any]:
    """The device, the versions, the commit (as the bundle recorded it)."""
    import importlib.metadata as metadata

    import torch

    packages = {}
    for name in (
        "megatron-core",
        "deepspeed",
        "transformers",
        "accelerate",
        "pydantic",
        "tokenizers",
        "safetensors",
        "numpy",
    ):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    cuda = torch.cuda.is_available()
    device = "cpu"
    memory = None
    if cuda:
        props = torch.cuda.get_device_properties(0)
        device, memory = props.name, round(props.total_memory / 2**30, 1)
    commit = bundle / "commit.txt"
    return {
        "device": device,
        "device_memory_gib": memory,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "packages": packages,
        "commit": commit.read_text().strip() if commit.is_file() else None,
        "date": _now(),
    }


def summary_table(summary: dict[str, Any]) -> str:
    env = summary["calls"][-1]["environment"] if summary.get("calls") else {}
    lines = [
        f"# GPU check ({summary.get('mode')}): {env.get('device')}, torch {env.get('torch')}, "
        f"CUDA {env.get('cuda')}, {env.get('date')}",
        "",
        "| step | status | seconds | reason |",
        "|---|---|---|---|",
    ]
    for name, entry in summary["steps"].items():
        reason = (entry.get("reason") or "").replace("\n", " ").replace("|", "/")[:200]
        lines.append(f"| {name} | {entry['status']} | {entry.get('seconds', '')} | {reason} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--rehearse", action="store_true")
    parser.add_argument("--work", type=Path, help="where the steps write (default OUT/work)")
    parser.add_argument("--budget", type=float, default=3600.0, help="seconds for the whole call")
    parser.add_argument("--steps", help="only these steps (comma-separated)")
    args = parser.parse_args()
    chosen = set(args.steps.split(",")) if args.steps else None
    if chosen is not None and (unknown := chosen - {s.name for s in STEPS}):
        raise SystemExit(f"gpu_check: unknown steps {sorted(unknown)}; the steps: {[s.name for s in STEPS]}")
    sys.exit(Check(args).execute(list(STEPS), chosen))


if __name__ == "__main__":
    main()
