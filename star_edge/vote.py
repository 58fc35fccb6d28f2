"""Mask-level majority voting over N sampled answers (DESIGN section 6).

Every object of every valid sample became one candidate mask (SAM's answer to its box and point).
Candidates that cover the same pixels are clustered by IoU on bit-packed masks; a cluster's votes
are the distinct samples in it, and the clusters most samples agree on become the final objects.

Tie rules (DESIGN leaves them open): the first seen wins everywhere, as with
`collections.Counter.most_common`, a stable `sorted` and `max`:
- K, the most common non-zero object count: on a tie, the count seen first in sample order.
- Clusters with equal (votes, mean score): the earlier cluster (the one whose first member comes
  first in candidate order) ranks first.
- "best" members with equal (score, area): the earlier candidate.
- Labels with equal counts: the label seen first in candidate order.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from numbers import Integral, Real
from typing import Literal, Protocol

import numpy as np

from star_edge.errors import InvalidInputError
from star_edge.kernels.iou import PackedMasks, pack_masks, pairwise_iou

logger = logging.getLogger(__name__)

_AGGREGATIONS = ("best", "consensus")
_CLUSTERINGS = ("greedy", "components")


def _check_fraction(name: str, value: object, *, allow_zero: bool) -> None:
    """Raises InvalidInputError unless value is a real number in (0, 1] (or [0, 1] with allow_zero)."""
    is_number = isinstance(value, Real) and not isinstance(value, bool)
    if not (is_number and (value >= 0 if allow_zero else value > 0) and value <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise InvalidInputError(f"{name} must be a number in {interval}, got {value!r}")


@dataclass(frozen=True)
class VoteConfig:
    """Every knob of majority voting, with the reference implementation's defaults."""

    no_target_ratio: float = 0.5
    """The answer is empty when (samples answering "no target") / n_valid >= this; in (0, 1]."""

    iou_threshold: float = 0.85
    """A candidate joins a cluster when its IoU with the cluster's first member is >= this; in (0, 1]."""

    min_vote_ratio: float = 0.2
    """Clusters with votes / n_valid below this are dropped (unless that drops all); in [0, 1]."""

    aggregation: Literal["best", "consensus"] = "best"
    """How a cluster becomes one mask: "best" = its member with the highest (score, area);
    "consensus" = the pixels whose score-weighted mean over the members is >= consensus_threshold."""

    consensus_threshold: float = 0.5
    """The pixel threshold of aggregation="consensus"; in (0, 1]."""

    clustering: Literal["greedy", "components"] = "greedy"
    """"greedy" = the reference: in candidate order, join the first cluster whose first member
    matches, else open a cluster. "components" (ours, order-independent, never the default): the
    connected components of the graph with an edge wherever IoU >= iou_threshold, over all pairs."""

    def __post_init__(self) -> None:
        _check_fraction("no_target_ratio", self.no_target_ratio, allow_zero=False)
        _check_fraction("iou_threshold", self.iou_threshold, allow_zero=False)
        _check_fraction("min_vote_ratio", self.min_vote_ratio, allow_zero=True)
        _check_fraction("consensus_threshold", self.consensus_threshold, allow_zero=False)
        if self.aggregation not in _AGGREGATIONS:
            raise InvalidInputError(f"aggregation must be one of {_AGGREGATIONS}, got {self.aggregation!r}")
        if self.clustering not in _CLUSTERINGS:
            raise InvalidInputError(f"clustering must be one of {_CLUSTERINGS}, got {self.clustering!r}")


@dataclass
class VotedObject:
    """One object the samples agreed on.

    Attributes:
        mask: (H, W) bool, the object's pixels (its own array, not a view of the input).
        score: the mean SAM score of the cluster's members (both aggregations), exactly rounded.
        label: the most common label among the members (tie: the first seen in candidate order).
        votes: the number of distinct samples among the members.
        members: the candidate indices in the cluster, ascending.
        best_member: the member with the highest (score, area) (tie: the earlier candidate); its
            mask is the object's mask under "best" aggregation, its prompts represent the object.
    """

    mask: np.ndarray
    score: float
    label: str
    votes: int
    members: tuple[int, ...]
    best_member: int


