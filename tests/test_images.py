"""Image and query validation: odd but valid images convert, bad ones raise InvalidInputError."""

from __future__ import annotations

import io
import sys
import threading
import warnings

import numpy as np
import pytest
from PIL import Image, ImageOps

from star_edge.errors import InvalidInputError
from star_edge.images import MAX_ASPECT_RATIO, load_image, validate_query


@pytest.fixture()
def rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)


def _saved(tmp_path, image: Image.Image, name: str, **kwargs) -> str:
    path = tmp_path / name
    image.save(path, **kwargs)
    return str(path)


def test_rgb_array_passes_through_unchanged(rgb):
    out = load_image(rgb)
    assert out.dtype == np.uint8 and out.shape == (37, 53, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb)


def test_non_contiguous_array_is_made_contiguous(rgb):
    out = load_image(rgb[:, ::2])
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb[:, ::2])


@pytest.mark.parametrize("layout", ["2d", "hw1", "rgba"])
def test_grayscale_and_rgba_arrays_become_rgb(rgb, layout):
    gray = rgb[:, :, 0]
    source = {"2d": gray, "hw1": gray[:, :, None], "rgba": np.dstack([rgb, rgb[:, :, :1]])}[layout]
    out = load_image(source)
    expected = rgb if layout == "rgba" else np.repeat(gray[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(out, expected)


def test_uint16_array_keeps_the_high_byte(rgb):
    wide = rgb.astype(np.uint16) * 257
    np.testing.assert_array_equal(load_image(wide), rgb)


def test_png_round_trip(tmp_path, rgb):
    np.testing.assert_array_equal(load_image(_saved(tmp_path, Image.fromarray(rgb), "a.png")), rgb)


def test_pil_modes_convert_like_pil(tmp_path, rgb):
    base = Image.fromarray(rgb)
    for mode in ("L", "LA", "RGBA", "CMYK", "P"):
        converted = base.convert(mode)
        out = load_image(converted)
        np.testing.assert_array_equal(out, np.asarray(converted.convert("RGB")))


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 64 * 8).astype(np.uint16).reshape(8, 64)
    path = _saved(tmp_path, Image.fromarray(values), "wide.png")
    out = load_image(path)
    np.testing.assert_array_equal(out[:, :, 0], (values >> 8).astype(np.uint8))


def test_32_bit_integer_images_load_as_16_bit_unless_their_depth_is_ambiguous(tmp_path):
    values = np.linspace(0, 65535, 64 * 8).astype(np.int32).reshape(8, 64)
    path = _saved(tmp_path, Image.fromarray(values), "i32.tif")
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(load_image(path)[:, :, 0], (values >> 8).astype(np.uint8))
    eight_bit = Image.fromarray(np.full((8, 8), 200, np.uint8)).convert("I")
    for ambiguous in (eight_bit, np.asarray(eight_bit)):
        with pytest.raises(InvalidInputError, match=r"32-bit integer .* values 0-255 only: its bit depth is ambiguous"):
            load_image(ambiguous)


def test_16_bit_images_holding_8_bit_values_are_refused_not_read_as_black(tmp_path, rgb):
    eight_bit = rgb.astype(np.uint16)  # values 0-255 in a 16-bit container: >> 8 would give all zeros
    path = _saved(tmp_path, Image.fromarray(eight_bit[:, :, 0]), "narrow16.png")
    assert Image.open(path).mode.startswith("I;16")
    for ambiguous in (eight_bit, Image.fromarray(eight_bit[:, :, 0]), path):
        with pytest.raises(InvalidInputError, match=r"16-bit .* values 0-255 only: its bit depth is ambiguous"):
            load_image(ambiguous)
    eight_bit[0, 0, 0] = 256  # one value past 8 bits: a (dark) 16-bit image
    assert load_image(eight_bit)[0, 0, 0] == 1


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_array_subclasses_load_as_plain_arrays_and_masked_arrays_are_refused(rgb):
    gray = rgb[:, :, 0]
    np.testing.assert_array_equal(load_image(np.asmatrix(gray)), np.repeat(gray[:, :, None], 3, axis=2))
    with pytest.raises(InvalidInputError, match="masked image arrays are not supported"):
        load_image(np.ma.masked_less(rgb, 10))


def test_corrupt_exif_loads_without_warnings(tmp_path, rgb):
    path = _saved(tmp_path, Image.fromarray(rgb), "bad_exif.jpg",
                  exif=b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\xff\xff\x01\x12")
    with pytest.warns(UserWarning, match="Corrupt EXIF"):
        expected = np.asarray(Image.open(path).convert("RGB"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(load_image(path), expected)


def test_aspect_ratio_beyond_the_limit_is_refused(tmp_path):
    assert load_image(np.zeros((2, 2 * MAX_ASPECT_RATIO, 3), np.uint8)).shape == (2, 400, 3)
    too_long = Image.new("RGB", (2 * MAX_ASPECT_RATIO + 1, 2))
    for bad in (np.asarray(too_long), too_long, _saved(tmp_path, too_long, "strip.png")):
        with pytest.raises(InvalidInputError, match="401x2; the long side may be at most 200 times"):
            load_image(bad)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_the_image_as_pil_does(tmp_path, rgb, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _saved(tmp_path, Image.fromarray(rgb), "oriented.png", exif=exif)
    with Image.open(path) as opened:
        expected = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
    np.testing.assert_array_equal(load_image(path), expected)
    np.testing.assert_array_equal(load_image(Image.open(path)), expected)


def test_exif_that_pil_cannot_rewrite_still_gives_its_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "camera"
    # the Make tag (ASCII) renumbered as ColorMap: ImageOps.exif_transpose fails rewriting it (struct.error)
    raw = exif.tobytes().replace(b"\x01\x0f\x00\x02", b"\x01\x40\x00\x02")
    path = _saved(tmp_path, Image.new("RGB", (8, 12)), "odd_exif.jpg", exif=raw)
    assert load_image(path).shape == (8, 12, 3)


def test_a_pil_image_closed_before_loading_is_named(tmp_path, rgb):
    with Image.open(_saved(tmp_path, Image.fromarray(rgb), "closed.png")) as opened:
        pass
    with pytest.raises(InvalidInputError, match="closed before its pixels were loaded"):
        load_image(opened)


def test_an_array_is_copied_so_refilling_it_leaves_the_loaded_image(rgb):
    frame = rgb.copy()
    loaded = load_image(frame)
    frame[:] = 7
    np.testing.assert_array_equal(loaded, rgb)


def test_loading_from_threads_leaves_the_warning_filters_as_they_were(tmp_path, rgb):
    path = _saved(tmp_path, Image.fromarray(rgb), "shared.png")
    before = list(warnings.filters)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, inside catch_warnings too
    try:
        threads = [threading.Thread(target=lambda: [load_image(path) for _ in range(150)]) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert warnings.filters == before


def test_exif_orientation_is_applied(tmp_path, rgb):
    image = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    out = load_image(str(path))
    assert out.shape == (53, 37, 3)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((0, 10, 3), np.uint8), "both sides"),
        (np.zeros((10, 10, 2), np.uint8), "shape"),
        (np.zeros((4, 10, 10, 3), np.uint8), "shape"),
        (np.full((10, 10, 3), np.nan, np.float32), "uint8"),
        (np.zeros((10, 10, 3), np.float64), "uint8"),
        (np.zeros((10, 10, 3), bool), "uint8"),
        (12, "path, a PIL image or a numpy array"),
        (None, "path, a PIL image or a numpy array"),
    ],
)
def test_bad_arrays_and_types(bad, message):
    with pytest.raises(InvalidInputError, match=message):
        load_image(bad)


def test_bad_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buffer, format="PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[:60])
    cases = {
        tmp_path / "missing.jpg": "not found",
        tmp_path: "directory",
        tmp_path / "empty.jpg": "empty",
        tmp_path / "text.png": "not an image",
        tmp_path / "cut.png": "corrupt or truncated",
    }
    for path, message in cases.items():
        with pytest.raises(InvalidInputError, match=message):
            load_image(path)


def test_oversized_image_is_refused_before_decoding(tmp_path):
    path = _saved(tmp_path, Image.new("L", (400, 300)), "big.png")
    with pytest.raises(InvalidInputError, match="120000 pixels; the limit is 100000"):
        load_image(path, max_pixels=100_000)


def test_query_validation():
    assert validate_query("  the red cup \n") == "the red cup"
    assert validate_query("the red\u200bcup") == "the red\u200bcup"
    for bad, message in [("", "empty"), ("   ", "empty"), ("a\x00b", "NUL"), ("x" * 2001, "limit"),
                         (None, "string"), (b"cup", "string"), ("\u200b", "no visible characters")]:
        with pytest.raises(InvalidInputError, match=message):
            validate_query(bad)
