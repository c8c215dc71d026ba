"""Campaigns on a real Slurm: two slurmd "nodes" on this machine (`scripts/slurm_cluster.sh`), started for
this module and stopped by PID afterwards, also when a test fails.

- a tiny campaign from `distillery submit` runs to the end: prepare and cache as 2-task job arrays,
  training across both nodes (one elastic agent per node, c10d rendezvous on the first node's address),
  export, eval, report; `status` shows every job COMPLETED; the export loads with `transformers`;
- the 2-part prepare and cache equal 1-part runs of the same config byte for byte;
- a training job sent its grace signal (USR1 to the batch script, as `--signal=B:USR1@grace` does)
  and later `scontrol requeue`d checkpoints, requeues, resumes, and ends with the uninterrupted run's
  final loss; its log of consumed samples equals the uninterrupted run's (none lost, none repeated).

Without Slurm installed these tests skip, saying so, unless DISTILLERY_REQUIRE_SLURM=1 (`.ci/run`
sets it), where they fail instead.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import REPO, prepare_tree, training_section, tree_bytes, write_config

pytestmark = pytest.mark.slow
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A running two-node cluster; yields the environment its client commands need."""
    if shutil.which("slurmctld") is None or shutil.which("sbatch") is None:
        if os.environ.get("DISTILLERY_REQUIRE_SLURM") == "1":
            pytest.fail(
                "Slurm is not installed, but DISTILLERY_REQUIRE_SLURM=1 (scripts/setup.sh installs it)"
            )
        pytest.skip("Slurm is not installed (scripts/setup.sh installs it as root; .ci/run requires it)")
    # .ci/run names the state directory, so that its exit trap can stop the daemons if pytest dies;
    # munged wants every directory above its socket open to all (pytest's temporary ones are not)
    state = Path(os.environ.get("DISTILLERY_SLURM_DIR") or tempfile.mkdtemp(prefix="distillery-slurm-"))
    state.chmod(0o755)
    started = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "start", str(state)], capture_output=True, text=True, timeout=180
    )
    try:
        assert started.returncode == 0, f"the cluster did not start:\n{started.stderr[-4000:]}"
        conf = re.search(r"^export SLURM_CONF=(\S+)$", started.stdout, re.M)
        assert conf is not None, started.stdout
        env = {"SLURM_CONF": conf.group(1)}
        previous = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = env["SLURM_CONF"]  # for `distillery submit/status/cancel` in-process
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(state)], capture_output=True, timeout=120)
        if "previous" in locals():
            if previous is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = previous


