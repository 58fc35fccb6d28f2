"""Reading a model bundle: the manifest `star_edge.json` and the files it lists (DESIGN section 3).

A bundle is a folder:

    star_edge.json   the manifest (below)
    reasoner/        Hugging Face checkpoint (LoRA merged): config, *.safetensors, tokenizer, processor
    sam/             config.json + model.safetensors
    onnx/, tensorrt/ optional exported graphs and engines

Manifest fields (format_version 1)::

    {"format": "star-edge-bundle", "format_version": 1, "name": str, "trained": bool,
     "reasoner": {"family": "qwen2_5_vl" | "qwen3_vl", "path": "reasoner", "input_size": [W, H],
                  "frame": "pixels" | "grid1000", "prompt_template": str, "max_new_tokens": int},
     "sam": {"kind": "sam1" | "sam2", "variant": str, "path": "sam", "image_size": int},
     "files": {"<relative path>": {"sha256": hex str, "bytes": int}, ...},
     "backends": ["torch", ...]}

plus optional fields this module does not interpret: "card" (the model card of a trained
bundle) or "tensorrt" (the engines, read by `tensorrt_runtime`).

This module only reads; `star_edge.export.bundle_writer` writes. Every listed file is checked
against its size and sha256 (hashes are cached per process by path, size and mtime). Paths must stay
inside the bundle, and pickle-based weight files are refused: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from star_edge.errors import BundleError

_HEX_DIGITS = frozenset("0123456789abcdef")

MANIFEST_NAME = "star_edge.json"
FORMAT_NAME = "star-edge-bundle"
FORMAT_VERSION = 1
FAMILIES = ("qwen2_5_vl", "qwen3_vl")
FRAMES = ("pixels", "grid1000")
SAM_KINDS = ("sam1", "sam2")
BACKENDS = ("torch", "onnx", "tensorrt")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")

_HASH_CHUNK = 1 << 20
_hash_cache: dict[tuple[str, int, int], str] = {}
_hash_cache_lock = threading.Lock()


@dataclass(frozen=True)
class FileEntry:
    """One file listed in the manifest: its sha256 (hex) and size in bytes."""

    sha256: str
    size: int


@dataclass(frozen=True)
class ReasonerSpec:
    """The manifest's reasoner section."""

    family: str
    path: str
    input_size: tuple[int, int]
    frame: str
    prompt_template: str
    max_new_tokens: int


