"""Distillation training end to end on real gloo processes (see tests/distributed/ranks/check_distill.py),
of a Qwen3-style student (per-head q/k norms, explicit head_dim):

- online forward KL equals cached top-k with k = V (same teacher, same data), within the cache's
  quantization; both are the same at tp1, tp2 and pp2;
- every dense divergence plus TAID at T = 2 gives the same training at tp2 as at tp1;
- TAID's tau follows its schedule, a cached teacher with k = V gives the live teacher's TAID, and a run
  stopped and resumed at another layout continues with exactly the same tau and losses.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tests.distributed import run_ranks
from tests.helpers import TINY_QWEN3_STUDENT_ARCH, distillery, training_section, write_config

pytestmark = pytest.mark.slow
STEPS = 3
# The top-k cache stores log-probs with a bounded quantization error (distill/cache/format.py); a KL
# computed from them differs from the exact one by about that much per token.
CACHE_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def work(tmp_path_factory, prepared_tiny, tiny_model_dir, tokenizer_dir) -> Path:
    from tests.helpers import tiny_hf_only, tiny_moe

    work = tmp_path_factory.mktemp("distill")
    tiny_hf_only(work / "gemma3", tokenizer_dir, "gemma3", 640, seed=6)  # an online HF-module teacher
    tiny_moe(work / "qwen3_moe", tokenizer_dir, "qwen3_moe", 640, seed=7)  # an online MoE teacher
    tree = copy.deepcopy(prepared_tiny)
    tree.update(
        student={
            "arch": TINY_QWEN3_STUDENT_ARCH,  # q/k norms: their grads are summed over tp
            "init_dir": str(work / "student_init"),
        },
        training=training_section(steps=STEPS),
        checkpoint={"dir": "${run.dir}/checkpoints", "interval": 100},
        logging={"metrics": "${run.dir}/metrics.jsonl"},
        teacher={"path": str(tiny_model_dir), "micro_batch": 4},
    )
    online = copy.deepcopy(tree)
    online["teacher"]["mode"] = "online"
    write_config(work / "online.yaml", online)
    for name, cache in (
        ("cached", {"mode": "topk", "k": 640}),  # k = V: the whole distribution
        ("sampled", {"mode": "sampled", "samples": 50}),
    ):
        cached = copy.deepcopy(tree)
        cached["cache"] = {"dir": str(work / f"cache_{name}"), "sequences_per_shard": 64, **cache}
        write_config(work / f"{name}.yaml", cached)
        built = distillery("cache", work / f"{name}.yaml")
        assert built.returncode == 0, built.stderr[-3000:]
    return work


@pytest.fixture(scope="module")
def runs(work, tmp_path_factory) -> dict[str, dict]:
    return run_ranks("check_distill.py", 2, tmp_path_factory.mktemp("reports"), str(work), timeout=900)[0]


def test_online_teacher_is_the_same_at_every_layout(runs):
    reference = runs["online_tp1pp1"]["loss"]
    assert len(reference) == STEPS
    for layout in ("online_tp2pp1", "online_tp1pp2"):
        assert runs[layout]["loss"] == pytest.approx(reference, abs=1e-5), layout


def test_an_online_hf_module_teacher_is_the_same_at_tp2(runs):
    """Gemma 3 as the live teacher of a megatron student: transformers' tensor parallelism over the
    student's tp groups splits its vocabulary as the student's; tp2 trains as tp1 does."""
    one, two = runs["gemma_online_tp1pp1"], runs["gemma_online_tp2pp1"]
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-5)
    for step_one, step_two in zip(one["terms"], two["terms"], strict=True):
        assert step_two["forward_kl"] == pytest.approx(step_one["forward_kl"], abs=1e-5)
    llama = runs["online_tp1pp1"]["terms"][0]["forward_kl"]
    assert abs(one["terms"][0]["forward_kl"] - llama) > 1e-3  # another teacher: another signal


def test_an_online_moe_teacher_is_the_same_at_tp2(runs):
    """Qwen3-MoE as the live teacher of a megatron student (megatron-core's MoE layer, its experts split
    over the student's tp): tp2 trains as tp1 does."""
    one, two = runs["moe_online_tp1pp1"], runs["moe_online_tp2pp1"]
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-5)
    for step_one, step_two in zip(one["terms"], two["terms"], strict=True):
        assert step_two["forward_kl"] == pytest.approx(step_one["forward_kl"], abs=1e-5)
    gemma = runs["gemma_online_tp1pp1"]["terms"][0]["forward_kl"]
    assert abs(one["terms"][0]["forward_kl"] - gemma) > 1e-3  # another teacher: another signal


