"""Evaluation: run a Segmenter over a data set, score every (image, query) and write a report.

Report (JSON):

    {"meta": {"data", "bundle", "backend", "device", "samples": [N, ...], "queries": "first" | "all",
              "limit", "images", "processes", "star_edge"; the synthetic data also "synthetic":
              {"split", "seed", "count"}},
     "samples": [{"index", "query_index", "image_id", "query", "reasoning_type", "depth",
                  "is_sentence", "n_samples", "n_valid", "n_objects", "labels", "intersection",
                  "union", "iou", "target_area", "pred_area", "pred_mask" (COCO RLE),
                  "timings_ms": {stage: ms}}, ...],
     "summary": {"count", "giou", "ciou", "per_type", "per_depth", "timings_ms"},
     "summary_by_samples": {"N": summary, ...}}

One record per image, query and N (several N: `samples=(1, 8)`); an image's first query only, as
LISA scores ReasonSeg, unless every query is asked for. `summary` is that of the largest N. Areas,
intersection and union leave the ignore region out (`metrics`). Sampling is seeded per query
(seed = 1000 * image index + query index), so a sharded run gives the same records as one process.
Under `accelerate launch --multi_gpu` (one GPU per process) or `torchrun` (also on CPU, over gloo),
each process takes every num_processes-th image, writes its shard beside the report, and the main
process merges the shards (`merge_reports`).
"""

from __future__ import annotations

import heapq
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from star_edge import __version__
from star_edge.errors import InvalidInputError
from star_edge.kernels import rle_encode
from star_edge.result import Result
from star_edge.train.data.sample import DataError, SegSample
from star_edge.train.metrics import intersection_union, iou, summarize

SEED_STRIDE = 1000
"""Sampling seed of a query: SEED_STRIDE * image index + query index."""


@dataclass(frozen=True)
class Case:
    """One scored query kept for an overlay: its record, the Result and the ground truth
    (target and ignore, (H, W) bool)."""

    record: dict[str, Any]
    result: Result = field(repr=False)
    target: np.ndarray = field(repr=False)
    ignore: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Processes:
    """Where this process stands in a data-parallel run (one process: index 0 of 1)."""

    index: int
    count: int
    local_index: int
    barrier: Callable[[], None]

    @property
    def is_main(self) -> bool:
        return self.index == 0


