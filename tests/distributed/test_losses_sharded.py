"""The vocabulary-sharded fused losses at tp = 2: one 2-process gloo launch of
tests/distributed/ranks/check_losses.py, whose cases tests/unit/test_losses.py runs in one process;
values AND gradients against the dense float64 references of loss_reference.py, within TOLERANCE.
"""

from __future__ import annotations

import pytest

from tests.distributed import run_ranks
from tests.distributed.ranks.check_losses import V, build_cases, make_data
from tests.unit.test_losses import ERRORS, TOLERANCE


@pytest.mark.slow
def test_vocabulary_sharded_losses_match_dense_references_at_tp2(tmp_path):
    reports = run_ranks("check_losses.py", 2, tmp_path)
    assert [r["shard"] for r in reports] == [[0, V // 2], [V // 2, V // 2]]
    names = set(build_cases(make_data()))
    worst = (0.0, "", "", -1)
    for rank, found in enumerate(reports):
        assert set(found["results"]) == names
        for name, result in found["results"].items():
            for key in ERRORS:
                worst = max(worst, (result[key], name, key, rank))
                assert result[key] < TOLERANCE, (rank, name, key, result)
            assert result["ref_grad_max"] > 0.05, (rank, name, result)
            # every rank reports the same loss (reduced over the group)
            assert result["loss_per_token"] == reports[0]["results"][name]["loss_per_token"], (rank, name)
    print(f"worst error at tp=2: {worst[0]:.2e} ({worst[2]} of {worst[1]}, rank {worst[3]})")
    coverage = reports[0]["coverage"]
    assert coverage["topk_k10_T1"]["both"] > 0.5  # true top-k ids fall on both shards
    assert coverage["topk_k10_one_shard_rows"]["one"] > 0.5  # and rows with all kept ids on one shard
    assert coverage["topk_k10_one_shard_rows"]["both"] > 0.2
    assert coverage["sampled"]["both"] > 0.5
    assert 0.2 < coverage["labels"]["on_shard_0"] < 0.8