def majority_vote(
    masks: np.ndarray,
    scores: np.ndarray | Sequence[float],
    sample_ids: np.ndarray | Sequence[int],
    labels: Sequence[str],
    n_valid: int,
    object_counts: Sequence[int],
    config: VoteConfig = VoteConfig(),
) -> list[VotedObject]:
    """The objects that the valid samples agree on, most agreed first (DESIGN section 6).

    Args:
        masks: (M, H, W) bool, one mask per candidate, in candidate order (sample by sample, each
            sample's objects in its answer's order).
        scores: (M,) float, finite: SAM's predicted IoU of each candidate.
        sample_ids: (M,) int in [0, n_valid): the valid sample each candidate came from.
        labels: M strings, each candidate's label.
        n_valid: the number of valid samples (failed samples are not counted).
        object_counts: n_valid non-negative ints, the objects each valid sample answered (its
            number of candidates); 0 means "no target".
        config: the voting knobs.

    Returns:
        At most K objects (K = the most common non-zero object count), sorted by (votes, mean
        score) descending; [] when n_valid is 0, M is 0, or "no target" has at least
        no_target_ratio of the samples.

    Raises:
        InvalidInputError: inconsistent shapes or lengths, non-bool or non-3-D masks, non-finite
            scores, sample ids out of range, or object counts that are not each sample's number
            of candidates.
    """
    masks, scores, sample_ids = _check_inputs(masks, scores, sample_ids, labels, n_valid, object_counts, config)
    if n_valid == 0:
        return []
    no_target = sum(1 for count in object_counts if count == 0)
    if no_target / n_valid >= config.no_target_ratio or masks.shape[0] == 0:
        return []
    return _ranked_clusters(masks, scores, sample_ids, labels, n_valid, _modal_count(object_counts), config)


def every_cluster(
    masks: np.ndarray,
    scores: np.ndarray | Sequence[float],
    sample_ids: np.ndarray | Sequence[int],
    labels: Sequence[str],
    n_valid: int,
    object_counts: Sequence[int],
    config: VoteConfig = VoteConfig(),
) -> list[VotedObject]:
    """Every cluster of `majority_vote`'s clustering, ranked as it ranks them, with its votes and
    members: no "no target" rule, no vote-ratio filter, no top-K cut; each mask is the cluster's
    best member whatever `config.aggregation` says (what adaptive stopping weighs).

    Arguments and errors as `majority_vote`.
    """
    masks, scores, sample_ids = _check_inputs(masks, scores, sample_ids, labels, n_valid, object_counts, config)
    if masks.shape[0] == 0:
        return []
    everything = replace(config, min_vote_ratio=0.0, aggregation="best")
    return _ranked_clusters(masks, scores, sample_ids, labels, n_valid, masks.shape[0], everything)


def _ranked_clusters(
    masks: np.ndarray,
    scores: np.ndarray,
    sample_ids: np.ndarray,
    labels: Sequence[str],
    n_valid: int,
    k: int,
    config: VoteConfig,
) -> list[VotedObject]:
    """Steps 3-5 of the vote on checked, non-empty inputs: cluster, count votes, filter by vote
    ratio, rank, keep the top k, aggregate each kept cluster."""
    packed = pack_masks(masks)
    if config.clustering == "greedy":
        clusters = _greedy_clusters(packed, config.iou_threshold)
    else:
        clusters = _component_clusters(packed, config.iou_threshold)

    votes = [len(set(sample_ids[cluster].tolist())) for cluster in clusters]
    mean_scores = [math.fsum(scores[cluster].tolist()) / len(cluster) for cluster in clusters]
    kept = [c for c in range(len(clusters)) if votes[c] / n_valid >= config.min_vote_ratio]
    if not kept:
        kept = list(range(len(clusters)))
    ranked = sorted(kept, key=lambda c: (votes[c], mean_scores[c]), reverse=True)[:k]
    logger.debug(
        "majority_vote: %d candidates, %d clusters, %d kept, K=%d, votes %s",
        masks.shape[0], len(clusters), len(kept), k, [votes[c] for c in ranked],
    )

    objects = []
    for c in ranked:
        members = clusters[c]
        best = _best_member(members, scores, packed.areas)
        if config.aggregation == "best":
            mask = masks[best].copy()
        else:
            mask = _consensus_mask(masks, scores, members, config.consensus_threshold)
        objects.append(
            VotedObject(
                mask=mask,
                score=mean_scores[c],
                label=_modal_label([labels[j] for j in members]),
                votes=votes[c],
                members=tuple(members),
                best_member=best,
            )
        )
    return objects


