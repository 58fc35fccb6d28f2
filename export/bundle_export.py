"""`star-edge export --bundle DIR --out DIR [--onnx ...] [--tensorrt]`: a bundle copied, its
backends exported, its manifest rewritten.

Idempotent: files already in `out` with the right size and sha256 are not copied again, and the
ONNX export is skipped when the manifest records an export of the same inputs (the `onnx` record:
a fingerprint over the reasoner's and SAM's listed files, the variants and the exporter's versions)
and its files verify; a second run then leaves every file and the manifest as they were. TensorRT
engines (one set per GPU architecture and TensorRT version, `tensorrt_engines`) are kept while they
were built from the ONNX graphs the bundle holds, and built again only for this machine's key when
their precision, sizes or graphs changed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from dataclasses import asdict
from typing import Any

from star_edge.bundle import BACKENDS, MANIFEST_NAME, Bundle, file_sha256, load_bundle
from star_edge.errors import BundleError, InvalidInputError
from star_edge.export.bundle_writer import check_out_folder, write_manifest
from star_edge.export.tensorrt_engines import (
    PRECISIONS,
    build_bundle_engines,
    current_engine_records,
    remove_unrecorded_engines,
)
from star_edge.export.tensorrt_profiles import ProfileSettings
from star_edge.tensorrt_runtime import GRAPHS, Platform, detect_platform, engine_records

#: Manifest keys the writer sets itself; any others are carried over as they are.
_WRITTEN_KEYS = ("format", "format_version", "name", "trained", "reasoner", "sam", "backends", "files")


def _copy_listed_files(source: Bundle, out: Path, say: Callable[[str], None]) -> None:
    """Copy every file the source manifest lists into `out`, skipping those already equal, and
    remove the files in out's reasoner and SAM folders that the source does not list (left by an
    older bundle there, they would be hashed into the new manifest: a stale chat template or shard
    index read in place of the source's)."""
    copied = 0
    for relative, entry in source.files.items():
        target = out / relative
        if target.is_file() and target.stat().st_size == entry.size and file_sha256(target) == entry.sha256:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.root / relative, target)
        copied += 1
    if copied:
        say(f"copied {copied} files of {source.name}")
    for folder in (source.reasoner.path, source.sam.path):
        for file in sorted((out / folder).rglob("*")):
            if (file.is_file() or file.is_symlink()) and file.relative_to(out).as_posix() not in source.files:
                file.unlink()
                say(f"removed {file.relative_to(out).as_posix()}, which {source.name} does not list")


def onnx_fingerprint(bundle: Bundle, variants: tuple[str, ...]) -> str:
    """sha256 over the reasoner's and SAM's listed files (their sha256), the variants and the
    versions of the exporters."""
    import onnx
    import torch
    import transformers

    from star_edge.reasoner.onnx_backend import FORMAT_VERSION as REASONER_FORMAT
    from star_edge.sam.onnx_backend import FORMAT_VERSION as SAM_FORMAT

    folders = (bundle.reasoner.path + "/", bundle.sam.path + "/")
    listed = {path: entry.sha256 for path, entry in bundle.files.items() if path.startswith(folders)}
    record = {"files": listed, "reasoner": bundle.manifest["reasoner"], "sam": bundle.manifest["sam"],
              "variants": sorted(variants), "torch": torch.__version__, "transformers": transformers.__version__,
              "onnx": onnx.__version__, "formats": [REASONER_FORMAT, SAM_FORMAT]}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _export_onnx(bundle: Bundle, variants: tuple[str, ...], say: Callable[[str], None]) -> None:
    from star_edge.export.reasoner_onnx import export_reasoner_onnx
    from star_edge.export.sam_onnx import export_sam_onnx

    folder = bundle.root / "onnx"
    if folder.exists():
        shutil.rmtree(folder)
    say("exporting SAM (image encoder, prompt decoder)")
    export_sam_onnx(bundle.sam_dir, folder, variants=variants)
    export_reasoner_onnx(bundle.reasoner_dir, bundle.manifest["reasoner"], folder, variants=variants, progress=say)


