"""Loading and validating the caller's inputs: images (path, PIL image or numpy array) and queries.

Every image leaves this module as an (H, W, 3) uint8 C-contiguous RGB array; anything that cannot
become one raises InvalidInputError naming what was wrong.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from star_edge.errors import InvalidInputError

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]

MAX_PIXELS = 64_000_000
"""Largest accepted image (W * H). Larger files are refused before they are decoded."""

MIN_SIDE = 2
"""Smallest accepted width and height in pixels."""

MAX_ASPECT_RATIO = 200
"""Largest accepted long side / short side (Qwen-VL's image processors refuse more; SAM would
shrink the short side to nothing)."""

MAX_QUERY_CHARS = 2000
"""Longest accepted query, in characters after stripping surrounding whitespace."""

READABLE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "TGA", "ICO", "JPEG2000", "QOI")
"""The PIL formats read from files (those this Pillow build registers). Others are refused unopened:
some PIL plugins hand the file to an outside program (EPS runs Ghostscript)."""

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}

_EXIF_ORIENTATION = 0x0112
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
"""EXIF orientation -> the transpose that shows the image upright (1: as stored)."""

_PIL_WARNINGS = threading.Lock()


def load_image(image: ImageInput, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Turn a path, PIL image or numpy array into an RGB array.

    Grayscale, RGBA, LA, palette, CMYK and 16-bit images are converted; EXIF orientation is
    applied; alpha is dropped.

    Args:
        image: a file path (a format of READABLE_FORMATS), a PIL image, or a numpy array: (H, W, 3)
            uint8 RGB, (H, W, 4) uint8 RGBA, (H, W) or (H, W, 1) uint8 grayscale, or the same
            layouts in uint16.
        max_pixels: refuse images with more than this many pixels (decompression bombs).

    Returns:
        (H, W, 3) uint8 C-contiguous RGB array of its own (never a view of the caller's array).
    """
    if isinstance(image, np.ma.MaskedArray):
        raise InvalidInputError("masked image arrays are not supported (the mask would be ignored); "
                                "pass image.filled(0) or a plain array")
    if isinstance(image, np.ndarray):
        return _from_array(np.asarray(image), max_pixels)  # np.matrix and other subclasses: a plain view
    if isinstance(image, Image.Image):
        _check_size(image.size, max_pixels, "image")
        try:
            return _from_pil(image)
        except InvalidInputError:
            raise
        except AssertionError:  # PIL asserts it has pixels: a lazily opened image closed before loading
            raise InvalidInputError("cannot read the PIL image: it was closed before its pixels were loaded "
                                    "(call .load() before closing it, or pass the file path)") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise InvalidInputError(f"cannot read the PIL image (mode {image.mode!r}): {exc}") from None
    if isinstance(image, (str, os.PathLike)):
        return _from_path(Path(image), max_pixels)
    raise InvalidInputError(
        f"image must be a path, a PIL image or a numpy array, got {type(image).__name__}"
    )


def validate_query(query: object, max_chars: int = MAX_QUERY_CHARS) -> str:
    """Return the query stripped of surrounding whitespace, or raise InvalidInputError."""
    if not isinstance(query, str):
        raise InvalidInputError(f"query must be a string, got {type(query).__name__}")
    if "\x00" in query:
        raise InvalidInputError("query contains a NUL character")
    try:
        query.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a bad decode upstream
        raise InvalidInputError(f"query is not valid Unicode text: {exc.reason} at {exc.start}") from None
    stripped = query.strip()
    if not any(char.isprintable() and not char.isspace() for char in stripped):  # zero-width spaces too
        raise InvalidInputError("query is empty" if not stripped else "query has no visible characters")
    if len(stripped) > max_chars:
        raise InvalidInputError(f"query is {len(stripped)} characters long; the limit is {max_chars}")
    return stripped


