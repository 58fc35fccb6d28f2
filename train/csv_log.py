"""`log.csv` of the SFT and SAM training loops: one row per logged step, appended as the run goes,
and rewound when a run resumes from a checkpoint older than its last logged step."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def append_row(path: Path, fields: Sequence[str], row: Mapping[str, Any]) -> None:
    """Append `row` (keys among `fields`; missing ones stay empty) to the CSV at `path`, writing
    the header first when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields))
        if new:
            writer.writeheader()
        writer.writerow(row)


def rewind(path: Path, fields: Sequence[str], step: int) -> None:
    """Keep the header and the rows up to `step`: a run stopped between checkpoints logged steps
    that the resumed run logs again. No file, nothing to do."""
    if not path.is_file():
        return
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= step]
    rewritten = path.with_name(path.name + ".tmp")
    with open(rewritten, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(rewritten, path)  # a run killed while rewinding keeps its log
