"""What a synthetic scene is made of: named colours, shapes and everyday-object silhouettes.

Every object is drawn in a unit box (u right, v down, both in [0, 1]) as an ordered list of parts;
the scene module scales, rotates and places it. A part is (op, role, polygon):
- op "fill" adds the polygon to the object's mask, "erase" removes it (handle loops, key bows,
  scissor rings), "paint" colours pixels already in the mask (details: rims, seams, labels);
- role picks the colour: "body" is the object's named colour (and carries its texture), "dark" and
  "light" are shades of it, "metal", "leaf" and "wood" are fixed colours (a knife's blade, a plant
  pot's leaves, a pencil's tip). The object's named colour is always its body's colour.

Labels are short nouns ("cup", "plant pot", "circle"): the object's category without its colour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Part = tuple[str, str, np.ndarray]
"""(op, role, polygon (k, 2) float64 unit coordinates)."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 60),
    "blue": (31, 90, 210),
    "yellow": (240, 205, 30),
    "orange": (245, 130, 20),
    "purple": (135, 60, 180),
    "pink": (240, 120, 180),
    "brown": (125, 75, 35),
    "black": (25, 25, 25),
    "white": (245, 245, 245),
}
"""Named object colours (RGB); rendered with a small per-object jitter."""

FIXED_ROLES: dict[str, tuple[int, int, int]] = {
    "metal": (185, 190, 200),
    "leaf": (50, 135, 45),
    "wood": (225, 190, 140),
}


@dataclass(frozen=True)
class Kind:
    """One kind of object.

    noun: the label. aspect: width / height of its unit box when drawn. upright: drawn within
    +-12 degrees of upright (a cup, a lamp) rather than at any angle (a knife, a star).
    affordances: what it can be used for (keys of `synthetic_queries.FUNCTIONS`); shapes have none.
    """

    noun: str
    aspect: float
    upright: bool
    affordances: tuple[str, ...]
    parts: tuple[Part, ...]


def ellipse(cx: float, cy: float, rx: float, ry: float, angle_deg: float = 0.0, n: int = 32) -> np.ndarray:
    """(n, 2) vertices of an ellipse centred at (cx, cy) with radii (rx, ry), rotated by angle."""
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    a = np.deg2rad(angle_deg)
    return np.stack([cx + x * np.cos(a) - y * np.sin(a), cy + x * np.sin(a) + y * np.cos(a)], axis=1)


def rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """(4, 2) vertices of an axis-aligned rectangle."""
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], dtype=np.float64)


def poly(*points: tuple[float, float]) -> np.ndarray:
    """(k, 2) vertices from (u, v) pairs."""
    return np.array(points, dtype=np.float64)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 0.5, 0.5 * inner)
    return np.stack([0.5 + radii * np.cos(angles), 0.52 + radii * np.sin(angles)], axis=1)


def _regular(sides: int) -> np.ndarray:
    angles = np.arange(sides) * 2 * np.pi / sides
    return np.stack([0.5 + 0.5 * np.cos(angles), 0.5 + 0.5 * np.sin(angles)], axis=1)


def _ring(cx: float, cy: float, rx: float, ry: float, thickness: float) -> tuple[Part, Part]:
    """A loop (handle, key bow, scissor ring): a filled ellipse with a smaller one erased."""
    return (("fill", "body", ellipse(cx, cy, rx, ry)),
            ("erase", "body", ellipse(cx, cy, rx * (1 - thickness), ry * (1 - thickness))))


SHAPES: tuple[Kind, ...] = (
    Kind("circle", 1.0, False, (), (("fill", "body", ellipse(0.5, 0.5, 0.5, 0.5)),)),
    Kind("square", 1.0, False, (), (("fill", "body", rect(0, 0, 1, 1)),)),
    Kind("triangle", 1.1, False, (), (("fill", "body", poly((0.5, 0), (1, 1), (0, 1))),)),
    Kind("star", 1.0, False, (), (("fill", "body", _star()),)),
    Kind("hexagon", 1.15, False, (), (("fill", "body", _regular(6)),)),
    Kind("diamond", 0.7, False, (), (("fill", "body", poly((0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5))),)),
)

