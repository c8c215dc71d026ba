"""The GPU kit (docs/gpu.md): the bundle that travels to a GPU machine, and the check rehearsed on CPU
(the bundle checker's rules in one process: tests/unit/test_gpu_bundle.py).

The rehearsal runs every step of `scripts/gpu_check.sh` tiny on this CPU; its bundle is made by running
the default campaign shrunk (corpus -> prepare -> cache -> train -> baseline -> export -> eval -> report),
so this is also the end-to-end test of `distillery run configs/demo.yaml`: what the campaign hands over,
that a second run skips every stage, that a changed student is refused.
"""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from distill.data.prepared import PreparedData
from tests.helpers import REPO, distillery

sys.path.insert(0, str(REPO / "scripts" / "gpu"))
from bundle_check import check_bundle, wheel_problem
from bundle_demo import REHEARSAL_OVERRIDES

has_translated_man_pages = any(Path("/usr/share/man").glob("de/man1/*"))


@pytest.mark.slow
def test_the_bundle_holds_python_312_wheels_of_what_the_gpu_image_lacks(tmp_path):
    """Downloads from the package registry and builds deepspeed's wheel (as CI can)."""
    done = subprocess.run(
        ["bash", "scripts/gpu_bundle.sh", "--wheels-only", str(tmp_path / "bundle")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    wheels = sorted(p.name for p in (tmp_path / "bundle" / "wheels").glob("*.whl"))
    projects = {w.split("-")[0].lower() for w in wheels}
    assert {
        "megatron_core",
        "deepspeed",
        "pydantic",
        "pydantic_core",
        "omegaconf",
        "antlr4_python3_runtime",
    } <= projects
    assert not {"torch", "transformers", "datasets", "wandb"} & projects  # the image's, or not needed there
    assert all(wheel_problem(w) is None for w in wheels)
    lines, problems = check_bundle(tmp_path / "bundle")
    assert problems == [] and "MiB in all (limit 50 MiB)" in lines[-1]
    deepspeed = next((tmp_path / "bundle" / "wheels").glob("deepspeed-*.whl"))
    assert deepspeed.name.endswith("py3-none-any.whl")  # no ops compiled here


# -- the rehearsal ------------------------------------------------------------------------------------


def check_handoff(run: Path, log: str) -> None:
    """What the campaign hands over: eval.json and its table, metrics, model card, report, a loadable export
    whose bits per byte lm-evaluation-harness confirms."""
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
    table = log[log.rindex("held-out bits per UTF-8 byte") :]
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
    assert str(run) not in card and "/assets/" not in card  # models named by name and hash, never a path
    for fact in (
        "`demo-teacher` (sha256 ",
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


def campaign(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["run", "configs/demo.yaml", "--quiet", "--set", f"run.dir={run_dir}"]
    for item in (*REHEARSAL_OVERRIDES, *extra):
        args += ["--set", item]
    return distillery(*args)


@pytest.fixture(scope="module")
def rehearsal_bundle(tmp_path_factory) -> Path:
    """`scripts/gpu_bundle.sh --rehearse`: the shrunk demo campaign on this CPU, its data and reference."""
    bundle = tmp_path_factory.mktemp("kit") / "bundle"
    done = subprocess.run(
        ["bash", "scripts/gpu_bundle.sh", "--rehearse", str(bundle)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return bundle


@pytest.mark.slow
@pytest.mark.skipif(not has_translated_man_pages, reason="this machine has no translated man pages")
def test_the_demo_campaign_hands_over_then_skips_every_stage_and_refuses_a_changed_student(rehearsal_bundle):
    run = rehearsal_bundle.parent / "bundle-cpu-run"
    log = (run / "campaign.log").read_text()
    assert "corpus -> prepare -> cache -> train -> baseline -> export -> eval -> report" in log
    data = PreparedData(run / "prepared")
    assert data.domains == ("code", "legal", "docs", "multilingual")
    for domain in data.domains:
        assert data.num_sequences(domain, "train") > 0 and data.num_sequences(domain, "heldout") == 4
    assert (run / "config.yaml").is_file() and (run / "prepared" / "config.yaml").is_file()
    check_handoff(run, log)

    second = campaign(run)
    assert second.returncode == 0, second.stderr
    for line in ("corpus: ", "prepare: ", "cache: ", "train: ", "export: ", "eval: "):
        assert line in second.stderr
    assert second.stderr.count("nothing to do") == 8  # the baseline's train and export too
    assert PreparedData(run / "prepared").fingerprint == data.fingerprint

    third = distillery("train", run / "config.yaml", "--set", "student.arch.hidden_size=64", timeout=300)
    message = " ".join(third.stderr.split())  # the CLI wraps its paragraph
    assert (
        third.returncode == 2
        and "holds a student of another architecture (hidden_size: 96 there vs 64" in message
    )


def summary(out: Path) -> dict:
    path = out / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {"steps": {}}


@pytest.mark.slow
@pytest.mark.skipif(not has_translated_man_pages, reason="this machine has no translated man pages")
def test_the_rehearsal_passes_every_step_and_a_rerun_after_an_interruption_skips_the_passed_ones(
    rehearsal_bundle, tmp_path
):
    out = tmp_path / "out"
    command = ["bash", "scripts/gpu_check.sh", "--rehearse", str(out)]
    env = {**os.environ, "DISTILLERY_GPU_BUNDLE": str(rehearsal_bundle)}
    first = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 600
    while summary(out)["steps"].get("demo") is None:  # stop it once the first step is recorded
        assert first.poll() is None and time.monotonic() < deadline, (
            first.stdout.read() if first.stdout else ""
        )
        time.sleep(0.5)
    time.sleep(3)  # into the next step
    first.send_signal(signal.SIGTERM)  # `exec`: the check itself
    first_output = first.communicate(timeout=60)[0]
    assert first.returncode != 0, first_output
    steps = summary(out)["steps"]
    assert steps["demo"]["status"] == "pass", steps["demo"]
    assert set(steps) <= {"demo", "zero"} and steps.get("zero", {}).get("status") in (None, "interrupted")

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-2000:]
    assert "demo: passed in an earlier call, skipped" in second.stdout
    result = summary(out)
    statuses = {name: entry["status"] for name, entry in result["steps"].items()}
    assert statuses == {
        "demo": "pass",
        "zero": "pass",
        "loss_memory": "pass",
        "scale": "pass",
        "distributed_optimizer": "skipped",  # needs CUDA
        "bf16": "pass",
        "scale_deepspeed": "pass",
    }
    assert "needs CUDA" in result["steps"]["distributed_optimizer"]["reason"]
    assert [call["environment"]["device"] for call in result["calls"]] == ["cpu", "cpu"]

    demo = result["steps"]["demo"]["result"]
    assert all(v["rel_diff"] < 1e-6 for v in demo["heldout_bits_per_byte"].values())  # the same computation
    assert demo["training_loss"]["student"]["ok"] and demo["training_loss"]["baseline"]["ok"]
    assert result["steps"]["zero"]["result"]["zero3"]["rel_diff"] < 0.02
    assert result["steps"]["bf16"]["result"]["rel_diff"] < 0.02  # bf16 weights, fp32 masters: tracks fp32
    scale = result["steps"]["scale"]["result"]
    assert scale["cache"]["write_tokens_per_s"] > 0 and set(scale["variants"]) == {
        "ce",
        "cached_kd",
        "online_kd",
    }
    assert result["steps"]["loss_memory"]["result"]["agree"]

    assert (out / "work" / "demo" / "eval" / "eval.json").is_file()  # its hand-off: the test above
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {"demo.log", "zero.log", "scale.log"} <= set(tar.getnames())
    assert "| scale_deepspeed | pass |" in (out / "summary.md").read_text()
