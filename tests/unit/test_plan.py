"""`distillery plan`: the cluster example planned for an 80 GB GPU, its largest items checked by arithmetic
written out here; an impossible layout refused by `submit --dry-run`; no GPU, no refusal; the cache size
planned for a written cache; the GPU table."""

from __future__ import annotations

import copy
import json

import pytest

from distill.config import load_config
from distill.gpus import find_gpu
from distill.plan.campaign import HEADROOM, plan_campaign
from tests.helpers import REPO, distillery, write_config

CLUSTER = REPO / "configs" / "cluster_8b_to_1b.yaml"
GIB = 2**30


def _llama_layer(h: int, heads: int, kv: int, ffn: int, tp: int) -> int:
    head_dim = h // heads
    matrices = h * head_dim * heads * 2 + h * head_dim * kv * 2 + 3 * h * ffn
    return matrices // tp + 2 * h


def test_the_cluster_example_on_an_80gb_gpu(tmp_path):
    config = load_config(CLUSTER, [f"run.dir={tmp_path}"])
    plan = plan_campaign(config, find_gpu("NVIDIA H100 80GB HBM3"))
    assert plan.archs["teacher"].source.startswith("table of well-known models (Llama-3.1-8B")
    cache, train = plan.stages
    assert (cache.stage, cache.ranks, train.stage, train.ranks) == ("cache", 128, "train", 32)
    # the teacher at tp 8: 32 layers of Llama-3.1-8B's, an eighth of the 128256 x 4096 embedding and of the
    # (untied) output layer, the final norm; bf16
    teacher = 32 * _llama_layer(4096, 32, 8, 14336, 8) + 2 * (128256 // 8) * 4096 + 4096
    assert {i.name: i.bytes for i in cache.memory}["weights"] == teacher * 2
    # the student at tp 2: Llama-3.2-1B (16 layers, tied embedding counted once at pp 1)
    student = 16 * _llama_layer(2048, 32, 8, 8192, 2) + (128256 // 2) * 2048 + 2048
    items = {i.name: i.bytes for i in train.memory}
    assert (items["weights"], items["gradients"], items["optimizer"]) == (
        student * 2,
        student * 4,
        student * 12,
    )
    # activations of one micro-batch of 1 x 4096 on 16 layers at tp 2: the largest item
    per_layer = 4096 * 1 * 2048 * (10 + 24 / 2) + 8 * 32 * 4096**2 * 1 / 2
    assert items["activations"] == int(per_layer * 16)
    assert train.largest().name == "activations"
    assert max(items.values()) < 80e9 * HEADROOM and cache.fits and train.fits
    # 50,000 steps of 512 x 4096 tokens, each position cached at 6 + 64 x 3 = 198 bytes
    tokens = 50_000 * 512 * 4096
    assert plan.tokens == tokens
    assert {i.name: i.bytes for i in cache.disk}["cache"] == tokens * 198
    assert train.slurm["nodes"] == 4 and train.slurm["requeues"] == 1  # 55.7 h of work, --time 48 h


def test_a_layout_that_does_not_fit_names_the_item_and_the_change(tmp_path):
    config = load_config(CLUSTER, [f"run.dir={tmp_path}", "training.micro_batch=4"])
    train = plan_campaign(config, find_gpu("H100")).stages[1]
    assert train.fits is False and train.largest().name == "activations"
    assert train.advice == "fits with training.micro_batch=1"


def test_submit_refuses_a_70b_teacher_at_tp1_on_one_80gb_gpu(tmp_path):
    done = distillery(
        "submit",
        CLUSTER,
        "--dry-run",
        "--set",
        f"run.dir={tmp_path}",
        "--set",
        "teacher.path=hf://meta-llama/Llama-3.1-70B",
        "--set",
        "teacher.parallel.tp=1",
    )
    assert done.returncode == 2, done.stderr
    message = " ".join(done.stderr.split())
    assert "stage cache needs" in message and "most of it weights" in message
    assert "fits with teacher.parallel.tp=4" in message and "pass --force" in message
    forced = distillery(
        "submit", CLUSTER, "--dry-run", "--force", "--set", f"run.dir={tmp_path}",
        "--set", "teacher.path=hf://meta-llama/Llama-3.1-70B", "--set", "teacher.parallel.tp=1",
    )  # fmt: skip
    assert "warning (--force)" in forced.stderr


def test_without_a_gpu_nothing_is_refused_and_time_is_not_planned(tmp_path):
    config = load_config(CLUSTER, [f"run.dir={tmp_path}", "slurm.gpu=null", "training.micro_batch=4"])
    plan = plan_campaign(config, None)
    assert all(stage.fits is None and stage.seconds is None for stage in plan.stages)
    assert not plan.refusals()
    done = distillery("plan", CLUSTER, "--json", "--set", f"run.dir={tmp_path}", "--set", "slurm.gpu=null")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["gpu"] is None


def test_an_unknown_gpu_is_an_error_naming_the_table(tmp_path):
    done = distillery("plan", CLUSTER, "--gpu", "TPU v5", "--set", f"run.dir={tmp_path}")
    assert done.returncode == 2 and "GPU 'TPU v5' is not in the table (B200, H200" in done.stderr


def test_the_gpu_table_knows_device_names():
    assert find_gpu("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert find_gpu("NVIDIA A100-SXM4-40GB").memory_gb == 40
    assert find_gpu("NVIDIA GH200 480GB").name == "GH200"
    assert find_gpu("cpu") is None


def test_the_planned_cache_is_the_written_one(tmp_path, prepared_tiny, tiny_model_dir):
    """A top-k cache of the prepared data: the plan (from the prepared manifest and the record size)
    within 5% of the bytes written; a sampled cache already written is measured, not assumed."""
    tree = copy.deepcopy(prepared_tiny)
    tree.update(
        run={"name": "plan", "dir": str(tmp_path / "run")},
        teacher={"path": str(tiny_model_dir), "micro_batch": 8},
        cache={"dir": str(tmp_path / "cache"), "k": 8, "sequences_per_shard": 512},
    )
    path = write_config(tmp_path / "c.yaml", tree)
    built = distillery("cache", path)
    assert built.returncode == 0, built.stderr[-2000:]
    written = json.loads((tmp_path / "cache" / "manifest.json").read_text())["bytes"]
    planned = plan_campaign(load_config(path), None).stages[0]
    cache = {i.name: i.bytes for i in planned.disk}["cache"]
    assert cache == pytest.approx(written, rel=0.05)
    sampled = load_config(path, ["cache.mode=sampled", "cache.samples=8"])
    note = {i.name: i.note for i in plan_campaign(sampled, None).stages[0].disk}["cache"]
    assert note.startswith("sampled N = 8: assumed")  # the top-k cache there is of another mode


def test_minitron_stages_are_planned(tmp_path):
    """The prune stage runs the teacher forward at its layout (once per candidate block more when layers
    are dropped) and writes the pruned student; the correction trains the teacher at its layout."""
    config = load_config(
        REPO / "configs" / "demo_minitron.yaml",
        [f"run.dir={tmp_path}", "correct.dir=${run.dir}/correct", "correct.steps=10", "correct.lr=1e-5"],
    )
    plan = plan_campaign(config, find_gpu("H100"))
    assert [s.stage for s in plan.stages] == ["correct", "cache", "prune", "train"]
    correct, cache, prune, train = plan.stages
    teacher, student = plan.archs["teacher"].arch, plan.archs["student"].arch
    assert (student.hidden_size, student.num_layers, student.head_dim) == (
        96,
        4,
        32,
    )  # pruned, teacher's head_dim
    assert {i.name: i.bytes for i in prune.disk}["student init"] == student.num_parameters() * 4
    assert {i.name: i.bytes for i in correct.memory}[
        "weights"
    ] == teacher.num_parameters() * 2  # bf16 on a GPU
    assert {i.name: i.bytes for i in train.memory}["weights"] == student.num_parameters() * 2
    assert prune.time_note.endswith("(1 pass(es) over the calibration set)")  # width: no depth passes


def test_a_teacher_only_transformers_runs_is_sized_from_its_config(tmp_path, tokenizer_dir):
    from safetensors.torch import load_file

    from distill.plan.arch import model_arch
    from tests.helpers import tiny_hf_only

    gemma = tiny_hf_only(tmp_path / "gemma3", tokenizer_dir, "gemma3", 640, seed=1)
    found = model_arch(gemma, "teacher.path")
    assert "model_type 'gemma3_text' sized as a dense decoder" in found.source
    arch = found.arch
    assert (arch.vocab_size, arch.hidden_size, arch.num_layers, arch.head_dim) == (640, 32, 4, 16)
    held = sum(t.numel() for t in load_file(gemma / "model.safetensors").values())
    assert arch.num_parameters() == pytest.approx(held, rel=0.02)  # less its extra norms (pre/post MLP)
