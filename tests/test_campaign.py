"""The default campaign end to end (`distillery run configs/demo.yaml`), shrunk by overrides."""

import subprocess
import sys
from pathlib import Path

import pytest

from distill.data.prepared import PreparedData
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(
    not any(Path("/usr/share/man").glob("de/man1/*")), reason="this machine has no translated man pages"
)


def run_demo(run_dir: Path) -> subprocess.CompletedProcess:
    overrides = [
        f"run.dir={run_dir}",
        "data.demo_corpus.max_bytes_per_domain=60000",
        "data.seq_len=64",
        "training.steps=4",
        "training.warmup_steps=1",
        "training.global_batch=4",
        "training.micro_batch=2",
        "checkpoint.interval=2",
        "data.heldout_sequences=4",
        "data.heldout_fraction=1.0",  # tiny domains: the first document fills held-out
    ]
    command = [sys.executable, "-m", "launcher", "run", "configs/demo.yaml", "--quiet"]
    for item in overrides:
        command += ["--set", item]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_demo_campaign_runs_every_stage_then_skips_them(tmp_path):
    first = run_demo(tmp_path / "demo")
    assert first.returncode == 0, first.stderr
    assert "corpus -> prepare -> cache -> train -> export" in first.stderr
    data = PreparedData(tmp_path / "demo" / "prepared")
    assert data.domains == ("code", "legal", "docs", "multilingual")
    for domain in data.domains:
        assert data.num_sequences(domain, "train") > 0 and data.num_sequences(domain, "heldout") == 4
    assert (tmp_path / "demo" / "config.yaml").is_file() and (
        tmp_path / "demo" / "prepared" / "config.yaml"
    ).is_file()

    second = run_demo(tmp_path / "demo")
    assert second.returncode == 0, second.stderr
    for line in ("corpus: ", "prepare: ", "cache: ", "train: ", "export: "):
        assert line in second.stderr
    assert second.stderr.count("nothing to do") == 5
    assert PreparedData(tmp_path / "demo" / "prepared").fingerprint == data.fingerprint

    resolved = str(tmp_path / "demo" / "config.yaml")
    changed = [
        sys.executable,
        "-m",
        "launcher",
        "train",
        resolved,
        "--set",
        "parallel.tp=1",
        "--set",
        "student.arch.hidden_size=64",
    ]
    third = subprocess.run(changed, cwd=REPO, capture_output=True, text=True, timeout=300)
    message = " ".join(third.stderr.split())  # the CLI wraps its paragraph
    assert (
        third.returncode == 2
        and "holds a student of another architecture (hidden_size: 96 there vs 64" in message
    )
