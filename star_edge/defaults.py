"""Where the default model lives.

`Segmenter.from_pretrained(path=None)` uses the demo bundle that ships inside the package,
`star_edge/demo/bundle/`: a tiny StAR trained on star-edge's synthetic scenes (its manifest's
"card" field and README's model card say how, and what it can do). It knows only that synthetic
world; real photos need real checkpoints (`star-edge export`).
"""

from __future__ import annotations

from pathlib import Path

DEMO_BUNDLE_DIR = Path(__file__).resolve().parent / "demo" / "bundle"


def default_bundle_path() -> Path:
    """The folder of the default bundle (read-only package data)."""
    return DEMO_BUNDLE_DIR
