"""The synthetic reasoning-segmentation benchmark (ours): seeded procedural scenes and queries.

`sample(seed, index, config)` is a pure function: the same (seed, index, config) always gives the
same sample, so a training stream can resume at any index and a benchmark is reproducible from its
seed. Scenes come from `synthetic_scenes` (objects from `synthetic_catalogue`), queries and traces
from `synthetic_queries`.

Conventions of a SyntheticSample:
- boxes are (x1, y1, x2, y2) int, original pixels, INCLUSIVE (x2, y2 is the last column / row of
  the target's visible mask), the +1 convention of the StAR rewards (DESIGN section 7);
- points are (x, y) int, the pixel of the visible mask deepest inside it (always in the mask);
- labels are short nouns ("cup", "plant pot", "circle"), without the colour;
- masks are the visible parts of the targets (after occlusion), disjoint.

Splits: train, val and test use the seeds 3 * seed + 0, 1, 2 (`split_seed`), so the splits of one
seed never share a (seed, index) pair, nor do the splits of different seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from star_edge.train.data.contours import mask_to_polygons
from star_edge.train.data.reasonseg import write_sample
from star_edge.train.data.sample import SegSample
from star_edge.train.data.synthetic_queries import (
    NO_EMPTY_FORM, REASONING_TYPES, Query, SceneFacts, dense_query, reasoning_query, single_query,
)
from star_edge.train.data.synthetic_scenes import SceneObject, interior_point, mask_box, render_scene

STAGES = ("single", "dense", "reasoning", "mixed")
SPLITS = ("train", "val", "test")
_ATTEMPTS = 200


@dataclass(frozen=True)
class SyntheticConfig:
    """Every knob of the generator. Defaults: the 256-px training stream of the demo model."""

    size_range: tuple[int, int] = (256, 256)
    """Width and height are each drawn from this range (inclusive); (256, 512) for the benchmark."""
    objects: tuple[int, int] = (2, 6)
    """Objects per scene, drawn from this range (inclusive); a scene may end with fewer when some
    find no place, but never with fewer than 2 (or 1 for the "single" stage)."""
    stage: str = "reasoning"
    """Curriculum stage: "single" (one object named directly: "the red circle"), "dense" (every
    object is a target: "find every object"), "reasoning" (the four types at depths 1-3), "mixed"
    (each sample draws its stage by `mixed_weights`)."""
    mixed_weights: tuple[float, float, float] = (0.25, 0.25, 0.5)
    """Chances of single, dense and reasoning in the "mixed" stage."""
    reasoning_types: tuple[str, ...] = REASONING_TYPES
    """The types drawn (uniformly) in the reasoning stage."""
    depths: tuple[int, ...] = (1, 2, 3)
    """The depths drawn (uniformly) in the reasoning stage."""
    no_target_probability: float = 0.1
    """Chance that a reasoning or single query has no target."""
    item_probability: float = 0.7
    """Chance that an object is an everyday item rather than a plain shape."""
    scale_range: tuple[float, float] = (0.16, 0.42)
    """An object's longer side, as a fraction of the image's shorter side."""
    min_visible_fraction: float = 0.4
    """Every object keeps at least this fraction of its full mask visible."""
    min_visible_pixels: int = 48
    """... and at least this many pixels."""
    trace_locations: bool = True
    """Traces say where each named object is ("The red cup is at the top left."); False says
    "... is in the image." instead, so that an answer's coordinates cannot be read off its own
    trace under teacher forcing (the demo reasoner's SFT, DESIGN section 12)."""

    def __post_init__(self) -> None:
        low, high = self.size_range
        if not 64 <= low <= high <= 4096:
            raise ValueError(f"size_range must satisfy 64 <= low <= high <= 4096, got {self.size_range}")
        if not 1 <= self.objects[0] <= self.objects[1] <= 12:
            raise ValueError(f"objects must satisfy 1 <= low <= high <= 12, got {self.objects}")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if not self.reasoning_types or set(self.reasoning_types) - set(REASONING_TYPES):
            raise ValueError(f"reasoning_types must be a non-empty subset of {REASONING_TYPES}")
        if not self.depths or set(self.depths) - {1, 2, 3}:
            raise ValueError(f"depths must be a non-empty subset of (1, 2, 3), got {self.depths}")
        if not 0.0 <= self.no_target_probability <= 1.0:
            raise ValueError("no_target_probability must lie in [0, 1]")


BENCHMARK_CONFIG = SyntheticConfig(size_range=(256, 512))
"""The benchmark's settings: scenes of 256-512 px per side, the reasoning stage."""


@dataclass(frozen=True)
class SyntheticSample:
    """One generated sample.

    image: (H, W, 3) uint8 RGB. boxes: (n, 4) int64, points: (n, 2) int64, labels: n nouns,
    masks: (n, H, W) bool, one per target (module docstring for the conventions); n = 0 for "no
    target". target_ids: (n,) indices of the targets in `objects`. objects: every object in drawing
    order; instance_masks: (m, H, W) bool, the visible mask of each. trace: the worded reasoning.
    reasoning_type: attribute | spatial | function | multi (reasoning stage), single | dense.
    """

    image_id: str
    image: np.ndarray = field(repr=False)
    query: str
    is_sentence: bool
    reasoning_type: str
    depth: int
    trace: str
    target_ids: tuple[int, ...]
    boxes: np.ndarray = field(repr=False)
    points: np.ndarray = field(repr=False)
    labels: list[str]
    masks: np.ndarray = field(repr=False)
    objects: tuple[SceneObject, ...]
    instance_masks: np.ndarray = field(repr=False)

    @property
    def mask(self) -> np.ndarray:
        """(H, W) bool, the union of the targets' masks."""
        return self.masks.any(axis=0) if len(self.masks) else np.zeros(self.image.shape[:2], dtype=bool)


def sample(seed: int, index: int, config: SyntheticConfig = SyntheticConfig()) -> SyntheticSample:
    """The sample at `index` of the stream `seed` (both >= 0); deterministic."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed}, {index}")
    rng = np.random.default_rng([seed, index])
    stage = config.stage
    if stage == "mixed":
        weights = np.asarray(config.mixed_weights, dtype=np.float64)
        stage = ("single", "dense", "reasoning")[int(rng.choice(3, p=weights / weights.sum()))]
    empty = stage != "dense" and bool(rng.random() < config.no_target_probability)
    reasoning_type, depth = "", 0
    if stage == "reasoning":
        combos = [(t, d) for t in config.reasoning_types for d in config.depths
                  if not (empty and (t, d) in NO_EMPTY_FORM)]
        if not combos:  # only spatial depth 1 asked for: it has no "no target" form
            empty = False
            combos = [(t, d) for t in config.reasoning_types for d in config.depths]
        reasoning_type, depth = combos[int(rng.integers(len(combos)))]
    fewest = 1 if stage == "single" else 2
    for _ in range(_ATTEMPTS):
        width, height = (int(v) for v in rng.integers(config.size_range[0], config.size_range[1] + 1, 2))
        count = int(rng.integers(max(config.objects[0], fewest), max(config.objects[1], fewest) + 1))
        scene = render_scene(rng, (width, height), count, config.item_probability, config.scale_range,
                             config.min_visible_fraction, config.min_visible_pixels)
        if len(scene.objects) < fewest:
            continue
        facts = SceneFacts(scene.objects, (width, height), config.trace_locations)
        if stage == "reasoning":
            query = reasoning_query(rng, facts, reasoning_type, depth, empty)
        elif stage == "single":
            query = single_query(rng, facts, empty)
        else:
            query = dense_query(rng, facts)
        if query is not None:
            return _assemble(f"synth-s{seed}-{index:07d}", scene.image, query, scene.objects, scene.visible)
    raise RuntimeError(f"no {reasoning_type or stage} query (depth {depth}, no target: {empty}) for seed {seed}, "
                       f"index {index} in {_ATTEMPTS} scenes; widen the config")


def _assemble(image_id: str, image: np.ndarray, query: Query, objects: tuple[SceneObject, ...],
              visible: np.ndarray) -> SyntheticSample:
    ids = query.targets
    masks = visible[list(ids)] if ids else np.zeros((0, *image.shape[:2]), dtype=bool)
    boxes = np.array([mask_box(m) for m in masks], dtype=np.int64).reshape(-1, 4)
    points = np.array([interior_point(m) for m in masks], dtype=np.int64).reshape(-1, 2)
    return SyntheticSample(
        image_id=image_id, image=image, query=query.text, is_sentence=query.is_sentence,
        reasoning_type=query.reasoning_type, depth=query.depth, trace=query.trace, target_ids=ids,
        boxes=boxes, points=points, labels=[objects[i].noun for i in ids], masks=masks,
        objects=objects, instance_masks=visible,
    )


def answer_objects(item: SyntheticSample) -> list[dict[str, Any]]:
    """The targets as answer objects in original pixels: [{"bbox_2d", "point_2d", "label"}]."""
    return [{"bbox_2d": [int(v) for v in box], "point_2d": [int(v) for v in point], "label": label}
            for box, point, label in zip(item.boxes, item.points, item.labels)]


def split_seed(seed: int, split: str) -> int:
    """The stream seed of a split: 3 * seed + 0 (train), 1 (val) or 2 (test)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return 3 * seed + SPLITS.index(split)


def to_seg_sample(item: SyntheticSample) -> SegSample:
    """The sample as an evaluation SegSample (in-memory image, no ignore region)."""
    return SegSample(image_id=item.image_id, image=item.image, queries=(item.query,),
                     is_sentence=item.is_sentence, mask=item.mask,
                     ignore=np.zeros(item.image.shape[:2], dtype=bool),
                     reasoning_type=item.reasoning_type, depth=item.depth)


class SyntheticBenchmark(Sequence[SegSample]):
    """`count` samples of the stream `split_seed(seed, split)`, generated on access."""

    def __init__(self, seed: int, count: int, split: str = "test",
                 config: SyntheticConfig = BENCHMARK_CONFIG) -> None:
        self.stream = split_seed(seed, split)
        self.count = count
        self.config = config

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> SegSample:  # type: ignore[override]
        if not 0 <= index < self.count:
            raise IndexError(index)
        return to_seg_sample(sample(self.stream, index, self.config))


def write_split(out: str | Path, seed: int, split: str, count: int,
                config: SyntheticConfig = BENCHMARK_CONFIG,
                progress: Callable[[int], None] | None = None) -> Path:
    """Write `count` samples of a split to `out/<split>/` in the ReasonSeg layout.

    Each target's visible mask is written as polygons traced from it (label "target", group_id =
    the target's position in the answer), which rasterise back to exactly the mask; the JSON also
    holds reasoning_type, depth, labels (one per target), trace and the image size. `progress`
    is called with the number written so far.

    Returns:
        The split folder.
    """
    folder = Path(out) / split
    stream = split_seed(seed, split)
    for index in range(count):
        item = sample(stream, index, config)
        polygons, groups = [], []
        for position, mask in enumerate(item.masks):
            for polygon in mask_to_polygons(mask):
                polygons.append(polygon)
                groups.append(position)
        extra = {"reasoning_type": item.reasoning_type, "depth": item.depth, "labels": item.labels,
                 "trace": item.trace, "imageWidth": item.image.shape[1], "imageHeight": item.image.shape[0]}
        write_sample(folder, item.image_id, item.image, [item.query], item.is_sentence, polygons,
                     extra=extra, group_ids=groups)
        if progress is not None:
            progress(index + 1)
    return folder
