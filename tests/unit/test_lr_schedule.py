import math

import pytest

from distill.config.schema import TrainingConfig
from distill.engine.schedule import lr_at


def cfg(**kw) -> TrainingConfig:
    base = {"steps": 100, "global_batch": 8, "micro_batch": 2, "lr": 1.0, "min_lr": 0.1, "warmup_steps": 10}
    return TrainingConfig(**{**base, **kw})


def test_linear_warmup_then_cosine_to_min_lr():
    c = cfg(schedule="cosine")
    assert [lr_at(s, c) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(10, c) == pytest.approx(1.0)
    assert lr_at(55, c) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, c) == pytest.approx(0.1)


def test_warmup_stable_decay():
    c = cfg(schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, c) == pytest.approx(1.0) and lr_at(82, c) == pytest.approx(1.0)
    assert lr_at(91, c) == pytest.approx(1.0 - 0.9 * (81 / 90 - 0.8) / 0.2)
    assert lr_at(100, c) == pytest.approx(0.1)


def test_constant_and_invalid():
    assert lr_at(70, cfg(schedule="constant")) == 1.0
    with pytest.raises(ValueError, match="warmup_steps 100 must be below steps 100"):
        cfg(warmup_steps=100)
    with pytest.raises(ValueError, match="not divisible by micro_batch"):
        cfg(global_batch=9)
