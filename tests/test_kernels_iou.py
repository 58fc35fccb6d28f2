"""Bit-packed masks and pairwise IoU vs the numpy reference and pycocotools.mask.iou."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools import mask as coco_mask

from star_edge.errors import InvalidInputError
from star_edge.kernels import PackedMasks, pack_masks, pairwise_iou, unpack_masks
from star_edge.kernels.reference import pairwise_iou_reference


def random_masks(rng: np.random.Generator, m: int, h: int, w: int) -> np.ndarray:
    """(m, h, w) bool masks of varied density, with an empty and a full one when m >= 3."""
    masks = rng.random((m, h, w)) < rng.random((m, 1, 1))
    if m >= 3:
        masks[0] = False
        masks[1] = True
    return masks


def coco_iou(masks_a: np.ndarray, masks_b: np.ndarray) -> np.ndarray:
    def encode(masks):
        return coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))

    return np.asarray(coco_mask.iou(encode(masks_a), encode(masks_b), [0] * len(masks_b)), dtype=np.float64)


@pytest.mark.parametrize("shape", [(4, 1, 1), (5, 7, 9), (3, 8, 8), (6, 33, 31), (2, 64, 65), (7, 120, 90)])
def test_pack_unpack_round_trip_and_areas(shape):
    masks = random_masks(np.random.default_rng(1), *shape)
    packed = pack_masks(masks)
    m, h, w = shape
    assert packed.bits.dtype == np.uint64 and packed.bits.shape == (m, -(-h * w // 64))
    assert packed.areas.dtype == np.int64
    assert packed.shape == (h, w) and len(packed) == m
    np.testing.assert_array_equal(packed.areas, masks.reshape(m, -1).sum(axis=1))
    np.testing.assert_array_equal(unpack_masks(packed), masks)


def test_padding_bits_are_zero():
    packed = pack_masks(np.ones((2, 3, 5), dtype=bool))
    assert packed.bits.shape == (2, 1)
    assert packed.bits[0, 0] == (1 << 15) - 1


def test_pack_accepts_non_contiguous_masks():
    masks = random_masks(np.random.default_rng(2), 4, 20, 30)
    view = masks.transpose(0, 2, 1)
    np.testing.assert_array_equal(unpack_masks(pack_masks(view)), view)


@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 7, 9), (9, 16, 4), (8, 33, 31), (6, 100, 75)])
def test_symmetric_iou_matches_reference_and_pycocotools(shape):
    masks = random_masks(np.random.default_rng(3), *shape)
    iou = pairwise_iou(pack_masks(masks))
    assert iou.dtype == np.float64 and iou.shape == (shape[0], shape[0])
    np.testing.assert_allclose(iou, pairwise_iou_reference(masks), rtol=0, atol=1e-12)
    off_diagonal = ~np.eye(shape[0], dtype=bool)
    np.testing.assert_allclose(iou[off_diagonal], coco_iou(masks, masks)[off_diagonal], rtol=0, atol=1e-12)


def test_symmetric_iou_is_exactly_symmetric_with_unit_diagonal_for_non_empty():
    masks = random_masks(np.random.default_rng(4), 11, 40, 50)
    iou = pairwise_iou(pack_masks(masks))
    np.testing.assert_array_equal(iou, iou.T)
    non_empty = masks.any(axis=(1, 2))
    np.testing.assert_array_equal(np.diag(iou), np.where(non_empty, 1.0, 0.0))


def test_cross_iou_matches_reference_and_pycocotools():
    rng = np.random.default_rng(5)
    masks_a = random_masks(rng, 6, 45, 37)
    masks_b = random_masks(rng, 4, 45, 37)
    iou = pairwise_iou(pack_masks(masks_a), pack_masks(masks_b))
    assert iou.shape == (6, 4)
    np.testing.assert_allclose(iou, pairwise_iou_reference(masks_a, masks_b), rtol=0, atol=1e-12)
    np.testing.assert_allclose(iou, coco_iou(masks_a, masks_b), rtol=0, atol=1e-12)


def test_cross_iou_with_itself_equals_symmetric():
    packed = pack_masks(random_masks(np.random.default_rng(6), 9, 30, 30))
    np.testing.assert_array_equal(pairwise_iou(packed, packed)[~np.eye(9, dtype=bool)],
                                  pairwise_iou(packed)[~np.eye(9, dtype=bool)])


def test_empty_masks_have_iou_zero():
    packed = pack_masks(np.zeros((3, 10, 10), dtype=bool))
    np.testing.assert_array_equal(pairwise_iou(packed), np.zeros((3, 3)))
    np.testing.assert_array_equal(pairwise_iou(packed, packed), np.zeros((3, 3)))


def test_exact_fractions():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, :4] = True
    masks[1, 2:6] = True
    assert pairwise_iou(pack_masks(masks))[0, 1] == 16 / 48


def test_no_masks():
    packed = pack_masks(np.zeros((0, 12, 7), dtype=bool))
    assert packed.bits.shape == (0, 2)
    assert pairwise_iou(packed).shape == (0, 0)
    assert pairwise_iou(packed, pack_masks(np.ones((3, 12, 7), dtype=bool))).shape == (0, 3)


def test_zero_sized_masks():
    packed = pack_masks(np.zeros((2, 0, 5), dtype=bool))
    assert packed.bits.shape == (2, 0)
    np.testing.assert_array_equal(pairwise_iou(packed), np.zeros((2, 2)))


@pytest.mark.parametrize(
    "masks, message",
    [
        (np.zeros((4, 4), dtype=bool), "(M, H, W)"),
        (np.zeros((1, 2, 4, 4), dtype=bool), "(M, H, W)"),
        (np.zeros((2, 4, 4), dtype=np.uint8), "dtype bool"),
        (np.zeros((2, 4, 4), dtype=np.float32), "dtype bool"),
    ],
)
def test_pack_rejects_bad_masks(masks, message):
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pack_masks(masks)


def test_pairwise_iou_rejects_mismatched_shapes_and_raw_arrays():
    with pytest.raises(InvalidInputError, match="shapes differ"):
        pairwise_iou(pack_masks(np.zeros((1, 4, 4), dtype=bool)), pack_masks(np.zeros((1, 4, 5), dtype=bool)))
    with pytest.raises(InvalidInputError, match="PackedMasks"):
        pairwise_iou(np.zeros((1, 4, 4), dtype=bool))
    packed = pack_masks(np.zeros((2, 4, 4), dtype=bool))
    with pytest.raises(InvalidInputError, match="uint64"):
        pairwise_iou(PackedMasks(bits=packed.bits.astype(np.int64), areas=packed.areas, shape=(4, 4)))
    with pytest.raises(InvalidInputError, match="areas"):
        pairwise_iou(packed, PackedMasks(bits=packed.bits, areas=packed.areas[:1], shape=(4, 4)))


def test_packed_masks_is_frozen():
    packed = pack_masks(np.zeros((1, 2, 2), dtype=bool))
    assert isinstance(packed, PackedMasks)
    with pytest.raises(AttributeError):
        packed.shape = (1, 1)


@st.composite
def mask_stacks(draw):
    h = draw(st.integers(0, 40))
    w = draw(st.integers(0, 40))
    m = draw(st.integers(0, 6))
    return draw(arrays(np.bool_, (m, h, w)))


@settings(max_examples=300, deadline=None)
@given(mask_stacks(), st.booleans())
def test_pairwise_iou_property(masks, cross):
    packed = pack_masks(masks)
    np.testing.assert_array_equal(unpack_masks(packed), masks)
    if cross:
        iou = pairwise_iou(packed, packed)
    else:
        iou = pairwise_iou(packed)
    expected = pairwise_iou_reference(masks)
    np.testing.assert_allclose(iou, expected, rtol=0, atol=1e-12)
    assert ((iou >= 0) & (iou <= 1)).all()


def test_threads_share_the_parallel_kernels_under_numba_workqueue_layer():
    """Numba's workqueue layer (its fallback without OpenMP or TBB) aborts the process when two
    threads run parallel kernels at once; pairwise_iou must be safe to call from several threads."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import threading
        import numpy as np
        import numba
        from star_edge.kernels.iou import pack_masks, pairwise_iou

        masks = np.random.default_rng(0).random((24, 64, 64)) < 0.5
        packed = pack_masks(masks)
        expected = pairwise_iou(packed)

        def work():
            for _ in range(200):
                assert np.array_equal(pairwise_iou(packed), expected)
                pairwise_iou(packed, packed)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(numba.threading_layer())
    """)
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue", "NUMBA_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "workqueue"
