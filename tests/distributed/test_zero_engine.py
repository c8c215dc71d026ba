"""The DeepSpeed ZeRO engine (`engine: deepspeed`) on real gloo processes
(tests/distributed/ranks/check_zero.py):

- ZeRO-2 and ZeRO-3 on 2 ranks train exactly like 1 rank on the same global batches (5 steps), with the
  cached top-k teacher and with the online teacher (itself a ZeRO-3 inference engine);
- the megatron engine and the DeepSpeed engine started from the same HF weights give the same losses
  (a Qwen3-style student: transformers' Qwen3 against our megatron-core mapping of it);
- a ZeRO-3 checkpoint exports to an HF directory whose `from_pretrained` logits are the engine's;
- SIGKILL between checkpoints, then resume: the final loss of an uninterrupted run;
- bad input: resuming with another number of ranks, or with the other engine, is refused by name.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.checkpoint import latest_checkpoint, read_meta
from tests.distributed import run_ranks
from tests.distributed.test_training import final_loss, kill_when
from tests.helpers import REPO, TINY_QWEN3_STUDENT_ARCH, distillery, training_section, write_config

pytestmark = pytest.mark.slow

# Two engines, one model: the same weights and batches in fp32, HF's kernels (sdpa attention, RoPE,
# RMSNorm) against megatron-core's: float rounding apart (measured ~1e-7 over 5 steps).
ENGINES = 1e-5
# ZeRO-1/2/3 are the same update: fp32 partitions reduce and step in other buckets and order (measured
# up to 1e-7 apart over 5 steps).
STAGES = 1e-6


@pytest.fixture(scope="module")
def work(tmp_path_factory, prepared_tiny, tiny_model_dir) -> Path:
    work = tmp_path_factory.mktemp("zero")
    tree = copy.deepcopy(prepared_tiny)
    tree.update(
        student={
            # Qwen3-style (q/k norms, explicit head_dim: HF's Qwen3 against our megatron-core mapping);
            # untied: the output weight ZeRO-3 must gather is not the embedding's
            "arch": {**TINY_QWEN3_STUDENT_ARCH, "tie_word_embeddings": False},
            "init_dir": str(work / "student_init"),
        },
        training=training_section(steps=5, micro_batch=1),
        checkpoint={"dir": "${run.dir}/checkpoints", "interval": 100},
        logging={"metrics": "${run.dir}/metrics.jsonl"},
        teacher={"path": str(tiny_model_dir), "micro_batch": 4},
        loss={"weights": {"ce": 0.5, "forward_kl": 1.0}},
    )
    online = copy.deepcopy(tree)
    online["teacher"]["mode"] = "online"
    write_config(work / "online.yaml", online)
    cached = copy.deepcopy(tree)
    cached["cache"] = {"dir": str(work / "cache"), "mode": "topk", "k": 640, "sequences_per_shard": 64}
    write_config(work / "cached.yaml", cached)
    built = distillery("cache", work / "cached.yaml")
    assert built.returncode == 0, built.stderr[-3000:]
    return work


@pytest.fixture(scope="module")
def runs(work, tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("zero_reports")
    return {n: run_ranks("check_zero.py", n, out / str(n), str(work), timeout=900)[0] for n in (1, 2)}


@pytest.mark.parametrize(
    "name",
    [
        "zero1_cached",
        "zero2_cached",
        "zero3_cached",
        "zero2_online",
        "zero3_online",
        "zero2_bf16",
        "zero3_bf16",
    ],
)
def test_two_ranks_train_like_one(runs, name):
    one, two = runs[1][name], runs[2][name]
    assert len(one) == 5 and one[-1] < one[0]
    if name.startswith("zero3"):
        assert runs[2][f"{name}_partitioned"]  # every parameter was split over the 2 ranks
    assert two == pytest.approx(one, abs=1e-5)


def test_taid_and_ddk_run_on_the_deepspeed_engine_like_on_one_rank(runs):
    one, two = runs[1], runs[2]
    assert two["zero2_taid_ddk"] == pytest.approx(one["zero2_taid_ddk"], abs=1e-5)
    taus = two["zero2_taid_ddk_tau"]
    assert taus == one["zero2_taid_ddk_tau"] and taus == sorted(taus) and taus[-1] > taus[0]
    weights = two["zero2_taid_ddk_weights"]
    assert weights == pytest.approx(one["zero2_taid_ddk_weights"], abs=1e-6) and len(set(weights)) > 1


def test_every_stage_is_the_same_training_with_weight_decay_on_the_matrices(runs):
    two = runs[2]
    assert two["zero1_cached"] == pytest.approx(two["zero2_cached"], abs=STAGES)
    assert two["zero3_cached"] == pytest.approx(two["zero2_cached"], abs=STAGES)
    assert two["zero3_online"] == pytest.approx(two["zero2_online"], abs=STAGES)
    # AdamW's two groups (decay on the matrices, none on the norms) under every stage: ZeRO-3's partitioned
    # placeholders are 1-d, and a decay group judged by them would be empty (DeepSpeed drops it)
    for name in ("zero1_cached", "zero2_cached", "zero3_cached", "zero3_bf16"):
        assert two[f"{name}_decay_groups"] == [0.1, 0.0], name


def test_bf16_weights_with_fp32_gradients_and_masters_train_like_fp32(runs):
    two = runs[2]
    assert two["zero2_bf16"][0] == pytest.approx(
        two["zero2_cached"][0], abs=0.02
    )  # bf16 rounding of the weights
    assert two["zero3_bf16"] == pytest.approx(two["zero2_bf16"], abs=1e-3)
    assert two["zero2_bf16"][-1] < two["zero2_bf16"][0]


def test_megatron_and_deepspeed_engines_agree_from_the_same_weights(runs):
    megatron = runs[1]["megatron_cached"]
    assert runs[1]["zero2_cached"] == pytest.approx(megatron, abs=ENGINES)
    assert runs[2]["zero3_cached"] == pytest.approx(megatron, abs=ENGINES)


def test_zero3_export_loads_with_from_pretrained_and_gives_the_engines_logits(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    report = runs[2]
    checkpoint = latest_checkpoint(Path(report["zero3_checkpoint"]))
    meta = read_meta(checkpoint)
    assert (meta["engine"], meta["zero_stage"], meta["layout"]["dp"]) == ("deepspeed", 3, 2)
    out = tmp_path / "export"
    exported = distillery("export", checkpoint, out, "--dtype", "float32", timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "trained by: DeepSpeed ZeRO-3" in (out / "README.md").read_text()  # the same model card
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.tensor(report["zero3_tokens"])
    with torch.no_grad():
        logits = model(tokens[:, :-1]).logits
    engine_logits = torch.tensor(report["zero3_logits"])
    assert logits.shape == engine_logits.shape
    assert torch.allclose(logits, engine_logits, atol=1e-5), (logits - engine_logits).abs().max()


def train_command(
    work: Path, run_dir: Path, *overrides: str, nproc: int = 2, engine: str = "deepspeed"
) -> list[str]:
    command = [sys.executable, "-m", "launcher", "launch", "--nproc", str(nproc), "--", "train"]
    command.append(str(work / "cached.yaml"))
    zero = (
        ["deepspeed.zero_stage=3", "deepspeed.stage3_param_persistence_threshold=0"]
        if engine == "deepspeed"
        else []
    )
    sets = (f"run.dir={run_dir}", f"engine={engine}", *zero, "training.steps=8", *overrides)
    for item in sets:
        command += ["--set", item]
    return command


def test_sigkill_then_resume_gives_the_uninterrupted_final_loss(work):
    full = work / "zero_full"
    subprocess.run(
        train_command(work, full, "checkpoint.interval=2"), cwd=REPO, check=True, capture_output=True
    )
    run_dir = work / "zero_killed"
    shutil.rmtree(run_dir, ignore_errors=True)
    command = train_command(work, run_dir, "checkpoint.interval=2")
    latest = run_dir / "checkpoints" / "latest"
    kill_when(command, lambda: latest.is_file() and latest.read_text().strip() >= "step_00000004")
    assert int(read_meta(latest_checkpoint(run_dir / "checkpoints"))["step"]) < 8
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    assert final_loss(run_dir) == pytest.approx(final_loss(full), abs=1e-6)

    # the same checkpoints cannot resume with one rank (ZeRO partitions are per rank) or under megatron
    one_rank = subprocess.run(
        train_command(work, run_dir, "training.steps=10", nproc=1), cwd=REPO, capture_output=True, text=True
    )
    assert one_rank.returncode != 0
    assert "holds ZeRO partitions of 2 ranks and this job has 1" in " ".join(one_rank.stderr.split())
    stage2 = subprocess.run(
        train_command(work, run_dir, "training.steps=10", "deepspeed.zero_stage=2"),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert stage2.returncode != 0
    assert "holds ZeRO-3 partitions and deepspeed.zero_stage is 2" in " ".join(stage2.stderr.split())
    megatron = subprocess.run(
        train_command(work, run_dir, "training.steps=10", engine="megatron"),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert megatron.returncode != 0
    assert "was written by the deepspeed engine; resume it with engine: deepspeed" in " ".join(
        megatron.stderr.split()
    )