@dataclass(frozen=True)
class SamSpec:
    """The manifest's SAM section."""

    kind: str
    variant: str
    path: str
    image_size: int

    @property
    def model(self) -> dict[str, Any]:
        """Which SAM: {"kind", "variant", "image_size"}, as its config.json and ONNX export name it."""
        return {"kind": self.kind, "variant": self.variant, "image_size": self.image_size}


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    root: Path
    name: str
    trained: bool
    reasoner: ReasonerSpec
    sam: SamSpec
    files: dict[str, FileEntry]
    backends: tuple[str, ...]
    manifest: dict[str, Any]

    @property
    def reasoner_dir(self) -> Path:
        return self.root / self.reasoner.path

    @property
    def sam_dir(self) -> Path:
        return self.root / self.sam.path


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and check the bundle at `path`.

    Args:
        path: the bundle folder (or its star_edge.json).
        verify: check every listed file's size and sha256.

    Raises:
        BundleError: naming the file and what was expected, for a missing or unreadable manifest,
            an unknown format version, a malformed field, a path leaving the bundle, a pickle
            file, a listed file that is missing, truncated or altered, or a sam section that
            disagrees with the SAM config.
    """
    root = Path(path)
    try:
        if root.name == MANIFEST_NAME and root.is_file():
            root = root.parent
        if root.is_file():
            raise BundleError(f"{root} is a file; a bundle is the folder that holds {MANIFEST_NAME}")
        if not root.is_dir():
            raise BundleError(f"bundle folder not found: {root}")
    except OSError as exc:  # e.g. a name too long, a folder on the way that cannot be searched
        raise BundleError(f"cannot access bundle folder {root}: {exc.strerror or exc}") from None
    manifest = _read_manifest(root / MANIFEST_NAME)
    bundle = _parse_manifest(root, manifest)
    _refuse_pickle_files(bundle)
    if verify:
        verify_files(bundle)
    _check_sam_section(bundle)
    return bundle


def _check_sam_section(bundle: Bundle) -> None:
    """The manifest's sam kind, variant and image_size must be those of the sam/config.json it points
    to, when there is one (an ONNX-only bundle may have none; a broken one is its loader's to name)."""
    config_file = bundle.root / bundle.sam.path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return
    if not isinstance(config, dict):
        return
    for key, declared in bundle.sam.model.items():
        if key in config and config[key] != declared:
            raise BundleError(f"{bundle.root / MANIFEST_NAME}: sam.{key} is {declared!r} but "
                              f"{config_file} has {config[key]!r}")


def verify_files(bundle: Bundle) -> None:
    """Check that every file the manifest lists exists inside the bundle folder (symbolic links
    included) with the listed size and sha256."""
    root = bundle.root.resolve()
    for relative, entry in bundle.files.items():
        file = bundle.root / relative
        try:
            _verify_file(file, entry, root)
        except OSError as exc:  # unreadable, a name too long, ...
            raise BundleError(f"{file}: listed in {MANIFEST_NAME} but cannot be read: {exc.strerror or exc}") from None


def _verify_file(file: Path, entry: FileEntry, root: Path) -> None:
    if not file.is_file():
        raise BundleError(f"{file}: listed in {MANIFEST_NAME} but missing")
    if not file.resolve().is_relative_to(root):
        raise BundleError(f"{file}: a symbolic link to {file.resolve()}, outside the bundle folder")
    size = file.stat().st_size
    if size != entry.size:
        raise BundleError(f"{file}: {size} bytes, the manifest lists {entry.size} (truncated or replaced)")
    digest = file_sha256(file)
    if digest != entry.sha256:
        raise BundleError(
            f"{file}: sha256 {digest[:16]}... does not match the manifest's {entry.sha256[:16]}... (file altered)"
        )


def checkpoint_weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a Hugging Face checkpoint folder: the shards that
    `model.safetensors.index.json` lists when there is one, else `model.safetensors` (whether they
    exist is the caller's question).

    Raises:
        BundleError: an index that is not a safetensors index (named).
    """
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        return [directory / "model.safetensors"]
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as err:
        raise BundleError(f"{index} is not a safetensors index: {err}") from err
    return [directory / shard for shard in shards]


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file, cached per process by (resolved path, size, mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _hash_cache_lock:
        cached = _hash_cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    hexdigest = digest.hexdigest()
    with _hash_cache_lock:
        _hash_cache[key] = hexdigest
    return hexdigest


def check_relative_path(relative: str, where: str) -> str:
    """Return `relative` if it is a safe path inside a bundle, else raise BundleError."""
    if not isinstance(relative, str) or not relative:
        raise BundleError(f"{where}: expected a relative path, got {relative!r}")
    posix = PurePosixPath(relative.replace("\\", "/"))
    if not posix.parts:
        raise BundleError(f"{where}: path {relative!r} names the bundle folder itself")
    if posix.is_absolute() or relative.startswith(("/", "\\")) or ":" in posix.parts[0]:
        raise BundleError(f"{where}: absolute path {relative!r} is not allowed in a bundle")
    if ".." in posix.parts:
        raise BundleError(f"{where}: path {relative!r} leaves the bundle folder")
    return str(posix)


def _read_manifest(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise BundleError(f"{file}: manifest missing (is this a star-edge bundle folder?)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"{file}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{file}: manifest must be a JSON object")
    if manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{file}: 'format' must be {FORMAT_NAME!r}, got {manifest.get('format')!r}")
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # true and 1.0 are not versions
        raise BundleError(
            f"{file}: format_version {version!r} is not supported by this star-edge "
            f"(expected {FORMAT_VERSION}); upgrade star-edge or re-export the bundle"
        )
    return manifest


def _parse_manifest(root: Path, manifest: dict[str, Any]) -> Bundle:
    where = str(root / MANIFEST_NAME)
    reasoner = _section(manifest, "reasoner", where)
    sam = _section(manifest, "sam", where)
    reasoner_spec = ReasonerSpec(
        family=_choice(reasoner, "family", FAMILIES, where),
        path=check_relative_path(_field(reasoner, "path", str, where), f"{where}: reasoner.path"),
        input_size=_size_pair(reasoner, "input_size", where),
        frame=_choice(reasoner, "frame", FRAMES, where),
        prompt_template=_field(reasoner, "prompt_template", str, where),
        max_new_tokens=_positive_int(reasoner, "max_new_tokens", where),
    )
    sam_spec = SamSpec(
        kind=_choice(sam, "kind", SAM_KINDS, where),
        variant=_field(sam, "variant", str, where),
        path=check_relative_path(_field(sam, "path", str, where), f"{where}: sam.path"),
        image_size=_positive_int(sam, "image_size", where),
    )
    files = _parse_files(manifest.get("files"), where)
    trained = manifest.get("trained", False)
    if not isinstance(trained, bool):
        raise BundleError(f"{where}: 'trained' must be true or false, got {trained!r}")
    backends = manifest.get("backends", ["torch"])
    if not isinstance(backends, list) or not backends or not all(b in BACKENDS for b in backends):
        raise BundleError(f"{where}: 'backends' must be a non-empty list drawn from {BACKENDS}, got {backends!r}")
    return Bundle(
        root=root,
        name=str(manifest.get("name", root.name)),
        trained=trained,
        reasoner=reasoner_spec,
        sam=sam_spec,
        files=files,
        backends=tuple(backends),
        manifest=manifest,
    )


def _parse_files(files: object, where: str) -> dict[str, FileEntry]:
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{where}: 'files' must be a non-empty object of path -> {{sha256, bytes}}")
    parsed: dict[str, FileEntry] = {}
    for relative, entry in files.items():
        safe = check_relative_path(relative, f"{where}: files")
        if safe.lower().endswith(PICKLE_SUFFIXES):
            raise BundleError(
                f"{where}: {safe!r} is a pickle-based file; bundles hold safetensors only"
            )
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or len(entry["sha256"]) != 64
            or not set(entry["sha256"].lower()) <= _HEX_DIGITS
            or not isinstance(entry.get("bytes"), int)
            or isinstance(entry["bytes"], bool)
            or entry["bytes"] < 0
        ):
            raise BundleError(f"{where}: files[{relative!r}] must be {{'sha256': 64 hex chars, 'bytes': int}}")
        if safe in parsed:
            raise BundleError(f"{where}: files[{relative!r}] names {safe!r}, which files already lists")
        parsed[safe] = FileEntry(sha256=entry["sha256"].lower(), size=entry["bytes"])
    return parsed


def _refuse_pickle_files(bundle: Bundle) -> None:
    """Raise BundleError for any pickle-based file in the folders the runtime reads, listed in the
    manifest or not (the rule `star_edge.export.bundle_writer` applies when writing)."""
    folders = [bundle.reasoner.path, bundle.sam.path] + [b for b in bundle.backends if b != "torch"]
    for folder in folders:
        for file in (bundle.root / folder).rglob("*"):
            if file.name.lower().endswith(PICKLE_SUFFIXES):
                raise BundleError(f"{file}: a pickle-based file in the bundle; bundles hold safetensors only")


def _section(manifest: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    section = manifest.get(key)
    if not isinstance(section, dict):
        raise BundleError(f"{where}: missing or malformed '{key}' section")
    return section


def _field(section: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = section.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BundleError(f"{where}: '{key}' must be {kind.__name__}, got {value!r}")
    return value


def _choice(section: dict[str, Any], key: str, allowed: tuple[str, ...], where: str) -> str:
    value = section.get(key)
    if value not in allowed:
        raise BundleError(f"{where}: '{key}' must be one of {allowed}, got {value!r}")
    return value


def _positive_int(section: dict[str, Any], key: str, where: str) -> int:
    value = _field(section, key, int, where)
    if value <= 0:
        raise BundleError(f"{where}: '{key}' must be positive, got {value}")
    return value


def _size_pair(section: dict[str, Any], key: str, where: str) -> tuple[int, int]:
    value = section.get(key)
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise BundleError(f"{where}: '{key}' must be [width, height] positive integers, got {value!r}")
    return (value[0], value[1])
