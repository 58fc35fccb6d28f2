"""Drawing a synthetic scene: a background, then objects from the catalogue, each drawn over the
earlier ones.

Every random choice comes from the numpy Generator passed in, so a scene is a pure function of it.
Occlusion: an object's visible mask is its full mask minus everything drawn later; an object is
only placed where every object already in the scene keeps at least `min_visible_fraction` of its
full mask and `min_visible_pixels` pixels visible, so every object of a finished scene is
recognisable.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from star_edge.train.data.synthetic_catalogue import COLOURS, FIXED_ROLES, ITEMS, KINDS, SHAPES, Kind

TEXTURES = ("plain", "striped", "dotted", "speckled")
_TEXTURE_WEIGHTS = (0.55, 0.15, 0.15, 0.15)
_ROLE_IDS = {"body": 1, "dark": 2, "light": 3, "metal": 4, "leaf": 5, "wood": 6}
_PLACEMENT_TRIES = 30
_MIN_COLOUR_DISTANCE = 110.0
"""Object colours closer than this (RGB Euclidean) to the background's colours are not used."""


@dataclass(frozen=True)
class SceneObject:
    """One object as drawn.

    box: (x1, y1, x2, y2) int, the inclusive bounds of its full (unoccluded) mask; area: pixels of
    the full mask; visible_area: pixels left visible by the objects drawn after it.
    """

    noun: str
    colour: str
    texture: str
    box: tuple[int, int, int, int]
    area: int
    visible_area: int

    @property
    def name(self) -> str:
        """"red cup": colour and noun (unique within a scene)."""
        return f"{self.colour} {self.noun}"

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) centre of the full box."""
        x1, y1, x2, y2 = self.box
        return ((x1 + x2) / 2.0, (y1 + y2) / 2.0)

    @property
    def kind(self) -> Kind:
        return KINDS[self.noun]


@dataclass(frozen=True)
class Scene:
    """image (H, W, 3) uint8; objects in drawing order; visible (m, H, W) bool, one visible mask
    per object (disjoint)."""

    image: np.ndarray = field(repr=False)
    objects: tuple[SceneObject, ...]
    visible: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class _Placed:
    kind: Kind
    colour: str
    texture: str
    origin: tuple[int, int]
    full: np.ndarray  # (h, w) bool window of the full mask, top-left at origin (x, y)
    roles: np.ndarray  # (h, w) uint8 role ids over the window


def render_scene(
    rng: np.random.Generator,
    size: tuple[int, int],
    n_objects: int,
    item_probability: float = 0.7,
    scale_range: tuple[float, float] = (0.16, 0.42),
    min_visible_fraction: float = 0.4,
    min_visible_pixels: int = 48,
) -> Scene:
    """Draw one scene with up to `n_objects` objects (fewer when some find no place).

    Args:
        rng: the only source of randomness.
        size: (W, H) of the image.
        n_objects: objects to try to place.
        item_probability: chance that an object is an everyday item rather than a plain shape.
        scale_range: an object's longer side as a fraction of the image's shorter side.
        min_visible_fraction, min_visible_pixels: the occlusion limits (module docstring).
    """
    width, height = size
    image, surfaces = _background(rng, width, height)
    palette = _scene_palette(rng, surfaces)
    placed: list[_Placed] = []
    visible: list[np.ndarray] = []
    used: set[tuple[str, str]] = set()
    for _ in range(n_objects):
        kind, colour = _pick_kind_and_colour(rng, palette, used, item_probability)
        texture = str(rng.choice(TEXTURES, p=_TEXTURE_WEIGHTS))
        for _ in range(_PLACEMENT_TRIES):
            candidate = _draw_object(rng, kind, colour, texture, width, height, scale_range)
            if candidate is not None and _fits(candidate, placed, visible, min_visible_fraction,
                                               min_visible_pixels):
                _occlude(candidate, visible)
                placed.append(candidate)
                full = np.zeros((height, width), dtype=bool)
                _window(full, candidate)[...] = candidate.full
                visible.append(full)
                used.add((kind.noun, colour))
                break
    for obj in placed:
        _paint(rng, image, obj)
    noise = rng.integers(-5, 6, size=(height, width, 1), dtype=np.int16)
    pixels = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    objects = tuple(
        SceneObject(noun=p.kind.noun, colour=p.colour, texture=p.texture, box=_full_box(p),
                    area=int(p.full.sum()), visible_area=int(v.sum()))
        for p, v in zip(placed, visible)
    )
    masks = np.stack(visible) if visible else np.zeros((0, height, width), dtype=bool)
    return Scene(image=pixels, objects=objects, visible=masks)


def interior_point(mask: np.ndarray) -> tuple[int, int]:
    """The (x, y) pixel of `mask` (H, W) bool (non-empty) deepest inside it: repeated 4-neighbour
    erosion until nothing is left; of the last pixels standing, the one nearest their centroid."""
    rows, cols = np.nonzero(mask)
    r0, c0 = rows.min(), cols.min()
    core = np.zeros((rows.max() - r0 + 3, cols.max() - c0 + 3), dtype=bool)
    core[rows - r0 + 1, cols - c0 + 1] = True
    while True:
        eroded = core.copy()
        eroded[1:-1, 1:-1] &= core[:-2, 1:-1] & core[2:, 1:-1] & core[1:-1, :-2] & core[1:-1, 2:]
        eroded[0, :] = eroded[-1, :] = False
        eroded[:, 0] = eroded[:, -1] = False
        if not eroded.any():
            break
        core = eroded
    rr, cc = np.nonzero(core)
    nearest = int(np.argmin((rr - rr.mean()) ** 2 + (cc - cc.mean()) ** 2))
    return int(cc[nearest] + c0 - 1), int(rr[nearest] + r0 - 1)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) inclusive bounds of a non-empty (H, W) bool mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(H, W, 3) float32 background and the surface colours used (to keep objects visible)."""
    first, second = _surface_colour(rng), _surface_colour(rng)
    style = rng.integers(3)
    if style == 0:  # a gradient in a random direction
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        ramp = xx * np.cos(angle) / width + yy * np.sin(angle) / height
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
        image = first + ramp[:, :, None] * (second - first)
    elif style == 1:  # a wall above a table edge
        edge = int(rng.uniform(0.2, 0.6) * height)
        image = np.empty((height, width, 3), dtype=np.float32)
        image[:edge], image[edge:] = first, second
        image[max(edge - 2, 0):edge + 2] = second * 0.7
    else:  # soft blotches: coarse noise, upsampled
        coarse = rng.uniform(0.0, 1.0, size=(4, 4)).astype(np.float32)
        blend = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
        image = first + blend[:, :, None] * (second - first)
    return image.astype(np.float32), [first, second]


