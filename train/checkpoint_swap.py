"""The one checkpoint folder of the SFT and SAM training loops, replaced whole.

`staging_folder` gives an empty `<checkpoint>.tmp` to write the next checkpoint into (its
trainer_state.json last); `swap_in` flushes it to disk, moves the current checkpoint to
`<checkpoint>.old`, the new one into place and deletes the old one. A run killed between those two
moves leaves no `<checkpoint>`: `recover` puts back the newest complete one, so a resumed run goes
on from it instead of starting over (and rewinding its log to nothing).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

STATE_FILE = "trainer_state.json"
"""Written last into a staged checkpoint: a folder that has it is complete."""


def staging_folder(checkpoint: Path) -> Path:
    """An empty `<checkpoint>.tmp` folder (a leftover of a killed save is removed)."""
    staging = checkpoint.with_name(checkpoint.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def swap_in(staging: Path, checkpoint: Path) -> Path:
    """Replace `checkpoint` by the complete `staging` folder; returns `checkpoint`."""
    _flush(staging)
    previous = checkpoint.with_name(checkpoint.name + ".old")
    shutil.rmtree(previous, ignore_errors=True)
    if checkpoint.exists():
        checkpoint.rename(previous)
    staging.rename(checkpoint)
    _flush_folder(checkpoint.parent)
    shutil.rmtree(previous, ignore_errors=True)
    return checkpoint


def recover(checkpoint: Path) -> bool:
    """Where a run was killed between `swap_in`'s moves (no `checkpoint`), move the newest complete
    checkpoint back into place: the staged one if its state file was written, else the previous
    one. Returns whether one was moved."""
    if checkpoint.exists():
        return False
    for suffix in (".tmp", ".old"):
        candidate = checkpoint.with_name(checkpoint.name + suffix)
        if (candidate / STATE_FILE).is_file():
            candidate.rename(checkpoint)
            return True
    return False


def _flush(folder: Path) -> None:
    """fsync every file under `folder`, then the folders, so a power loss cannot leave a checkpoint
    whose state file exists but whose weights are empty."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for path in [*sorted(p for p in folder.rglob("*") if p.is_dir()), folder]:
        _flush_folder(path)


def _flush_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