class _HasMask(Protocol):
    mask: np.ndarray


def union_mask(objects: Sequence[_HasMask], shape: tuple[int, int]) -> np.ndarray:
    """The final mask: (H, W) bool, the union of the objects' masks (VotedObject, ObjectMask, or
    anything with a (H, W) bool `.mask`); all False when there are none.

    Raises:
        InvalidInputError: an object's mask is not (H, W).
    """
    out = np.zeros(shape, dtype=np.bool_)
    for obj in objects:
        if obj.mask.shape != out.shape:
            raise InvalidInputError(f"object mask has shape {obj.mask.shape}, expected {out.shape}")
        out |= obj.mask
    return out


def _check_inputs(
    masks: np.ndarray,
    scores: np.ndarray | Sequence[float],
    sample_ids: np.ndarray | Sequence[int],
    labels: Sequence[str],
    n_valid: int,
    object_counts: Sequence[int],
    config: VoteConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validates majority_vote's arguments; returns masks (M, H, W) bool, scores (M,) float64 and
    sample_ids (M,) int64."""
    if not isinstance(config, VoteConfig):
        raise InvalidInputError(f"config must be a VoteConfig, got {type(config).__name__}")
    if not isinstance(masks, np.ndarray) or masks.ndim != 3 or masks.dtype != np.bool_:
        if isinstance(masks, np.ndarray):
            got = f"{masks.dtype} array of shape {masks.shape}"
        else:
            got = type(masks).__name__
        raise InvalidInputError(f"masks must be an (M, H, W) bool array, got {got}")
    m, h, w = masks.shape
    if h == 0 or w == 0:
        raise InvalidInputError(f"masks must have a non-empty (H, W), got {(h, w)}")

    try:
        scores = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"scores must be numbers: {exc}") from None
    if scores.shape != (m,):
        raise InvalidInputError(f"scores must have shape ({m},) like masks, got {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise InvalidInputError(f"scores must be finite, got {scores[~np.isfinite(scores)][:3].tolist()}")

    ids = np.asarray(sample_ids)
    if ids.shape != (m,):
        raise InvalidInputError(f"sample_ids must have shape ({m},) like masks, got {ids.shape}")
    if m and not np.issubdtype(ids.dtype, np.integer):
        raise InvalidInputError(f"sample_ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)

    if _length(labels, "labels") != m or not all(isinstance(label, str) for label in labels):
        raise InvalidInputError(f"labels must be {m} strings, one per mask, got {len(labels)} items")
    if not isinstance(n_valid, Integral) or isinstance(n_valid, bool) or n_valid < 0:
        raise InvalidInputError(f"n_valid must be a non-negative int, got {n_valid!r}")
    if m and (ids.min() < 0 or ids.max() >= n_valid):
        raise InvalidInputError(
            f"sample_ids must lie in [0, n_valid={n_valid}), got values from {ids.min()} to {ids.max()}"
        )
    if _length(object_counts, "object_counts") != n_valid:
        raise InvalidInputError(
            f"object_counts must have one entry per valid sample ({n_valid}), got {len(object_counts)}"
        )
    if not all(isinstance(c, Integral) and not isinstance(c, bool) and c >= 0 for c in object_counts):
        raise InvalidInputError(f"object_counts must be non-negative ints, got {list(object_counts)}")
    candidates = np.bincount(ids, minlength=n_valid)
    if not np.array_equal(candidates, np.asarray(object_counts, dtype=np.int64)):
        sample = int(np.flatnonzero(candidates != np.asarray(object_counts))[0])
        raise InvalidInputError(f"object_counts must count each sample's masks: sample {sample} has "
                                f"{candidates[sample]} masks and an object count of {object_counts[sample]}")
    return masks, scores, ids


def _length(values: object, name: str) -> int:
    """len(values) of a sequence argument (a string is not one), else InvalidInputError."""
    try:
        if isinstance(values, (str, bytes)):
            raise TypeError
        return len(values)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidInputError(f"{name} must be a sequence, got {type(values).__name__}") from None


def _modal_count(object_counts: Sequence[int]) -> int:
    """The most common non-zero count; on a tie, the one seen first (Counter keeps insertion order
    and max returns the first maximum). Needs at least one non-zero count."""
    counts = Counter(int(c) for c in object_counts if c != 0)
    return max(counts, key=counts.__getitem__)


def _modal_label(labels: list[str]) -> str:
    """The most common label; on a tie, the one seen first."""
    counts = Counter(labels)
    return max(counts, key=counts.__getitem__)


def _take(packed: PackedMasks, indices: np.ndarray) -> PackedMasks:
    """The masks at indices (ascending int64) of packed: a view when they are one contiguous run,
    else a copy."""
    if indices.size and indices[-1] - indices[0] + 1 == indices.size:
        rows = slice(int(indices[0]), int(indices[-1]) + 1)
        return replace(packed, bits=packed.bits[rows], areas=packed.areas[rows])
    return replace(packed, bits=packed.bits[indices], areas=packed.areas[indices])


def _greedy_clusters(packed: PackedMasks, threshold: float) -> list[list[int]]:
    """The reference clustering: in candidate order, a candidate joins the first cluster whose first
    member (its head) has IoU >= threshold with it, else it opens a new cluster.

    Computed cluster by cluster, which gives the same clusters: the first candidate not yet
    assigned is the next head (it matched none of the earlier heads), and every later unassigned
    candidate that matches it joins it (no earlier cluster wanted it). So each head is compared once
    with the unassigned candidates after it, in one kernel call: exactly the pairs that the
    candidate-by-candidate loop compares when it stops at the first matching head, each once, in
    one call per cluster instead of one per candidate (each call has a fixed cost: the kernel is
    parallel). Returns the clusters in order of their heads, each a list of ascending indices.
    """
    unassigned = np.arange(len(packed), dtype=np.int64)
    clusters: list[list[int]] = []
    while unassigned.size:
        head, rest = unassigned[:1], unassigned[1:]
        joins = pairwise_iou(_take(packed, rest), _take(packed, head))[:, 0] >= threshold
        clusters.append([int(head[0]), *rest[joins].tolist()])
        unassigned = rest[~joins]
    return clusters


def _component_clusters(packed: PackedMasks, threshold: float) -> list[list[int]]:
    """Connected components of the graph whose edges join candidates with IoU >= threshold (all
    pairs, each computed once by the symmetric kernel). Order-independent as a set of clusters.
    Returns the clusters ordered by their smallest member, each a list of ascending indices."""
    adjacent = pairwise_iou(packed) >= threshold
    component = np.full(len(packed), -1, dtype=np.int64)
    clusters: list[list[int]] = []
    for start in range(len(packed)):
        if component[start] >= 0:
            continue
        component[start] = len(clusters)
        members, frontier = [start], [start]
        while frontier:
            neighbours = np.flatnonzero(adjacent[frontier.pop()] & (component < 0))
            component[neighbours] = len(clusters)
            members.extend(neighbours.tolist())
            frontier.extend(neighbours.tolist())
        clusters.append(sorted(members))
    return clusters


def _best_member(members: list[int], scores: np.ndarray, areas: np.ndarray) -> int:
    """The member with the highest (score, area); on a tie, the earliest candidate."""
    return max(members, key=lambda j: (scores[j], areas[j]))


def _consensus_mask(
    masks: np.ndarray, scores: np.ndarray, members: list[int], threshold: float
) -> np.ndarray:
    """(H, W) bool: the pixels whose score-weighted mean over the members' masks is >= threshold.

    The weights are the scores clipped at 0 (a negative predicted IoU does not un-vote a pixel);
    when they sum to 0 every member weighs 1. The total is summed in the same order as each pixel's
    sum, so a pixel that every member covers has a mean of exactly 1. Only the bounding box of the
    members' union is summed: outside it the mean is 0, below any threshold (which is > 0).
    """
    out = np.zeros(masks.shape[1:], dtype=np.bool_)
    for j in members:
        np.logical_or(out, masks[j], out=out)
    rows, cols = np.flatnonzero(out.any(axis=1)), np.flatnonzero(out.any(axis=0))
    if rows.size == 0:
        return out
    window = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    weights = np.maximum(scores[members], 0.0)
    if not weights.any():
        weights = np.ones_like(weights)
    weighted = np.zeros(out[window].shape, dtype=np.float64)
    total = 0.0
    for j, weight in zip(members, weights.tolist()):
        np.add(weighted, weight, out=weighted, where=masks[j][window])
        total += weight
    out[window] = weighted / total >= threshold
    return out