def _surface_colour(rng: np.random.Generator) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.05, 0.3), rng.uniform(0.4, 0.85))
    return np.array(rgb, dtype=np.float32) * 255.0


def _scene_palette(rng: np.random.Generator, surfaces: list[np.ndarray]) -> list[str]:
    """2-4 colour names that stand out from the background (few, so colours repeat in a scene)."""
    allowed = [name for name, rgb in COLOURS.items()
               if min(np.linalg.norm(np.array(rgb) - s) for s in surfaces) >= _MIN_COLOUR_DISTANCE]
    if len(allowed) < 2:
        allowed = list(COLOURS)
    count = min(int(rng.integers(2, 5)), len(allowed))
    return [str(c) for c in rng.choice(allowed, size=count, replace=False)]


def _pick_kind_and_colour(
    rng: np.random.Generator, palette: list[str], used: set[tuple[str, str]], item_probability: float
) -> tuple[Kind, str]:
    """A (kind, colour) pair not yet in the scene, so "the <colour> <noun>" names one object."""
    while True:
        pool = ITEMS if rng.random() < item_probability else SHAPES
        kind = pool[int(rng.integers(len(pool)))]
        colour = palette[int(rng.integers(len(palette)))]
        if (kind.noun, colour) not in used:
            return kind, colour


