"""A `Job` (jobs.py) + the `slurm` config section -> the text of its sbatch script (`launcher/slurm/job.sbatch`).

Safety: values reach the script in two places. `#SBATCH` lines are read by sbatch, not a shell, but a
newline or space would start another option: names, times and sizes are validated by the config
schema, and paths written into `#SBATCH` lines must be free of whitespace and quotes (checked here,
naming the key). Everything in a shell line (paths, the config file, the Python, command arguments) is
`shlex.quote`d; the only verbatim shell is `slurm.setup`, which is shell by definition.
"""

from __future__ import annotations

import re
import shlex
from importlib.resources import files as package_files
from pathlib import Path

from distill.config import CampaignConfig
from distill.config.slurm import slurm_seconds
from distill.errors import ConfigError
from launcher.slurm.jobs import Job

TEMPLATE = "job.sbatch"  # package data beside this module: a wheel carries it
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_SAFE_SBATCH_PATH = re.compile(r"^[^\s'\"\\%]+$")  # %: sbatch's own filename patterns
_JOB_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def render(template: str, values: dict[str, str]) -> str:
    """Fill every `{{name}}`; a placeholder without a value (or a value without a place) is a bug."""
    missing = sorted(set(_PLACEHOLDER.findall(template)) - set(values))
    unused = sorted(set(values) - set(_PLACEHOLDER.findall(template)))
    if missing or unused:
        raise ValueError(f"template placeholders: missing values {missing}, unused values {unused}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _sbatch_path(path: Path, key: str) -> str:
    text = str(path)
    if not _SAFE_SBATCH_PATH.match(text):
        raise ConfigError(
            f"{key}: {text!r} goes into an #SBATCH line, which cannot hold whitespace, quotes, backslashes "
            "or %; choose a path without them"
        )
    return text


def job_name(config: CampaignConfig, job: Job) -> str:
    return _JOB_NAME.sub("_", f"distillery-{config.run.name}-{job.name}")


def script_path(config: CampaignConfig, job: Job) -> Path:
    return config.run.dir / "slurm" / f"{job.name}.sbatch"


def sbatch_lines(config: CampaignConfig, job: Job) -> list[str]:
    slurm = config.slurm
    assert slurm is not None
    resources = slurm.stage(job.stage)
    logs = _sbatch_path(config.run.dir / "slurm" / "logs", "run.dir")
    options = [
        f"--job-name={job_name(config, job)}",
        f"--chdir={_sbatch_path(config.run.dir, 'run.dir')}",
        f"--output={logs}/{job.name}-{'%A_%a' if job.array > 1 else '%j'}.out",
        "--open-mode=append",  # a requeued job adds to its log
        f"--time={slurm.time_of(job.stage)}",
        "--requeue",
        f"--signal=B:{slurm.signal}@{slurm.grace_seconds}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
    ]
    if job.array > 1:
        options.append(f"--array=0-{job.array - 1}")
    if resources.gpus_per_node:
        options.append(f"--gpus-per-node={resources.gpus_per_node}")
    if resources.cpus_per_task:
        options.append(f"--cpus-per-task={resources.cpus_per_task}")
    if resources.mem:
        options.append(f"--mem={resources.mem}")
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(slurm, key)
        if value:
            options.append(f"--{key}={value}")
    if slurm.exclusive:
        options.append("--exclusive")
    options += slurm.sbatch
    return [f"#SBATCH {option}" for option in options]


def _arguments(arguments: tuple[str, ...], part: str | None) -> str:
    """`distillery` arguments for a shell line, each quoted; PART becomes the array task's I/N."""
    return " ".join(part if a == "PART" and part is not None else shlex.quote(a) for a in arguments)


def _distillery(arguments: tuple[str, ...], part: str | None) -> str:
    return '"$PYTHON" -m launcher ' + _arguments(arguments, part)


def body(config: CampaignConfig, job: Job) -> str:
    """The stage's lines: in the batch script, or one elastic agent per node under srun."""
    slurm = config.slurm
    assert slurm is not None
    part = f'"${{SLURM_ARRAY_TASK_ID}}/{job.array}"' if job.array > 1 else None
    if not job.launched:
        return f"run_step {_distillery(job.command, part)}"
    launch = (
        f'launch --nproc {job.ranks_per_node} --nnodes "$SLURM_NNODES" --rdzv-endpoint "$head_addr:$port" '
        f'--rdzv-id "slurm-$SLURM_JOB_ID" --'
    )
    lines = [
        "# one task per node, each running torch's elastic agent; they meet on the first node's address",
        "# as Slurm knows it (NodeAddr; never localhost), at a port derived from the job id",
        'nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))',
        'head_addr=$(scontrol show node "${nodes[0]}" | tr " " "\\n" | sed -n "s/^NodeAddr=//p")',
        f"port=$(({slurm.port} + SLURM_JOB_ID % 1000))",
        "run_step srun --ntasks-per-node=1 --kill-on-bad-exit=0 \\",
        f'  "$PYTHON" -m launcher {launch} \\',
        "  " + _arguments(job.command, part),
    ]
    if job.then:
        lines += [
            'if [ "$status" -eq 0 ]; then',
            f"  run_step {_distillery(job.then, None)}",
            "fi",
        ]
    return "\n".join(lines)


def render_job(config: CampaignConfig, job: Job, python: str, after: list[str] | None = None) -> str:
    """The sbatch script of `job`; `after`: job ids it will depend on (for the resubmit hint only)."""
    slurm = config.slurm
    assert slurm is not None
    resources = slurm.stage(job.stage)
    stop_dir = shlex.quote(str(config.run.dir / "slurm" / "stop"))
    stop_after = (
        f"export DISTILLERY_STOP_AFTER={slurm_seconds(resources.stop_after)}  # slurm.stages.{job.stage}.stop_after"
        if resources.stop_after
        else "# (no wall-time budget: slurm.stages.<stage>.stop_after)"
    )
    what = f"{job.array} array tasks, each " if job.array > 1 else ""
    where = f"{job.nodes} node(s) x {job.ranks_per_node} rank(s)" if job.launched else "the batch node"
    values = {
        "sbatch": "\n".join(sbatch_lines(config, job)),
        "campaign": _JOB_NAME.sub("_", config.run.name),
        "description": f"{job.name} ({what}distillery {' '.join(job.command[:1])} on {where})",
        "script": shlex.quote(str(script_path(config, job))),
        "dependency_hint": f"--dependency=afterok:{':'.join(after)} " if after else "",
        "setup": "\n".join(slurm.setup) if slurm.setup else "# (none)",
        "python": shlex.quote(python),
        "signal": slurm.signal,
        "grace": str(slurm.grace_seconds),
        "stop_dir": stop_dir,
        "stop_after": stop_after,
        "name": job.name,
        "body": body(config, job),
        "max_requeues": str(slurm.max_requeues),
    }
    return render(package_files("launcher.slurm").joinpath(TEMPLATE).read_text(encoding="utf-8"), values)
