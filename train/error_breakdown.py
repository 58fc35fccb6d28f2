"""Where a `star-edge eval --synthetic --json` report loses its gIoU, query by query.

The synthetic benchmark regenerates every scene from the split and seed the report names, so each
answer can be set against all of the scene's objects, not only its targets:

- outcome of every query, per N: no sample of it parsed ("failed"; its empty mask scores 1.0 on a
  "no target" query, 0 otherwise); a "no target" query answered with nothing ("rejected") or with
  something ("false positive"); a query with targets answered with nothing ("empty"), with IoU
  < 0.1 ("miss"), 0.1-0.5 ("partial") or >= 0.5 ("hit"). Each outcome's gIoU lost is
  sum(1 - IoU) over its queries / all queries, so the losses add up to 1 - gIoU.
- grounding of every one-object answer: the scene object its mask covers (IoU >= 0.5 with that
  object's visible mask; "no object" when none does), whether that object is a target, and
  whether the answer's label names it ("named right": the object's noun, e.g. "cup").

A miss on "another object, named right" is a reasoning error (the wrong object, recognised); on
"another object, named wrong" the object was not recognised either; "no object" is a
localisation error.

Usage: python -m star_edge.train.error_breakdown REPORT.json [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from star_edge.errors import InvalidInputError
from star_edge.kernels import pack_masks, pairwise_iou, rle_decode
from star_edge.train.data.synthetic import BENCHMARK_CONFIG, SyntheticSample, sample, split_seed

OUTCOMES = ("failed", "rejected", "false positive", "empty", "miss", "partial", "hit")
GROUNDINGS = ("target, named right", "target, named wrong", "another object, named right",
              "another object, named wrong", "no object")
COVERS = 0.5
"""IoU with an object's visible mask from which an answer's mask counts as that object."""


@dataclass(frozen=True)
class Share:
    """How many of the queries scored with N samples fell in one category, and what they cost."""

    samples: int
    """N, samples per query (1: greedy)."""
    category: str
    """An outcome (OUTCOMES) or a grounding (GROUNDINGS)."""
    queries: int
    """Queries in this category."""
    share: float
    """queries / all queries of this N (outcomes) or / its one-object answers (groundings)."""
    giou_lost: float
    """sum(1 - IoU) over these queries / all queries of this N."""


def outcome(record: dict[str, Any]) -> str:
    """The OUTCOMES entry of one report record (its n_valid, target_area, pred_area and iou)."""
    if record["n_valid"] == 0:
        return "failed"
    answered = record["pred_area"] > 0
    if record["target_area"] == 0:
        return "false positive" if answered else "rejected"
    if not answered:
        return "empty"
    return "hit" if record["iou"] >= 0.5 else "partial" if record["iou"] >= 0.1 else "miss"


def grounding(record: dict[str, Any], scene: SyntheticSample) -> str | None:
    """The GROUNDINGS entry of a one-object answer on its scene; None for any other answer."""
    if record["n_objects"] != 1 or len(record["labels"]) != 1 or record["pred_area"] == 0:
        return None
    predicted = rle_decode(record["pred_mask"])[0]
    objects = scene.instance_masks
    if predicted.shape != objects.shape[1:]:
        raise InvalidInputError(f"record {record['index']}: mask {predicted.shape} on a scene of "
                                f"{objects.shape[1:]} pixels")
    ious = pairwise_iou(pack_masks(predicted[None]), pack_masks(objects))[0]
    best = int(ious.argmax())
    if ious[best] < COVERS:
        return "no object"
    where = "target" if best in scene.target_ids else "another object"
    named = "right" if record["labels"][0].strip().lower() == scene.objects[best].noun else "wrong"
    return f"{where}, named {named}"


def scene_source(report: dict[str, Any]) -> Callable[[int], SyntheticSample]:
    """index -> the scene a synthetic report scored at that index (from meta["synthetic"]).

    Raises InvalidInputError for a report of other data.
    """
    source = report.get("meta", {}).get("synthetic")
    if not isinstance(source, dict) or not {"split", "seed"} <= set(source):
        raise InvalidInputError("not a report of `star-edge eval --synthetic` (its meta names no synthetic split "
                                "and seed)")
    stream = split_seed(int(source["seed"]), str(source["split"]))
    return lambda index: sample(stream, index, BENCHMARK_CONFIG)


def breakdown(report: dict[str, Any]) -> list[Share]:
    """Outcome shares, then grounding shares, per N (ascending) of a synthetic report.

    Scenes are regenerated one image index at a time (each serves every N scored on it).

    Raises InvalidInputError if the report is not synthetic, lacks a record field, or its image ids
    are not those of the regenerated scenes (another split, seed or index; a generator changed
    since the report was written is not detected).
    """
    scenes = scene_source(report)
    classified: list[tuple[int, float, str, str | None]] = []  # (N, IoU, outcome, grounding)
    try:
        by_index: dict[int, list[dict[str, Any]]] = {}
        for record in report["samples"]:
            by_index.setdefault(int(record["index"]), []).append(record)
        for index, records in sorted(by_index.items()):
            scene = scenes(index)
            for record in records:
                if record["image_id"] != scene.image_id:
                    raise InvalidInputError(f"record {index} scored {record['image_id']}, the generator gives "
                                            f"{scene.image_id}: not the scenes this report scored")
                classified.append((int(record["n_samples"]), float(record["iou"]), outcome(record),
                                   grounding(record, scene)))
    except InvalidInputError:
        raise
    except (KeyError, TypeError, ValueError) as error:
        raise InvalidInputError(f"not a `star-edge eval --json` report: {error!r}") from None
    rows: list[Share] = []
    for n in sorted({item[0] for item in classified}):
        of_n = [item for item in classified if item[0] == n]
        answered = sum(item[3] is not None for item in of_n)
        for names, position, total in ((OUTCOMES, 2, len(of_n)), (GROUNDINGS, 3, answered)):
            for name in names:
                members = [item[1] for item in of_n if item[position] == name]
                lost = sum(1.0 - iou for iou in members) / len(of_n)
                rows.append(Share(samples=n, category=name, queries=len(members),
                                  share=len(members) / total if total else 0.0, giou_lost=lost))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.report.read_text(encoding="utf-8"))
        rows = breakdown(report)
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"cannot read {args.report}: {error}") from None
    except InvalidInputError as error:
        raise SystemExit(f"{args.report}: {error}") from None
    for n in sorted({row.samples for row in rows}):
        print(f"N = {n}")
        for title, names in (("outcome", OUTCOMES), ("one-object answers", GROUNDINGS)):
            print(f"  {title}:")
            for row in (r for r in rows if r.samples == n and r.category in names):
                print(f"    {row.category:<28} {row.queries:>5} {row.share:>7.1%}   gIoU lost {row.giou_lost:.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
