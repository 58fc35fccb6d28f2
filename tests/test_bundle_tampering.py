"""Damaged and hostile bundles fail with BundleError before any weight is used, through
`Segmenter.from_pretrained` and `star-edge segment` (exit 2, one line); nothing is ever unpickled.

A pristine tiny bundle is built once; each case copies it and damages the copy: altered files,
safetensors truncated behind a manifest that agrees with them, manifest paths and symbolic links
leaving the bundle, unknown format versions, pickle files listed or merely present. The last section
scans the source tree for loads that could unpickle (the check fails on a planted unsafe call).
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from star_edge.bundle import MANIFEST_NAME, load_bundle
from star_edge.cli import app
from star_edge.errors import BundleError
from star_edge.export.bundle_writer import write_manifest
from star_edge.export.tiny import make_tiny_bundle
from star_edge.segmenter import Segmenter

REPOSITORY = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "bundle"
    make_tiny_bundle(path, seed=0, family="qwen2_5_vl")
    return path


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(path)
    return path


def _copy(pristine: Path, tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    shutil.copytree(pristine, root)
    return root


def _edit_manifest(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / MANIFEST_NAME
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))

    return apply


def _rehashed(change: Callable[[Path], None]) -> Callable[[Path], None]:
    """Damage files, then rewrite the manifest so that sizes and hashes agree with the damage: only
    reading the weights can tell."""

    def apply(root: Path) -> None:
        manifest = json.loads((root / MANIFEST_NAME).read_text())
        change(root)
        write_manifest(root, name="rehashed", reasoner=manifest["reasoner"], sam=manifest["sam"])

    return apply


def _truncate(relative: str, keep: Callable[[int], int]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / relative
        data = path.read_bytes()
        path.write_bytes(data[: keep(len(data))])

    return apply


def _header_length(relative: str, length: int) -> Callable[[Path], None]:
    """Overwrite the 8-byte little-endian header length at the start of a safetensors file."""

    def apply(root: Path) -> None:
        path = root / relative
        data = bytearray(path.read_bytes())
        data[:8] = length.to_bytes(8, "little")
        path.write_bytes(bytes(data))

    return apply


def _link_out(relative: str) -> Callable[[Path], None]:
    """Move a file or folder out of the bundle and leave a symbolic link to it in its place."""

    def apply(root: Path) -> None:
        inside = root / relative
        outside = root.parent / ("outside-" + inside.name)
        shutil.move(inside, outside)
        inside.symlink_to(outside)

    return apply


def _drop(relative: str, data: bytes) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        (root / relative).parent.mkdir(exist_ok=True)
        (root / relative).write_bytes(data)

    return apply


class _Trap:
    """Unpickling this creates `marker`: the proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


