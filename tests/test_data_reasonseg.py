"""ReasonSeg-format data: polygons rasterised against an independent point-in-polygon reference,
LISA's painting order, the folder and Hugging Face loaders, clear errors for bad files, and the
mask-to-polygon tracer that the synthetic writer relies on."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from star_edge.train.data.contours import mask_to_polygons
from star_edge.train.data.hf import HFReasonSeg, load_hf
from star_edge.train.data.polygons import IGNORE, TARGET, paint_polygons, polygon_mask
from star_edge.train.data.reasonseg import ReasonSegFolder, load, read_sample, write_sample
from star_edge.train.data.sample import DataError


def _on_segment(px: float, py: float, a: np.ndarray, b: np.ndarray) -> bool:
    cross = (b[0] - a[0]) * (py - a[1]) - (b[1] - a[1]) * (px - a[0])
    return (cross == 0 and min(a[0], b[0]) <= px <= max(a[0], b[0])
            and min(a[1], b[1]) <= py <= max(a[1], b[1]))


def _closed_polygon_reference(vertices: np.ndarray, width: int, height: int) -> np.ndarray:
    """Integer points inside (even-odd ray casting) or on the boundary of the polygon."""
    out = np.zeros((height, width), dtype=bool)
    edges = list(zip(vertices, np.roll(vertices, -1, axis=0)))
    for y in range(height):
        for x in range(width):
            if any(_on_segment(x, y, a, b) for a, b in edges):
                out[y, x] = True
                continue
            inside = False
            for a, b in edges:
                if (a[1] > y) != (b[1] > y):
                    crossing = a[0] + (y - a[1]) * (b[0] - a[0]) / (b[1] - a[1])
                    inside ^= x < crossing
            out[y, x] = inside
    return out


def _distance_to_edges(x: float, y: float, vertices: np.ndarray) -> float:
    best = np.inf
    for a, b in zip(vertices, np.roll(vertices, -1, axis=0)):
        ab, ap = b - a, np.array([x, y], dtype=float) - a
        t = np.clip(ap @ ab / max(ab @ ab, 1e-12), 0.0, 1.0)
        best = min(best, float(np.hypot(*(ap - t * ab))))
    return best


@pytest.mark.parametrize("vertices", [
    [(2, 3), (14, 3), (14, 9), (2, 9)],                      # rectangle
    [(8, 1), (15, 8), (8, 15), (1, 8)],                      # diamond: 45-degree edges
    [(1, 1), (12, 1), (12, 5), (6, 5), (6, 13), (1, 13)],    # L shape (concave)
    [(3, 2), (3, 2), (11, 10), (3, 10)],                     # repeated vertex
])
def test_axis_and_diagonal_polygons_are_exactly_the_closed_polygon(vertices):
    vertices = np.array(vertices, dtype=float)
    got = polygon_mask(vertices, (17, 16))
    np.testing.assert_array_equal(got, _closed_polygon_reference(vertices, 17, 16))


@pytest.mark.parametrize("seed", range(4))
def test_general_polygons_cover_the_inside_and_only_pixels_touching_an_edge(seed):
    rng = np.random.default_rng(seed)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
    radii = rng.uniform(4, 11, 7)
    vertices = np.stack([15 + radii * np.cos(angles), 13 + radii * np.sin(angles)], axis=1)
    integer = np.trunc(vertices)  # LISA's int32 cast
    got = polygon_mask(vertices, (30, 27))
    reference = _closed_polygon_reference(integer, 30, 27)
    assert not (reference & ~got).any(), "every point inside or on the polygon is covered"
    for y, x in zip(*np.nonzero(got & ~reference)):
        assert _distance_to_edges(x, y, integer) < 1.0, (x, y)


def test_float_vertices_are_truncated_and_the_outside_is_clipped():
    np.testing.assert_array_equal(polygon_mask([(1.9, 1.2), (4.99, 1.7), (4.5, 3.9), (1.1, 3.2)], (8, 6)),
                                  polygon_mask([(1, 1), (4, 1), (4, 3), (1, 3)], (8, 6)))
    clipped = polygon_mask([(-5, -5), (3, -5), (3, 2), (-5, 2)], (6, 5))
    expected = np.zeros((5, 6), dtype=bool)
    expected[:3, :4] = True
    np.testing.assert_array_equal(clipped, expected)
    assert not polygon_mask([(20, 20), (30, 20), (30, 30)], (6, 5)).any()


def test_smaller_polygons_are_painted_last_as_in_lisa():
    big = np.array([(0, 0), (19, 0), (19, 19), (0, 19)])
    small = np.array([(5, 5), (9, 5), (9, 9), (5, 9)])
    labels = paint_polygons([small, big], [IGNORE, TARGET], (20, 20))
    assert (labels[5:10, 5:10] == IGNORE).all() and (labels == TARGET).sum() == 400 - 25
    labels = paint_polygons([big, small], [IGNORE, TARGET], (20, 20))
    assert (labels[5:10, 5:10] == TARGET).all() and (labels == IGNORE).sum() == 400 - 25


def _write(folder, stem, record, size=(40, 30), suffix=".jpg"):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(folder / f"{stem}{suffix}")
    (folder / f"{stem}.json").write_text(json.dumps(record))


def test_folder_loader_reads_queries_masks_ignore_and_extras(tmp_path):
    target = [[2.7, 3.2], [20, 3], [20, 12], [2, 12]]
    ignore = [[25, 5], [35, 5], [35, 25], [25, 25]]
    _write(tmp_path, "b_img", {"text": ["what holds coffee?", "the mug"], "is_sentence": True,
                               "shapes": [{"label": "target", "shape_type": "polygon", "points": target},
                                          {"label": "ignore", "shape_type": "polygon", "points": ignore},
                                          {"label": "flag", "shape_type": "polygon", "points": target}],
                               "reasoning_type": "function", "depth": 2})
    _write(tmp_path, "a_img", {"text": "one query", "is_sentence": False, "shapes": []}, suffix=".png")
    folder = ReasonSegFolder(tmp_path)
    assert len(folder) == 2 and [s.image_id for s in load(tmp_path)] == ["a_img", "b_img"]
    first, second = folder[0], folder[1]
    assert first.queries == ("one query",) and not first.mask.any() and first.reasoning_type is None
    assert first.image.name == "a_img.png" and first.pixels().shape == (30, 40, 3)
    assert second.queries == ("what holds coffee?", "the mug") and second.is_sentence
    assert (second.reasoning_type, second.depth) == ("function", 2)
    np.testing.assert_array_equal(second.mask, _closed_polygon_reference(np.trunc(np.array(target)), 40, 30))
    np.testing.assert_array_equal(second.ignore, _closed_polygon_reference(np.array(ignore, float), 40, 30))
    assert second.mask.dtype == bool and second.mask.shape == (30, 40)


def test_polygons_with_fewer_than_three_points_are_skipped_with_a_warning(tmp_path):
    _write(tmp_path, "x", {"text": ["q"], "is_sentence": False, "shapes": [
        {"label": "target", "points": [[1, 1], [9, 9]]},
        {"label": "target", "points": []},
        {"label": "target", "points": [[1, 1], [9, 1], [9, 9]]}]})
    with pytest.warns(UserWarning) as caught:
        item = read_sample(tmp_path / "x.json")
    messages = sorted(str(w.message).split("x.json: ")[1] for w in caught)
    assert messages == ["shape 0 has 2 point(s), fewer than 3; skipped",
                        "shape 1 has 0 point(s), fewer than 3; skipped"]
    assert item.mask.sum() == _closed_polygon_reference(np.array([[1, 1], [9, 1], [9, 9]], float), 40, 30).sum()


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"shapes": []}), "'text' must be"),
    (json.dumps({"text": ["q"], "shapes": {}}), "'shapes' must be a list"),
    (json.dumps({"text": ["q"], "shapes": [{"label": "target", "points": [[1, "a"], [2, 2], [3, 1]]}]}),
     "shape 0 'points'"),
    (json.dumps({"text": ["q"], "shapes": [{"label": "target", "points": [[1, 1e300], [2, 2], [3, 1]]}]}),
     "shape 0 'points' must be a list of \\[x, y\\] numbers within"),
    (json.dumps({"text": ["q"], "shapes": [{"points": [[1, 1]]}]}), "shape 0 must be an object"),
    (json.dumps({"text": ["q"], "shapes": [], "depth": "two"}), "'depth' must be an integer"),
])
def test_bad_files_raise_one_error_naming_the_file(tmp_path, content, message):
    _write(tmp_path, "bad", {})
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(DataError, match=message) as error:
        read_sample(tmp_path / "bad.json")
    assert "bad.json" in str(error.value)


def test_missing_images_and_folders_are_named(tmp_path):
    (tmp_path / "lonely.json").write_text(json.dumps({"text": ["q"], "shapes": []}))
    with pytest.raises(DataError, match="lonely.json: no image beside it"):
        read_sample(tmp_path / "lonely.json")
    with pytest.raises(DataError, match="data folder not found"):
        ReasonSegFolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no ReasonSeg JSON files"):
        ReasonSegFolder(tmp_path / "empty")


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height (8-bit grey) and holds no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(
        b"IEND", b"")


@pytest.mark.parametrize("side, message", [(10_000, "100000000 pixels; the limit is 64000000"),
                                           (60_000, "not a readable image")])
def test_images_too_large_to_decode_are_refused_from_their_header(tmp_path, side, message):
    (tmp_path / "huge.png").write_bytes(_png_header(side, side))
    (tmp_path / "huge.json").write_text(json.dumps({"text": ["q"], "shapes": []}))
    with pytest.raises(DataError, match=message):
        read_sample(tmp_path / "huge.json")


def test_masks_take_the_exif_orientation_of_the_image(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40x30, shown rotated: 30 wide, 40 high
    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "turned.jpg", exif=exif)
    (tmp_path / "turned.json").write_text(json.dumps(
        {"text": ["q"], "shapes": [{"label": "target", "points": [[2, 30], [20, 30], [20, 38], [2, 38]]}]}))
    item = read_sample(tmp_path / "turned.json")
    assert item.mask.shape == item.pixels().shape[:2] == (40, 30)
    assert item.mask.sum() == 19 * 9


def test_cp1252_files_are_read_like_lisa_does(tmp_path):
    _write(tmp_path, "old", {})
    (tmp_path / "old.json").write_bytes('{"text": ["caf\xe9 cup"], "shapes": []}'.encode("cp1252"))
    assert read_sample(tmp_path / "old.json").queries == ("caf\xe9 cup",)


def test_written_samples_read_back(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    square = np.array([[3, 3], [10, 3], [10, 10], [3, 10]])
    write_sample(tmp_path, "w", image, ["find it"], False, [square], [square + 12],
                 extra={"reasoning_type": "multi", "depth": 3})
    item = read_sample(tmp_path / "w.json")
    assert item.mask.sum() == 64 and item.ignore.sum() == 64 and item.depth == 3
    assert item.pixels().shape == (24, 32, 3)


@settings(max_examples=200, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 12), st.integers(1, 12))))
def test_traced_polygons_rasterise_back_to_exactly_the_mask(mask):
    polygons = mask_to_polygons(mask)
    assert all(len(p) >= 3 for p in polygons)
    labels = paint_polygons(polygons, [TARGET] * len(polygons), (mask.shape[1], mask.shape[0]))
    np.testing.assert_array_equal(labels == TARGET, mask)


def test_masks_with_holes_and_several_parts_round_trip():
    yy, xx = np.mgrid[0:64, 0:80]
    mask = ((yy - 30) ** 2 + (xx - 30) ** 2 < 25 ** 2) & ((yy - 30) ** 2 + (xx - 30) ** 2 >= 9 ** 2)
    mask |= (xx > 62) & (yy > 10) & (yy < 50) & ~((xx > 66) & (xx < 74) & (yy > 20) & (yy < 40))
    polygons = mask_to_polygons(mask)
    labels = paint_polygons(polygons, [TARGET] * len(polygons), (80, 64))
    np.testing.assert_array_equal(labels == TARGET, mask)
    assert mask_to_polygons(np.zeros((5, 5), dtype=bool)) == []


def _hf_dataset():
    from datasets import Dataset, Features, Image as ImageFeature, Value

    rng = np.random.default_rng(1)
    rows = {"image": [], "mask": [], "text": [], "image_id": [], "reasoning_type": [], "depth": []}
    for k in range(3):
        rows["image"].append(Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)))
        mask = np.zeros((20, 30), dtype=np.uint8)
        mask[2:8 + k, 3:9] = 255
        rows["mask"].append(Image.fromarray(mask))
        rows["text"].append(f"query {k}")
        rows["image_id"].append(f"img{k}")
        rows["reasoning_type"].append("spatial")
        rows["depth"].append(k + 1)
    features = Features({"image": ImageFeature(), "mask": ImageFeature(), "text": Value("string"),
                         "image_id": Value("string"), "reasoning_type": Value("string"),
                         "depth": Value("int32")})
    return Dataset.from_dict(rows, features=features)


def test_hugging_face_folders_load_with_image_and_mask_columns(tmp_path):
    from datasets import DatasetDict

    dataset = _hf_dataset()
    dataset.save_to_disk(str(tmp_path / "single"))
    loaded = load_hf(tmp_path / "single")
    assert len(loaded) == 3
    item = loaded[2]
    assert item.image_id == "img2" and item.queries == ("query 2",) and item.depth == 3
    assert item.pixels().shape == (20, 30, 3) and item.mask.sum() == 8 * 6 and not item.ignore.any()
    DatasetDict({"val": dataset, "test": dataset}).save_to_disk(str(tmp_path / "dict"))
    assert load_hf(tmp_path / "dict", split="test")[0].reasoning_type == "spatial"
    with pytest.raises(DataError, match="choose a split"):
        load_hf(tmp_path / "dict")
    with pytest.raises(DataError, match="missing column"):
        HFReasonSeg(dataset.remove_columns("mask"), name="x")


def test_training_reads_every_kind_of_folder_whole_or_its_train_split(tmp_path):
    from datasets import DatasetDict

    from star_edge.train.grpo_data import DataConfig, open_items

    image = np.zeros((20, 30, 3), dtype=np.uint8)
    target = np.zeros((20, 30), dtype=bool)
    target[4:9, 5:12] = True
    write_sample(tmp_path / "reasonseg", "a", image, ["first", "second"], False, mask_to_polygons(target))
    dataset = _hf_dataset()
    dataset.save_to_disk(str(tmp_path / "single"))
    DatasetDict({"train": dataset.select([0, 1]), "test": dataset}).save_to_disk(str(tmp_path / "dict"))
    items, count = open_items(DataConfig(source=str(tmp_path / "reasonseg")))
    assert count == 2 and [items(i).query for i in range(2)] == ["first", "second"]
    assert items(0).boxes.tolist() == [[5, 4, 11, 8]] and items(0).ignore is None
    ignore = np.zeros((20, 30), dtype=bool)
    ignore[12:18, 20:28] = True
    write_sample(tmp_path / "ignoring", "b", image, ["q"], False, mask_to_polygons(target), mask_to_polygons(ignore))
    np.testing.assert_array_equal(open_items(DataConfig(source=str(tmp_path / "ignoring")))[0](0).ignore, ignore)
    assert open_items(DataConfig(source=str(tmp_path / "single")))[1] == 3
    items, count = open_items(DataConfig(source=str(tmp_path / "dict")))
    assert count == 2 and items(1).query == "query 1", "a DatasetDict trains on its train split"