def processes(cpu: bool = False) -> Processes:
    """The accelerate process state under `accelerate launch` or torchrun (WORLD_SIZE > 1), else
    one process. `cpu`: the processes run on CPU (gloo) rather than one GPU each.

    accelerate is imported only in the first case.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes(0, 1, 0, lambda: None)
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    return Processes(state.process_index, state.num_processes, state.local_process_index,
                     state.wait_for_everyone)


def open_dataset(data: str | Path | None, split: str | None = None, synthetic: bool = False,
                 seed: int = 0, count: int = 500) -> Sequence[SegSample]:
    """A ReasonSeg folder, a Hugging Face `save_to_disk` folder (`split`: the DatasetDict's split),
    or the synthetic benchmark (`split`, default test: `count` samples of seed `seed`, generated on
    access). A split given for a ReasonSeg folder is refused: such a folder is one split."""
    if synthetic:
        if data is not None:
            raise InvalidInputError("give either a data folder or --synthetic, not both")
        from star_edge.train.data.synthetic import SPLITS, SyntheticBenchmark

        split = "test" if split is None else split
        if split not in SPLITS or seed < 0 or count < 1:
            raise InvalidInputError(f"synthetic data needs a split in {', '.join(SPLITS)}, seed >= 0 "
                                    f"and count >= 1 (got {split!r}, {seed}, {count})")
        return SyntheticBenchmark(seed, count, split=split)
    if data is None:
        raise InvalidInputError("give a data folder, or --synthetic")
    from star_edge.train.data.hf import is_hf_folder, load_hf

    if is_hf_folder(data):
        return load_hf(data, split)
    from star_edge.train.data.reasonseg import ReasonSegFolder

    folder = ReasonSegFolder(data)
    if split is not None:
        raise InvalidInputError(f"{data} is a ReasonSeg folder, which has no splits: give the split's own "
                                f"folder (e.g. {Path(data) / split}) instead of --split {split}")
    return folder


def evaluate(
    segmenter: Any,
    dataset: Sequence[SegSample],
    samples: Sequence[int] = (1,),
    indices: Iterable[int] | None = None,
    worst: int = 0,
    progress: Callable[[int], None] | None = None,
    all_queries: bool = False,
) -> tuple[list[dict[str, Any]], list[Case]]:
    """Segment the chosen images' queries and score them.

    Args:
        segmenter: a star_edge.Segmenter (anything with its `segment`).
        dataset: the samples.
        samples: the N to run each query with (1 = greedy).
        indices: the images to evaluate (default: all).
        worst: keep this many lowest-IoU cases (of the largest N) for overlays.
        progress: called with the number of images done so far.
        all_queries: score every query of an image; by default only its first, as LISA's
            ReasonSeg evaluation does (published gIoU / cIoU count each image once).

    Returns:
        (records in image, query, N order; the kept worst cases, lowest IoU first).
    """
    records: list[dict[str, Any]] = []
    kept: list[tuple[float, int, Case]] = []  # (-IoU, -order, case): the heap top is the best kept
    largest = max(samples)
    indices = range(len(dataset)) if indices is None else indices
    for done, index in enumerate(indices, start=1):
        item = dataset[index]
        pixels = item.pixels()
        if item.mask.shape != pixels.shape[:2] or item.ignore.shape != pixels.shape[:2]:
            raise DataError(f"{item.image_id}: mask {item.mask.shape} does not match the image "
                            f"{pixels.shape[:2]}")
        for query_index, query in enumerate(item.queries if all_queries else item.queries[:1]):
            for n in samples:
                began = time.perf_counter()
                result = segmenter.segment(pixels, query, samples=n, seed=SEED_STRIDE * index + query_index)
                record = score(result, item, index, query_index, n)
                record["timings_ms"]["eval_total"] = round((time.perf_counter() - began) * 1000.0, 3)
                records.append(record)
                if worst and n == largest:
                    case = Case(record, result, item.mask, item.ignore)
                    entry = (-record["iou"], -len(records), case)
                    if len(kept) < worst:
                        heapq.heappush(kept, entry)
                    elif entry > kept[0]:
                        heapq.heapreplace(kept, entry)
        if progress is not None:
            progress(done)
    worst_cases = [case for _, _, case in sorted(kept, key=lambda e: (-e[0], -e[1]))]
    return records, worst_cases


def score(result: Result, item: SegSample, index: int, query_index: int, n: int) -> dict[str, Any]:
    """The record of one segmented query (module docstring), without eval_total."""
    intersection, union = intersection_union(result.mask, item.mask, item.ignore)
    keep = ~item.ignore
    return {
        "index": index,
        "query_index": query_index,
        "image_id": item.image_id,
        "query": result.query,
        "reasoning_type": item.reasoning_type,
        "depth": item.depth,
        "is_sentence": item.is_sentence,
        "n_samples": n,
        "n_valid": sum(s.ok for s in result.samples),
        "n_objects": len(result.objects),
        "labels": [obj.label for obj in result.objects],
        "intersection": intersection,
        "union": union,
        "iou": iou(intersection, union),
        "target_area": int(np.count_nonzero(item.mask & keep)),
        "pred_area": int(np.count_nonzero(result.mask & keep)),
        "pred_mask": rle_encode(result.mask[None])[0],
        "timings_ms": {stage: round(ms, 3) for stage, ms in result.timings.items()},
    }


def build_report(records: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """The report of these records: meta, the records, and the summaries per N."""
    by_n: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        by_n.setdefault(int(record["n_samples"]), []).append(record)
    summaries = {str(n): _summary(by_n[n]) for n in sorted(by_n)}
    headline = summaries[str(max(by_n))] if by_n else _summary([])
    return {"meta": meta, "samples": records, "summary": headline, "summary_by_samples": summaries}


def _summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    summary = summarize(records)
    stages = sorted({stage for r in records for stage in r["timings_ms"]})
    summary["timings_ms"] = {stage: float(np.mean([r["timings_ms"][stage] for r in records
                                                    if stage in r["timings_ms"]])) for stage in stages}
    return summary


def merge_reports(paths: Sequence[str | Path]) -> dict[str, Any]:
    """One report from the shard reports of a data-parallel run (records merged in image, query,
    N order; summaries recomputed). The shards must share the evaluated N and hold disjoint records."""
    reports = []
    for path in paths:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: cannot read the shard report ({exc})") from None
    if not reports:
        raise InvalidInputError("no shard reports to merge")
    meta = dict(reports[0]["meta"])
    for path, report in zip(paths, reports):
        if report["meta"].get("samples") != meta.get("samples"):
            raise DataError(f"{path}: evaluated N {report['meta'].get('samples')}, "
                            f"the first shard {meta.get('samples')}")
    records = sorted((r for report in reports for r in report["samples"]),
                     key=lambda r: (r["index"], r["query_index"], r["n_samples"]))
    keys = [(r["index"], r["query_index"], r["n_samples"]) for r in records]
    if len(set(keys)) != len(keys):
        raise DataError("the shard reports overlap (the same image, query and N twice)")
    return build_report(records, meta)


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    """Write a report as JSON (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report) + "\n")
    return path


