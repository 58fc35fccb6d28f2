"""Bundle manifest: what the writer hashes the reader verifies; every kind of damage is named."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from star_edge.bundle import MANIFEST_NAME, file_sha256, load_bundle
from star_edge.errors import BundleError
from star_edge.export.bundle_writer import write_manifest

REASONER = {"family": "qwen3_vl", "path": "reasoner", "input_size": [256, 256], "frame": "grid1000",
            "prompt_template": "star_v1", "max_new_tokens": 64}
SAM = {"kind": "sam1", "variant": "tiny", "path": "sam", "image_size": 256}


@pytest.fixture()
def bundle_dir(tmp_path):
    root = tmp_path / "bundle"
    (root / "reasoner").mkdir(parents=True)
    (root / "sam").mkdir()
    (root / "reasoner" / "config.json").write_text('{"model_type": "qwen3_vl"}')
    (root / "reasoner" / "model.safetensors").write_bytes(os.urandom(4096))
    (root / "sam" / "config.json").write_text('{"kind": "sam1"}')
    (root / "sam" / "model.safetensors").write_bytes(os.urandom(2048))
    write_manifest(root, name="test", reasoner=REASONER, sam=SAM)
    return root


def _edit_manifest(root, edit) -> None:
    path = root / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_written_manifest_lists_every_file_with_its_sha256(bundle_dir):
    bundle = load_bundle(bundle_dir)
    assert set(bundle.files) == {"reasoner/config.json", "reasoner/model.safetensors",
                                 "sam/config.json", "sam/model.safetensors"}
    for relative, entry in bundle.files.items():
        data = (bundle_dir / relative).read_bytes()
        assert entry.sha256 == hashlib.sha256(data).hexdigest() and entry.size == len(data)
    assert bundle.reasoner.input_size == (256, 256) and bundle.reasoner.frame == "grid1000"
    assert bundle.sam.image_size == 256 and bundle.backends == ("torch",)
    assert load_bundle(bundle_dir / MANIFEST_NAME).root == bundle_dir


def test_hash_cache_notices_a_rewritten_file(bundle_dir):
    path = bundle_dir / "sam" / "config.json"
    first = file_sha256(path)
    path.write_text('{"kind": "sam2"}')
    os.utime(path, ns=(1, 1))
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest() != first


def test_tampered_file_is_named(bundle_dir):
    path = bundle_dir / "reasoner" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.safetensors: sha256 .* altered"):
        load_bundle(bundle_dir)


def test_truncated_and_missing_files_are_named(bundle_dir):
    path = bundle_dir / "sam" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(BundleError, match=r"sam/model\.safetensors: 100 bytes, the manifest lists 2048"):
        load_bundle(bundle_dir)
    path.unlink()
    with pytest.raises(BundleError, match=r"sam/model\.safetensors: listed .* but missing"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
        (lambda m: m.update(format="other"), "'format' must be"),
        (lambda m: m["reasoner"].update(family="llama"), "'family' must be one of"),
        (lambda m: m["reasoner"].update(input_size=[0, 840]), "'input_size'"),
        (lambda m: m["reasoner"].update(path="../elsewhere"), "leaves the bundle"),
        (lambda m: m["sam"].update(path="/etc"), "absolute path"),
        (lambda m: m["files"].update({"../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}),
         "leaves the bundle"),
        (lambda m: m["files"].update({"sam/weights.pth": {"sha256": "0" * 64, "bytes": 1}}),
         "pickle-based"),
        (lambda m: m["files"].update({"sam/x": {"sha256": "abc", "bytes": 1}}), "64 hex"),
        (lambda m: m["files"].update({"sam/x": {"sha256": "g" * 64, "bytes": 1}}), "64 hex"),
        (lambda m: m["files"].update({"sam/x": {"sha256": "0" * 64, "bytes": True}}), "64 hex"),
        (lambda m: m["files"].update({"sam//model.safetensors": m["files"]["sam/model.safetensors"]}),
         r"files\['sam//model.safetensors'\] names 'sam/model.safetensors', which files already lists"),
        (lambda m: m.update(backends=["cuda"]), "'backends'"),
        (lambda m: m.update(backends=[]), "'backends' must be a non-empty list"),
        (lambda m: m.pop("sam"), "'sam' section"),
    ],
)
def test_malformed_manifests_are_refused(bundle_dir, edit, message):
    _edit_manifest(bundle_dir, edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_dir)


def test_missing_or_unreadable_manifest(tmp_path, bundle_dir):
    with pytest.raises(BundleError, match="bundle folder not found"):
        load_bundle(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="manifest missing"):
        load_bundle(bundle_dir / "sam")
    with pytest.raises(BundleError, match=r"model\.safetensors is a file; a bundle is the folder that holds"):
        load_bundle(bundle_dir / "sam" / "model.safetensors")
    (bundle_dir / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        load_bundle(bundle_dir)


def test_paths_the_file_system_refuses_are_named_as_bundle_errors(tmp_path, bundle_dir):
    with pytest.raises(BundleError, match="cannot access bundle folder .*: File name too long"):
        load_bundle(tmp_path / ("y" * 300))
    _edit_manifest(bundle_dir, lambda m: m["files"].update({"reasoner/" + "x" * 300: {"sha256": "0" * 64,
                                                                                        "bytes": 1}}))
    with pytest.raises(BundleError, match="listed in star_edge.json but cannot be read: File name too long"):
        load_bundle(bundle_dir)


def test_writer_refuses_pickle_files(bundle_dir):
    (bundle_dir / "sam" / "extra.pth").write_bytes(b"\x80\x04")
    with pytest.raises(BundleError, match="pickle-based files may not go into a bundle"):
        write_manifest(bundle_dir, name="test", reasoner=REASONER, sam=SAM)