def _from_path(path: Path, max_pixels: int) -> np.ndarray:
    _check_file(path)
    try:
        with _pil_warnings_handled():
            opened = Image.open(path, formats=_registered(READABLE_FORMATS))
        with opened:
            _check_size(opened.size, max_pixels, str(path))
            opened.load()
            return _from_pil(opened)
    except InvalidInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInputError(f"image is too large to decode safely: {path} ({exc})") from None
    except UnidentifiedImageError:
        formats = ", ".join(_registered(READABLE_FORMATS))
        raise InvalidInputError(f"not an image file, or not one of {formats}: {path}") from None
    except PermissionError:
        raise InvalidInputError(f"image file is not readable: {path}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidInputError(f"corrupt or truncated image file {path}: {exc}") from None


def _check_file(path: Path) -> None:
    """Raise InvalidInputError unless `path` is an existing, non-empty file (not a directory)."""
    try:
        if not path.exists():
            raise InvalidInputError(f"image file not found: {path}")
        if path.is_dir():
            raise InvalidInputError(f"image path is a directory, not a file: {path}")
        if path.stat().st_size == 0:
            raise InvalidInputError(f"image file is empty: {path}")
    except OSError as exc:  # e.g. a name too long, a folder on the way that cannot be searched
        raise InvalidInputError(f"cannot access image file {path}: {exc.strerror or exc}") from None


def _registered(formats: tuple[str, ...]) -> tuple[str, ...]:
    """The formats among `formats` that this Pillow build can open."""
    Image.init()
    return tuple(name for name in formats if name in Image.OPEN)


def _check_size(size: tuple[int, int], max_pixels: int | None, what: str) -> None:
    width, height = size
    if width < MIN_SIDE or height < MIN_SIDE:
        raise InvalidInputError(f"{what} is {width}x{height}; both sides must be >= {MIN_SIDE} pixels")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InvalidInputError(f"{what} is {width}x{height}; the long side may be at most {MAX_ASPECT_RATIO} "
                                "times the short side")
    if max_pixels is not None and width * height > max_pixels:
        raise InvalidInputError(
            f"{what} is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )


@contextmanager
def _pil_warnings_handled() -> Iterator[None]:
    """While PIL reads a header or EXIF: its decompression-bomb warning raised as an error, its
    corrupt-EXIF UserWarning silenced. `warnings.catch_warnings` swaps process-wide state, so
    threads take turns here (these are short reads; pixels are decoded outside)."""
    with _PIL_WARNINGS, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _upright(image: Image.Image) -> Image.Image:
    """`image` turned as its EXIF orientation says; as stored when it has none, or EXIF that PIL
    cannot parse (PIL's own exif_transpose raises on some malformed tags while rewriting them)."""
    try:
        with _pil_warnings_handled():
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - any parse failure of a corrupt EXIF block: keep the stored orientation
        return image
    method = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    return image if method is None else image.transpose(method)


def _from_pil(image: Image.Image) -> np.ndarray:
    image = _upright(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        return _from_array(np.asarray(image), max_pixels=None)
    if image.mode == "F":
        raise InvalidInputError("floating-point images (PIL mode 'F') are not supported; save as 8-bit")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def _from_array(array: np.ndarray, max_pixels: int | None) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise InvalidInputError(
            f"image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {array.shape}"
        )
    height, width = array.shape[:2]
    _check_size((width, height), max_pixels, "image array" if max_pixels is not None else "image")
    rgb = array[:, :, :3]
    if not rgb.dtype.isnative:  # big-endian 16-bit samples (PIL mode 'I;16B', TIFF files)
        rgb = rgb.astype(rgb.dtype.newbyteorder("="))
    if rgb.dtype == np.uint8:
        out = np.ascontiguousarray(rgb)
        # a copy, never a view of the caller's array: a camera loop that refills its buffer must not
        # change the image a Result holds
        return out.copy() if np.may_share_memory(out, array) else out
    if rgb.dtype in (np.uint16, np.int32):  # int32: PIL's 'I' mode (32-bit TIFF, Image.convert("I"))
        if rgb.min() < 0 or rgb.max() > 65535:
            raise InvalidInputError("16-bit image values must lie in [0, 65535]")
        if rgb.max() <= 255:  # 8-bit values in a wider type: read as 16-bit they would be all but black
            kind = "16-bit (uint16, PIL mode 'I;16')" if rgb.dtype == np.uint16 else "32-bit integer (int32, PIL mode 'I')"
            raise InvalidInputError(f"{kind} image with values 0-255 only: its bit depth is ambiguous (read as "
                                    "16-bit it would be black); convert it to uint8 (PIL mode 'L' or 'RGB')")
        return np.ascontiguousarray((rgb.astype(np.uint32) >> 8).astype(np.uint8))
    raise InvalidInputError(
        f"image array must be uint8 (or uint16), got {array.dtype}; "
        "scale float images to 0-255 and convert with .astype(np.uint8)"
    )
