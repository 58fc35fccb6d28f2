"""SAM at K prompts: MaskDecoder.decode against segment_anything's SamPredictor, side by side.

Model: full-size SAM ViT-B (the official architecture, built by segment_anything's own classes)
with seeded random weights: no checkpoint can be downloaded here, and the cost of every operation
depends on the shapes only. Image: examples/coffee.jpg (600 x 400). Prompts: K random boxes, each
with one positive point inside (the StAR prompt), K in --prompts (default 1 8 24 64).

Decoder rows, per K:
- official per-prompt loop: SamPredictor.predict(box, point, multimask_output=True) K times, best
  mask each; this postprocesses all three masks at full resolution every call (the baseline).
- official one batch: SamPredictor.predict_torch with all K prompts at once.
- ours: MaskDecoder.decode (torch), default max_batch and the values in --max-batch.
- ours bfloat16 (--bf16): the same with dtype="bfloat16" (encoder and decoder weights and
  activations in bfloat16; float32 prompt encoding, upsampling and scores), decoding its own
  bfloat16 embedding: on CPUs with AVX512-BF16 / AMX, oneDNN's bfloat16 matrix products.
- ours onnx (--onnx): the same weights exported by export/sam_onnx.py, OnnxMaskDecoder.decode on
  onnxruntime's CPU provider with the fp32, fp16 and int8 decoder graphs.
Each row reports the minimum mask IoU over its prompts against the per-prompt loop; the fp16 and
int8 rows also the mean and minimum IoU against the onnx fp32 masks.

Encoder rows: SamPredictor.set_image against MaskDecoder.embed (cache off), the bfloat16 one
(--bf16), and the ONNX encoder.

SamPredictor imports torchvision for two image functions; the script supplies them from PIL (the
same functions, as torchvision applies them to a uint8 image) without installing torchvision.
Repeats are interleaved across rows, so background load on the machine hits them alike; torch
runs with --threads threads. `--clock cpu` times this process's CPU time instead of elapsed time:
with one thread it is the work done, undisturbed by other processes waiting for the same cores.

Usage: python benchmarks/sam_decode.py [--threads 1] [--repeats 5] [--encoder-repeats 2]
       [--prompts 1 8 24 64] [--max-batch 1 64] [--onnx] [--bf16] [--clock wall|cpu]
Writes benchmarks/results/sam_decode.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from star_edge.sam.official import OFFICIAL_CONFIGS, build_sam_from_config, import_segment_anything
from star_edge.sam.torch_backend import MaskDecoder

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "sam_decode.json"
IMAGE = ROOT / "examples" / "coffee.jpg"


def official_predictor_class() -> type:
    """segment_anything.predictor.SamPredictor with PIL standing in for the two torchvision
    functions it calls (to_pil_image, resize)."""
    import_segment_anything()
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.to_pil_image = lambda array: Image.fromarray(array)
    functional.resize = lambda image, size: image.resize(size[::-1], Image.Resampling.BILINEAR)
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    vision = types.ModuleType("torchvision")
    vision.transforms = transforms
    sys.modules.update(
        {
            "torchvision": vision,
            "torchvision.transforms": transforms,
            "torchvision.transforms.functional": functional,
        }
    )
    from segment_anything.predictor import SamPredictor

    return SamPredictor


def random_prompts(height: int, width: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """boxes (K, 4) float64 and points (K, 2) float64 inside them, in pixels of an (H, W) image."""
    rng = np.random.default_rng(seed)
    xs = np.sort(rng.uniform(0, width - 1, (count, 2)), axis=1)
    ys = np.sort(rng.uniform(0, height - 1, (count, 2)), axis=1)
    boxes = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1)
    points = boxes[:, :2] + rng.uniform(0.2, 0.8, (count, 2)) * (boxes[:, 2:] - boxes[:, :2])
    return boxes, points


def official_loop(predictor: object, boxes: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(K, H, W) bool: one SamPredictor.predict per prompt, the best of its three masks."""
    masks = []
    for box, point in zip(boxes, points):
        candidates, scores, _ = predictor.predict(
            point_coords=point[None], point_labels=np.array([1]), box=box, multimask_output=True
        )
        masks.append(candidates[int(np.argmax(scores))])
    return np.stack(masks)


