"""Writing a bundle's manifest (`star_edge.json`) over folders already written, then verifying it
with the runtime's own reader, so a bundle that export writes is one that `from_pretrained` loads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from star_edge.bundle import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PICKLE_SUFFIXES,
    Bundle,
    file_sha256,
    load_bundle,
)
from star_edge.errors import BundleError, InvalidInputError
from star_edge.paths import file_in_the_way


def check_out_folder(out: str | Path) -> Path:
    """`out` as a Path, if it is a folder or can become one.

    Raises:
        InvalidInputError: `out`, or a folder on its way, is an existing file.
    """
    out = Path(out)
    blocking = out if out.exists() and not out.is_dir() else file_in_the_way(out)
    if blocking is not None:
        raise InvalidInputError(f"cannot write the bundle folder {out}: {blocking} is a file")
    return out


def write_manifest(
    root: str | Path,
    name: str,
    reasoner: dict[str, Any],
    sam: dict[str, Any],
    backends: Iterable[str] = ("torch",),
    trained: bool = False,
    extra: dict[str, Any] | None = None,
) -> Bundle:
    """Hash every file under the reasoner, SAM and backend folders and write the manifest.

    Args:
        root: the bundle folder; `reasoner["path"]` and `sam["path"]` are folders inside it.
        name: a human-readable bundle name.
        reasoner: the manifest's reasoner section (family, path, input_size, frame,
            prompt_template, max_new_tokens).
        sam: the manifest's SAM section (kind, variant, path, image_size).
        backends: the backends whose files are present.
        trained: False for bundles built from config with random or crafted weights.
        extra: additional top-level manifest fields (e.g. a model card).

    Returns:
        The bundle as read back and verified by `star_edge.bundle.load_bundle`.
    """
    root = Path(root)
    backends = list(backends)
    folders = [reasoner["path"], sam["path"]] + [b for b in backends if b != "torch"]
    files: dict[str, dict[str, Any]] = {}
    for folder in folders:
        for file in _files_under(root / folder):
            relative = file.relative_to(root).as_posix()
            if relative.lower().endswith(PICKLE_SUFFIXES):
                raise BundleError(f"{file}: pickle-based files may not go into a bundle")
            files[relative] = {"sha256": file_sha256(file), "bytes": file.stat().st_size}
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "name": name,
        "trained": trained,
        "reasoner": reasoner,
        "sam": sam,
        "backends": backends,
        **(extra or {}),
        "files": dict(sorted(files.items())),
    }
    target = root / MANIFEST_NAME
    temporary = target.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, target)
    return load_bundle(root)


def _files_under(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise BundleError(f"{folder}: expected a folder of model files")
    return sorted(path for path in folder.rglob("*") if path.is_file())
