"""`distillery submit --dry-run` and the generated sbatch scripts, without a cluster: the script text of a
realistic config, the dependency chain, validation of every value that reaches a script, and a script
run by bash (with stand-ins for srun, scontrol and Python) that must not execute a config value."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from distill.config import load_config
from distill.errors import ConfigError
from distill.stop import StopRequest
from launcher.cli import main
from launcher.slurm.jobs import campaign_jobs
from launcher.slurm.render import render_job
from tests.helpers import REPO, write_config

CLUSTER = REPO / "configs" / "cluster_8b_to_1b.yaml"


def dry_run(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))
    monkeypatch.setenv("HOME", "/home/alice")
    assert main(["submit", str(CLUSTER), "--dry-run"]) == 0
    return capsys.readouterr().out


def scripts_of(out: str) -> dict[str, str]:
    """`# ---- PATH` sections of the dry run -> {job name: script text}."""
    found = {}
    for section in out.split("# ---- ")[1:]:
        head, _, text = section.partition("\n")
        if head.endswith(".sbatch"):
            found[Path(head).stem] = text
    return found


def test_dry_run_of_a_cluster_campaign(capsys, monkeypatch, tmp_path):
    out = dry_run(capsys, monkeypatch, tmp_path)
    scripts = scripts_of(out)
    assert list(scripts) == ["prepare", "prepare-pack", "cache", "train", "export", "eval", "report"]
    run_dir = tmp_path / "scratch" / "distillery" / "llama8b-to-1b"
    assert not run_dir.exists(), "a dry run writes nothing"

    # the chain: each job waits for the one before it, in campaign order
    lines = out.split("# ---- sbatch lines, in order (each job waits for the one before it):\n")[1].split(
        "\n"
    )
    argvs = [shlex.split(line) for line in lines if line]
    assert [Path(a[-1]).stem for a in argvs] == list(scripts)
    assert not any(a.startswith("--dependency") for a in argvs[0])
    for before, argv in zip(list(scripts), argvs[1:], strict=False):
        assert f"--dependency=afterok:<{before}>" in argv
        assert "--kill-on-invalid-dep=yes" in argv

    train = scripts["train"]
    for line in [
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@600",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=llm-distill",
        "#SBATCH --qos=normal",
        "#SBATCH --constraint=h100",
        "#SBATCH --mail-type=FAIL",
        f"#SBATCH --output={run_dir}/slurm/logs/train-%j.out",
        "module load cuda/12.4",
        "PYTHON=/home/alice/distillery/.venv/bin/python",
        "export DISTILLERY_STOP_AFTER=171000  # slurm.stages.train.stop_after",
        "set -euo pipefail",
        '  scontrol requeue "$SLURM_JOB_ID"',
    ]:
        assert line in train.splitlines(), line
    assert '--nproc 8 --nnodes "$SLURM_NNODES" --rdzv-endpoint "$head_addr:$port"' in train
    assert f"  train {run_dir}/config.yaml" in train
    assert '[ "$restarts" -ge 10 ]' in train and "localhost:" not in train

    cache = scripts["cache"]
    assert "#SBATCH --array=0-15" in cache and f"--output={run_dir}/slurm/logs/cache-%A_%a.out" in cache
    assert '--part "${SLURM_ARRAY_TASK_ID}/16"' in cache
    assert "#SBATCH --array=0-31" in scripts["prepare"] and "--gpus-per-node" not in scripts["prepare"]
    assert "--part " not in scripts["prepare-pack"] and "--array" not in scripts["prepare-pack"]
    assert 'run_step "$PYTHON" -m launcher run' in scripts["eval"] and "--stages eval" in scripts["eval"]
    for name, text in scripts.items():  # bash parses every script
        done = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
        assert done.returncode == 0, (name, done.stderr)


def cluster_tree(tmp_path: Path) -> dict:
    tree = yaml.safe_load(CLUSTER.read_text())
    tree["run"]["dir"] = str(tmp_path / "run")
    for key in ("tokenizer",):
        tree["data"][key]["path"] = str(tmp_path / "tok")
    tree["teacher"]["path"] = str(tmp_path / "teacher")
    tree["student"]["init"] = str(tmp_path / "student")
    for domain in tree["data"]["domains"].values():
        for source in domain["sources"]:
            if "files" in source:
                source["files"] = str(tmp_path / "*.parquet")
    tree["slurm"]["python"] = "/usr/bin/python3"
    return tree


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("partition", "gpu;rm -rf /", "slurm.partition"),
        ("account", "a b", "slurm.account"),
        ("qos", "$(id)", "slurm.qos"),
        ("constraint", "h100 && reboot", "slurm.constraint"),
        ("sbatch", ["--mail-type=END\n#SBATCH --uid=0"], "slurm.sbatch"),
        ("sbatch", ["--comment=`id`"], "slurm.sbatch"),
        ("setup", ["module load x\nrm -rf /"], "slurm.setup"),
        ("time", "1 day", "slurm.time"),
        ("stages", {"train": {"mem": "64G; reboot"}}, "slurm.stages.train.mem"),
        ("stages", {"report": {"nodes": 2}}, "stages.report.nodes"),
        ("stages", {"train": {"array": 4}}, "stages.train.array"),
        ("stages", {"trian": {"nodes": 2}}, "stages.trian"),
        ("stages", {"train": {"nodes": 3, "gpus_per_node": 1}}, "tp x pp = 2"),
        ("stages", {"train": {"time": "00:05:00"}}, "grace_seconds"),
    ],
)
def test_bad_slurm_values_are_rejected_naming_the_key(tmp_path, key, value, message):
    tree = cluster_tree(tmp_path)
    tree["slurm"][key] = value
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(write_config(tmp_path / "c.yaml", tree))


def test_paths_in_sbatch_lines_must_not_hold_whitespace(tmp_path):
    tree = cluster_tree(tmp_path)
    tree["run"]["dir"] = str(tmp_path / "my run")
    config = load_config(write_config(tmp_path / "c.yaml", tree))
    job = campaign_jobs(config, config.run.dir / "config.yaml")[0]
    with pytest.raises(ConfigError, match="run.dir: .* #SBATCH line"):
        render_job(config, job, "/usr/bin/python3")


def test_a_config_value_with_shell_syntax_is_passed_on_not_executed(tmp_path):
    """The rendered export job, run by bash: the odd run directory reaches Python as one argument."""
    tree = cluster_tree(tmp_path)
    odd = tmp_path / "run$(touch${IFS}PWNED)`touch${IFS}PWNED2`;x"
    tree["run"]["dir"] = str(odd).replace("${", "\\${")  # escaped from OmegaConf's interpolation
    record = tmp_path / "argv.txt"
    fake_python = tmp_path / "python"
    fake_python.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {shlex.quote(str(record))}\n')
    fake_python.chmod(0o755)
    tree["slurm"]["python"] = str(fake_python)
    tree["slurm"]["setup"] = []
    config = load_config(write_config(tmp_path / "c.yaml", tree))
    job = next(j for j in campaign_jobs(config, config.run.dir / "config.yaml") if j.name == "export")
    script = tmp_path / "export.sbatch"
    script.write_text(render_job(config, job, str(fake_python)))
    env = {**os.environ, "SLURM_JOB_ID": "42"}
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert record.read_text().splitlines() == ["-m", "launcher", "run", f"{odd}/config.yaml", "--stages",
                                               "export", "--quiet"]  # fmt: skip
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))
    assert (odd / "slurm" / "stop").is_dir()  # the quoted path was used as it is


def test_stop_request_sources(tmp_path, monkeypatch):
    stop_file = tmp_path / "stop"
    monkeypatch.setenv("DISTILLERY_STOP_FILE", str(stop_file))
    monkeypatch.setenv("DISTILLERY_STOP_AFTER", "3600")
    request = StopRequest.from_environment()
    assert request.local() is None
    stop_file.touch()
    assert request.local() == f"stop file {stop_file}"
    stop_file.unlink()
    assert StopRequest(budget_seconds=0).local() == "wall-time budget"

    def reduce_with_another_rank_asking(tensor):  # a 2-rank sum where the other rank wants to stop
        tensor += 1

    assert request.agreed(reduce_with_another_rank_asking) == "another rank's request"
    assert request.agreed(lambda t: None) is None
    request.install()
    try:
        os.kill(os.getpid(), __import__("signal").SIGUSR1)
        assert request.local() == "SIGUSR1"
    finally:
        request.uninstall()
