"""Learning-rate schedules (workers.schedules) against hand-computed rates, and the engine applying them."""
from __future__ import annotations

import math

import pytest

from workers.schedules import learning_rate_at
from workers.specs import TrainSpec

pytestmark = pytest.mark.timeout(60)


def test_step_schedule_is_steplr_per_epoch():
    t = TrainSpec(epochs=10, learning_rate=0.01, lr_schedule="step", lr_decay_step=3, lr_decay_ratio=0.1)
    # StepLR(3, 0.1) stepped once per epoch: epochs 0-2 at 1e-2, 3-5 at 1e-3, 6-8 at 1e-4.
    assert learning_rate_at(t, 0) == pytest.approx(0.01)
    assert learning_rate_at(t, 2.99) == pytest.approx(0.01)
    assert learning_rate_at(t, 3) == pytest.approx(0.001)
    assert learning_rate_at(t, 6.5) == pytest.approx(0.0001)


def test_constant_schedule_never_decays():
    t = TrainSpec(epochs=50, learning_rate=0.002, lr_schedule="constant", lr_decay_step=30, lr_decay_ratio=0.1)
    assert [learning_rate_at(t, e) for e in (0, 29.9, 30, 49.5)] == [0.002] * 4


def test_cosine_with_linear_warmup_matches_pyslowfast_by_hand():
    t = TrainSpec(epochs=10, learning_rate=0.1, lr_schedule="cosine", warmup_epochs=2, warmup_start_lr=0.01)
    at_warmup_end = 0.1 * (math.cos(math.pi * 2 / 10) + 1) / 2  # 0.0904508...
    assert at_warmup_end == pytest.approx(0.0904508, abs=1e-7)
    assert learning_rate_at(t, 0) == pytest.approx(0.01)
    assert learning_rate_at(t, 1) == pytest.approx(0.01 + (0.0904508 - 0.01) / 2, abs=1e-7)  # 0.0502254
    assert learning_rate_at(t, 2) == pytest.approx(0.0904508, abs=1e-7)
    assert learning_rate_at(t, 5) == pytest.approx(0.05)
    assert learning_rate_at(t, 10) == pytest.approx(0.0, abs=1e-12)
    ended = TrainSpec(epochs=10, learning_rate=0.1, lr_schedule="cosine", cosine_end_lr=0.001)
    assert learning_rate_at(ended, 5) == pytest.approx(0.001 + 0.099 * 0.5)
