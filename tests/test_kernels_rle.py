"""COCO RLE kernels vs pycocotools.mask (byte-identical counts) and the numpy reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools import mask as coco_mask

from star_edge.errors import InvalidInputError
from star_edge.kernels import rle_area, rle_decode, rle_encode
from star_edge.kernels.reference import rle_decode_reference, rle_encode_reference


def coco_encode(masks: np.ndarray) -> list[dict]:
    """pycocotools RLEs of masks (M, H, W) bool."""
    return coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def assert_matches_pycocotools(masks: np.ndarray) -> None:
    ours = rle_encode(masks)
    theirs = coco_encode(masks)
    assert [rle["size"] for rle in ours] == [list(rle["size"]) for rle in theirs]
    assert [rle["counts"] for rle in ours] == [rle["counts"].decode("ascii") for rle in theirs]
    assert ours == rle_encode_reference(masks)
    np.testing.assert_array_equal(rle_decode(ours), masks)
    np.testing.assert_array_equal(rle_decode(theirs), masks)
    np.testing.assert_array_equal(rle_area(ours), coco_mask.area(theirs))


def stripes(h: int, w: int, period: int) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) // period) % 2 == 1


@pytest.mark.parametrize("shape", [(3, 1, 1), (4, 5, 7), (2, 64, 64), (3, 33, 17), (2, 1, 300), (2, 300, 1)])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.5, 0.99, 1.0])
def test_encode_matches_pycocotools_on_random_masks(shape, density):
    assert_matches_pycocotools(np.random.default_rng(7).random(shape) < density)


@pytest.mark.parametrize("h, w", [(1, 1), (2, 3), (17, 13), (480, 640)])
def test_empty_full_and_single_pixel_masks(h, w):
    masks = np.zeros((4, h, w), dtype=bool)
    masks[1] = True
    masks[2, 0, 0] = True
    masks[3, h - 1, w - 1] = True
    assert_matches_pycocotools(masks)


def test_many_runs_and_long_runs():
    checker = (np.add.outer(np.arange(99), np.arange(101)) % 2).astype(bool)
    masks = np.stack([checker, ~checker, stripes(99, 101, 1), stripes(99, 101, 37), np.zeros((99, 101), bool)])
    masks[4, 50:, 60:] = True
    assert_matches_pycocotools(masks)


def test_counts_needing_many_characters():
    masks = np.zeros((3, 2000, 1500), dtype=bool)
    masks[0, 1999, 1499] = True
    masks[1, :1000, :700] = True
    masks[2, 5, 3] = True
    masks[2, 1500:, 1400:] = True
    assert_matches_pycocotools(masks)


def test_encode_single_mask_and_non_contiguous_input():
    mask = np.random.default_rng(8).random((30, 40)) < 0.3
    assert rle_encode(mask) == rle_encode(mask[None])
    view = np.random.default_rng(9).random((3, 20, 25)) < 0.5
    assert rle_encode(view.transpose(0, 2, 1)) == rle_encode(np.ascontiguousarray(view.transpose(0, 2, 1)))


def test_counts_are_str_and_json_ready():
    rle = rle_encode(np.ones((1, 3, 3), dtype=bool))[0]
    assert rle == {"size": [3, 3], "counts": "09"}
    assert isinstance(rle["counts"], str)


def test_decode_accepts_bytes_a_single_dict_and_an_empty_list():
    masks = np.random.default_rng(10).random((2, 9, 11)) < 0.4
    as_bytes = [{"size": rle["size"], "counts": rle["counts"].encode()} for rle in rle_encode(masks)]
    np.testing.assert_array_equal(rle_decode(as_bytes), masks)
    np.testing.assert_array_equal(rle_decode(as_bytes[1]), masks[1:])
    assert rle_decode([]).shape == (0, 0, 0)
    assert rle_area([]).shape == (0,)


def test_area_of_rles_of_different_sizes():
    rles = rle_encode(np.ones((1, 4, 5), dtype=bool)) + rle_encode(np.ones((1, 2, 2), dtype=bool))
    np.testing.assert_array_equal(rle_area(rles), [20, 4])


def test_zero_sized_masks():
    masks = np.zeros((2, 0, 4), dtype=bool)
    rles = rle_encode(masks)
    assert rles == [{"size": [0, 4], "counts": "0"}] * 2
    assert rle_decode(rles).shape == (2, 0, 4)


@pytest.mark.parametrize(
    "masks, message",
    [
        (np.zeros(5, dtype=bool), r"\(M, H, W\)"),
        (np.zeros((2, 3, 4), dtype=np.uint8), "dtype bool"),
    ],
)
def test_encode_rejects_bad_masks(masks, message):
    with pytest.raises(InvalidInputError, match=message):
        rle_encode(masks)


@pytest.mark.parametrize(
    "rles, message",
    [
        ([{"size": [2, 2], "counts": "05"}], "do not add up"),
        ([{"size": [2, 2], "counts": "0~"}], "outside"),
        ([{"size": [2, 2], "counts": "0R"}], "truncated"),
        ([{"size": [2, 2], "counts": "0N"}], "negative"),
        ([{"size": [2, 2], "counts": "o" * 14}], "63 bits"),
        # 13 characters whose last sets bit 63 but not the sign bit above it: a 65-bit count
        ([{"size": [2, 2], "counts": "o" * 12 + "8"}], "63 bits"),
        # runs 2**63 - 1, 2**63 - 1, 6: their int64 sum wraps round to exactly H*W = 4
        ([{"size": [2, 2], "counts": "o" * 12 + "7" + "o" * 12 + "76"}], "do not add up"),
        ([{"size": [2**32, 2**32], "counts": "0"}], "more than 2\\*\\*63 - 1 pixels"),
        ([{"size": [2, 2], "counts": 4}], "str or bytes"),
        ([{"size": [2, 2], "counts": "0é"}], "non-ASCII"),
        ([{"size": [2], "counts": "4"}], r"\[H, W\]"),
        ([{"size": [2, -2], "counts": "4"}], r"\[H, W\]"),
        ([{"counts": "4"}], "'size' and 'counts'"),
        ([{"size": [2, 2], "counts": "4"}, {"size": [1, 4], "counts": "4"}], "has size"),
        ("04", "sequence"),
    ],
)
def test_decode_rejects_corrupt_rles(rles, message):
    with pytest.raises(InvalidInputError, match=message):
        rle_decode(rles)


def test_area_rejects_runs_past_the_mask():
    with pytest.raises(InvalidInputError, match="do not add up"):
        rle_area({"size": [2, 2], "counts": "o" * 12 + "7" + "o" * 12 + "76"})


def test_bool_masks_with_bytes_other_than_one_encode_as_their_truth_values():
    raw = np.array([[[0, 2], [1, 1]], [[3, 0], [0, 255]]], dtype=np.uint8)
    masks = raw.view(np.bool_)
    truth = raw != 0
    assert rle_encode(masks) == rle_encode(truth)
    assert_matches_pycocotools(truth)


@st.composite
def mask_stacks(draw):
    h = draw(st.integers(1, 48))
    w = draw(st.integers(1, 48))
    m = draw(st.integers(1, 4))
    return draw(arrays(np.bool_, (m, h, w)))


@settings(max_examples=300, deadline=None)
@given(mask_stacks())
def test_rle_property_matches_pycocotools_and_round_trips(masks):
    ours = rle_encode(masks)
    assert [rle["counts"] for rle in ours] == [rle["counts"].decode("ascii") for rle in coco_encode(masks)]
    np.testing.assert_array_equal(rle_decode(ours), masks)
    np.testing.assert_array_equal(rle_decode_reference(ours), masks)
    np.testing.assert_array_equal(rle_area(ours), masks.sum(axis=(1, 2)))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.lists(st.integers(0, 40), min_size=1, max_size=30))
def test_rle_property_structured_runs(h, w, run_lengths):
    """Long runs crossing column boundaries, built from explicit run lengths."""
    values = np.repeat(np.arange(len(run_lengths)) % 2 == 1, run_lengths)
    column_major = np.resize(values, h * w) if values.size else np.zeros(h * w, dtype=bool)
    mask = column_major.reshape(w, h).T[None]
    assert_matches_pycocotools(np.ascontiguousarray(mask))
