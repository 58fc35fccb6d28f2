"""Two `star-edge eval --json` reports of the same queries, compared query by query.

Two models scored on the same 500 synthetic queries differ by less than either score's own
sampling error suggests: most of the per-query variation is the queries' (some are hard for
both). The paired difference (after - before, per query and N) and its standard error
(sd / sqrt(n)) say whether a change is more than noise.

Usage: python -m star_edge.train.compare_reports BEFORE.json AFTER.json [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from star_edge.errors import InvalidInputError


@dataclass(frozen=True)
class PairedDifference:
    """gIoU of two reports over the queries both scored with N samples, and their difference."""

    samples: int
    """N, samples per query (1: greedy)."""
    queries: int
    """Queries scored in both reports."""
    before: float
    """Mean IoU (gIoU) of the first report over those queries."""
    after: float
    """Mean IoU of the second report."""
    difference: float
    """Mean of after - before per query (= after - before)."""
    standard_error: float
    """Standard error of that mean: sample standard deviation of the differences / sqrt(queries)."""


def _ious(report: dict[str, Any], name: str) -> dict[tuple[int, int, int], tuple[float, str | None]]:
    """(image index, query index, N) -> (IoU, image id or None) of each scored query of a report."""
    try:
        return {(int(s["index"]), int(s["query_index"]), int(s["n_samples"])): (float(s["iou"]), s.get("image_id"))
                for s in report["samples"]}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise InvalidInputError(f"{name} is not a `star-edge eval --json` report: {error!r}") from None


def paired_differences(before: dict[str, Any], after: dict[str, Any]) -> list[PairedDifference]:
    """One PairedDifference per N that both reports scored, ascending N.

    Raises InvalidInputError if a report lacks per-query rows, the two name different images at
    the same index (another split or seed) or share no query with at least two of them per N.
    """
    first, second = _ious(before, "the first report"), _ious(after, "the second report")
    shared = sorted(set(first) & set(second))
    for key in shared:
        ids = first[key][1], second[key][1]
        if None not in ids and ids[0] != ids[1]:
            raise InvalidInputError(f"the reports score different images at index {key[0]} ({ids[0]} vs {ids[1]}): "
                                    "not the same data (split, seed)")
    results = []
    for samples in sorted({key[2] for key in shared}):
        keys = [key for key in shared if key[2] == samples]
        if len(keys) < 2:
            continue
        a = np.array([first[key][0] for key in keys])
        b = np.array([second[key][0] for key in keys])
        diff = b - a
        results.append(PairedDifference(samples=samples, queries=len(keys), before=float(a.mean()),
                                        after=float(b.mean()), difference=float(diff.mean()),
                                        standard_error=float(diff.std(ddof=1) / np.sqrt(len(keys)))))
    if not results:
        raise InvalidInputError(f"the two reports share {len(shared)} scored queries, not two of the same N "
                                "(same --synthetic seed and count? same -n?)")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    reports = []
    for path in (args.before, args.after):
        try:
            reports.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"cannot read {path}: {error}") from None
    try:
        rows = paired_differences(*reports)
    except InvalidInputError as error:
        raise SystemExit(str(error)) from None
    for row in rows:
        print(f"N = {row.samples}: {row.queries} queries, gIoU {row.before:.4f} -> {row.after:.4f}, "
              f"difference {row.difference:+.4f} +- {row.standard_error:.4f} (standard error)")
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
