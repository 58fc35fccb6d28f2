"""Where an output can go: the one check that writing a file or folder at a path needs first."""

from __future__ import annotations

from pathlib import Path


def file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` when it is not a folder (a file there stops `path`
    being made); None when that ancestor is a folder.

    Raises:
        OSError: the file system could not be asked (a name too long, a folder that cannot be searched).
    """
    above = next((parent for parent in path.parents if parent.exists()), None)
    return above if above is not None and not above.is_dir() else None
