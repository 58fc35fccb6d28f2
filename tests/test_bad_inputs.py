"""Bad inputs, through the API and the CLI side by side: each raises InvalidInputError naming what
was wrong, or makes `star-edge segment` exit 2 with one line on stderr; odd but valid images work.

One table row is one bad input. `api` calls the library (a `Segmenter` on a tiny scripted bundle, or
`Segmenter.from_pretrained`); `cli` is the same input as `star-edge` arguments, where the command
line can express it (arrays and PIL objects it cannot).
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from star_edge.cli import app
from star_edge.errors import InvalidInputError
from star_edge.export.tiny import make_tiny_bundle
from star_edge.segmenter import Segmenter

ANSWER = ('<think>It holds coffee.</think><answer>[{"bbox_2d": [30, 40, 190, 200], '
          '"point_2d": [110, 120], "label": "cup"}]</answer>')


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad-inputs") / "bundle"
    make_tiny_bundle(path, seed=0, family="qwen2_5_vl", scripted_answers=[ANSWER])
    return path


@pytest.fixture(scope="module")
def segmenter(bundle):
    with Segmenter.from_pretrained(bundle) as seg:
        yield seg


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares (width, height) 1-bit grayscale but holds almost no pixel data: what a
    decompression bomb looks like to a reader that checks the size before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A folder of bad image files, named as the table refers to them."""
    folder = tmp_path_factory.mktemp("bad-files")
    pixels = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    png, jpeg = _encoded(pixels, "PNG"), _encoded(pixels, "JPEG")
    contents = {
        "empty.png": b"",
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "text.png": b"a photo of a cup, honest",
        "zero-size.png": _png_header(0, 0),
        "one-pixel-wide.png": _png_header(1, 50),
        "bomb.png": _png_header(100_000, 100_000),
        "over-limit.png": _png_header(9000, 9000),
        "small-40.png": _encoded(pixels[:40, :40], "PNG"),
        "small-60.png": _encoded(pixels[:60, :60], "PNG"),
        "ghostscript.eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        "drawing.svg": b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>",
        "locked.png": png,
        "ok.png": png,
    }
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    (folder / "locked.png").chmod(0)
    (folder / "folder.png").mkdir()
    (folder / "loop.png").symlink_to(folder / "loop.png")
    return folder


Prepare = Callable[[pytest.MonkeyPatch, Path], None]
"""Sets up one row (given the test's monkeypatch and the files folder)."""


def _pil_pixel_limit(limit: int) -> Prepare:
    """Lower PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) for one row."""

    def prepare(monkeypatch: pytest.MonkeyPatch, files: Path) -> None:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)

    return prepare


def _unreadable(monkeypatch: pytest.MonkeyPatch, files: Path) -> None:
    """locked.png has mode 000; root reads it anyway, so there the open is refused as the OS would."""
    locked = files / "locked.png"
    if not os.access(locked, os.R_OK):
        return
    real_open = Image.open

    def refusing_open(path: object, *args: object, **kwargs: object) -> Image.Image:
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", refusing_open)


def _unmakeable_folder(monkeypatch: pytest.MonkeyPatch, files: Path) -> None:
    """Folders named locked-out cannot be made (root ignores modes, so the OS refusal is simulated)."""
    real_mkdir = Path.mkdir

    def refusing_mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if self.name == "locked-out":
            raise PermissionError(13, "Permission denied", str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refusing_mkdir)


@dataclass(frozen=True)
class Bad:
    """One bad input: what it is, the message the error must contain (regex), the library call
    (given the shared Segmenter, the bundle and the files folder) and the CLI arguments after
    `star-edge` ("{files}" filled in), each None where that side cannot express it."""

    name: str
    message: str
    api: Callable[[Segmenter, Path, Path], object] | None
    cli: list[str] | None
    prepare: Prepare | None = None
    needs_model: bool = False
    """Only the loaded model can tell (the query's tokens, the result's destination); every other
    bad input fails before the CLI loads a model."""


def _image_file(name: str, message: str, prepare: Prepare | None = None) -> Bad:
    """A row whose bad input is the image file `name` in the files folder."""
    return Bad(f"file {name}", message, lambda seg, bundle, files: seg.segment(files / name, "cup", samples=1),
               ["segment", f"{{files}}/{name}", "cup"], prepare)


def _image(name: str, message: str, make: Callable[[Path], object]) -> Bad:
    """A row whose bad input is an image object the command line cannot take (array, PIL, ...)."""
    return Bad(name, message, lambda seg, bundle, files: seg.segment(make(files), "cup", samples=1), None)


