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


def check_handoff(run: Path, stderr: str) -> None:
    """What the campaign hands over: eval.json and its table, metrics, model card, report, a loadable export
    whose bits per byte lm-evaluation-harness confirms."""
    import json

    import lm_eval
    import yaml
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.atomic import read_json

    evaluation = read_json(run / "eval" / "eval.json")
    assert list(evaluation["models"]) == ["teacher", "student", "baseline"]
    domains = ["code", "legal", "docs", "multilingual"]
    for model in evaluation["models"].values():
        assert list(model["domains"]) == domains
        assert all(0 < d["bits_per_byte"] < 10 and d["bytes"] > 0 for d in model["domains"].values())
    table = stderr[stderr.rindex("held-out bits per UTF-8 byte") :]
    assert "teacher" in table and "student" in table and "baseline" in table and "multilingual" in table

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert len({r["step"] for r in logged}) == len(logged)  # one rank writes
    for key in (
        "loss/forward_kl",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "time/forward_backward",
        "time/optimizer",
        "time/teacher_wait",
        "time/data",
        "tflops_per_device",
        "memory/host_peak_gib",
    ):
        assert key in logged[-1], key
    assert "mfu" not in logged[-1] and records[0]["device"] == "cpu"  # no peak known on CPU
    assert any("eval/code/bpb" in r for r in records) and any("teacher/code/bpb" in r for r in records)

    card = (run / "student" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert "distillation" in front["tags"] and front["license"] == "apache-2.0"
    for fact in (
        "assets/demo-teacher",
        "3,147,456",
        "tokens seen: 1,024 (4 steps of 4 sequences of 64",
        "forward_kl 1",
        "temperature: 1.0",
        "final mixture weights",
        "| this model | teacher | CE-only",
        "campaign config sha256",
        "prepared data fingerprint",
    ):
        assert fact in card, fact
    baseline_card = (run / "baseline" / "student" / "README.md").read_text()
    assert "without a teacher" in baseline_card and "| domain | this model | teacher |\n" in baseline_card

    report = run / "report"
    assert {"report.md", "loss.png", "heldout_bits_per_byte.png", "throughput.png"} <= {
        p.name for p in report.iterdir()
    }
    assert "| multilingual |" in (report / "report.md").read_text()

    tokenizer = AutoTokenizer.from_pretrained(run / "student")
    model = AutoModelForCausalLM.from_pretrained(run / "student")
    out = model.generate(**tokenizer("def main(", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > 3

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={run / 'student'},max_length=64,dtype=float32",
        tasks=["distillery_heldout"],
        task_manager=TaskManager(include_path=str(run / "eval" / "lm_eval")),
        batch_size=8,
        device="cpu",
    )["results"]
    for domain in domains:
        theirs = results[f"distillery_heldout_{domain}"]["bits_per_byte,none"]
        ours = evaluation["models"]["student"]["domains"][domain]["bits_per_byte"]
        assert abs(theirs - ours) / ours < 0.01, (domain, theirs, ours)


@pytest.mark.slow
def test_demo_campaign_runs_every_stage_then_skips_them(tmp_path):
    first = run_demo(tmp_path / "demo")
    assert first.returncode == 0, first.stderr
    assert "corpus -> prepare -> cache -> train -> baseline -> export -> eval -> report" in first.stderr
    data = PreparedData(tmp_path / "demo" / "prepared")
    assert data.domains == ("code", "legal", "docs", "multilingual")
    for domain in data.domains:
        assert data.num_sequences(domain, "train") > 0 and data.num_sequences(domain, "heldout") == 4
    assert (tmp_path / "demo" / "config.yaml").is_file() and (
        tmp_path / "demo" / "prepared" / "config.yaml"
    ).is_file()

    check_handoff(tmp_path / "demo", first.stderr)

    second = run_demo(tmp_path / "demo")
    assert second.returncode == 0, second.stderr
    for line in ("corpus: ", "prepare: ", "cache: ", "train: ", "export: ", "eval: "):
        assert line in second.stderr
    assert second.stderr.count("nothing to do") == 8  # the baseline's train and export too
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
