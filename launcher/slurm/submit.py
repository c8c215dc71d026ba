"""`distillery submit`, `status` and `cancel`: a campaign's jobs on Slurm, remembered in `slurm/jobs.json`.

`submit` writes every job's script into `run.dir/slurm/` and submits them in order, each with
`--dependency=afterok:<the previous job>` and `--kill-on-invalid-dep=yes` (a failed stage cancels what
waits on it instead of leaving it pending forever). Submitting again is safe: a stage whose output is
complete is not submitted, a job of ours still pending or running is kept (and depended on), anything
else is submitted anew. Job ids go to `run.dir/slurm/jobs.json` (atomically, after each sbatch).

`status` and `cancel` ask Slurm with `scontrol show job` / `scancel` only: no accounting database
(`sacct`) is assumed. A job Slurm no longer remembers (after `MinJobAge`) shows as `gone`; its stage's
own completion (from its output record) is shown beside it.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from distill.atomic import atomic_write_json, atomic_write_text, read_json
from distill.config import CampaignConfig, config_to_yaml, load_config
from distill.errors import UserError
from distill.messages import say
from launcher.slurm.jobs import Job, campaign_jobs, stage_complete
from launcher.slurm.render import job_name, render_job, script_path

JOBS = "jobs.json"
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "RESIZING",
          "SUSPENDED", "STOPPED", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}  # fmt: skip


class SlurmError(UserError):
    """A Slurm command failed or is missing; the message has its output."""


def _slurm(*argv: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SlurmError(
            f"`{argv[0]}` is not installed or not on PATH (is this a Slurm login node?)"
        ) from None
    if done.returncode != 0:
        raise SlurmError(f"`{shlex.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def job_states(job_id: str) -> list[str]:
    """The state of each job (or array task) of `job_id` as `scontrol show job` says; [] if gone."""
    done = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    if done.returncode != 0:
        return []  # "Invalid job id specified": purged after MinJobAge
    states = []
    for line in done.stdout.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if fields.get("JobState"):
            states.append(fields["JobState"])
    return states


def summarize(states: list[str]) -> str:
    """`COMPLETED` when every task agrees, else `RUNNING 1, PENDING 1`; `gone` when Slurm forgot it."""
    if not states:
        return "gone"
    counts: dict[str, int] = {}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    if len(counts) == 1:
        return states[0]
    return ", ".join(f"{state} {n}" for state, n in counts.items())


def _read_jobs(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "slurm" / JOBS
    return read_json(path) if path.is_file() else {"jobs": {}}


def submit(config: CampaignConfig, *, dry_run: bool = False, python: str | None = None) -> list[str]:
    """Write the scripts and submit (or, `dry_run`, print) the jobs; returns the sbatch command lines."""
    if config.slurm is None:
        raise UserError("this config has no `slurm` section (see configs/cluster_8b_to_1b.yaml)")
    python = python or str(config.slurm.python or sys.executable)
    slurm_dir = config.run.dir / "slurm"
    config_path = config.run.dir / "config.yaml"
    jobs = campaign_jobs(config, config_path)
    record = _read_jobs(config.run.dir)
    if not dry_run:
        (slurm_dir / "logs").mkdir(parents=True, exist_ok=True)
        atomic_write_text(config_path, config_to_yaml(config))
        _write_derived_configs(config)
    previous: str | None = None  # id of the last job submitted or kept: the next one waits for it
    lines = []
    for job in jobs:
        known = record["jobs"].get(job.name)
        if stage_complete(config, job.stage):
            say("submit", f"{job.name}: complete, not submitted")
            continue
        if known is not None and not dry_run and set(job_states(known["id"])) & ACTIVE:
            say("submit", f"{job.name}: job {known['id']} is still queued or running, kept")
            previous = known["id"]
            continue
        after = [previous] if previous else []
        script = render_job(config, job, python, after)
        path = script_path(config, job)
        argv = ["sbatch", "--parsable", "--kill-on-invalid-dep=yes"]
        argv += [f"--dependency=afterok:{previous}"] if previous else []
        argv.append(str(path))
        lines.append(shlex.join(argv))
        if dry_run:
            print(f"# ---- {path}\n{script}", file=sys.stdout)
            previous = f"<{job.name}>"
            continue
        atomic_write_text(path, script)
        path.chmod(0o755)
        job_id = _slurm(*argv).strip().split(";")[0]
        record["jobs"][job.name] = {"id": job_id, "stage": job.stage, "script": str(path)}
        atomic_write_json(slurm_dir / JOBS, record)
        say("submit", f"{job.name}: job {job_id}" + (f" after {previous}" if previous else ""))
        previous = job_id
    if dry_run:
        print("# ---- sbatch lines, in order (each job waits for the one before it):")
        print("\n".join(lines))
    return lines


def _write_derived_configs(config: CampaignConfig) -> None:
    """The resolved configs of the baseline's and the correction's training jobs (what `stages.baseline`
    and `stages.correct` write in a local run)."""
    from distill.training.baseline import baseline_config
    from distill.training.correction import correction_config

    for derived in (
        baseline_config(config) if config.baseline is not None else None,
        correction_config(config) if config.correct is not None else None,
    ):
        if derived is not None:
            derived.run.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(derived.run.dir / "config.yaml", config_to_yaml(derived))


def _campaign(run_dir: Path) -> tuple[CampaignConfig, dict[str, Any]]:
    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file() or not (Path(run_dir) / "slurm" / JOBS).is_file():
        raise UserError(
            f"{run_dir} is not a submitted campaign (no config.yaml and slurm/{JOBS}); see `distillery submit`"
        )
    return load_config(config_path), _read_jobs(Path(run_dir))


def status(run_dir: Path) -> list[dict[str, str]]:
    """One row per job of the campaign: job, id, Slurm state, stage output."""
    config, record = _campaign(run_dir)
    rows = []
    for job in campaign_jobs(config, Path(run_dir) / "config.yaml"):
        known = record["jobs"].get(job.name)
        states = job_states(known["id"]) if known else []
        rows.append(
            {
                "job": job.name,
                "id": known["id"] if known else "-",
                "tasks": str(job.array),
                "slurm": summarize(states) if known else "unsubmitted",
                "output": "complete" if stage_complete(config, job.stage) else "incomplete",
            }
        )
    return rows


def format_status(rows: list[dict[str, str]]) -> str:
    keys = ("job", "id", "tasks", "slurm", "output")
    widths = {key: max(len(key), *(len(row[key]) for row in rows)) for key in keys}
    lines = ["  ".join(key.ljust(widths[key]) for key in widths)]
    lines += ["  ".join(row[key].ljust(widths[key]) for key in widths) for row in rows]
    return "\n".join(lines)


def cancel(run_dir: Path) -> list[str]:
    """Cancel every job of the campaign Slurm still has queued or running; returns their ids."""
    _, record = _campaign(run_dir)
    ids = [job["id"] for job in record["jobs"].values() if set(job_states(job["id"])) & ACTIVE]
    if ids:
        _slurm("scancel", *ids)
    return ids


__all__ = ["Job", "cancel", "format_status", "job_name", "status", "submit", "summarize"]