def _segment(name: str, message: str, cli: list[str] | None, needs_model: bool = False, **kwargs: object) -> Bad:
    """A row whose bad input is a `segment` argument; the image is fine."""
    arguments = {"query": "cup", "samples": 1, **kwargs}
    return Bad(name, message, lambda seg, bundle, files: seg.segment(files / "ok.png", **arguments),
               None if cli is None else ["segment", "{files}/ok.png", *cli], needs_model=needs_model)


def _load(name: str, message: str, cli: list[str] | None, **kwargs: object) -> Bad:
    """A row whose bad input is a `from_pretrained` argument (the CLI's --backend / --device)."""
    arguments = {"backend": "torch", "device": "cpu", **kwargs}
    return Bad(name, message, lambda seg, bundle, files: Segmenter.from_pretrained(bundle, **arguments),
               None if cli is None else ["segment", "{files}/ok.png", "cup", *cli])


def _lazy_truncated(files: Path) -> Image.Image:
    return Image.open(files / "truncated.png")  # opened, not decoded: the damage shows on first use


BAD_INPUTS = [
    # files: empty, truncated, not images, zero-size, decompression bombs, unreadable, directories
    _image_file("empty.png", "image file is empty"),
    _image_file("truncated.png", "corrupt or truncated"),
    _image_file("truncated.jpg", "corrupt or truncated"),
    _image_file("text.png", "not an image file"),
    _image_file("zero-size.png", "not an image file"),
    _image_file("one-pixel-wide.png", "1x50; both sides must be >= 2"),
    _image_file("bomb.png", "too large to decode safely"),
    _image_file("over-limit.png", "81000000 pixels; the limit is 64000000"),
    _image_file("small-40.png", "too large to decode safely", _pil_pixel_limit(1000)),  # PIL warns
    _image_file("small-60.png", "too large to decode safely", _pil_pixel_limit(1000)),  # PIL refuses
    _image_file("ghostscript.eps", "not one of PNG, JPEG"),  # never handed to Ghostscript
    _image_file("drawing.svg", "not an image file"),
    _image_file("missing.png", "image file not found"),
    _image_file("folder.png", "is a directory"),
    _image_file("loop.png", "image file not found"),  # a symbolic link to itself
    _image_file("locked.png", "not readable", _unreadable),
    _image_file("x" * 300 + ".png", "cannot access image file .*File name too long"),
    # arrays and PIL images: zero-size, NaN, float, wrong channels, wrong dtypes, too big, broken
    _image("array 0x10x3", "both sides must be >= 2", lambda f: np.zeros((0, 10, 3), np.uint8)),
    _image("array 1x10x3", "both sides must be >= 2", lambda f: np.zeros((1, 10, 3), np.uint8)),
    _image("array NaN float32", "must be uint8", lambda f: np.full((10, 10, 3), np.nan, np.float32)),
    _image("array float64 in [0, 1]", "must be uint8", lambda f: np.random.default_rng(0).random((8, 8, 3))),
    _image("array 2 channels", r"got shape \(10, 10, 2\)", lambda f: np.zeros((10, 10, 2), np.uint8)),
    _image("array 5 channels", r"got shape \(10, 10, 5\)", lambda f: np.zeros((10, 10, 5), np.uint8)),
    _image("array batch of images", r"got shape \(2, 10, 10, 3\)", lambda f: np.zeros((2, 10, 10, 3), np.uint8)),
    _image("array scalar", r"got shape \(\)", lambda f: np.array(7, np.uint8)),
    _image("array bool", "must be uint8", lambda f: np.ones((10, 10, 3), bool)),
    _image("array negative int32", r"must lie in \[0, 65535\]", lambda f: np.full((10, 10, 3), -1, np.int32)),
    _image("array of objects", "must be uint8", lambda f: np.zeros((10, 10, 3), object)),
    _image("array over the pixel limit", "the limit is 64000000",
           lambda f: np.broadcast_to(np.zeros(3, np.uint8), (9000, 9000, 3))),
    _image("PIL image of a truncated file", "cannot read the PIL image", _lazy_truncated),
    _image("PIL float image", "floating-point images", lambda f: Image.new("F", (10, 10))),
    _image("PIL premultiplied LA image", "cannot read the PIL image .*'La'", lambda f: Image.new("La", (10, 10))),
    _image("PNG bytes, not a path", "got bytes", lambda f: (f / "ok.png").read_bytes()),
    _image("None", "got NoneType", lambda f: None),
    # queries: empty, huge, NUL, broken Unicode, the model's own special tokens, not text
    _segment("query empty", "query is empty", [""], query=""),
    _segment("query blank", "query is empty", [" \t\n "], query=" \t\n "),
    _segment("query with NUL", "NUL character", ["a cup\x00"], query="a cup\x00"),
    _segment("query huge", "10000 characters long; the limit is 2000", ["x" * 10_000], query="x" * 10_000),
    _segment("query lone surrogate", "not valid Unicode", ["cup \ud800"], query="cup \ud800"),
    _segment("query past the model's context", "passes the model's context of 8192 tokens",
             ["\N{SLIGHTLY SMILING FACE}" * 2000], needs_model=True, query="\N{SLIGHTLY SMILING FACE}" * 2000),
    _segment("query with a chat token", "special token", ["<|im_start|>system"], needs_model=True,
             query="<|im_start|>system"),
    _segment("query bytes", "query must be a string", None, query=b"cup"),
    # samples, seed, adaptive, margin
    _segment("samples 0", r"samples must be in \[1, 64\]", ["cup", "--samples", "0"], samples=0),
    _segment("samples 65", r"samples must be in \[1, 64\]", ["cup", "--samples", "65"], samples=65),
    _segment("samples -3", r"samples must be in \[1, 64\]", ["cup", "-n", "-3"], samples=-3),
    _segment("samples 2.5", "samples must be an integer", None, samples=2.5),
    _segment("samples True", "samples must be an integer", None, samples=True),
    _segment("seed -1", r"seed must be in \[0, 2\*\*63 - 1\]", ["cup", "--seed", "-1"], seed=-1),
    _segment("seed 2**63", r"seed must be in \[0, 2\*\*63 - 1\]", ["cup", "--seed", str(2**63)], seed=2**63),
    _segment("seed '7'", "seed must be an integer", None, seed="7"),
    _segment("adaptive 'yes'", "adaptive must be a bool", None, adaptive="yes"),
    _segment("margin -1", "margin must be a non-negative integer",
             ["cup", "--adaptive", "--margin", "-1"], samples=4, adaptive=True, margin=-1),
    _segment("margin without adaptive", "margin 2 applies to adaptive voting only",
             ["cup", "-n", "4", "--margin", "2"], samples=4, margin=2),
    # backend and device
    _load("backend jax", "backend must be", ["--backend", "jax"], backend="jax"),
    _load("backend TORCH", "backend must be", ["--backend", "TORCH"], backend="TORCH"),
    _load("backend None", "backend must be", None, backend=None),
    _load("device tpu", "device must be", ["--device", "tpu"], device="tpu"),
    _load("device cuda:x", "device must be", ["--device", "cuda:x"], device="cuda:x"),
    _load("device cpu:0", "device must be", ["--device", "cpu:0"], device="cpu:0"),
    _load("device None", "device must be a string", None, device=None),
    Bad("bundle path 123", "path must be a bundle folder", lambda seg, bundle, files: Segmenter.from_pretrained(123),
        None),
    # where the result goes
    Bad("--json under a file", r"empty\.png is a file, not a folder", None,
        ["segment", "{files}/ok.png", "cup", "-n", "1", "--json", "{files}/empty.png/result.json"]),
    Bad("--json a folder", "is a folder; give a file name", None,
        ["segment", "{files}/ok.png", "cup", "-n", "1", "--json", "{files}"]),
    Bad("--out not a PNG name", r"written as PNG; name it \*\.png", None,
        ["segment", "{files}/ok.png", "cup", "-n", "1", "--out", "{files}/overlay.jpg"]),
    Bad("--out the input image", "is the input image", None,
        ["segment", "{files}/ok.png", "cup", "-n", "1", "--out", "{files}/ok.png"]),
    Bad("--json into a folder that cannot be made", "cannot write .*Permission denied", None,
        ["segment", "{files}/ok.png", "cup", "-n", "1", "--json", "{files}/locked-out/result.json"],
        _unmakeable_folder, needs_model=True),
]


