"""Coordinate frames: reference rounding, round trips, SAM ResizeLongestSide, clamping, order."""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from star_edge import geometry
from star_edge.errors import InvalidInputError

sizes = st.integers(min_value=1, max_value=5000)
frame_sides = st.integers(min_value=1, max_value=2000)


def reference_to_original(v: float, side: int, frame_side: int) -> int:
    """The StAR / VisionReasoner reference: factor = side / frame_side; int(v * factor + 0.5)."""
    factor = side / frame_side
    return int(v * factor + 0.5)


# --- reasoner frames -> original pixels: the reference rounding on concrete numbers -------------


@pytest.mark.parametrize(
    ("v", "side", "expected"),
    [
        (0, 1000, 0),
        (42, 1000, 50),  # 42 * 1000 / 840 = 50.0
        (839, 500, 499),  # 499.40 -> 499
        (100, 640, 76),  # 76.19 -> 76
        (420, 640, 320),
        (21, 100, 3),  # 2.5 rounds half up
        (840, 1920, 1920),  # the right edge of the input maps to W (clamping is separate)
        (-1, 840, 0),  # int() truncates toward zero: int(-0.5) == 0
        (-2, 840, -1),  # int(-1.5) == -1
        (420, 27, 13),  # factor first: 420 * (27 / 840) = 13.499999999999998 -> 13
    ],
)
def test_input_to_original_uses_reference_rounding(v: int, side: int, expected: int) -> None:
    got = geometry.input_to_original([[v, v]], image_size=(side, side))
    assert got.tolist() == [[expected, expected]]
    assert got.dtype == np.int64
    assert expected == reference_to_original(v, side, 840)


def test_input_to_original_scales_x_by_width_and_y_by_height() -> None:
    box = np.array([420, 420, 840, 210])
    got = geometry.input_to_original(box, image_size=(1000, 500))
    assert got.tolist() == [500, 250, 1000, 125]


def test_input_to_original_honours_other_input_sizes() -> None:
    got = geometry.input_to_original([[112, 56]], image_size=(640, 480), input_size=(224, 112))
    assert got.tolist() == [[320, 240]]


def test_grid1000_to_original_on_concrete_numbers() -> None:
    got = geometry.grid1000_to_original([0, 500, 999, 1000], image_size=(640, 480))
    assert got.tolist() == [0, 240, 639, 480]  # 999 * 0.64 = 639.36; 1000 * 0.48 = 480


def test_reasoner_to_original_dispatches_on_frame() -> None:
    coords = np.array([[100, 200]])
    pixels = geometry.reasoner_to_original(coords, (640, 480), "pixels", (840, 840))
    grid = geometry.reasoner_to_original(coords, (640, 480), geometry.Frame.GRID1000, (840, 840))
    assert pixels.tolist() == geometry.input_to_original(coords, (640, 480)).tolist()
    assert grid.tolist() == geometry.grid1000_to_original(coords, (640, 480)).tolist()


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.integers(-100, 3000), min_size=4, max_size=4),
    width=sizes,
    height=sizes,
    frame_w=frame_sides,
    frame_h=frame_sides,
)
def test_input_to_original_matches_written_out_reference(
    values: list[int], width: int, height: int, frame_w: int, frame_h: int
) -> None:
    got = geometry.input_to_original(values, (width, height), (frame_w, frame_h)).tolist()
    expected = [
        reference_to_original(values[0], width, frame_w),
        reference_to_original(values[1], height, frame_h),
        reference_to_original(values[2], width, frame_w),
        reference_to_original(values[3], height, frame_h),
    ]
    assert got == expected


@settings(max_examples=200, deadline=None)
@given(
    x=st.floats(0, 1, allow_nan=False),
    y=st.floats(0, 1, allow_nan=False),
    width=sizes,
    height=sizes,
    frame_w=frame_sides,
    frame_h=frame_sides,
)
def test_original_to_input_round_trip_lands_within_one_input_step(
    x: float, y: float, width: int, height: int, frame_w: int, frame_h: int
) -> None:
    original = np.array([x * (width - 1), y * (height - 1)])
    there = geometry.original_to_input(original, (width, height), (frame_w, frame_h))
    back = geometry.input_to_original(there, (width, height), (frame_w, frame_h))
    step = np.array([width / frame_w, height / frame_h])
    assert (np.abs(back - original) <= 0.5 * step + 0.5 + 1e-9).all()