def shard_path(report_path: str | Path, index: int, count: int) -> Path:
    """Where process `index` of `count` writes its shard of the report at `report_path`."""
    path = Path(report_path)
    return path.with_name(f"{path.name}.shard{index:03d}-of-{count:03d}.json")


def _keep_worst_overlays(shards: Sequence[Path], worst: int) -> None:
    """Each process drew the overlays of its own `worst` cases; delete all but the `worst` lowest-IoU
    ones of all the shards together (ties: the earlier shard, then its order)."""
    drawn = [(iou_value, shard_index, order, path)
             for shard_index, shard in enumerate(shards)
             for order, (iou_value, path) in enumerate(json.loads(shard.read_text()).get("overlays", []))]
    for _, _, _, path in sorted(drawn)[worst:]:
        Path(path).unlink(missing_ok=True)


def run(
    segmenter: Any,
    dataset: Sequence[SegSample],
    meta: dict[str, Any],
    samples: Sequence[int] = (1,),
    limit: int | None = None,
    json_path: str | Path | None = None,
    plots: str | Path | None = None,
    worst: int = 8,
    procs: Processes | None = None,
    progress: Callable[[int], None] | None = None,
    all_queries: bool = False,
) -> dict[str, Any] | None:
    """Evaluate (this process's share of) the first `limit` images, then write the report and
    the plots; with several processes, the main one merges the shards and keeps the overlays of
    the `worst` cases of them all. `all_queries`: as in `evaluate`.

    Returns the full report in the main process, None in the others.
    """
    procs = procs or Processes(0, 1, 0, lambda: None)
    if procs.count > 1 and json_path is None:
        raise InvalidInputError("a multi-process evaluation needs --json PATH (shards are written beside it)")
    total = len(dataset) if limit is None else min(limit, len(dataset))
    mine = range(procs.index, total, procs.count)
    records, cases = evaluate(segmenter, dataset, samples, mine, worst if plots else 0, progress, all_queries)
    meta = {**meta, "samples": sorted(samples), "queries": "all" if all_queries else "first", "limit": limit,
            "images": total, "processes": procs.count, "star_edge": __version__}
    report = build_report(records, meta)
    overlays: list[Path] = []
    if plots is not None and cases:
        from star_edge.train.eval_plots import write_worst_overlays

        overlays = write_worst_overlays(cases, Path(plots) / "worst")
    if procs.count > 1:
        shard = {**report, "overlays": [[case.record["iou"], str(path)] for case, path in zip(cases, overlays)]}
        write_json(shard, shard_path(json_path, procs.index, procs.count))  # type: ignore[arg-type]
        procs.barrier()
        if not procs.is_main:
            return None
        shards = [shard_path(json_path, i, procs.count) for i in range(procs.count)]  # type: ignore[arg-type]
        report = merge_reports(shards)
        _keep_worst_overlays(shards, worst)
        for path in shards:
            path.unlink()
    if json_path is not None:
        write_json(report, json_path)
    if plots is not None:
        from star_edge.train.eval_plots import write_summary_plots

        write_summary_plots(report, plots)
    return report