NO_FILE = {"sha256": "0" * 64, "bytes": 1}
CASES = {
    # truncated or corrupt safetensors whose size and hash the manifest agrees with
    "reasoner weights cut in half": (_rehashed(_truncate("reasoner/model.safetensors", lambda n: n // 2)),
                                     r"reasoner.*(truncated|incomplete metadata|not fully covered)"),
    "reasoner weights cut to 4 bytes": (_rehashed(_truncate("reasoner/model.safetensors", lambda n: 4)),
                                        "reasoner.*header too small"),
    "reasoner weights lose 8 bytes": (_rehashed(_truncate("reasoner/model.safetensors", lambda n: n - 8)),
                                      "reasoner.*not fully covered"),
    "sam weights cut in half": (_rehashed(_truncate("sam/model.safetensors", lambda n: n // 2)),
                                r"sam/model\.safetensors is truncated or corrupt"),
    "sam weights empty": (_rehashed(_truncate("sam/model.safetensors", lambda n: 0)),
                          r"sam/model\.safetensors is truncated or corrupt"),
    "sam header claims 2**62 bytes": (_rehashed(_header_length("sam/model.safetensors", 2**62)),
                                      r"sam/model\.safetensors is truncated or corrupt.*too large"),
    "reasoner header claims 2**62 bytes": (_rehashed(_header_length("reasoner/model.safetensors", 2**62)),
                                           "reasoner.*header too large"),
    # manifest paths leaving the bundle
    "files: absolute path": (_edit_manifest(lambda m: m["files"].update({"/etc/passwd": NO_FILE})),
                             "absolute path '/etc/passwd'"),
    "files: Windows drive": (_edit_manifest(lambda m: m["files"].update({"C:\\weights.bin": NO_FILE})),
                             "absolute path"),
    "files: ../ with backslashes": (_edit_manifest(lambda m: m["files"].update({"..\\..\\x": NO_FILE})),
                                    "leaves the bundle folder"),
    "files: ../ in the middle": (_edit_manifest(lambda m: m["files"].update({"sam/../../x": NO_FILE})),
                                 "leaves the bundle folder"),
    "files: the bundle folder itself": (_edit_manifest(lambda m: m["files"].update({".": NO_FILE})),
                                        "names the bundle folder itself"),
    "reasoner.path absolute": (_edit_manifest(lambda m: m["reasoner"].update(path="/tmp")), "absolute path"),
    "reasoner.path '.'": (_edit_manifest(lambda m: m["reasoner"].update(path="./")),
                          "names the bundle folder itself"),
    "sam.path ../": (_edit_manifest(lambda m: m["sam"].update(path="sam/../../sam")), "leaves the bundle folder"),
    "file linked outside": (_link_out("sam/config.json"), r"sam/config\.json: a symbolic link to .*outside"),
    "folder linked outside": (_link_out("reasoner"), "reasoner/.*: a symbolic link to .*outside"),
    "trained as a string": (_edit_manifest(lambda m: m.update(trained="false")), "'trained' must be true or false"),
    **{f"sam.{key} disagrees with sam/config.json": (_edit_manifest(lambda m, k=key, v=value: m["sam"].update({k: v})),
                                                      f"sam.{key} is {value!r} but .*config.json has")
       for key, value in (("kind", "sam2"), ("variant", "vit_h"), ("image_size", 512))},
    # format versions this reader does not know
    **{f"format_version {version!r}": (_edit_manifest(lambda m, v=version: m.update(format_version=v)),
                                       "is not supported by this star-edge")
       for version in (0, 2, 99, -1, "1", 1.0, True, None, [1])},
    "format_version missing": (_edit_manifest(lambda m: m.pop("format_version")), "format_version None"),
    "manifest nested 100000 deep": (lambda root: (root / MANIFEST_NAME).write_text("[" * 100_000),
                                    "unreadable manifest"),
    # pickle files, listed or not
    "pickle listed in the manifest": (_edit_manifest(lambda m: m["files"].update({"sam/sam_vit_b.pth": NO_FILE})),
                                      "pickle-based"),
    **{f"unlisted {name}": (_drop(name, b"\x80\x04N."), "pickle-based file in the bundle")
       for name in ("reasoner/pytorch_model.bin", "reasoner/training_args.PT", "sam/sam_vit_b_01ec64.pth",
                    "sam/extra/optimizer.ckpt", "reasoner/cache.pkl")},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_damaged_bundles_fail_with_bundle_error(name, pristine, photo, tmp_path):
    damage, message = CASES[name]
    root = _copy(pristine, tmp_path)
    damage(root)
    with pytest.raises(BundleError, match=message):
        Segmenter.from_pretrained(root)
    result = CliRunner().invoke(app, ["segment", str(photo), "cup", "-n", "1", "--bundle", str(root)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def test_every_listed_file_is_checked_by_hash(pristine, tmp_path):
    """One byte changed in any listed file, size kept: refused, naming that file."""
    root = _copy(pristine, tmp_path)
    files = json.loads((root / MANIFEST_NAME).read_text())["files"]
    assert len(files) >= 8
    for relative in files:
        path = root / relative
        original = path.read_bytes()
        changed = bytearray(original)
        changed[len(changed) // 2] ^= 0x01
        path.write_bytes(bytes(changed))
        with pytest.raises(BundleError, match=rf"{relative}: sha256 .* \(file altered\)"):
            Segmenter.from_pretrained(root)
        path.write_bytes(original)
    assert Segmenter.from_pretrained(root).bundle.name == load_bundle(pristine).name


def test_a_pickle_in_the_bundle_is_refused_not_loaded(pristine, tmp_path):
    """A booby-trapped pickle where transformers or torch would look for weights is never opened."""
    root = _copy(pristine, tmp_path)
    marker = tmp_path / "unpickled"
    payload = pickle.dumps({"weight": _Trap(marker)})
    assert not marker.exists()
    pickle.loads(payload)  # the trap works: loading it would leave the marker
    assert marker.exists()
    marker.unlink()
    for name in ("reasoner/pytorch_model.bin", "sam/sam_vit_b.pth"):
        (root / name).write_bytes(payload)
        with pytest.raises(BundleError, match="pickle-based"):
            Segmenter.from_pretrained(root)
        with pytest.raises(BundleError, match="pickle-based"):
            load_bundle(root, verify=False)
        (root / name).unlink()
    assert not marker.exists()


# --- nothing is ever unpickled: the source tree -------------------------------------------------

SCANNED = ("star_edge", "kernels", "export", "train", "benchmarks", "examples")
UNPICKLERS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "dill.load",
    "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load", "marshal.load", "marshal.loads",
    "shelve.open", "pandas.read_pickle", "yaml.unsafe_load", "yaml.full_load",
}


def _qualified_names(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted name of what it was imported as (`np` -> `numpy`, `load` -> `torch.load`)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, names: dict[str, str]) -> str | None:
    if isinstance(node, ast.Name):
        return names.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, names)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _keyword(call: ast.Call, name: str) -> object:
    """The constant value of keyword `name` in `call`; `...` when absent, None when not a constant."""
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else None
    return ...


def unsafe_loads(source: str) -> list[str]:
    """Calls in `source` that could unpickle or run foreign code: torch.load without
    weights_only=True, numpy.load with allow_pickle other than False, yaml.load without SafeLoader,
    any pickle-family loader, and trust_remote_code=True."""
    tree = ast.parse(source)
    names = _qualified_names(tree)
    found = []
    for call in (node for node in ast.walk(tree) if isinstance(node, ast.Call)):
        name = _dotted(call.func, names) or ""
        where = f"line {call.lineno}: {name}"
        if name == "torch.load" and _keyword(call, "weights_only") is not True:
            found.append(f"{where} without weights_only=True")
        elif name == "numpy.load" and _keyword(call, "allow_pickle") not in (False, ...):
            found.append(f"{where} with allow_pickle not False")
        elif name == "yaml.load" and not any(
                keyword.arg == "Loader" and "Safe" in ast.unparse(keyword.value) for keyword in call.keywords):
            found.append(f"{where} without a SafeLoader")
        elif name in UNPICKLERS:
            found.append(where)
        if _keyword(call, "trust_remote_code") not in (False, ...):
            found.append(f"{where} with trust_remote_code")
    return found


@pytest.mark.parametrize(
    "source, flagged",
    [
        ("import torch\ntorch.load(p)", True),
        ("import torch\ntorch.load(p, weights_only=False)", True),
        ("import torch\ntorch.load(p, weights_only=flag)", True),
        ("import torch\ntorch.load(p, map_location='cpu', weights_only=True)", False),
        ("from torch import load as read\nread(p)", True),
        ("import numpy as np\nnp.load(p, allow_pickle=True)", True),
        ("import numpy as np\nnp.load(p)", False),
        ("import numpy\nnumpy.load(p, allow_pickle=False)", False),
        ("import pickle\npickle.loads(b)", True),
        ("from pickle import load\nload(f)", True),
        ("import joblib\njoblib.load(p)", True),
        ("import yaml\nyaml.load(text)", True),
        ("import yaml\nyaml.load(text, Loader=yaml.SafeLoader)", False),
        ("import yaml\nyaml.safe_load(text)", False),
        ("from transformers import AutoModel\nAutoModel.from_pretrained(p, trust_remote_code=True)", True),
        ("json.load(f)", False),
    ],
)
def test_the_unsafe_load_scanner_flags_what_it_should(source, flagged):
    assert bool(unsafe_loads(source)) == flagged


def test_no_source_file_can_unpickle():
    files = [path for folder in SCANNED for path in sorted((REPOSITORY / folder).rglob("*.py"))]
    assert len(files) > 50
    findings = {str(path.relative_to(REPOSITORY)): unsafe_loads(path.read_text(encoding="utf-8")) for path in files}
    assert {path: found for path, found in findings.items() if found} == {}
    torch_loads = sum(path.read_text(encoding="utf-8").count("torch.load(") for path in files)
    assert torch_loads >= 1, "the scan should see the known torch.load calls (all weights_only=True)"
