"""REST: keep the extremes of an expanded rollout set (StAR Stage 2, DESIGN section 8).

Per prompt, draw n rollouts (StAR: 256), score them all, and keep m (StAR: 16): the m/2 with the
highest and the m/2 with the lowest rewards. The group-normalised advantages are then computed over
the kept m only, so the few rollouts that stand out of a mostly uniform group are not drowned in it.
This module is the selection step and its statistics, pure numpy; `star_edge.train.grpo` places it
between scoring and the advantage computation.
"""

from __future__ import annotations

import numpy as np

from star_edge.errors import InvalidInputError


def select_extremes(rewards: np.ndarray, m: int) -> np.ndarray:
    """Indices of the m/2 highest and m/2 lowest rewards of each row.

    rewards: (B, n) finite real, B prompts of n rollouts each; m: even, 2 <= m <= n.
    Returns (B, m) int64 indices into each row: the m/2 highest rewards first (highest first), then
    the m/2 lowest (highest of them first); the two halves never share an index. Ties are broken by
    the rollout index (the earlier one counts as higher), so the selection is deterministic.
    """
    rewards = np.asarray(rewards)
    if rewards.ndim != 2 or rewards.dtype.kind not in "biuf":
        raise InvalidInputError(f"rewards must be a (B, n) real array, got shape {rewards.shape} dtype {rewards.dtype}")
    n = rewards.shape[1]
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 2 or m % 2 or m > n:
        raise InvalidInputError(f"m must be an even integer in [2, n = {n}], got {m!r}")
    if not np.isfinite(rewards).all():
        raise InvalidInputError("rewards must be finite")
    half = int(m) // 2
    order = np.argsort(-rewards.astype(np.float64), axis=1, kind="stable")
    return np.concatenate([order[:, :half], order[:, n - half:]], axis=1).astype(np.int64)


def reward_spread(rewards: np.ndarray) -> dict[str, float]:
    """How far rewards spread within their groups: rewards (B, k) real, k >= 2.

    Returns {"std": mean over groups of the sample standard deviation (ddof 1, as the advantages use),
    "range": mean over groups of max - min, "zero_std": share of groups whose rewards are all equal}.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise InvalidInputError(f"rewards must be (B, k) with k >= 2, got shape {rewards.shape}")
    spread = rewards.max(axis=1) - rewards.min(axis=1)
    return {"std": float(rewards.std(axis=1, ddof=1).mean()), "range": float(spread.mean()),
            "zero_std": float((spread == 0).mean())}