@settings(max_examples=200, deadline=None)
@given(x=st.integers(0, 4999), y=st.integers(0, 4999), width=sizes, height=sizes)
def test_original_to_grid1000_round_trip(x: int, y: int, width: int, height: int) -> None:
    original = np.array([x % width, y % height])
    there = geometry.original_to_grid1000(original, (width, height))
    back = geometry.grid1000_to_original(there, (width, height))
    step = np.array([width / 1000, height / 1000])
    assert (np.abs(back - original) <= 0.5 * step + 0.5 + 1e-9).all()


def test_original_to_reasoner_is_the_inverse_mapping() -> None:
    coords = [[500, 250]]
    assert geometry.original_to_reasoner(coords, (1000, 500), "pixels").tolist() == [[420, 420]]
    assert geometry.original_to_reasoner(coords, (1000, 500), "grid1000").tolist() == [[500, 500]]


def test_huge_values_saturate_instead_of_overflowing() -> None:
    got = geometry.input_to_original([1e300, -1e300], image_size=(5000, 5000))
    assert got.tolist() == [2**53, -(2**53)]


def test_values_that_overflow_float64_when_scaled_saturate_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = geometry.input_to_original([1e308, -1e308], image_size=(10000, 10000))
    assert got.tolist() == [2**53, -(2**53)]


@pytest.mark.parametrize("bad", [[np.nan, 1.0], [np.inf, 1.0]])
def test_non_finite_coordinates_are_refused(bad: list[float]) -> None:
    with pytest.raises(InvalidInputError, match="finite"):
        geometry.input_to_original(bad, image_size=(10, 10))


@pytest.mark.parametrize("coords", [5.0, [1.0, 2.0, 3.0], np.zeros((2, 0))])
def test_coordinates_without_xy_pairs_are_refused(coords: object) -> None:
    with pytest.raises(InvalidInputError, match="x, y pairs"):
        geometry.input_to_original(coords, image_size=(10, 10))


@pytest.mark.parametrize("coords", [[["a", "b"]], [[1, 2], [3]], None])
def test_non_numeric_coordinates_are_refused(coords: object) -> None:
    with pytest.raises(InvalidInputError, match="coordinates"):
        geometry.input_to_original(coords, image_size=(10, 10))


def test_sam_long_side_must_be_positive() -> None:
    with pytest.raises(InvalidInputError, match="long_side"):
        geometry.sam_preprocess_shape(10, 10, 0)


@pytest.mark.parametrize("size", [(0, 10), (10, -1), (True, 10), (10.5, 10), (10,), "ab", None])
def test_bad_sizes_are_refused(size: object) -> None:
    with pytest.raises(InvalidInputError, match="image_size"):
        geometry.input_to_original([1, 1], image_size=size)


def test_numpy_integer_sizes_are_accepted() -> None:
    assert geometry.check_size((np.int32(4), np.int64(3))) == (4, 3)


def test_unknown_frame_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="grid1000"):
        geometry.frame_size("normalised")


# --- SAM's ResizeLongestSide ----------------------------------------------------------------------


def sam_reference_shape(oldh: int, oldw: int, long_side: int) -> tuple[int, int]:
    """segment_anything get_preprocess_shape, written out."""
    scale = long_side * 1.0 / max(oldh, oldw)
    return int(oldh * scale + 0.5), int(oldw * scale + 0.5)


