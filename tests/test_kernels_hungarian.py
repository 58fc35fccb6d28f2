"""Batched linear sum assignment vs scipy.optimize.linear_sum_assignment and brute force."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.optimize import linear_sum_assignment

from star_edge.errors import InvalidInputError
from star_edge.kernels import linear_sum_assignment_batch
from star_edge.kernels.reference import linear_sum_assignment_reference


def assert_valid_and_optimal(cost: np.ndarray, rows: np.ndarray, cols: np.ndarray, maximize: bool) -> None:
    """A complete matching with strictly ascending rows whose total equals scipy's."""
    n = min(cost.shape)
    assert rows.dtype == np.int64 and cols.dtype == np.int64
    assert rows.shape == cols.shape == (n,)
    assert (np.diff(rows) > 0).all()
    assert len(set(cols.tolist())) == n
    assert ((0 <= rows) & (rows < cost.shape[0])).all() and ((0 <= cols) & (cols < cost.shape[1])).all()
    expected_rows, expected_cols = linear_sum_assignment(cost, maximize=maximize)
    expected = cost[expected_rows, expected_cols].sum()
    total = cost[rows, cols].sum()
    assert total == pytest.approx(expected, rel=1e-12, abs=1e-12 * (1.0 + float(np.abs(cost).sum())))


def random_batch(rng: np.random.Generator, n_problems: int, max_size: int) -> list[np.ndarray]:
    """Float, tie-heavy integer, all-equal, zero, negative and empty problems of random shapes."""
    costs = []
    for _ in range(n_problems):
        shape = tuple(rng.integers(0, max_size + 1, size=2))
        kind = rng.integers(6)
        if kind == 0:
            costs.append(rng.random(shape))
        elif kind == 1:
            costs.append(rng.integers(0, 3, size=shape))
        elif kind == 2:
            costs.append(np.full(shape, 7.0))
        elif kind == 3:
            costs.append(np.zeros(shape))
        elif kind == 4:
            costs.append(rng.integers(-4, 5, size=shape).astype(np.float32))
        else:
            costs.append(rng.normal(scale=1e3, size=shape))
    return costs


@pytest.mark.parametrize("maximize", [False, True])
def test_thousands_of_small_problems_match_scipy(maximize):
    costs = random_batch(np.random.default_rng(11), 3000, 8)
    results = linear_sum_assignment_batch(costs, maximize=maximize)
    assert len(results) == len(costs)
    for cost, (rows, cols) in zip(costs, results):
        assert_valid_and_optimal(cost, rows, cols, maximize)


def test_small_problems_match_brute_force():
    rng = np.random.default_rng(12)
    costs = random_batch(rng, 400, 5)
    for maximize in (False, True):
        for cost, (rows, cols) in zip(costs, linear_sum_assignment_batch(costs, maximize=maximize)):
            reference_rows, reference_cols = linear_sum_assignment_reference(cost, maximize=maximize)
            assert cost[rows, cols].sum() == pytest.approx(cost[reference_rows, reference_cols].sum(), abs=1e-9)


@pytest.mark.parametrize("shape", [(120, 120), (120, 37), (37, 120), (64, 64)])
def test_large_problems_match_scipy(shape):
    rng = np.random.default_rng(13)
    costs = [rng.random(shape), rng.integers(0, 4, size=shape), rng.integers(0, 1000, size=shape)]
    for maximize in (False, True):
        for cost, (rows, cols) in zip(costs, linear_sum_assignment_batch(costs, maximize=maximize)):
            assert_valid_and_optimal(cost, rows, cols, maximize)


def test_unique_optimum_gives_scipy_assignment():
    rng = np.random.default_rng(14)
    costs = [rng.random((n, m)) for n in range(1, 9) for m in range(1, 9)]
    for cost, (rows, cols) in zip(costs, linear_sum_assignment_batch(costs)):
        expected_rows, expected_cols = linear_sum_assignment(cost)
        np.testing.assert_array_equal(rows, expected_rows)
        np.testing.assert_array_equal(cols, expected_cols)


def test_empty_problems_and_empty_batch():
    assert linear_sum_assignment_batch([]) == []
    for shape in [(0, 0), (0, 4), (5, 0)]:
        ((rows, cols),) = linear_sum_assignment_batch([np.zeros(shape)])
        assert rows.shape == cols.shape == (0,) and rows.dtype == np.int64


def test_mixed_batch_keeps_problem_order():
    costs = [np.array([[5.0, 1.0]]), np.zeros((0, 3)), np.array([[1.0], [0.0], [3.0]]), np.eye(3)]
    results = linear_sum_assignment_batch(costs)
    np.testing.assert_array_equal(results[0][1], [1])
    assert results[1][0].size == 0
    np.testing.assert_array_equal(results[2][0], [1])
    assert linear_sum_assignment_batch(costs, maximize=True)[3][1].tolist() == [0, 1, 2]


def test_accepts_integer_bool_and_nested_list_costs():
    ((rows, cols),) = linear_sum_assignment_batch([[[3, 1], [1, 3]]])
    assert cols.tolist() == [1, 0]
    ((rows, cols),) = linear_sum_assignment_batch([np.eye(3, dtype=bool)], maximize=True)
    assert cols.tolist() == [0, 1, 2]


def test_forbidden_infinite_entries():
    inf = np.inf
    cost = np.array([[inf, 1.0, inf], [2.0, inf, 9.0], [inf, 3.0, 4.0]])
    ((rows, cols),) = linear_sum_assignment_batch([cost])
    assert cols.tolist() == [1, 0, 2]
    ((rows, cols),) = linear_sum_assignment_batch([-cost], maximize=True)
    assert cols.tolist() == [1, 0, 2]
    rectangular = np.array([[inf, 1.0], [2.0, inf], [inf, inf]])
    ((rows, cols),) = linear_sum_assignment_batch([rectangular])
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]


@pytest.mark.parametrize(
    "cost, maximize, message",
    [
        (np.array([[1.0, np.nan]]), False, "NaN"),
        (np.array([[1.0, -np.inf]]), False, "-inf"),
        (np.array([[1.0, np.inf]]), True, r"\+inf"),
        (np.array([[np.inf, np.inf], [1.0, 2.0]]), False, "infeasible"),
        (np.array([[1.0, np.inf], [2.0, np.inf]]), False, "infeasible"),
        (np.array([[-np.inf], [-np.inf]]), True, "infeasible"),
        (np.zeros(3), False, "2-D"),
        (np.zeros((2, 2), dtype=complex), False, "real"),
        (np.array([["a"]]), False, "real"),
    ],
)
def test_rejects_invalid_problems_naming_the_index(cost, maximize, message):
    with pytest.raises(InvalidInputError, match=message) as error:
        linear_sum_assignment_batch([np.zeros((2, 2)), cost], maximize=maximize)
    assert "costs[1]" in str(error.value)


@st.composite
def cost_matrices(draw):
    shape = (draw(st.integers(0, 9)), draw(st.integers(0, 9)))
    if draw(st.booleans()):
        return draw(arrays(np.int64, shape, elements=st.integers(-3, 3)))
    return draw(arrays(np.float64, shape, elements=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)))


@settings(max_examples=300, deadline=None)
@given(st.lists(cost_matrices(), max_size=12), st.booleans())
def test_batch_property_matches_scipy(costs, maximize):
    results = linear_sum_assignment_batch(costs, maximize=maximize)
    assert len(results) == len(costs)
    for cost, (rows, cols) in zip(costs, results):
        assert_valid_and_optimal(cost, rows, cols, maximize)
