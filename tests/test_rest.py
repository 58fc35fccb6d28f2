"""REST selection: the m/2 highest and m/2 lowest rewards per prompt, and the spread statistics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from star_edge.errors import InvalidInputError
from star_edge.train.rest import reward_spread, select_extremes


def test_hand_worked_selection():
    rewards = np.array([[5.0, 1.0, 3.0, 3.0, 9.0, 0.0],
                        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    picked = select_extremes(rewards, 4)
    assert picked.dtype == np.int64 and picked.shape == (2, 4)
    np.testing.assert_array_equal(picked[0], [4, 0, 1, 5])   # 9, 5 | 1, 0
    np.testing.assert_array_equal(picked[1], [0, 1, 4, 5])   # ties: the earlier rollout ranks higher


def test_keeping_everything_keeps_every_rollout_once():
    rewards = np.array([[2.0, 7.0, 1.0, 4.0]])
    assert sorted(select_extremes(rewards, 4)[0].tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("m", [0, 3, 8, True, 2.0])
def test_bad_m_is_refused(m):
    with pytest.raises(InvalidInputError):
        select_extremes(np.zeros((1, 6)), m)


def test_bad_rewards_are_refused():
    with pytest.raises(InvalidInputError):
        select_extremes(np.array([[1.0, np.nan, 2.0, 3.0]]), 2)
    with pytest.raises(InvalidInputError):
        select_extremes(np.zeros(6), 2)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(2, 12)),
              elements=st.floats(-5, 5, allow_nan=False).map(lambda v: round(v, 1))),
       st.integers(1, 6))
def test_selection_keeps_the_extremes(rewards, half):
    m = min(2 * half, rewards.shape[1] - rewards.shape[1] % 2)
    picked = select_extremes(rewards, m)
    for row, chosen in zip(rewards, picked):
        assert len(set(chosen.tolist())) == m
        values = row[chosen]
        ranked = np.sort(row)[::-1]
        np.testing.assert_array_equal(values[: m // 2], ranked[: m // 2])
        np.testing.assert_array_equal(np.sort(values[m // 2:])[::-1], ranked[len(row) - m // 2:])


def test_reward_spread_before_and_after():
    rewards = np.array([[0.0, 0.0, 0.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    before = reward_spread(rewards)
    assert before == pytest.approx({"std": (2.0 + 0.0) / 2, "range": 2.0, "zero_std": 0.5})
    after = reward_spread(np.take_along_axis(rewards, select_extremes(rewards, 2), axis=1))
    assert after["std"] == pytest.approx((np.sqrt(8.0) + 0.0) / 2) and after["range"] == 2.0
