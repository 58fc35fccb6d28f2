"""Draw docs/demo-model/learning-curve.png: the shipped reasoner's lineage (SFT run 3's variant C,
SFT run 4, SFT run 5's constant-rate part A, then SFT run 6 on the GPU, annealed at its end),
training loss and held-out greedy box IoU per curriculum phase against samples seen; run 5's
annealed branches B and C (the earlier shipped reasoner) as open marks.

Reads sft-run3-log.csv / sft-run3-eval.json (variant C and its CPU continuation),
sft-run4-log.csv / sft-run4-eval.json, sft-run5-log.csv / sft-run5-eval.json and sft-run6-log.csv /
sft-run6-eval.json. Usage: python docs/demo-model/plot_learning_curve.py (needs matplotlib, the
`train` extra).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
LINEAGE = ("C_init_noloc_vis", "C_init_noloc_vis_cpu")
RUN5_LINEAGE = ("A_constant_lr",)
RUN5_BRANCHES = ("B_anneal_probe", "C_annealed")
PHASES = {"phase1": "phase 1: one named shape", "phase2": "phase 2: shapes + items",
          "phase3": "phase 3: mixed (dense, reasoning)"}
#: Where the curriculum moves on (samples seen), `DEMO_CURRICULUM`.
PHASE_STARTS = (60_000, 120_000)


def _loss(path: Path, variants: tuple[str, ...] | None) -> list[tuple[int, float]]:
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if variants is None or row.get("variant") in variants]
    return [(int(row["samples"]), float(row["loss"])) for row in rows]


def main() -> None:
    loss = _loss(HERE / "sft-run3-log.csv", LINEAGE) + _loss(HERE / "sft-run4-log.csv", None)
    loss += _loss(HERE / "sft-run5-log.csv", RUN5_LINEAGE) + _loss(HERE / "sft-run6-log.csv", None)
    evaluations = [e for e in json.loads((HERE / "sft-run3-eval.json").read_text()) if e["variant"] in LINEAGE]
    evaluations += json.loads((HERE / "sft-run4-eval.json").read_text())
    run5 = json.loads((HERE / "sft-run5-eval.json").read_text())
    evaluations += [e for e in run5 if e["variant"] in RUN5_LINEAGE]
    evaluations += json.loads((HERE / "sft-run6-eval.json").read_text())
    branches = [e for e in run5 if e["variant"] in RUN5_BRANCHES]
    evaluations.sort(key=lambda e: e["samples"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(*zip(*sorted(loss)), color="tab:blue", label="shipped lineage")
    for variant, color in zip(RUN5_BRANCHES, ("tab:orange", "tab:green")):
        points = sorted(_loss(HERE / "sft-run5-log.csv", (variant,)))
        left.plot(*zip(*points), color=color, linewidth=1, label=f"run 5 {variant[0]} (annealed branch)")
    left.set(xlabel="samples seen", ylabel="answer-token loss", yscale="log", title="training loss")
    for key, name in PHASES.items():
        line, = right.plot([e["samples"] for e in evaluations], [e[key]["box_iou"] for e in evaluations],
                           marker="o", label=name)
        right.plot([e["samples"] for e in branches], [e[key]["box_iou"] for e in branches], linestyle="none",
                   marker="o", markerfacecolor="none", color=line.get_color())
    right.set(xlabel="samples seen", ylabel="greedy box IoU of the first target (val)", ylim=(0, 0.7),
              title="held-out box IoU by curriculum phase")
    for axis in (left, right):
        for start in PHASE_STARTS:
            axis.axvline(start, color="grey", linestyle=":", linewidth=1)
    right.legend(fontsize=8, loc="lower right", title="open marks: run 5 B, C", title_fontsize=8)
    left.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(HERE / "learning-curve.png", dpi=110)


if __name__ == "__main__":
    main()
