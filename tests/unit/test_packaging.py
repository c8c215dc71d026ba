"""A non-editable install has every file distillery reads at run time: a wheel of the project, installed
over the dependencies already here, runs `distillery submit --dry-run` (which reads the sbatch template)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def test_a_wheel_installed_over_the_dependencies_runs_submit_dry_run(tmp_path):
    source = tmp_path / "src"  # built from a copy: a build writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("launcher", "distill", "parallel"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source], check=True
    )
    wheel = next((tmp_path / "dist").glob("distillery-*.whl"))
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", site, wheel], check=True)

    env = {**os.environ, "PYTHONPATH": str(site), "SCRATCH": str(tmp_path / "scratch"), "HOME": "/home/alice"}
    where = subprocess.run(
        [sys.executable, "-c", "import launcher.slurm.render as r; print(r.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(site)), where.stdout  # the wheel's code, not the source tree's
    run = subprocess.run(
        [site / "bin" / "distillery", "submit", REPO / "configs" / "cluster_8b_to_1b.yaml", "--dry-run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "#SBATCH" in run.stdout and "# ---- sbatch lines, in order" in run.stdout