def export_bundle(
    source: str | Path,
    out: str | Path,
    onnx: bool = False,
    variants: tuple[str, ...] = ("fp32",),
    tensorrt: bool = False,
    engine_precision: str = "fp16",
    engine_settings: ProfileSettings | None = None,
    progress: Callable[[str], None] | None = None,
) -> Bundle:
    """Write the bundle at `source` into `out` (the same folder is allowed) with the backends asked for.

    Args:
        source: a bundle folder.
        out: the bundle folder to write.
        onnx: export the reasoner and SAM to ONNX into out/onnx.
        variants: decoder variants of the ONNX export ("fp32" and optionally "int8", "fp16"); they
            apply to the reasoner's and SAM's decoders.
        tensorrt: build TensorRT engines for this machine's GPU (cuda:0) and TensorRT into
            out/tensorrt/<key>/ (implies onnx: they are built from the ONNX graphs).
        engine_precision: "fp16" or "fp32" engines.
        engine_settings: the sizes the engines take (N samples, query tokens, SAM prompts).
        progress: called with a short line before each step.

    Returns:
        The written bundle as the runtime reads it (files verified).

    Raises:
        BundleError: a broken source bundle; an export that fails its checks.
        BackendUnavailableError: tensorrt=True without TensorRT 10, torch or a CUDA device (raised
            before anything is written).
        InvalidInputError: an unknown engine precision; `out` is (or lies under) a file.
    """
    say = progress or (lambda line: None)
    if tensorrt and engine_precision not in PRECISIONS:
        raise InvalidInputError(f"engine precision must be one of {PRECISIONS}, got {engine_precision!r}")
    platform = detect_platform("cuda") if tensorrt else None
    onnx = onnx or tensorrt
    out = check_out_folder(out)
    bundle = load_bundle(source)
    if out.resolve() != bundle.root.resolve():
        _copy_listed_files(bundle, out, say)
    manifest = bundle.manifest
    extra = {key: value for key, value in manifest.items() if key not in _WRITTEN_KEYS}
    backends = list(bundle.backends)
    if onnx:
        fingerprint = onnx_fingerprint(bundle, variants)
        if _recorded_fingerprint(out) == fingerprint:
            say("the ONNX graphs are up to date")
        else:
            _export_onnx(_with_root(bundle, out), variants, say)
        extra["onnx"] = {"fingerprint": fingerprint, "variants": sorted(variants)}
        backends = sorted(set(backends) | {"torch", "onnx"}, key=BACKENDS.index)
    onnx_record = extra.get("onnx")
    graphs_fingerprint = onnx_record.get("fingerprint") if isinstance(onnx_record, dict) else None
    engines = current_engine_records(engine_records(bundle), graphs_fingerprint)
    if platform is not None:
        settings = engine_settings or ProfileSettings()
        engines[platform.engine_key] = _engines_for(_with_root(bundle, out), platform, engine_precision, settings,
                                                    graphs_fingerprint, engines.get(platform.engine_key), say)
    remove_unrecorded_engines(out, engines)
    extra.pop("tensorrt", None)
    if engines:
        extra["tensorrt"] = {"engines": engines}
    backends = sorted((set(backends) - {"tensorrt"}) | ({"tensorrt"} if engines else set()), key=BACKENDS.index)
    say("writing the manifest (sha256 of every file)")
    return write_manifest(out, name=bundle.name, reasoner=manifest["reasoner"], sam=manifest["sam"],
                          backends=backends, trained=bundle.trained, extra=extra)


def _engines_for(
    bundle: Bundle,
    platform: Platform,
    precision: str,
    settings: ProfileSettings,
    onnx_fingerprint: str,
    recorded: dict[str, Any] | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """The engine record for `platform`: the recorded one when it was built the same way and its
    files are there, else a fresh build's."""
    wanted = {"precision": precision, "settings": asdict(settings), "onnx_fingerprint": onnx_fingerprint}
    if recorded is not None and all(recorded.get(key) == value for key, value in wanted.items()):
        try:
            present = all((bundle.root / recorded["graphs"][name]["engine"]).is_file() for name in GRAPHS)
        except (KeyError, TypeError):
            present = False
        if present:
            say(f"the TensorRT engines for {platform.engine_key} are up to date")
            return recorded
    return build_bundle_engines(bundle.root, bundle.reasoner_dir, bundle.reasoner.max_new_tokens, onnx_fingerprint,
                                platform, precision, settings, say)


def _recorded_fingerprint(root: Path) -> str | None:
    """The ONNX fingerprint recorded by a verified bundle at `root`, if there is one."""
    if not (root / MANIFEST_NAME).is_file():
        return None
    try:
        record = load_bundle(root).manifest.get("onnx")
    except BundleError:
        return None
    return record.get("fingerprint") if isinstance(record, dict) else None


def _with_root(bundle: Bundle, root: Path) -> Bundle:
    """`bundle` as if it lived in `root` (after its files were copied there)."""
    return Bundle(root=root, name=bundle.name, trained=bundle.trained, reasoner=bundle.reasoner, sam=bundle.sam,
                  files=bundle.files, backends=bundle.backends, manifest=bundle.manifest)

