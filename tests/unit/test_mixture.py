"""The domain mixture sampler and DDK's weight update, against direct implementations."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from distill.data.mixture import MixtureSampler, rank_slice
from distill.errors import DataError
from distill.training.ddk import DomainMixture, ddk_initial, ddk_update, within_bounds

SIZES = {"code": 37, "legal": 11, "docs": 5, "multilingual": 23}
WEIGHTS = {"code": 0.5, "legal": 0.2, "docs": 0.25, "multilingual": 0.05}


def test_proportions_track_the_weights_within_about_one_over_n():
    sampler = MixtureSampler(SIZES, WEIGHTS, seed=3)
    counts = dict.fromkeys(SIZES, 0)
    for n in range(1, 401):
        domain, _ = sampler.draw(1)[0]
        counts[domain] += 1
        for d, w in WEIGHTS.items():
            assert abs(counts[d] / n - w) <= 1.0 / n + 1e-12, (n, d)


def test_each_domain_is_read_without_repetition_then_reshuffled():
    sampler = MixtureSampler(SIZES, WEIGHTS, seed=3)
    rows = sampler.draw(2000)
    for domain, size in SIZES.items():
        seen = [i for d, i in rows if d == domain]
        epochs = [seen[k : k + size] for k in range(0, len(seen) - size + 1, size)]
        assert len(epochs) >= 2, domain
        for epoch in epochs:
            assert sorted(epoch) == list(range(size)), domain  # a permutation: no repeat within an epoch
        assert epochs[0] != epochs[1], domain  # a new order each epoch


def test_resume_from_state_draws_the_same_samples():
    uninterrupted = MixtureSampler(SIZES, WEIGHTS, seed=11)
    expected = [uninterrupted.draw(16) for _ in range(30)]
    first = MixtureSampler(SIZES, WEIGHTS, seed=11)
    got = [first.draw(13) for _ in range(7)]  # 91 samples: mid-batch, mid-epoch, greedy counts non-zero
    state = first.state_dict()
    assert any(state["counts"]) and any(state["epoch"])
    resumed = MixtureSampler(SIZES, {d: 1.0 for d in SIZES}, seed=11)  # other weights: the state wins
    resumed.load_state_dict(state)
    flat = [row for batch in got for row in batch] + resumed.draw(30 * 16 - 91)
    assert flat == [row for batch in expected for row in batch]


def test_peek_does_not_advance_and_equals_the_next_draw():
    sampler = MixtureSampler(SIZES, WEIGHTS, seed=5)
    sampler.draw(40)
    ahead = sampler.peek(32)
    assert sampler.peek(32) == ahead and sampler.draw(32) == ahead


def test_data_parallel_slices_are_disjoint_and_make_the_dp1_batch():
    batch = MixtureSampler(SIZES, WEIGHTS, seed=1).draw(12)
    for dp in (1, 2, 3, 4):
        parts = [rank_slice(batch, r, dp) for r in range(dp)]
        assert [row for part in parts for row in part] == batch


def test_zero_weight_domains_are_never_drawn_and_bad_weights_refused():
    sampler = MixtureSampler(SIZES, {**WEIGHTS, "docs": 0.0}, seed=0)
    assert all(d != "docs" for d, _ in sampler.draw(300))
    with pytest.raises(DataError, match="data has domains"):
        sampler.set_weights({"code": 1.0})
    with pytest.raises(DataError, match="no training sequences"):
        MixtureSampler({**SIZES, "empty": 0}, {**WEIGHTS, "empty": 0.1}, seed=0)


def test_ddk_update_equals_the_formula():
    student = {"code": 93.7, "legal": 217.0, "docs": 270.7, "multilingual": 840.2}
    teacher = {"code": 10.6, "legal": 34.9, "docs": 32.4, "multilingual": 115.9}
    r0 = ddk_initial(student, teacher)
    ratios = {d: student[d] / teacher[d] for d in student}
    z = sum(math.exp(v) for v in ratios.values())
    assert r0 == pytest.approx({d: math.exp(v) / z for d, v in ratios.items()}, rel=1e-12)
    weights = {"code": 0.1, "legal": 0.2, "docs": 0.3, "multilingual": 0.4}
    psi = {d: weights[d] * math.exp(ratios[d]) for d in weights}
    total = sum(psi.values())
    expected = {d: 0.5 * psi[d] / total + 0.5 / 4 for d in weights}
    assert ddk_update(weights, student, teacher, alpha=0.5) == pytest.approx(expected, rel=1e-12)
    assert sum(ddk_update(weights, student, teacher, alpha=0.3).values()) == pytest.approx(1.0)
    # the most lagging domain (largest student/teacher ratio) gains weight
    lagging = max(ratios, key=ratios.get)
    assert ddk_update(weights, student, teacher, 0.5)[lagging] > weights[lagging]


def test_ddk_mixture_starts_from_r0_and_updates_on_its_interval():
    from distill.config.data import MixtureConfig

    config = MixtureConfig(type="ddk", interval=3, alpha=0.5, min_weight=0.0, max_weight=1.0, smoothing=0.0)
    mixture = DomainMixture(config, SIZES, seed=0)
    student = {"code": 50.0, "legal": 40.0, "docs": 30.0, "multilingual": 20.0}
    teacher = dict.fromkeys(SIZES, 10.0)
    record = mixture.start(lambda: student, lambda: teacher)
    r0 = ddk_initial(student, teacher, alpha=0.5)
    assert mixture.sampler.weights_dict() == pytest.approx(r0)
    assert r0 == pytest.approx({d: 0.5 * w + 0.125 for d, w in ddk_initial(student, teacher).items()})
    assert record["ddk/ratio/code"] == pytest.approx(5.0)
    assert mixture.after_step(2, lambda: student) is None
    before = mixture.sampler.weights_dict()
    assert mixture.after_step(3, lambda: student) is not None
    assert mixture.sampler.weights_dict() == pytest.approx(ddk_update(before, student, teacher, 0.5))
    again = DomainMixture(config, SIZES, seed=0)
    again.load_state_dict(mixture.state_dict())
    assert again.peek_batch(8) == mixture.peek_batch(8) and again.teacher_ppl == teacher


def test_within_bounds_keeps_proportions_inside_and_respects_every_bound():
    rng = np.random.default_rng(0)
    domains = list(SIZES)
    for _ in range(200):
        weights = dict(zip(domains, rng.dirichlet([0.2] * 4) + rng.uniform(0, 1e-3, 4), strict=True))
        low = rng.uniform(0, 0.25, 4)
        high = np.maximum(low, rng.uniform(0.25, 1.0, 4))
        bounds = {d: (float(lo), float(hi)) for d, lo, hi in zip(domains, low, high, strict=True)}
        out = within_bounds(weights, bounds)
        assert sum(out.values()) == pytest.approx(1.0, abs=1e-12)
        assert all(bounds[d][0] - 1e-12 <= out[d] <= bounds[d][1] + 1e-12 for d in domains)
        # the domains strictly inside their bounds share one scale factor: clip(c * w, lo, hi)
        inside = [d for d in domains if bounds[d][0] + 1e-9 < out[d] < bounds[d][1] - 1e-9]
        scales = [out[d] / weights[d] for d in inside]
        assert scales == pytest.approx([scales[0]] * len(scales) if scales else [], rel=1e-9)
        # a domain clipped up had c * w below its min, one clipped down above its max
        for d in domains:
            if inside and out[d] <= bounds[d][0] + 1e-12 and bounds[d][0] < bounds[d][1]:
                assert scales[0] * weights[d] <= bounds[d][0] + 1e-9
    inside_bounds = dict.fromkeys(domains, (0.0, 1.0))
    assert within_bounds(WEIGHTS, inside_bounds) == pytest.approx(WEIGHTS, rel=1e-12)


def test_within_bounds_lifts_weights_that_underflowed_to_zero_and_the_sampler_refuses_nan():
    # alpha 1 (the paper's r_0): ratios thousands apart underflow the softmax to exact zeros
    r0 = ddk_initial(
        {"code": 3000.0, "legal": 200.0, "docs": 200.0, "multilingual": 200.0}, dict.fromkeys(SIZES, 1.0)
    )
    assert sorted(r0.values()) == [0.0, 0.0, 0.0, 1.0]
    bounded = within_bounds(r0, dict.fromkeys(SIZES, (0.125, 0.5)))
    assert bounded == pytest.approx({"code": 0.5, "legal": 1 / 6, "docs": 1 / 6, "multilingual": 1 / 6})
    sampler = MixtureSampler(SIZES, WEIGHTS, seed=0)
    with pytest.raises(DataError, match="finite"):
        sampler.set_weights({**WEIGHTS, "docs": float("nan")})


def test_ddk_guardrails_hold_over_many_updates_that_push_one_domain():
    from distill.config.data import MixtureConfig

    config = MixtureConfig(type="ddk", interval=1, alpha=1.0, min_weight={"docs": 0.1}, max_weight=0.4)
    mixture = DomainMixture(config, SIZES, seed=0)
    assert mixture.bounds == {
        "code": (0.125, 0.4),
        "legal": (0.125, 0.4),
        "docs": (0.1, 0.4),
        "multilingual": (0.125, 0.4),
    }
    teacher = dict.fromkeys(SIZES, 10.0)
    lagging = {"code": 900.0, "legal": 20.0, "docs": 15.0, "multilingual": 30.0}  # ratios 90 vs 1.5-3
    record = mixture.start(lambda: lagging, lambda: teacher)
    assert record["ddk/max_weight/code"] == 0.4 and record["ddk/min_weight/docs"] == 0.1
    seen = [mixture.sampler.weights_dict()]
    for step in range(1, 40):
        before = mixture.sampler.weights_dict()
        mixture.after_step(step, lambda: lagging)
        after = mixture.sampler.weights_dict()
        # smoothing 0.5: at most half of the way to the raw update, before the bounds
        raw = ddk_update(before, lagging, teacher, alpha=1.0)
        expected = within_bounds({d: 0.5 * before[d] + 0.5 * raw[d] for d in before}, mixture.bounds)
        assert after == pytest.approx(expected, rel=1e-9)
        seen.append(after)
    for weights in seen:
        assert sum(weights.values()) == pytest.approx(1.0)
        assert all(
            mixture.bounds[d][0] - 1e-12 <= w <= mixture.bounds[d][1] + 1e-12 for d, w in weights.items()
        )
    assert seen[-1]["code"] == pytest.approx(0.4)  # pinned at its maximum, not all of the data
    assert seen[-1]["docs"] == pytest.approx(0.1)  # the least lagging domain kept at its minimum


@pytest.mark.parametrize(
    ("mixture", "message"),
    [
        ({"type": "ddk", "min_weight": 0.3}, "min_weight sums to 1.2"),
        ({"type": "ddk", "max_weight": 0.2}, "max_weight to 0.8"),
        (
            {"type": "ddk", "min_weight": {"code": 0.6}, "max_weight": {"code": 0.5}},
            "min_weight exceeds max_weight for ['code']",
        ),
        ({"type": "ddk", "min_weight": {"python": 0.1}}, "data.mixture.min_weight names ['python']"),
        ({"type": "uniform", "max_weight": 0.5}, "`max_weight` applies to type ddk only"),
        ({"type": "ddk", "max_weight": 1.5}, "`max_weight` must lie in [0, 1]"),
        ({"type": "ddk", "smoothing": 1.0}, "smoothing"),
    ],
)
def test_ddk_bounds_that_cannot_hold_are_refused_naming_the_key(mixture, message):
    from pydantic import ValidationError

    from distill.config.schema import DataConfig

    data = {
        "tokenizer": {"path": "/tmp/tok"},
        "domains": {d: {"sources": [{"files": f"/tmp/{d}/*.txt"}]} for d in SIZES},
        "seq_len": 8,
        "dir": "/tmp/data",
        "mixture": mixture,
    }
    with pytest.raises(ValidationError, match=re.escape(message)):
        DataConfig.model_validate(data)


def test_natural_and_uniform_weights():
    from distill.config.data import MixtureConfig

    natural = DomainMixture(MixtureConfig(), SIZES, seed=0).sampler.weights_dict()
    total = sum(SIZES.values())
    assert natural == pytest.approx({d: n / total for d, n in SIZES.items()})
    uniform = DomainMixture(MixtureConfig(type="uniform"), SIZES, seed=0).sampler.weights_dict()
    assert np.allclose(list(uniform.values()), 0.25)
