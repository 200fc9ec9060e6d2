"""The paper's metrics on hand-built curves with answers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from ttadapt import metrics


def test_sample_efficiency_identical_curves_is_one():
    curve = [[5.0, 4.0, 3.0, 2.0]]
    assert metrics.sample_efficiency(curve, curve) == pytest.approx(1.0)


def test_sample_efficiency_twice_as_fast():
    # B improves one step per epoch, A reaches each of B's losses in half the epochs
    b = [[4.0, 3.0, 2.0, 1.0]]
    a = [[3.0, 1.0, 0.5, 0.2]]
    # horizons: E'=1: B best 4 at 1, A ≤ 4 at 1 → 1; E'=2: B 3 at 2, A at 1 → 2;
    # E'=3: B 2 at 3, A ≤ 2 at 2 → 1.5; E'=4: B 1 at 4, A at 2 → 2
    assert metrics.sample_efficiency(a, b) == pytest.approx((1 + 2 + 1.5 + 2) / 4)


def test_sample_efficiency_never_matched_counts_zero():
    b = [[4.0, 3.0, 2.0]]
    a = [[5.0, 5.0, 5.0]]  # never as good as B's best of any horizon
    assert metrics.sample_efficiency(a, b) == 0.0
    # matched only for the first horizon: (1 + 0 + 0) / 3
    a2 = [[4.0, 4.0, 4.0]]
    assert metrics.sample_efficiency(a2, b) == pytest.approx(1 / 3)


def test_sample_efficiency_ties_take_the_first_epochs():
    b = [[3.0, 2.0, 2.0, 2.0]]  # best reached at epoch 2 and kept
    a = [[2.0, 2.0, 2.0, 2.0]]  # A ties B's best at epoch 1
    # E'=1: B 3 at 1, A at 1 → 1; E'≥2: B 2 at 2, A at 1 → 2
    assert metrics.sample_efficiency(a, b) == pytest.approx((1 + 2 + 2 + 2) / 4)


def test_sample_efficiency_geometric_mean_of_mean_and_median_curves():
    # three runs of B; the mean and median curves differ
    b = [[4.0, 3.0, 1.0], [4.0, 3.0, 2.9], [4.0, 3.0, 2.9]]  # mean [4, 3, 2.2667], median [4, 3, 2.9]
    a = [[4.0, 2.5, 2.5]] * 3  # mean = median = [4, 2.5, 2.5]
    # E'=1: both 1/1. E'=2: B best 3 at 2, A ≤ 3 at 2 → 1 both.
    # E'=3: mean: B best 2.2667 at 3, A never ≤ → 0; median: B best 2.9 at 3, A at 2 → 1.5; geo mean 0
    assert metrics.sample_efficiency(a, b) == pytest.approx((1 + 1 + 0) / 3)
    a_better = [[4.0, 2.0, 2.0]] * 3
    # E'=3: mean ratio 3/2, median ratio 3/2 → 1.5; E'=2: B 3 at 2, A at 2 → 1
    assert metrics.sample_efficiency(a_better, b) == pytest.approx((1 + 1 + 1.5) / 3)


def test_sample_efficiency_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same number of epochs"):
        metrics.sample_efficiency([[1.0, 2.0]], [[1.0]])
    with pytest.raises(ValueError, match="finite"):
        metrics.sample_efficiency([[float("nan")]], [[1.0]])


def test_batch_loss_improvement():
    ag = [[0.2, 0.1], [0.3, 0.3]]
    plain = [[0.1, 0.1], [0.3, 0.2]]
    # run 1: (0.3 - 0.2) / 0.2 = 0.5; run 2: (0.6 - 0.5) / 0.5 = 0.2
    result = metrics.batch_loss_improvement(ag, plain)
    assert result.mean == pytest.approx(0.35)
    assert result.sem == pytest.approx(math.sqrt(((0.5 - 0.35) ** 2 + (0.2 - 0.35) ** 2) / 1) / math.sqrt(2))
    single = metrics.batch_loss_improvement([0.11, 0.11], [0.1, 0.1])
    assert single.mean == pytest.approx(0.1) and single.sem == 0.0
    with pytest.raises(ValueError, match="undefined"):
        metrics.batch_loss_improvement([0.1], [0.0])


def test_step_lengths_and_scaling():
    delta = {"w": torch.tensor([3.0, -4.0]), "b": torch.tensor([0.0])}
    assert metrics.step_lengths(delta) == pytest.approx((7.0, 5.0))
    scaled = metrics.scale_to_l1(delta, 14.0)
    assert metrics.step_lengths(scaled)[0] == pytest.approx(14.0)
    assert metrics.relative_step_lengths(scaled, delta) == pytest.approx((2.0, 2.0))


def test_mean_sem_and_accuracy():
    assert metrics.mean_sem([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0 / math.sqrt(3)))
    assert metrics.accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1])) == 0.5
