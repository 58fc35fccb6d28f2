"""Adaptive test-time scaling: when the samples still being decoded can no longer change the vote.

`Segmenter.segment(..., adaptive=True)` decodes its N samples in one batch from one vision encode and
one prefill, and votes on the answers as they finish. Samples are voted in the order they finish
(fewer tokens first, then by row; the fixed-N path uses the same order), so the answers still being
decoded always come *after* the finished ones in candidate order. After each decoding step that
finished answers, `vote_is_settled` asks whether `slack` more samples (those still decoding) could
change the outcome of majority voting (DESIGN section 6); if not, the rest of the batch is dropped.
The outcome is: whether the answer is empty, and which clusters become the final objects. (A kept
object's mask may still gain a better-scored member from later samples; its identity may not change.)

Measured on this project's CPU (benchmarks/adaptive.py): drawing in rounds (4, then 4 more, ...)
costs more time than it saves, because decoding 16 rows in one batch costs far less than four
batches of 4; stopping one batch early never adds decoding and cuts the long tail of slow answers.

The worst case of `slack` more samples, each of which may fail, answer "no target", or vote for any
clusters it likes (at most one vote per cluster per sample), never splitting an existing cluster
(greedy clustering puts candidates that come later into the clusters of earlier heads or into new
clusters):
- "no target" decides the answer: it must stay so with `slack` more samples that do have objects,
  and the opposite: `slack` more "no target" answers must not reach the ratio;
- K (the most common non-zero object count) must lead the runner-up count by more than `slack`;
- every kept cluster must keep a vote ratio >= min_vote_ratio over `slack` more valid samples;
- when all K places are taken, every kept cluster must lead every other cluster (and a cluster not
  seen yet, with 0 votes) by more than `slack` votes (ties are broken by SAM scores, which later
  members change); when fewer than K clusters pass the ratio filter, no other cluster may reach it.
Each condition is strict, so a settled vote equals the vote over all samples, whatever they answer.
The guarantee holds for the default greedy clustering; with "components" clustering a later
candidate can merge two clusters, and the rule is a heuristic there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from star_edge.vote import VoteConfig, every_cluster, majority_vote


def vote_is_settled(
    masks: np.ndarray,
    scores: np.ndarray,
    sample_ids: np.ndarray,
    labels: Sequence[str],
    object_counts: Sequence[int],
    slack: int,
    config: VoteConfig = VoteConfig(),
) -> bool:
    """Whether `slack` more samples could not change the outcome of `majority_vote` on these samples.

    Args:
        masks: (M, H, W) bool, the candidates of the valid samples so far, in candidate order.
        scores: (M,) float, their SAM scores.
        sample_ids: (M,) int, the valid sample of each candidate.
        labels: M labels.
        object_counts: one entry per valid sample so far, its object count (0 = "no target").
        slack: how many more samples to guard against (>= 0).
        config: the voting knobs.

    Returns:
        True when the outcome (empty or not, and the set of kept clusters) is the same whatever the
        `slack` further samples answer.
    """
    n_valid = len(object_counts)
    if n_valid == 0:
        return slack == 0
    grown = n_valid + slack
    no_target = sum(1 for count in object_counts if count == 0)
    if no_target / n_valid >= config.no_target_ratio:
        return no_target / grown >= config.no_target_ratio
    if (no_target + slack) / grown >= config.no_target_ratio:
        return False
    ranked_counts = Counter(count for count in object_counts if count).most_common() + [(0, 0)]
    (k, k_votes), (_, runner_up_votes) = ranked_counts[:2]
    if k_votes <= runner_up_votes + slack:
        return False
    kept = {obj.members for obj in majority_vote(masks, scores, sample_ids, labels, n_valid, object_counts, config)}
    clusters = every_cluster(masks, scores, sample_ids, labels, n_valid, object_counts, config)
    kept_votes = [cluster.votes for cluster in clusters if cluster.members in kept]
    other_votes = [cluster.votes for cluster in clusters if cluster.members not in kept] + [0]
    if not kept_votes or min(kept_votes) / grown < config.min_vote_ratio:
        return False
    if len(kept_votes) == k:
        return min(kept_votes) > max(other_votes) + slack
    return (max(other_votes) + slack) / grown < config.min_vote_ratio
