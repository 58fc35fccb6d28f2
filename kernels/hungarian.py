"""Batched linear sum assignment (minimum-cost matching) for many small rectangular problems.

Each problem is solved by the shortest augmenting path method with dual potentials (the
Jonker-Volgenant form of the Hungarian algorithm, O(r^2 c) for r <= c): rows are added one at a
time, and a Dijkstra search over reduced costs finds the cheapest way to give the new row a column.
The whole batch is flattened into one float64 buffer and solved in one compiled call.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np
from numba import njit

from star_edge.errors import InvalidInputError

_SOLVED = 0
_INVALID_ENTRY = 1
_INFEASIBLE = 2
_ROW_SEEN = 1
_COL_DONE = 2

# Rows of the float64 work space (each >= n_cols long): row and column duals, path lengths.
_U, _V, _DISTANCE = 0, 1, 2
# Rows of the int64 work space: the matching both ways (-1 = free), the predecessor row of each
# column on the search tree, the columns not yet reached, the _ROW_SEEN / _COL_DONE flags.
_COL_OF_ROW, _ROW_OF_COL, _PREVIOUS_ROW, _UNVISITED, _FLAGS = 0, 1, 2, 3, 4


@njit(cache=True, inline="always")
def _augment_row(
    cost: np.ndarray, base: int, n_rows: int, n_cols: int, new_row: int, wf: np.ndarray, wi: np.ndarray
) -> bool:
    """Matches new_row through the cheapest alternating path to a free column, keeping the duals
    feasible. cost: flat float64; entry (i, j) of the (n_rows, n_cols) problem is
    cost[base + i * n_cols + j], +inf for a forbidden pair. wf (3, >= n_cols) float64 and
    wi (5, >= n_cols) int64 are the work space (rows named by _U... and _COL_OF_ROW...). Returns
    False when every path is infinite (the problem is infeasible)."""
    for j in range(n_cols):
        wf[_DISTANCE, j] = np.inf
        wi[_UNVISITED, j] = j
        wi[_FLAGS, j] = 0
    n_unvisited = n_cols
    row = new_row
    reached = 0.0
    sink = -1
    while sink < 0:
        wi[_FLAGS, row] |= _ROW_SEEN
        row_start = base + row * n_cols
        row_potential = wf[_U, row]
        best = -1
        best_distance = np.inf
        for index in range(n_unvisited):
            j = wi[_UNVISITED, index]
            through_row = reached + cost[row_start + j] - row_potential - wf[_V, j]
            if through_row < wf[_DISTANCE, j]:
                wf[_DISTANCE, j] = through_row
                wi[_PREVIOUS_ROW, j] = row
            # Among equally near columns prefer a free one: the path ends sooner.
            distance = wf[_DISTANCE, j]
            if distance < best_distance or (distance == best_distance and wi[_ROW_OF_COL, j] < 0):
                best_distance = distance
                best = index
        if best_distance == np.inf:
            return False
        reached = best_distance
        j = wi[_UNVISITED, best]
        wi[_FLAGS, j] |= _COL_DONE
        n_unvisited -= 1
        wi[_UNVISITED, best] = wi[_UNVISITED, n_unvisited]
        if wi[_ROW_OF_COL, j] < 0:
            sink = j
        else:
            row = wi[_ROW_OF_COL, j]
    wf[_U, new_row] += reached
    for i in range(n_rows):
        if wi[_FLAGS, i] & _ROW_SEEN and i != new_row:
            wf[_U, i] += reached - wf[_DISTANCE, wi[_COL_OF_ROW, i]]
    for j in range(n_cols):
        if wi[_FLAGS, j] & _COL_DONE:
            wf[_V, j] -= reached - wf[_DISTANCE, j]
    j = sink
    while True:
        row = wi[_PREVIOUS_ROW, j]
        wi[_ROW_OF_COL, j] = row
        j, wi[_COL_OF_ROW, row] = wi[_COL_OF_ROW, row], j
        if row == new_row:
            return True


@njit(cache=True, inline="always")
def _solve_one(cost: np.ndarray, base: int, n_rows: int, n_cols: int, wf: np.ndarray, wi: np.ndarray) -> int:
    """Minimum-cost assignment of every row of the (n_rows, n_cols) problem at cost[base:] (flat
    float64, n_rows <= n_cols) into wi[_COL_OF_ROW, :n_rows]. Returns a status code."""
    for index in range(base, base + n_rows * n_cols):
        if np.isnan(cost[index]) or cost[index] == -np.inf:
            return _INVALID_ENTRY
    for j in range(n_cols):
        wf[_U, j] = 0.0
        wf[_V, j] = 0.0
        wi[_COL_OF_ROW, j] = -1
        wi[_ROW_OF_COL, j] = -1
    for row in range(n_rows):
        if not _augment_row(cost, base, n_rows, n_cols, row, wf, wi):
            return _INFEASIBLE
    return _SOLVED


@njit(cache=True, inline="always")
def _transpose_into(flat: np.ndarray, base: int, n_rows: int, n_cols: int, buffer: np.ndarray) -> None:
    """Writes the transpose (n_cols, n_rows) of the row-major (n_rows, n_cols) matrix at flat[base:]
    into buffer, row-major."""
    for i in range(n_rows):
        for j in range(n_cols):
            buffer[j * n_rows + i] = flat[base + i * n_cols + j]


@njit(cache=True, inline="always")
def _write_pairs(wi: np.ndarray, n_rows: int, n_cols: int, pairs: np.ndarray, start: int) -> None:
    """Writes the min(n_rows, n_cols) matched pairs of the original (n_rows, n_cols) problem, rows
    ascending, into pairs[0, start:] (rows) and pairs[1, start:] (columns), from the solution
    wi[_COL_OF_ROW] of the oriented problem (the transpose when n_rows > n_cols)."""
    if n_rows <= n_cols:
        for i in range(n_rows):
            pairs[0, start + i] = i
            pairs[1, start + i] = wi[_COL_OF_ROW, i]
        return
    col_of_original_row = wi[_PREVIOUS_ROW]
    for i in range(n_rows):
        col_of_original_row[i] = -1
    for j in range(n_cols):
        col_of_original_row[wi[_COL_OF_ROW, j]] = j
    k = start
    for i in range(n_rows):
        if col_of_original_row[i] >= 0:
            pairs[0, k] = i
            pairs[1, k] = col_of_original_row[i]
            k += 1


@njit(cache=True)
def _solve_batch(flat: np.ndarray, shapes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Solves B problems stored back to back in flat float64, problem k being the row-major
    shapes[k] = (n, m) matrix. Returns (pairs (2, P) int64: rows then columns, problem k's
    min(n, m) pairs from match_offsets[k]; match_offsets (B + 1,) int64; status (B,) int64)."""
    n_problems = shapes.shape[0]
    widest = 1
    largest = 1
    match_offsets = np.zeros(n_problems + 1, dtype=np.int64)
    for k in range(n_problems):
        widest = max(widest, shapes[k, 0], shapes[k, 1])
        largest = max(largest, shapes[k, 0] * shapes[k, 1])
        match_offsets[k + 1] = match_offsets[k] + min(shapes[k, 0], shapes[k, 1])
    wf = np.empty((3, widest), dtype=np.float64)
    wi = np.empty((5, widest), dtype=np.int64)
    transposed = np.empty(largest, dtype=np.float64)
    pairs = np.empty((2, match_offsets[n_problems]), dtype=np.int64)
    status = np.zeros(n_problems, dtype=np.int64)
    base = 0
    for k in range(n_problems):
        n_rows, n_cols = shapes[k, 0], shapes[k, 1]
        if n_rows <= n_cols:
            status[k] = _solve_one(flat, base, n_rows, n_cols, wf, wi)
        else:
            _transpose_into(flat, base, n_rows, n_cols, transposed)
            status[k] = _solve_one(transposed, 0, n_cols, n_rows, wf, wi)
        if status[k] == _SOLVED:
            _write_pairs(wi, n_rows, n_cols, pairs, match_offsets[k])
        base += n_rows * n_cols
    return pairs, match_offsets, status