@pytest.fixture(scope="module")
def resize_longest_side() -> type:
    """segment_anything's ResizeLongestSide class, loaded without the package (no torchvision).

    Only utils/transforms.py is executed, as a standalone module; its torchvision import is
    satisfied by a stub when torchvision is absent. Skips without torch or segment_anything.
    """
    pytest.importorskip("torch")
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or spec.origin is None:
        pytest.skip("segment_anything is not installed")
    path = Path(spec.origin).parent / "utils" / "transforms.py"
    with pytest.MonkeyPatch.context() as patch:
        if importlib.util.find_spec("torchvision") is None:
            functional = types.ModuleType("torchvision.transforms.functional")
            functional.resize = functional.to_pil_image = None
            patch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
            patch.setitem(sys.modules, "torchvision.transforms",
                          types.ModuleType("torchvision.transforms"))
            patch.setitem(sys.modules, "torchvision.transforms.functional", functional)
        module_spec = importlib.util.spec_from_file_location("_sam_transforms_under_test", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    return module.ResizeLongestSide


@pytest.mark.parametrize(
    ("height", "width", "long_side", "expected"),
    [(480, 640, 1024, (768, 1024)), (1000, 333, 1024, (1024, 341)), (7, 3, 256, (256, 110))],
)
def test_sam_preprocess_shape_on_concrete_numbers(
    height: int, width: int, long_side: int, expected: tuple[int, int]
) -> None:
    assert geometry.sam_preprocess_shape(height, width, long_side) == expected


@settings(max_examples=200, deadline=None)
@given(height=sizes, width=sizes, long_side=st.sampled_from([256, 1024]))
def test_sam_preprocess_shape_matches_formula(height: int, width: int, long_side: int) -> None:
    # segment_anything's formula, except that no side rounds down to 0 (it fails on such images)
    expected = tuple(max(1, side) for side in sam_reference_shape(height, width, long_side))
    assert geometry.sam_preprocess_shape(height, width, long_side) == expected


def test_a_very_thin_image_keeps_one_row() -> None:
    assert sam_reference_shape(1, 2049, 1024) == (0, 1024)
    assert geometry.sam_preprocess_shape(1, 2049, 1024) == (1, 1024)
    assert geometry.sam_preprocess_shape(3000, 1, 256) == (256, 1)


@settings(max_examples=100, deadline=None)
@given(
    height=sizes,
    width=sizes,
    long_side=st.sampled_from([256, 1024]),
    data=st.data(),
)
def test_original_to_sam_matches_segment_anything(
    resize_longest_side: type, height: int, width: int, long_side: int, data: st.DataObject
) -> None:
    transform = resize_longest_side(long_side)
    coordinate = st.floats(-10.0, 6000.0, allow_nan=False)
    points = np.array(data.draw(st.lists(coordinate, min_size=6, max_size=6))).reshape(3, 2)
    boxes = np.array(data.draw(st.lists(coordinate, min_size=8, max_size=8))).reshape(2, 4)
    expected_shape = tuple(max(1, side) for side in transform.get_preprocess_shape(height, width, long_side))
    assert geometry.sam_preprocess_shape(height, width, long_side) == expected_shape
    expected_points = transform.apply_coords(points, (height, width))
    expected_boxes = transform.apply_boxes(boxes, (height, width))
    np.testing.assert_array_equal(geometry.original_to_sam(points, (width, height), long_side),
                                  expected_points)
    np.testing.assert_array_equal(geometry.original_to_sam(boxes, (width, height), long_side),
                                  expected_boxes)


def test_original_to_sam_on_concrete_numbers() -> None:
    got = geometry.original_to_sam([[10, 20, 30, 40]], image_size=(640, 480), long_side=1024)
    assert got.dtype == np.float64
    assert got.tolist() == [[16.0, 32.0, 48.0, 64.0]]


# --- clamping and ordering ------------------------------------------------------------------------


def test_clamp_boxes_keeps_dtype_and_clamps_each_axis() -> None:
    boxes = np.array([[-5, -1, 700, 500], [10, 20, 30, 40]], dtype=np.int64)
    got = geometry.clamp_boxes(boxes, image_size=(640, 480))
    assert got.dtype == np.int64
    assert got.tolist() == [[0, 0, 639, 479], [10, 20, 30, 40]]


def test_clamp_points_on_floats() -> None:
    got = geometry.clamp_points(np.array([[-0.5, 480.2], [3.25, 4.75]]), image_size=(640, 480))
    assert got.dtype == np.float64
    assert got.tolist() == [[0.0, 479.0], [3.25, 4.75]]


def test_clamp_refuses_wrong_widths() -> None:
    with pytest.raises(InvalidInputError, match=r"\(\.\.\., 4\)"):
        geometry.clamp_boxes([[1, 2]], (10, 10))
    with pytest.raises(InvalidInputError, match=r"\(\.\.\., 2\)"):
        geometry.clamp_points([[1, 2, 3, 4]], (10, 10))


def test_order_box_corners_swaps_only_reversed_axes() -> None:
    boxes = np.array([[30, 5, 10, 40], [1, 9, 2, 3], [1, 2, 3, 4]])
    expected = [[10, 5, 30, 40], [1, 3, 2, 9], [1, 2, 3, 4]]
    assert geometry.order_box_corners(boxes).tolist() == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-50, 50), min_size=4, max_size=4))
def test_order_box_corners_orders_and_keeps_the_corner_values(box: list[int]) -> None:
    x1, y1, x2, y2 = geometry.order_box_corners(box).tolist()
    assert x1 <= x2 and y1 <= y2
    assert sorted([x1, x2]) == sorted(box[0::2]) and sorted([y1, y2]) == sorted(box[1::2])
