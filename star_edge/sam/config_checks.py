"""Checks shared by the SAM 1 and SAM 2 config validators (no torch)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from star_edge.errors import InvalidInputError


def is_int(value: object) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_header(
    config: Any,
    keys: Collection[str],
    kind: str,
    variants: Collection[str],
    fail: Callable[[str], InvalidInputError],
) -> None:
    """A config dict with exactly `keys`, "kind" == `kind` and "variant" in `variants`.

    Raises:
        InvalidInputError: from `fail`, naming the first offending key and its value.
    """
    if not isinstance(config, dict):
        raise fail(f"expected a JSON object, got {type(config).__name__}")
    missing = sorted(set(keys) - config.keys())
    unknown = sorted(config.keys() - set(keys))
    if missing:
        raise fail(f"missing keys {missing}")
    if unknown:
        raise fail(f"unknown keys {unknown}")
    if config["kind"] != kind:
        raise fail(f"kind must be {kind!r}, got {config['kind']!r}")
    if config["variant"] not in variants:
        raise fail(f"variant must be one of {list(variants)}, got {config['variant']!r}")
