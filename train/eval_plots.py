"""Pictures of an evaluation report (matplotlib, no pyplot state): gIoU and cIoU per reasoning type
and per depth, gIoU vs N when several N were run, and overlays of the worst cases."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from star_edge.train.eval import Case

_TARGET_TINT = np.array((40, 200, 60), dtype=np.float32)
_IGNORE_TINT = np.array((128, 128, 128), dtype=np.float32)


def write_summary_plots(report: dict[str, Any], folder: str | Path) -> list[Path]:
    """Write giou_per_type.png and giou_per_depth.png (when the data has types / depths) and
    giou_vs_samples.png (when several N were run) into `folder`; returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary = report["summary"]
    n = max(int(k) for k in report["summary_by_samples"]) if report["summary_by_samples"] else 1
    written = []
    for key, title, name in (("per_type", "reasoning type", "giou_per_type.png"),
                             ("per_depth", "depth", "giou_per_depth.png")):
        if summary.get(key):
            written.append(_bars(summary[key], f"gIoU and cIoU per {title} (N = {n})", folder / name))
    if len(report["summary_by_samples"]) > 1:
        written.append(_versus_samples(report["summary_by_samples"], folder / "giou_vs_samples.png"))
    return written


def write_worst_overlays(cases: Sequence[Case], folder: str | Path) -> list[Path]:
    """One PNG per case: the ground truth (green; ignore grey) beside the prediction's overlay,
    under the query and the IoU. Named by IoU, image index and id, and query index."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for case in cases:
        record = case.record
        name = f"iou{record['iou']:.3f}_{record['index']:06d}_{record['image_id']}_q{record['query_index']}.png"
        path = folder / name
        _panel(case).save(path, format="PNG")
        written.append(path)
    return written


def _panel(case: Case) -> Image.Image:
    image = case.result.image.astype(np.float32)
    truth = image.copy()
    truth[case.target] = 0.5 * truth[case.target] + 0.5 * _TARGET_TINT
    truth[case.ignore] = 0.5 * truth[case.ignore] + 0.5 * _IGNORE_TINT
    height, width = image.shape[:2]
    record = case.record
    caption = (f"IoU {record['iou']:.3f}  N={record['n_samples']}  "
               f"{record.get('reasoning_type') or ''} {record.get('depth') or ''}\n"
               + "\n".join(textwrap.wrap(record["query"], width=max(20, (2 * width) // 7))))
    top = 12 * (caption.count("\n") + 1) + 6
    panel = Image.new("RGB", (2 * width, height + top), (255, 255, 255))
    panel.paste(Image.fromarray(truth.round().astype(np.uint8)), (0, top))
    panel.paste(case.result.overlay(), (width, top))
    ImageDraw.Draw(panel).multiline_text((4, 3), caption, fill=(0, 0, 0), spacing=2)
    return panel


def _bars(groups: dict[str, dict[str, Any]], title: str, path: Path) -> Path:
    from matplotlib.figure import Figure

    names = list(groups)
    positions = np.arange(len(names))
    figure = Figure(figsize=(max(4.0, 1.2 * len(names) + 2), 3.5), layout="constrained")
    axes = figure.add_subplot()
    for offset, metric in ((-0.2, "giou"), (0.2, "ciou")):
        values = [groups[name][metric] or 0.0 for name in names]
        axes.bar(positions + offset, values, width=0.4, label=metric.replace("iou", "IoU"))
    axes.set_xticks(positions, [f"{name}\n(n={groups[name]['count']})" for name in names])
    axes.set_ylim(0, 1)
    axes.set_title(title)
    axes.legend()
    figure.savefig(path, dpi=100)
    return path


def _versus_samples(by_n: dict[str, dict[str, Any]], path: Path) -> Path:
    from matplotlib.figure import Figure

    ns = sorted(int(k) for k in by_n)
    figure = Figure(figsize=(5, 3.5), layout="constrained")
    axes = figure.add_subplot()
    axes.plot(ns, [by_n[str(n)]["giou"] for n in ns], marker="o", label="gIoU (all)")
    axes.plot(ns, [by_n[str(n)]["ciou"] for n in ns], marker="s", label="cIoU (all)")
    types = sorted({t for n in ns for t in by_n[str(n)].get("per_type", {})})
    for kind in types:
        axes.plot(ns, [by_n[str(n)]["per_type"].get(kind, {}).get("giou") for n in ns],
                  linestyle="--", marker=".", label=f"gIoU {kind}")
    axes.set_xscale("log", base=2)
    axes.set_xticks(ns, [str(n) for n in ns])
    axes.set_xlabel("samples N")
    axes.set_ylim(0, 1)
    axes.set_title("gIoU vs N (mask-level voting)")
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=100)
    return path