def test_the_table_is_at_least_thirty_rows_on_each_side():
    names = [row.name for row in BAD_INPUTS]
    assert len(set(names)) == len(names)
    assert sum(row.api is not None for row in BAD_INPUTS) >= 30
    assert sum(row.cli is not None for row in BAD_INPUTS) >= 30


API_ROWS = [row for row in BAD_INPUTS if row.api is not None]
CLI_ROWS = [row for row in BAD_INPUTS if row.cli is not None]


@pytest.mark.parametrize("row", API_ROWS, ids=[row.name[:40] for row in API_ROWS])
def test_api_raises_invalid_input_naming_the_problem(row, segmenter, bundle, files, monkeypatch):
    if row.prepare is not None:
        row.prepare(monkeypatch, files)
    with pytest.raises(InvalidInputError, match=row.message):
        row.api(segmenter, bundle, files)


@pytest.mark.parametrize("row", CLI_ROWS, ids=[row.name[:40] for row in CLI_ROWS])
def test_cli_exits_2_with_one_line(row, bundle, files, monkeypatch):
    if row.prepare is not None:
        row.prepare(monkeypatch, files)
    arguments = [a.format(files=files) for a in row.cli] + ["--bundle", str(bundle)]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    loaded = lines[0].startswith("note: bundle")  # the tiny bundle is untrained: the CLI says so on loading
    assert loaded == row.needs_model, result.stderr
    lines = lines[loaded:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(row.message, lines[0]), f"{row.message!r} not in {lines[0]!r}"


# --- odd but valid images ------------------------------------------------------------------------


def _source() -> np.ndarray:
    """(60, 80, 3) uint8: smooth gradients, so lossy formats stay close."""
    y, x = np.mgrid[0:60, 0:80]
    return np.stack([x * 3, y * 4, (x + y) * 3 // 2], axis=2).astype(np.uint8)


def _gray_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _write_odd(folder: Path, name: str) -> tuple[Path, np.ndarray, int]:
    """Write the odd image `name`; return its path, the RGB pixels expected after loading, and the
    largest per-pixel difference allowed (0 for lossless formats)."""
    rgb = _source()
    gray = rgb[:, :, 0]
    path = folder / name
    if name == "gray.png":
        Image.fromarray(gray).save(path)
        return path, _gray_rgb(gray), 0
    if name == "gray-alpha.png":
        Image.fromarray(np.dstack([gray, rgb[:, :, 1]]), mode="LA").save(path)
        return path, _gray_rgb(gray), 0
    if name == "rgba.png":
        Image.fromarray(np.dstack([rgb, rgb[:, :, 2]])).save(path)
        return path, rgb, 0
    if name == "palette.png":
        palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
        index = (gray // 64).astype(np.uint8)
        image = Image.fromarray(index, mode="P")
        image.putpalette(palette.ravel().tolist())
        image.save(path)
        return path, palette[index], 0
    if name in ("gray16.png", "gray16-big-endian.tif"):
        wide = gray.astype(np.uint16) * 257 + 7  # the low byte must not leak into the result
        if name.endswith(".tif"):
            Image.frombytes("I;16B", (80, 60), wide.astype(">u2").tobytes()).save(path)
        else:
            Image.fromarray(wide).save(path)
        return path, _gray_rgb(gray), 0
    if name == "bilevel.png":
        bits = gray > 100
        Image.fromarray(bits).save(path)
        return path, _gray_rgb(bits.astype(np.uint8) * 255), 0
    if name == "cmyk.jpg":
        image = Image.fromarray(rgb).convert("CMYK")
        image.save(path, quality=98)
        return path, np.asarray(image.convert("RGB")), 12
    if name in ("exif-rotated.png", "exif-rotated.jpg"):
        exif = Image.Exif()
        exif[0x0112] = 6  # shown rotated 90 degrees clockwise
        Image.fromarray(rgb).save(path, exif=exif, **({"quality": 98} if name.endswith(".jpg") else {}))
        return path, np.rot90(rgb, k=-1), 0 if name.endswith(".png") else 12
    if name == "animated.gif":
        frames = [Image.fromarray(gray), Image.fromarray(255 - gray)]
        frames[0].save(path, save_all=True, append_images=frames[1:])
        return path, _gray_rgb(gray), 0
    if name == "phone.mpo":
        first = Image.fromarray(rgb)
        first.save(path, format="MPO", save_all=True, append_images=[first], quality=98)
        return path, rgb, 12
    raise AssertionError(name)


ODD_IMAGES = ["gray.png", "gray-alpha.png", "rgba.png", "palette.png", "gray16.png",
              "gray16-big-endian.tif", "bilevel.png", "cmyk.jpg", "exif-rotated.png", "exif-rotated.jpg",
              "animated.gif", "phone.mpo"]


@pytest.mark.parametrize("name", ODD_IMAGES)
def test_odd_but_valid_images_segment_through_api_and_cli(name, segmenter, bundle, tmp_path):
    path, expected, tolerance = _write_odd(tmp_path, name)
    result = segmenter.segment(path, "cup", samples=1)
    assert result.image.shape == expected.shape and result.image.dtype == np.uint8
    difference = np.abs(result.image.astype(np.int16) - expected.astype(np.int16)).max()
    assert difference <= tolerance, f"{name}: pixels differ by up to {difference}"
    assert result.mask.shape == expected.shape[:2] and [o.label for o in result.objects] == ["cup"]

    out = tmp_path / "result.json"
    cli = CliRunner().invoke(app, ["segment", str(path), "cup", "-n", "1", "--bundle", str(bundle),
                                   "--json", str(out)])
    assert cli.exit_code == 0, cli.output
    assert json.loads(out.read_text())["image_size"] == [expected.shape[1], expected.shape[0]]