def _draw_object(
    rng: np.random.Generator, kind: Kind, colour: str, texture: str, width: int, height: int,
    scale_range: tuple[float, float],
) -> _Placed | None:
    """Scale, rotate and place `kind`; None when it does not fit in the image."""
    longer = rng.uniform(*scale_range) * min(width, height)
    w, h = (longer, longer / kind.aspect) if kind.aspect >= 1 else (longer * kind.aspect, longer)
    angle = rng.uniform(-12, 12) if kind.upright else rng.uniform(0, 360)
    cos, sin = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
    turned = []
    for _, _, unit in kind.parts:
        x, y = (unit[:, 0] - 0.5) * w, (unit[:, 1] - 0.5) * h
        turned.append(np.stack([x * cos - y * sin, x * sin + y * cos], axis=1))
    every = np.concatenate(turned)
    low, high = np.floor(every.min(axis=0)) - 1, np.ceil(every.max(axis=0)) + 1
    span = high - low
    if span[0] >= width - 2 or span[1] >= height - 2:
        return None
    x0 = int(rng.integers(1, width - 1 - int(span[0])))
    y0 = int(rng.integers(1, height - 1 - int(span[1])))
    mask_img = Image.new("L", (int(span[0]) + 1, int(span[1]) + 1), 0)
    role_img = Image.new("L", mask_img.size, 0)
    draw_mask, draw_role = ImageDraw.Draw(mask_img), ImageDraw.Draw(role_img)
    for (op, role, _), points in zip(kind.parts, turned):
        xy = [tuple(p) for p in (points - low)]
        if op == "fill":
            draw_mask.polygon(xy, fill=255)
            draw_role.polygon(xy, fill=_ROLE_IDS[role])
        elif op == "erase":
            draw_mask.polygon(xy, fill=0)
        else:
            draw_role.polygon(xy, fill=_ROLE_IDS[role])
    full = np.asarray(mask_img) > 0
    if not full.any():
        return None
    return _Placed(kind, colour, texture, (x0, y0), full, np.asarray(role_img))


def _window(array: np.ndarray, obj: _Placed) -> np.ndarray:
    """The (h, w) view of a full-size (H, W, ...) array under the object's window."""
    x0, y0 = obj.origin
    return array[y0:y0 + obj.full.shape[0], x0:x0 + obj.full.shape[1]]


def _fits(candidate: _Placed, placed: list[_Placed], visible: list[np.ndarray],
          min_fraction: float, min_pixels: int) -> bool:
    """Whether drawing `candidate` on top keeps every placed object visible enough."""
    if candidate.full.sum() < max(min_pixels, 1):
        return False
    for obj, vis in zip(placed, visible):
        hidden = int((_window(vis, candidate) & candidate.full).sum())
        remaining = int(vis.sum()) - hidden
        if hidden and (remaining < min_fraction * obj.full.sum() or remaining < min_pixels):
            return False
    return True


def _occlude(candidate: _Placed, visible: list[np.ndarray]) -> None:
    for vis in visible:
        _window(vis, candidate)[candidate.full] = False


def _paint(rng: np.random.Generator, image: np.ndarray, obj: _Placed) -> None:
    """Colour the object's full mask (later objects paint over it)."""
    base = np.clip(np.array(COLOURS[obj.colour], dtype=np.float32) + rng.integers(-12, 13, 3), 0, 255)
    shade = base + 70.0 if base.mean() < 80 else base * 0.65
    colours = np.zeros((len(_ROLE_IDS) + 1, 3), dtype=np.float32)
    colours[_ROLE_IDS["body"]] = base
    colours[_ROLE_IDS["dark"]] = shade
    colours[_ROLE_IDS["light"]] = base * 0.55 + 255.0 * 0.45
    for role, rgb in FIXED_ROLES.items():
        colours[_ROLE_IDS[role]] = rgb
    window = colours[obj.roles]
    body = obj.roles == _ROLE_IDS["body"]
    h, w = obj.full.shape
    if obj.texture == "striped":
        period, angle = rng.uniform(5, 11), rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:h, 0:w]
        band = ((xx * np.cos(angle) + yy * np.sin(angle)) // (period / 2)).astype(np.int64) % 2 == 1
        window[body & band] = shade
    elif obj.texture == "dotted":
        period = rng.uniform(6, 11)
        yy, xx = np.mgrid[0:h, 0:w]
        dots = ((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2 < (period / 4) ** 2
        window[body & dots] = shade
    elif obj.texture == "speckled":
        window[body] += rng.uniform(-28, 28, size=(int(body.sum()), 1)).astype(np.float32)
    _window(image, obj)[obj.full] = np.clip(window[obj.full], 0, 255)


def _full_box(obj: _Placed) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = mask_box(obj.full)
    x0, y0 = obj.origin
    return x1 + x0, y1 + y0, x2 + x0, y2 + y0