def distillery(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = helpers.distillery(*args)
    if check:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


def wait_for(what: str, ready: Callable[[], bool], timeout: float, logs: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            shown = ""
            if logs is not None and logs.is_dir():
                shown = "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(logs.iterdir()))
            pytest.fail(f"timed out waiting for {what}\n{shown}")
        time.sleep(1)


def job_field(job_id: str, field: str) -> list[str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return re.findall(rf"\b{field}=(\S+)", out)


# Enough steps (~0.06 s each here) that the preemption test's second stop, sent after the first requeue's
# resumed run has logged 4 more steps, lands mid-training rather than racing the run's end.
STEPS = 160


@pytest.fixture(scope="module")
def campaign(tmp_path_factory, small_corpus, tokenizer_dir, tiny_model_dir) -> dict:
    """The config tree of a tiny campaign with a `slurm` section, and the 1-part prepare and cache of it
    (made locally at the same paths, then moved aside to `reference/`)."""
    work = tmp_path_factory.mktemp("slurm-campaign")
    tree = prepare_tree(work / "run", small_corpus, tokenizer_dir, seq_len=32, heldout_sequences=2)
    tree["data"]["workers"] = 1
    tree.update(
        teacher={"path": str(tiny_model_dir), "micro_batch": 4},
        cache={"dir": "${run.dir}/cache", "mode": "topk", "k": 8, "sequences_per_shard": 16},
        loss={"weights": {"ce": 0.5, "forward_kl": 1.0}},
        student={"init": str(tiny_model_dir)},
        training=training_section(
            steps=STEPS, global_batch=8, micro_batch=4, warmup_steps=2, eval_interval=0
        ),
        checkpoint={"dir": "${run.dir}/checkpoints", "interval": 100},
        logging={"metrics": "${run.dir}/metrics.jsonl", "samples": "${run.dir}/samples.jsonl"},
        export={"dir": "${run.dir}/student", "dtype": "float32"},
        eval={"dir": "${run.dir}/eval", "sequences": 2, "teacher": False},
        slurm={
            "time": "00:20:00",
            "grace_seconds": 60,
            "stages": {
                "prepare": {"array": 2},
                "cache": {"array": 2},
                "train": {"nodes": 2, "procs_per_node": 1},
            },
        },
    )
    config = write_config(work / "campaign.yaml", tree)
    # the 1-part reference, at the very paths the Slurm run will use
    distillery("prepare", str(config), "--quiet")
    distillery("cache", str(config))
    reference = work / "reference"
    reference.mkdir()
    for name in ("prepared", "cache"):
        os.replace(work / "run" / name, reference / name)
    return {"work": work, "config": config, "tree": tree}


def test_a_submitted_campaign_runs_every_stage_on_two_nodes(slurm, campaign):
    from transformers import AutoModelForCausalLM

    work, config = campaign["work"], campaign["config"]
    run_dir = work / "run"
    distillery("submit", str(config))
    logs = run_dir / "slurm" / "logs"
    jobs = json.loads((run_dir / "slurm" / "jobs.json").read_text())["jobs"]
    assert list(jobs) == ["prepare", "prepare-pack", "cache", "train", "export", "eval", "report"]

    def finished() -> bool:
        states = [s for job in jobs.values() for s in job_field(job["id"], "JobState")]
        failed = [
            s for s in states if s not in ("PENDING", "RUNNING", "COMPLETING", "COMPLETED", "CONFIGURING")
        ]
        assert not failed, f"a job ended {failed}: " + distillery("status", str(run_dir)).stdout
        return (run_dir / "report" / "report.md").is_file() and all(s == "COMPLETED" for s in states)

    wait_for("the campaign", finished, timeout=900, logs=logs)
    status = distillery("status", str(run_dir)).stdout
    rows = [line.split() for line in status.splitlines()[1:]]
    assert [row[0] for row in rows] == list(jobs), status
    assert all(row[3:] == ["COMPLETED", "complete"] for row in rows), status
    assert [row[2] for row in rows] == ["2", "1", "2", "1", "1", "1", "1"], status  # array tasks
    assert len(job_field(jobs["prepare"]["id"], "JobState")) == 2  # two array tasks
    assert len(job_field(jobs["cache"]["id"], "JobState")) == 2
    assert set(job_field(jobs["train"]["id"], "NodeList")) == {"n[1-2]"}  # across both nodes

    # the 2-part data stages equal the 1-part ones, byte for byte
    reference = work / "reference"
    for name in ("prepared", "cache"):
        ours, theirs = tree_bytes(run_dir / name), tree_bytes(reference / name)
        assert ours.keys() == theirs.keys(), name
        assert [k for k in ours if ours[k] != theirs[k]] == [], name

    model = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    assert model.config.num_hidden_layers == 2
    train_log = next(logs.glob("train-*.out")).read_text()
    assert "rank 1" in train_log or "dp 2" in train_log or "resumed" not in train_log

    # submitting again submits nothing: every stage is complete
    again = distillery("submit", str(config))
    assert again.stderr.count("complete, not submitted") == len(jobs)
    assert json.loads((run_dir / "slurm" / "jobs.json").read_text())["jobs"] == jobs


def test_a_preempted_training_job_requeues_and_resumes_exactly(slurm, campaign):
    """USR1 to the batch script (the grace signal), then `scontrol requeue` (SIGTERM): each time the ranks
    checkpoint and the job comes back; the final loss and the consumed samples equal the
    uninterrupted run's (the previous test's training job)."""
    work = campaign["work"]
    uninterrupted = work / "run"
    assert (uninterrupted / "samples.jsonl").is_file(), "runs after the campaign test"
    tree = copy.deepcopy(campaign["tree"])
    run_dir = work / "preempted"
    tree["run"]["dir"] = str(run_dir)
    tree["data"]["dir"] = str(uninterrupted / "prepared")  # complete: not submitted again
    tree["cache"]["dir"] = str(uninterrupted / "cache")
    for key in ("export", "eval"):
        tree.pop(key)
    config = write_config(work / "preempted.yaml", tree)
    distillery("submit", str(config))
    jobs = json.loads((run_dir / "slurm" / "jobs.json").read_text())["jobs"]
    assert list(jobs) == ["train", "report"]
    train = jobs["train"]["id"]
    # submitting again while they are queued or running keeps them (no second copy of a job)
    again = distillery("submit", str(config))
    assert f"train: job {train} is still queued or running, kept" in again.stderr
    assert f"report: job {jobs['report']['id']} is still queued or running, kept" in again.stderr
    assert json.loads((run_dir / "slurm" / "jobs.json").read_text())["jobs"] == jobs
    logs = run_dir / "slurm" / "logs"
    samples = run_dir / "samples.jsonl"

    def steps_logged() -> int:
        return len(samples.read_text().splitlines()) if samples.is_file() else 0

    wait_for("step 4", lambda: steps_logged() >= 4, timeout=300, logs=logs)
    subprocess.run(["scancel", "--signal=USR1", "--batch", train], check=True)
    wait_for("the first requeue", lambda: job_field(train, "Restarts") == ["1"], timeout=300, logs=logs)
    first_stop = steps_logged()
    assert first_stop < STEPS
    wait_for("progress after the requeue", lambda: steps_logged() >= first_stop + 4, timeout=300, logs=logs)
    subprocess.run(["scontrol", "requeue", train], check=True)
    wait_for("the second start", lambda: job_field(train, "Restarts") == ["2"], timeout=300, logs=logs)
    wait_for(
        "the end",
        lambda: (
            (run_dir / "report" / "report.md").is_file() and job_field(train, "JobState") == ["COMPLETED"]
        ),
        timeout=600,
        logs=logs,
    )
    log = next(logs.glob("train-*.out")).read_text()
    assert "USR1: asking the ranks to checkpoint and stop" in log
    assert "requeueing job" in log and "SIGTERM: asking the ranks to checkpoint and stop" in log
    assert log.count("train: resumed from") == 2, log[-3000:]
    # the ranks checkpointed at both stops (no other checkpoint: checkpoint.interval is 100): the main rank
    # names what it saw, the stop file or the SIGTERM, or "another rank's request" when the rank on the
    # other node saw it first (either can, at either stop); the rank that saw it names it in its own line
    assert "wall-time budget" not in log and re.search(r"stopped on request \(stop file \S+\)", log)
    stops = re.findall(
        r"train: (SIGTERM|stop file \S+|another rank's request): stopped after step (\d+)", log
    )
    assert len(stops) == 2 and int(stops[0][1]) < int(stops[1][1]), stops

    def final(run: Path) -> float:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if "loss" in r][-1]["loss"]

    assert final(run_dir) == pytest.approx(final(uninterrupted), abs=1e-6)
    assert samples.read_text() == (uninterrupted / "samples.jsonl").read_text()
