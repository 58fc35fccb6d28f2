"""Draw docs/demo-model/sft-run3.png from sft-run3-log.csv and sft-run3-eval.json.

Usage: python docs/demo-model/plot_sft_run3.py (needs matplotlib, the `train` extra).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
NAMES = {
    "A_init_noloc": "A: smooth init, no locations in traces",
    "B_plain_noloc": "B: random init, no locations",
    "C_init_noloc_vis": "C: as A, vision lr x0.1 + wd 0.1 (shipped)",
    "D_init_loc": "D: as A, locations in traces",
}
#: C continued on the CPU from its float16 weights (fresh optimiser): drawn as C's loss.
CONTINUATION = {"C_init_noloc_vis_cpu": "C_init_noloc_vis"}


def main() -> None:
    losses: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(HERE / "sft-run3-log.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            variant = CONTINUATION.get(row["variant"], row["variant"])
            losses[variant].append((int(row["samples"]), float(row["loss"])))
    evaluations = json.loads((HERE / "sft-run3-eval.json").read_text())
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant, name in NAMES.items():
        samples, loss = zip(*losses[variant])
        left.plot(samples, loss, label=name)
        points = sorted((e["samples"], e["phase1"]["box_iou"]) for e in evaluations if e["variant"] == variant)
        right.plot(*zip(*points), marker="o", label=name)
    left.set(xlabel="samples seen", ylabel="answer-token loss", yscale="log", title="training loss")
    right.set(xlabel="samples seen", ylabel="greedy box IoU (val, one named shape)", ylim=(0, 0.6),
              title="held-out box IoU")
    right.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(HERE / "sft-run3.png", dpi=110)


if __name__ == "__main__":
    main()