def official_batch(predictor: object, boxes: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(K, H, W) bool: one SamPredictor.predict_torch call for all prompts, best mask each."""
    size = predictor.original_size
    coords = torch.as_tensor(predictor.transform.apply_coords(points, size), dtype=torch.float)
    box = torch.as_tensor(predictor.transform.apply_boxes(boxes, size), dtype=torch.float)
    labels = torch.ones((len(points), 1), dtype=torch.int)
    masks, scores, _ = predictor.predict_torch(coords[:, None], labels, box, multimask_output=True)
    rows = torch.arange(len(masks))
    return masks[rows, scores.argmax(dim=1)].numpy()


@dataclass
class Row:
    """One timed variant: its name, the call (returns masks), its times and accuracy."""

    name: str
    prompts: int
    call: Callable[[], np.ndarray]
    times: list[float] = field(default_factory=list)
    min_iou: float = float("nan")
    variant: str | None = None
    iou_vs_fp32: tuple[float, float] | None = None  # (mean, min) against the onnx fp32 masks


def ious(ours: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(K,) mask IoU per prompt of two (K, H, W) bool stacks (1 where both are empty)."""
    inter = np.logical_and(ours, reference).reshape(len(ours), -1).sum(axis=1)
    union = np.logical_or(ours, reference).reshape(len(ours), -1).sum(axis=1)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def time_rows(
    rows: list[Row],
    repeats: int,
    reference: Callable[[Row], np.ndarray | None],
    clock: Callable[[], float] = time.perf_counter,
) -> None:
    """Warm each row up (checking its masks against `reference`, and onnx variants against the
    onnx fp32 row of the same K), then time interleaved runs."""
    fp32 = {}
    for row in rows:
        masks = row.call()
        expected = reference(row)
        if expected is not None:
            row.min_iou = float(ious(masks, expected).min())
        if row.variant == "fp32":
            fp32[row.prompts] = masks
        elif row.variant is not None:
            values = ious(masks, fp32[row.prompts])
            row.iou_vs_fp32 = (float(values.mean()), float(values.min()))
    for _ in range(repeats):
        for row in rows:
            start = clock()
            row.call()
            row.times.append((clock() - start) * 1e3)


def export_onnx(sam: torch.nn.Module, folder: Path) -> Path:
    """Write `sam` as a sam/ folder and export it to ONNX (not verified: the rows measure the
    masks anyway). Runs before the PIL stand-in for torchvision is installed, which would confuse
    the exporter's check for torchvision operators. Returns the onnx/ folder."""
    from star_edge.export.sam_onnx import export_sam_onnx
    from star_edge.export.tiny_sam import write_sam_dir

    write_sam_dir(sam, dict(OFFICIAL_CONFIGS["vit_b"]), folder / "sam")
    export_sam_onnx(folder / "sam", folder / "onnx", verify=False)
    return folder / "onnx"


def onnx_rows(
    onnx_dir: Path, image: np.ndarray, prompts: dict[int, tuple], threads: int
) -> tuple[list[Row], list[Row]]:
    """Encoder and decoder rows of the ONNX backend, one decoder row per graph variant; the
    variants decode the fp32 encoder's embedding."""
    from star_edge.sam.onnx_backend import OnnxMaskDecoder

    decoders = {
        variant: OnnxMaskDecoder.from_dir(
            onnx_dir, decoder_variant=variant, cache_size=0, threads=threads
        )
        for variant in OnnxMaskDecoder.available_variants(onnx_dir)
    }
    encoder = decoders["fp32"]
    embedding = encoder.embed(image)
    encoder_rows = [Row("ours onnx encoder (fp32)", 0, lambda: encoder.embed(image))]
    decoder_rows = [
        Row(
            f"ours onnx, {variant} decoder",
            count,
            lambda d=decoder, b=boxes, p=points: d.decode(embedding, b, p)[0],
            variant=variant,
        )
        for variant, decoder in decoders.items()
        for count, (boxes, points) in prompts.items()
    ]
    return encoder_rows, decoder_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per decoder row")
    parser.add_argument("--encoder-repeats", type=int, default=2, help="timed runs per encoder row")
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 8, 24, 64])
    parser.add_argument("--max-batch", type=int, nargs="*", default=[1, 64])
    parser.add_argument(
        "--onnx", action="store_true", help="also export to ONNX and time onnxruntime"
    )
    parser.add_argument("--bf16", action="store_true", help="also time the bfloat16 torch decoder")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time, steadier on a shared machine "
        "(meaningful with --threads 1 only)",
    )
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sam = build_sam_from_config(OFFICIAL_CONFIGS["vit_b"])
        with torch.no_grad():
            for name, parameter in sam.named_parameters():
                if "pos_embed" in name or "rel_pos" in name:
                    parameter.normal_(0.0, 0.05)
    with Image.open(IMAGE) as opened:
        image = np.asarray(opened.convert("RGB"))
    height, width = image.shape[:2]
    prompts = {k: random_prompts(height, width, k, seed=k) for k in args.prompts}
    with tempfile.TemporaryDirectory() as scratch:
        onnx_dir = export_onnx(sam, Path(scratch)) if args.onnx else None
        predictor = official_predictor_class()(sam)
        ours = MaskDecoder.from_module(sam, cache_size=0)
        variants = {f"ours (max_batch={ours.max_batch}, default)": ours}
        for max_batch in args.max_batch:
            if max_batch != ours.max_batch:
                variants[f"ours (max_batch={max_batch})"] = MaskDecoder.from_module(
                    sam, cache_size=0, max_batch=max_batch
                )
        encoder_rows = [
            Row("official SamPredictor.set_image", 0, lambda: predictor.set_image(image)),
            Row("ours MaskDecoder.embed", 0, lambda: ours.embed(image)),
        ]
        predictor.set_image(image)
        embedding = ours.embed(image)
        embeddings = {decoder: embedding for decoder in variants.values()}
        if args.bf16:
            bf16 = MaskDecoder.from_module(copy.deepcopy(sam), cache_size=0, dtype="bfloat16")
            name = f"ours bfloat16 (max_batch={bf16.max_batch})"
            variants[name] = bf16
            embeddings[bf16] = bf16.embed(image)
            encoder_rows.append(Row("ours MaskDecoder.embed, bfloat16", 0, lambda: bf16.embed(image)))
        references = {k: official_loop(predictor, *prompts[k]) for k in args.prompts}
        decoder_rows: list[Row] = []
        for count, (boxes, points) in prompts.items():
            decoder_rows.append(
                Row(
                    "official per-prompt loop",
                    count,
                    lambda b=boxes, p=points: official_loop(predictor, b, p),
                )
            )
            decoder_rows.append(
                Row(
                    "official one batch",
                    count,
                    lambda b=boxes, p=points: official_batch(predictor, b, p),
                )
            )
            for name, decoder in variants.items():
                decoder_rows.append(
                    Row(
                        name,
                        count,
                        lambda d=decoder, b=boxes, p=points: d.decode(embeddings[d], b, p)[0],
                    )
                )
        if onnx_dir is not None:
            more_encoder, more_decoder = onnx_rows(onnx_dir, image, prompts, args.threads)
            encoder_rows += more_encoder
            decoder_rows += more_decoder
        time_rows(decoder_rows, args.repeats, lambda row: references[row.prompts], clock)
        time_rows(encoder_rows, args.encoder_repeats, lambda row: None, clock)

    print(f"SAM ViT-B (random weights), {IMAGE.name} {width}x{height}, threads {args.threads}")
    header = (
        f"{'decoder':<40} {'K':>3} {'median ms':>10} {'min ms':>9} {'loop / this':>12}"
        f" {'min IoU':>8} {'IoU vs fp32 mean/min':>21}"
    )
    print(header)
    results = []
    for count in args.prompts:
        rows = [r for r in decoder_rows if r.prompts == count]
        baseline = statistics.median(rows[0].times)  # the official per-prompt loop
        for row in rows:
            median = statistics.median(row.times)
            versus = "" if row.iou_vs_fp32 is None else "{:.4f} / {:.4f}".format(*row.iou_vs_fp32)
            print(
                f"{row.name:<40} {count:>3} {median:>10.1f} {min(row.times):>9.1f}"
                f" {baseline / median:>11.2f}x {row.min_iou:>8.4f} {versus:>21}"
            )
            results.append(
                {
                    "row": row.name,
                    "prompts": count,
                    "median_ms": median,
                    "min_ms": min(row.times),
                    "speedup_vs_official_loop": baseline / median,
                    "min_iou_vs_official_loop": row.min_iou,
                    "iou_vs_onnx_fp32_mean_min": row.iou_vs_fp32,
                    "times_ms": row.times,
                }
            )
    encoder_baseline = statistics.median(encoder_rows[0].times)
    print(f"{'encoder':<40} {'':>3} {'median ms':>10} {'min ms':>9} {'official / this':>12}")
    encoders = []
    for row in encoder_rows:
        median = statistics.median(row.times)
        ratio = encoder_baseline / median
        print(f"{row.name:<40} {'':>3} {median:>10.1f} {min(row.times):>9.1f} {ratio:>11.2f}x")
        encoders.append(
            {"row": row.name, "median_ms": median, "min_ms": min(row.times),
             "speedup_vs_official": encoder_baseline / median, "times_ms": row.times}
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "sam_decode",
                "model": "SAM ViT-B architecture, random weights (seed 0)",
                "image": {"file": IMAGE.name, "width": width, "height": height},
                "torch_threads": args.threads,
                "clock": args.clock,
                "decoder": results,
                "encoder": encoders,
                "machine": {
                    "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "load_average_1m_before": load_before,
                    "load_average_1m_after": os.getloadavg()[0],
                },
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