def _flatten_batch(costs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """B cost matrices -> (their entries back to back, row-major, as float64; shapes (B, 2) int64).

    Written as whole-list passes rather than one loop: the per-matrix Python cost is what a
    batch of tiny problems spends most of its time on.
    """
    matrices = [np.asarray(cost) for cost in costs]
    shapes = [cost.shape for cost in matrices]
    if {len(shape) for shape in shapes} - {2} or {cost.dtype.kind for cost in matrices} - set("biuf"):
        index, cost = next((i, c) for i, c in enumerate(matrices) if c.ndim != 2 or c.dtype.kind not in "biuf")
        raise InvalidInputError(
            f"costs[{index}] must be a 2-D real matrix, got shape {cost.shape} and dtype {cost.dtype}"
        )
    flat = np.concatenate([cost.ravel() for cost in matrices] + [np.empty(0)], dtype=np.float64)
    return flat, np.array(list(chain.from_iterable(shapes)), dtype=np.int64).reshape(-1, 2)


def linear_sum_assignment_batch(
    costs: Sequence[np.ndarray], maximize: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Optimal assignments of a batch of cost matrices, as scipy.optimize.linear_sum_assignment
    gives them one at a time, solved in one compiled call.

    costs: B matrices (n_k, m_k) of any real dtype; sizes may differ, 0 x m and n x 0 included.
    Entries equal to +inf (-inf when maximize) forbid their pair; NaN and -inf (+inf when
    maximize) are rejected, as is a problem whose forbidden pairs leave no complete matching.
    Returns per problem (rows, cols), both (min(n_k, m_k),) int64, rows ascending, that minimise
    (maximise) cost[rows, cols].sum(). They are views into two shared arrays.
    """
    flat, shapes = _flatten_batch(costs)
    if maximize:
        np.negative(flat, out=flat)
    pairs, match_offsets, status = _solve_batch(flat, shapes)
    _raise_on_failure(status, maximize)
    rows, cols = pairs
    bounds = match_offsets.tolist()
    return [(rows[start:end], cols[start:end]) for start, end in zip(bounds[:-1], bounds[1:])]


def _raise_on_failure(status: np.ndarray, maximize: bool) -> None:
    """Raises InvalidInputError for the first problem whose status is not _SOLVED."""
    failed = np.flatnonzero(status)
    if failed.size == 0:
        return
    k = int(failed[0])
    if status[k] == _INVALID_ENTRY:
        bad_inf = "+inf" if maximize else "-inf"
        raise InvalidInputError(f"costs[{k}] contains NaN or {bad_inf}")
    raise InvalidInputError(f"costs[{k}] is infeasible: its forbidden (infinite) entries leave no complete matching")