def test_online_forward_kl_equals_cached_topk_with_k_equal_v(runs):
    online = runs["online_tp1pp1"]
    for layout in ("cached_tp1pp1", "cached_tp2pp1", "cached_tp1pp2"):
        cached = runs[layout]
        assert cached["loss"] == pytest.approx(online["loss"], abs=CACHE_TOLERANCE), layout
        for step_online, step_cached in zip(online["terms"], cached["terms"], strict=True):
            assert step_cached["forward_kl"] == pytest.approx(step_online["forward_kl"], abs=CACHE_TOLERANCE)
            assert step_cached["ce"] == pytest.approx(step_online["ce"], abs=1e-5)  # same student, same data
        assert runs["cached_tp1pp1"]["loss"] == pytest.approx(cached["loss"], abs=1e-5)


def test_sampled_cache_trains_on_its_cross_entropy(runs):
    sampled = runs["sampled_tp2pp1"]
    kl = [t["forward_kl"] for t in sampled["terms"]]
    ce = [t["ce"] for t in sampled["terms"]]
    # CE against p_hat = KL(p_hat || q) + H(p_hat) >= H(p_hat) > 0, and near the exact CE to the teacher
    assert all(v > 0 for v in kl) and sampled["loss"] == pytest.approx(
        [a + b for a, b in zip(kl, ce, strict=True)], abs=1e-5
    )


def test_every_divergence_trains_the_same_at_tp2(runs):
    one, two = runs["mix_tp1pp1"], runs["mix_tp2pp1"]
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-5)
    names = {"ce", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "taid"}
    assert set(one["terms"][0]) == names
    for a, b in zip(one["terms"], two["terms"], strict=True):
        assert b == pytest.approx(a, abs=1e-5)


def test_taid_tau_schedule_cached_and_resumed(runs):
    online, cached, resumed = runs["taid_online"], runs["taid_cached"], runs["taid_resumed"]
    taus = online["tau"]
    assert (
        taus[0] == pytest.approx(0.4)
        and all(b > a for a, b in zip(taus[:-1], taus[1:], strict=True))
        and taus[-1] <= 1.0
    )
    assert cached["loss"] == pytest.approx(online["loss"], abs=CACHE_TOLERANCE)  # k = V: exact TAID
    assert resumed["tau"] == taus  # checkpointed tau, momentum and previous loss
    assert resumed["loss"] == pytest.approx(online["loss"], abs=1e-5)


def test_ddk_weights_follow_the_ratio_and_a_resumed_run_draws_the_same(runs):
    cached, online, resumed = runs["ddk_cached"], runs["ddk_online"], runs["ddk_resumed"]
    updates = cached["updates"]
    assert [u["step"] for u in updates] == [0, 2, 4]  # r_0 before training, then every interval
    for update in updates:
        weights = {k.split("/", 1)[1]: v for k, v in update.items() if k.startswith("mixture/")}
        ratios = {k.split("/", 2)[2]: v for k, v in update.items() if k.startswith("ddk/ratio/")}
        assert sum(weights.values()) == pytest.approx(1.0)
        assert max(weights, key=weights.get) == max(ratios, key=ratios.get)  # the lagging domain leads
    # the cache's stored next-token log-probs (k = V) give the live teacher's perplexities
    teacher_cached, teacher_online = cached["mixture"]["teacher_ppl"], online["mixture"]["teacher_ppl"]
    assert teacher_cached == pytest.approx(teacher_online, rel=2e-3)
    assert resumed["loss"] == pytest.approx(cached["loss"], abs=1e-5)
    after, expected = resumed["mixture"]["sampler"], cached["mixture"]["sampler"]
    for key in ("cursor", "epoch", "counts", "drawn"):  # the same samples were drawn
        assert after[key] == expected[key], key
    assert after["weights"] == pytest.approx(expected["weights"], abs=1e-6)  # evaluated at another layout


def test_a_stop_inside_a_ddk_pass_saves_the_update_as_pending_and_the_resumed_run_does_it(runs):
    cached, stopped = runs["ddk_cached"], runs["ddk_stopped_in_pass"]
    assert stopped["reason"] == "test stop"
    assert stopped["saved"] == {"step": 2, "pending": ["mixture"]}
    assert stopped["loss"] == pytest.approx(cached["loss"][2:], abs=1e-5)  # steps 3-5 as uninterrupted
    after, expected = stopped["mixture"], cached["mixture"]
    assert after["updates"] == expected["updates"]  # the update at step 2 was done once, on resume
    assert after["sampler"]["weights"] == pytest.approx(expected["sampler"]["weights"], abs=1e-6)
    for key in ("cursor", "epoch", "counts", "drawn"):
        assert after["sampler"][key] == expected["sampler"][key], key
