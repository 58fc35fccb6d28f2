"""The default bundle: built on first use from the untrained tiny reasoner and the trained tiny SAM
that ships in the package."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from star_edge.bundle import load_bundle
from star_edge.defaults import DEMO_SAM_DIR, ensure_default_bundle
from star_edge.sam.torch_backend import MaskDecoder
from star_edge.train.sam_data import split_scenes
from star_edge.train.sam_eval import predict_masks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_default_bundle_carries_the_shipped_sam_byte_for_byte() -> None:
    bundle = load_bundle(ensure_default_bundle())
    assert ensure_default_bundle() == bundle.root and not bundle.trained
    for name in ("config.json", "model.safetensors"):
        assert (bundle.sam_dir / name).read_bytes() == (DEMO_SAM_DIR / name).read_bytes()


def test_the_shipped_sam_segments_held_out_scenes_from_ground_truth_prompts() -> None:
    """Mask IoU (pycocotools) on test-split scenes the SAM never trained on; 0.854 on 500 scenes,
    0.84 on these 24; a random tiny SAM scores 0.02."""
    decoder = MaskDecoder.from_dir(DEMO_SAM_DIR, cache_size=0)
    ious = []
    for scene in split_scenes(0, "test", 24):
        for predicted, target in zip(predict_masks(decoder, scene), scene.masks):
            encoded = coco_mask.encode(np.asfortranarray(np.stack([predicted, target], -1).astype(np.uint8)))
            ious.append(coco_mask.iou(encoded[:1], encoded[1:], [0])[0, 0])
    assert len(ious) >= 40 and np.mean(ious) >= 0.8
