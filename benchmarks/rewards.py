"""Scoring a GRPO rollout batch with SAM in the loop: StarReward against the reference's way.

8 synthetic scenes (256 px, 1-3 target objects each) x 16 rollouts: answers are the targets with
seeded jitter on boxes and points, some with an object missing or added, some unparseable. Stage 1
with masks (every term). Three ways, side by side, same rewards:

- reference: per rollout, embed the image (the reference calls `set_image` for each rollout), decode
  each object's prompt on its own, numpy boolean mask IoU, one scipy Hungarian per rollout;
- per rollout, cached: the same with the image embedded once (MaskDecoder's cache), one decode call
  per rollout, bit-packed IoU, one scipy Hungarian per rollout;
- StarReward: one decode call per image for all its rollouts, one bit-packed IoU call per image,
  one batched Hungarian call for the whole batch.

SAM is the tiny demo SAM (CPU); with SAM ViT-H on a GPU the encoder dominates even more, so the
reference's per-rollout `set_image` costs more. Repeats are interleaved; medians are shown.

Usage: python benchmarks/rewards.py [--repeats 5]
Writes benchmarks/results/rewards.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from star_edge.answer import ParseError
from star_edge.export.tiny_sam import make_tiny_sam
from star_edge.sam import MaskDecoder
from star_edge.train.answer_text import format_answer
from star_edge.train.grpo_data import DataConfig, synthetic_items
from star_edge.train.rewards import (TERMS, RewardConfig, Target, format_reward, non_repeat_reward,
                                     pair_terms, read_answer)
from star_edge.train.rollout_reward import StarReward

SCENES = 8
ROLLOUTS = 16
RESULTS = Path(__file__).parent / "results" / "rewards.json"
CONFIG = RewardConfig(frame="grid1000")


def batch(seed: int = 0) -> tuple[list[str], list[Target], list[np.ndarray], list[str]]:
    """texts, targets, images, keys of SCENES x ROLLOUTS rollouts."""
    rng = np.random.default_rng(seed)
    items = synthetic_items(DataConfig(synthetic_stage="dense", objects=(1, 3)))
    texts, targets, images, keys = [], [], [], []
    for index in range(SCENES):
        item = items(index)
        height, width = item.image.shape[:2]
        target = Target(item.boxes, item.points, item.masks, image_size=(width, height))
        for _ in range(ROLLOUTS):
            boxes = item.boxes + rng.integers(-12, 13, item.boxes.shape)
            points = item.points + rng.integers(-8, 9, item.points.shape)
            labels = list(item.labels)
            if rng.random() < 0.2 and len(boxes) > 1:
                boxes, points, labels = boxes[1:], points[1:], labels[1:]
            text = format_answer(np.clip(boxes, 0, 255), np.clip(points, 0, 255), labels, (width, height),
                                 "grid1000", trace="I compare the objects.")
            texts.append(text if rng.random() > 0.1 else text.replace("</answer>", ""))
            targets.append(target)
            images.append(item.image)
            keys.append(item.sample_id)
    return texts, targets, images, keys


def reference(decoder: MaskDecoder, texts, targets, images) -> list[float]:
    """The reference's way: per rollout and object, as StAR's reward worker computes it."""
    totals = []
    for text, target, image in zip(texts, targets, images):
        answer = read_answer(text, target.image_size, CONFIG)
        accuracy = 0.0
        if not isinstance(answer, ParseError) and len(answer.objects):
            embedding = decoder.embed(image)
            masks = np.concatenate([decoder.decode(embedding, box[None].astype(float), point[None].astype(float))[0]
                                    for box, point in zip(answer.boxes, answer.points)])
            inter = np.logical_and(masks[:, None], target.masks[None]).sum(axis=(2, 3))
            union = np.logical_or(masks[:, None], target.masks[None]).sum(axis=(2, 3))
            iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
            accuracy = _matched(answer, target, iou)
        totals.append(format_reward(text) + accuracy + non_repeat_reward(text))
    return totals


def per_rollout(decoder: MaskDecoder, texts, targets, images) -> list[float]:
    """One decode call per rollout (embedding cached), packed IoU, one scipy matching per rollout."""
    from star_edge.train.rewards import mask_ious

    totals = []
    for text, target, image in zip(texts, targets, images):
        answer = read_answer(text, target.image_size, CONFIG)
        accuracy = 0.0
        if not isinstance(answer, ParseError) and len(answer.objects):
            masks, _ = decoder.decode(decoder.embed(image), answer.boxes.astype(float), answer.points.astype(float))
            accuracy = _matched(answer, target, mask_ious(masks, target))
        totals.append(format_reward(text) + accuracy + non_repeat_reward(text))
    return totals


def _matched(answer, target: Target, iou: np.ndarray) -> float:
    terms = pair_terms(answer.boxes, answer.points, target, iou)
    total = sum(terms[name] for name in TERMS)
    rows, cols = linear_sum_assignment(total, maximize=True)
    return float(total[rows, cols].sum()) / max(len(answer.objects), len(target)) + float(
        len(answer.objects) == len(target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    torch.set_num_threads(1)
    sam = make_tiny_sam(seed=0)[0]
    uncached = MaskDecoder.from_module(sam, cache_size=0)
    cached = MaskDecoder.from_module(sam)
    texts, targets, images, keys = batch()
    reward = StarReward(cached, CONFIG, stage=1)
    variants = {
        "reference: embed per rollout, decode per object, numpy IoU, scipy per rollout":
            lambda: reference(uncached, texts, targets, images),
        "per rollout: cached embedding, one decode per rollout, packed IoU, scipy per rollout":
            lambda: per_rollout(cached, texts, targets, images),
        "StarReward: one decode per image, one packed IoU per image, one batched Hungarian":
            lambda: [r.total for r in reward.score(texts, targets, images, keys)],
    }
    results = {name: run() for name, run in variants.items()}  # warm-up (JIT, caches) and agreement
    first = next(iter(results.values()))
    for name, totals in results.items():
        np.testing.assert_allclose(totals, first, err_msg=name)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(options.repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1e3)
    naive = statistics.median(times[next(iter(variants))])
    rows = [{"variant": name, "median_ms": statistics.median(ms), "ms_per_rollout": statistics.median(ms) / len(texts),
             "speedup_vs_reference": naive / statistics.median(ms), "times_ms": ms} for name, ms in times.items()]
    print(f"{len(texts)} rollouts ({SCENES} scenes x {ROLLOUTS}), stage 1 with masks, tiny SAM on CPU, 1 thread")
    print(f"{'variant':<88} {'median ms':>10} {'x ref':>7}")
    for row in rows:
        print(f"{row['variant']:<88} {row['median_ms']:>10.1f} {row['speedup_vs_reference']:>7.1f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "rewards", "input": {"scenes": SCENES, "rollouts_per_scene": ROLLOUTS, "sam": "tiny (256 px)",
                                          "mean_reward": float(np.mean(first))},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1},
        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
