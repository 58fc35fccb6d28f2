"""Where the default model lives.

`Segmenter.from_pretrained(path=None)` uses the default bundle. Until the trained demo reasoner
ships with the package, the default is built on first use, into the user's cache folder: a tiny
reasoner from config (random weights: its answers are noise) and the trained tiny SAM that ships
in `star_edge/demo/sam/` (mask IoU 0.854 on the synthetic test split with ground-truth prompts;
docs/demo-model/README.md).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

from star_edge.bundle import MANIFEST_NAME

DEFAULT_FAMILY = "qwen3_vl"
DEFAULT_SEED = 0
_REVISION = 2
DEMO_SAM_DIR = Path(__file__).resolve().parent / "demo" / "sam"
_build_lock = threading.Lock()


def cache_dir() -> Path:
    """$STAR_EDGE_CACHE, else $XDG_CACHE_HOME/star-edge, else ~/.cache/star-edge."""
    if os.environ.get("STAR_EDGE_CACHE"):
        return Path(os.environ["STAR_EDGE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "star-edge"


def default_bundle_path() -> Path:
    """The folder of the default bundle (it may not exist yet)."""
    return cache_dir() / f"default-tiny-{DEFAULT_FAMILY}-r{_REVISION}"


def ensure_default_bundle() -> Path:
    """Return the default bundle's folder, building it first if it is not there.

    The build writes into a temporary sibling folder and renames it into place, so concurrent
    processes never see a half-written bundle.
    """
    target = default_bundle_path()
    if (target / MANIFEST_NAME).is_file():
        return target
    with _build_lock:
        if (target / MANIFEST_NAME).is_file():
            return target
        # The one place the runtime reaches into export: building the default on first use. It
        # disappears when the whole trained default bundle ships with the package.
        from star_edge.export.tiny import make_tiny_bundle

        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
        try:
            make_tiny_bundle(staging / "bundle", seed=DEFAULT_SEED, family=DEFAULT_FAMILY,
                             sam_dir=DEMO_SAM_DIR)
            try:
                os.rename(staging / "bundle", target)
            except OSError:
                if not (target / MANIFEST_NAME).is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
