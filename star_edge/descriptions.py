"""Reading the JSON files of a bundle: `read_json` for any of them (e.g. sam/config.json), and
`read_description` for the description files that export writes next to a bundle's graphs (e.g.
onnx/sam_onnx.json, onnx/reasoner_onnx.json): a format name, a format version and named sections."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from star_edge.errors import BundleError


def read_json(path: Path, what: str) -> Any:
    """The parsed content of the JSON file `path`.

    Raises:
        BundleError: the file is missing (the message says it should hold `what`, e.g. "the SAM
            config") or is not readable JSON; the message names the file.
    """
    if not path.is_file():
        raise BundleError(f"{path} is missing (expected {what})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not readable JSON: {exc}") from exc


def read_description(
    path: Path, format_name: str, format_version: int, sections: tuple[str, ...], what: str
) -> dict[str, Any]:
    """Read and check one description file.

    path: the file; format_name: what its "format" must be; format_version: the newest
    "format_version" this runtime reads (each version adds to the one before); sections: keys
    whose values must be JSON objects; what: how the file is named in the message when it is
    missing ("the SAM ONNX description").

    Raises:
        BundleError: missing or unreadable file, another format or version, a missing section;
            the message names the file.
    """
    description = read_json(path, what)
    if not isinstance(description, dict) or description.get("format") != format_name:
        raise BundleError(f"{path} is not a {format_name} description")
    version = description.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= format_version:
        raise BundleError(f"{path}: format_version {version!r}, this runtime reads 1 to {format_version}")
    for key in sections:
        if not isinstance(description.get(key), dict):
            raise BundleError(f"{path}: missing section {key!r}")
    return description


def graph_io_names(graph: Any, where: str | Path) -> tuple[list[str], list[str]]:
    """The input and output names of one graph entry of a description ({"inputs": [{"name": ...},
    ...], "outputs": [...], ...}); `where` names the description in messages.

    Raises:
        BundleError: the entry is not an object or lacks well-formed "inputs" / "outputs".
    """
    names = []
    for key in ("inputs", "outputs"):
        tensors = graph.get(key) if isinstance(graph, dict) else None
        if not isinstance(tensors, list) or not all(
                isinstance(tensor, dict) and isinstance(tensor.get("name"), str) for tensor in tensors):
            raise BundleError(f"{where}: a graph entry lacks {key!r}, a list of {{\"name\": ...}} objects: "
                              "export the bundle again")
        names.append([tensor["name"] for tensor in tensors])
    return names[0], names[1]