ITEMS: tuple[Kind, ...] = (
    Kind("cup", 1.15, True, ("drink",), (
        *_ring(0.74, 0.5, 0.17, 0.19, 0.45),
        ("fill", "body", poly((0.1, 0.2), (0.74, 0.2), (0.64, 0.86), (0.2, 0.86))),
        ("fill", "body", ellipse(0.42, 0.9, 0.42, 0.09)),
        ("paint", "dark", ellipse(0.42, 0.2, 0.3, 0.05)),
    )),
    Kind("mug", 1.05, True, ("drink",), (
        *_ring(0.7, 0.52, 0.28, 0.3, 0.4),
        ("fill", "body", rect(0.04, 0.08, 0.7, 1.0)),
        ("paint", "dark", rect(0.04, 0.08, 0.7, 0.16)),
    )),
    Kind("bottle", 0.42, True, ("drink",), (
        ("fill", "dark", rect(0.37, 0.0, 0.63, 0.1)),
        ("fill", "body", rect(0.4, 0.08, 0.6, 0.32)),
        ("fill", "body", poly((0.4, 0.3), (0.6, 0.3), (0.82, 0.46), (0.18, 0.46))),
        ("fill", "body", rect(0.18, 0.44, 0.82, 1.0)),
        ("paint", "light", rect(0.18, 0.6, 0.82, 0.8)),
    )),
    Kind("ball", 1.0, False, ("roll",), (
        ("fill", "body", ellipse(0.5, 0.5, 0.5, 0.5)),
        ("paint", "dark", ellipse(0.5, 0.5, 0.5, 0.06, 35)),
        ("paint", "dark", ellipse(0.5, 0.5, 0.06, 0.5, 35)),
        ("paint", "light", ellipse(0.32, 0.3, 0.09, 0.06, -30)),
    )),
    Kind("knife", 5.0, False, ("cut",), (
        ("fill", "metal", poly((0.0, 0.62), (0.12, 0.3), (0.62, 0.26), (0.62, 0.66))),
        ("fill", "body", rect(0.6, 0.22, 1.0, 0.78)),
        ("paint", "dark", ellipse(0.74, 0.5, 0.02, 0.09)),
        ("paint", "dark", ellipse(0.88, 0.5, 0.02, 0.09)),
    )),
    Kind("scissors", 2.2, False, ("cut",), (
        ("fill", "metal", poly((0.28, 0.28), (0.34, 0.22), (1.0, 0.6), (0.96, 0.7))),
        ("fill", "metal", poly((0.28, 0.72), (0.34, 0.78), (1.0, 0.4), (0.96, 0.3))),
        *_ring(0.15, 0.26, 0.15, 0.25, 0.45),
        *_ring(0.15, 0.74, 0.15, 0.25, 0.45),
        ("paint", "dark", ellipse(0.55, 0.5, 0.03, 0.06)),
    )),
    Kind("key", 2.8, False, ("unlock",), (
        *_ring(0.17, 0.5, 0.17, 0.45, 0.5),
        ("fill", "body", rect(0.32, 0.4, 1.0, 0.6)),
        ("fill", "body", rect(0.7, 0.58, 0.78, 0.85)),
        ("fill", "body", rect(0.86, 0.58, 0.93, 0.78)),
    )),
    Kind("book", 0.75, True, ("read",), (
        ("fill", "body", rect(0.0, 0.0, 1.0, 1.0)),
        ("paint", "dark", rect(0.0, 0.0, 0.14, 1.0)),
        ("paint", "light", rect(0.3, 0.15, 0.85, 0.3)),
    )),
    Kind("plant pot", 0.8, True, ("grow",), (
        ("fill", "leaf", rect(0.47, 0.2, 0.53, 0.55)),
        ("fill", "leaf", ellipse(0.32, 0.3, 0.11, 0.22, -35)),
        ("fill", "leaf", ellipse(0.68, 0.3, 0.11, 0.22, 35)),
        ("fill", "leaf", ellipse(0.5, 0.17, 0.09, 0.17)),
        ("fill", "body", poly((0.18, 0.56), (0.82, 0.56), (0.72, 1.0), (0.28, 1.0))),
        ("fill", "body", rect(0.12, 0.5, 0.88, 0.62)),
    )),
    Kind("lamp", 0.7, True, ("light",), (
        ("fill", "body", poly((0.3, 0.0), (0.7, 0.0), (0.92, 0.4), (0.08, 0.4))),
        ("fill", "dark", rect(0.46, 0.4, 0.54, 0.92)),
        ("fill", "body", ellipse(0.5, 0.93, 0.32, 0.07)),
    )),
    Kind("pencil", 7.0, False, ("write",), (
        ("fill", "body", rect(0.0, 0.2, 0.8, 0.8)),
        ("fill", "wood", poly((0.8, 0.2), (1.0, 0.5), (0.8, 0.8))),
        ("fill", "dark", poly((0.93, 0.38), (1.0, 0.5), (0.93, 0.62))),
        ("paint", "light", rect(0.0, 0.2, 0.08, 0.8)),
    )),
    Kind("spoon", 3.5, False, ("eat",), (
        ("fill", "body", ellipse(0.18, 0.5, 0.18, 0.42)),
        ("fill", "body", rect(0.3, 0.42, 1.0, 0.58)),
        ("paint", "light", ellipse(0.16, 0.5, 0.1, 0.26)),
    )),
    Kind("fork", 3.5, False, ("eat",), (
        *(("fill", "body", rect(0.0, 0.12 + k * 0.22, 0.26, 0.22 + k * 0.22)) for k in range(4)),
        ("fill", "body", rect(0.22, 0.12, 0.38, 0.88)),
        ("fill", "body", rect(0.36, 0.42, 1.0, 0.58)),
    )),
)

KINDS: dict[str, Kind] = {kind.noun: kind for kind in SHAPES + ITEMS}
