"""star_edge.kernels: Numba kernels, numpy in, numpy out.

- iou: bit-packed masks (pack_masks, unpack_masks, PackedMasks) and their pairwise IoU.
- rle: COCO run-length encoding, byte-identical to pycocotools (rle_encode, rle_decode, rle_area).
- hungarian: batched linear sum assignment (linear_sum_assignment_batch).
- reference: slow numpy versions for tests and benchmarks (not re-exported).

Kernels compile on first use and cache to __pycache__ (cache=True).
"""

from star_edge.kernels.hungarian import linear_sum_assignment_batch
from star_edge.kernels.iou import PackedMasks, pack_masks, pairwise_iou, unpack_masks
from star_edge.kernels.rle import rle_area, rle_decode, rle_encode

__all__ = [
    "PackedMasks",
    "linear_sum_assignment_batch",
    "pack_masks",
    "pairwise_iou",
    "rle_area",
    "rle_decode",
    "rle_encode",
    "unpack_masks",
]
