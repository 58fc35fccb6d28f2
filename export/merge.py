"""LoRA adapters merged into their base Qwen2.5-VL / Qwen3-VL checkpoint, and the merged bundle.

StAR publishes its models as LoRA adapters in peft's format (adapter_config.json +
adapter_model.safetensors) over a base checkpoint. `merge_lora` loads the base with its own model
class, applies the adapter with peft, checks that every adapter tensor found its module, merges
(`merge_and_unload`), checks that the merged model computes what the unmerged one did on a probe
input (an image and text, so the vision tower and the language model both run), and writes a plain
checkpoint (safetensors) with the base's tokenizer and processor files. `write_merged_bundle` adds a
SAM folder and the manifest.

Adapters saved against the older transformers layout of Qwen2.5-VL (`model.layers.*` and `visual.*`
instead of `model.language_model.layers.*` and `model.visual.*`, transformers < 4.52) are renamed on
load by LEGACY_KEY_MAPPING (the rule transformers applies to such base checkpoints; peft 0.21 does not
apply it to adapters of this model type); the key check catches any that still do not fit.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from star_edge.bundle import Bundle
from star_edge.errors import BackendUnavailableError, BundleError, InvalidInputError
from star_edge.export.bundle_writer import check_out_folder, write_manifest
from star_edge.reasoner.torch_backend import FAMILIES, quiet_transformers
from star_edge.sam.checkpoints import check_sam_dir, read_sam_config

#: Files a base checkpoint must have besides its weights (the bundle's reasoner needs them).
REQUIRED_BASE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")
#: Suffixes of the base's non-weight files copied next to the merged weights.
PROCESSOR_SUFFIXES = (".json", ".jinja", ".txt")
#: Files the merged checkpoint writes itself (not copied from the base).
WRITTEN_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
#: Default reasoner input size per family: 840 px (StAR's) for Qwen2.5-VL; for Qwen3-VL (patch 16 x
#: merge 2) the multiple of 32 nearest 840, which is also where Qwen3-VL's own processor resizes an
#: 840 px image.
DEFAULT_INPUT_SIZE = {"qwen2_5_vl": 840, "qwen3_vl": 832}
#: Coordinate frame of the answers per family (DESIGN section 5).
FAMILY_FRAMES = {"qwen2_5_vl": "pixels", "qwen3_vl": "grid1000"}
#: Adapter key renames (after peft's "base_model.model." prefix): the pre-4.52 Qwen-VL layout to today's.
LEGACY_KEY_MAPPING = {
    r"^visual\.": "model.visual.",
    r"^model\.(?!language_model\.|visual\.)": "model.language_model.",
}
#: Largest allowed max |merged - unmerged| / max |unmerged logit| on the probe, per weight dtype.
MERGE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class MergeReport:
    """What `merge_lora` did.

    Attributes:
        family: "qwen2_5_vl" or "qwen3_vl".
        dtype: the weights' dtype (as loaded and as written).
        lora_modules: modules the adapter changed.
        max_abs_diff: max |merged - unmerged| over the probe's logits.
        max_abs_logit: max |unmerged logit| on the probe (the scale of max_abs_diff).
        adapter_effect: max |unmerged - base| over the probe's logits (0 for an adapter that changes
            nothing, e.g. freshly initialised).
    """

    family: str
    dtype: torch.dtype
    lora_modules: int
    max_abs_diff: float
    max_abs_logit: float
    adapter_effect: float


def checkpoint_family(directory: Path) -> str:
    """The family ("qwen2_5_vl" | "qwen3_vl") of the checkpoint in `directory`, from its config.json.

    Raises:
        BundleError: no readable config.json, or another model type.
    """
    path = Path(directory) / "config.json"
    try:
        model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise BundleError(f"{path}: cannot read the model config ({err})") from err
    if model_type not in FAMILIES:
        raise BundleError(f"{path}: model_type {model_type!r} is not one of {sorted(FAMILIES)}")
    return model_type


def probe_inputs(config: PreTrainedConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small fixed multimodal input built from the config alone (no tokenizer, no image file).

    A 2 x 2 grid of merged patches (4 image tokens) between vision start/end tokens, with ordinary
    token ids around it; pixel values are seeded noise.

    Returns:
        input_ids (1, 24) int64, mm_token_type_ids (1, 24) int64, image_grid_thw (1, 3) int64,
        pixel_values (4 * merge**2, 3 * temporal_patch * patch**2) float32.
    """
    vision = config.vision_config
    merge = vision.spatial_merge_size
    patches = 4 * merge * merge
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(patches, 3 * vision.temporal_patch_size * vision.patch_size**2, generator=generator)
    text = [int(t) for t in torch.randint(0, min(config.get_text_config().vocab_size, 150000), (18,), generator=generator)]
    ids = text[:8] + [config.vision_start_token_id] + [config.image_token_id] * 4 + [config.vision_end_token_id] + text[8:]
    input_ids = torch.tensor([ids])
    return {
        "input_ids": input_ids,
        "mm_token_type_ids": (input_ids == config.image_token_id).long(),
        "image_grid_thw": torch.tensor([[1, 2 * merge, 2 * merge]]),
        "pixel_values": pixel_values,
    }


@torch.inference_mode()
def _probe_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(1, L, V) float32 logits of `model` on the probe inputs."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    moved = {name: value.to(device) for name, value in inputs.items()}
    moved["pixel_values"] = moved["pixel_values"].to(dtype)
    return model(**moved).logits.float()


def _check_adapter_dir(adapter: Path) -> None:
    if not (adapter / "adapter_config.json").is_file():
        raise BundleError(f"LoRA adapter {adapter} lacks adapter_config.json")
    if not (adapter / "adapter_model.safetensors").is_file():
        pickled = [name for name in ("adapter_model.bin", "adapter_model.pt") if (adapter / name).is_file()]
        hint = f" ({pickled[0]} is pickle-based; save the adapter as safetensors)" if pickled else ""
        raise BundleError(f"LoRA adapter {adapter} lacks adapter_model.safetensors{hint}")


def _check_base_dir(base: Path) -> None:
    if not base.is_dir():
        raise BundleError(f"base checkpoint {base} does not exist")
    for name in REQUIRED_BASE_FILES:
        if not (base / name).is_file():
            raise BundleError(f"base checkpoint {base} lacks {name}")
    if not any(base.glob("*.safetensors")):
        raise BundleError(f"base checkpoint {base} has no *.safetensors weights (pickle-based weights are refused)")


def _apply_adapter(model: PreTrainedModel, adapter: Path) -> torch.nn.Module:
    """`model` wrapped in peft with the adapter's weights loaded; every adapter tensor must land."""
    try:
        from peft import PeftConfig, PeftModel, PeftType
    except ImportError as err:
        raise BackendUnavailableError(
            "merging a LoRA adapter needs peft: pip install 'star-edge[train]'") from err

    try:
        peft_config = PeftConfig.from_pretrained(str(adapter))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise BundleError(f"{adapter / 'adapter_config.json'}: not a peft adapter config ({err})") from err
    if peft_config.peft_type != PeftType.LORA:
        raise BundleError(f"{adapter}: a {peft_config.peft_type} adapter; only LoRA adapters are merged")
    try:
        wrapped = PeftModel(model, peft_config, adapter_name="default")
        result = wrapped.load_adapter(
            str(adapter), adapter_name="default", torch_device=str(model.device), key_mapping=LEGACY_KEY_MAPPING
        )
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise BundleError(f"cannot apply the LoRA adapter {adapter}: {_first_line(err)}") from err
    unplaced = [key for key in result.unexpected_keys if "lora_" in key]
    if result.missing_keys or unplaced:
        names = (result.missing_keys + unplaced)[:3]
        raise BundleError(
            f"LoRA adapter {adapter} does not fit the base model: {len(result.missing_keys)} adapter weights "
            f"missing and {len(unplaced)} without a module (e.g. {names})"
        )
    return wrapped


def _first_line(error: Exception) -> str:
    """An exception's message cut to one line: torch's size-mismatch report lists every tensor (hundreds
    of lines for a 7B adapter on the wrong base); the first two tensors it names say enough."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(error).__name__
    mismatches = [line for line in lines if line.startswith("size mismatch")]
    shown = mismatches[:2] if mismatches else lines[:1]
    more = len(mismatches) - len(shown) if mismatches else len(lines) - 1
    return " ".join(shown) + (f" (and {more} more)" if more > 0 else "")


def merge_lora(base: str | Path, adapter: str | Path, out: str | Path, dtype: str | torch.dtype = "auto") -> MergeReport:
    """Merge a peft LoRA adapter into its base checkpoint and write the result to `out`.

    Args:
        base: the base checkpoint folder (config.json, *.safetensors, tokenizer and processor files).
        adapter: the adapter folder (adapter_config.json, adapter_model.safetensors).
        out: where the merged checkpoint goes: written as OUT.partial beside it, then put in its
            place (an older folder there is replaced whole, so none of its files outlive it).
        dtype: weights dtype for loading, merging and writing; "auto" keeps the checkpoint's.

    Returns:
        MergeReport.

    Raises:
        BundleError: a missing or unusable file, an adapter that does not fit the base, or merged
            outputs that differ from the unmerged ones beyond MERGE_TOLERANCE.
        BackendUnavailableError: peft is not installed (the `train` extra).
    """
    base, adapter, out = Path(base), Path(adapter), Path(out)
    _check_base_dir(base)
    _check_adapter_dir(adapter)
    family = checkpoint_family(base)
    model_class = FAMILIES[family][0]
    try:
        with quiet_transformers():
            model = model_class.from_pretrained(base, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise BundleError(f"cannot load the base checkpoint {base}: {err}") from err
    model.eval()
    probe = probe_inputs(model.config)
    base_logits = _probe_logits(model, probe)
    wrapped = _apply_adapter(model, adapter)
    lora_modules = sum(1 for name, _ in wrapped.named_modules() if name.endswith("lora_A"))
    unmerged = _probe_logits(wrapped, probe)
    try:
        merged_model = wrapped.merge_and_unload()
    except (ValueError, RuntimeError) as err:
        raise BundleError(f"cannot merge the LoRA adapter {adapter}: {_first_line(err)}") from err
    merged = _probe_logits(merged_model, probe)
    scale = float(unmerged.abs().max())
    report = MergeReport(
        family=family,
        dtype=merged_model.dtype,
        lora_modules=lora_modules,
        max_abs_diff=float((merged - unmerged).abs().max()),
        max_abs_logit=scale,
        adapter_effect=float((unmerged - base_logits).abs().max()),
    )
    tolerance = MERGE_TOLERANCE.get(report.dtype, MERGE_TOLERANCE[torch.bfloat16])
    if report.max_abs_diff > tolerance * max(scale, 1.0):
        raise BundleError(
            f"merging {adapter} changed the model's outputs: max |merged - unmerged| = {report.max_abs_diff:.3g} "
            f"on logits up to {scale:.3g} (tolerance {tolerance:g} relative)"
        )
    fresh = out.with_name(out.name + ".partial")
    if fresh.exists():
        shutil.rmtree(fresh)
    fresh.mkdir(parents=True)
    with quiet_transformers():
        merged_model.save_pretrained(fresh)
    copy_processor_files(base, fresh)
    if out.exists():
        shutil.rmtree(out)
    fresh.rename(out)
    return report


def copy_processor_files(base: Path, out: Path) -> None:
    """Copy the base checkpoint's tokenizer, chat template and processor files into `out`, where a
    model was just saved (`PROCESSOR_SUFFIXES`, except the `WRITTEN_FILES` that the save wrote)."""
    for source in sorted(base.iterdir()):
        if source.is_file() and source.suffix in PROCESSOR_SUFFIXES and source.name not in WRITTEN_FILES:
            shutil.copyfile(source, out / source.name)


def check_sam_source(sam: Path) -> None:
    """`--sam` before anything is written: a sam/ folder that passes `check_sam_dir` (config and
    weights header), or an existing official .pth / .pt file.

    Raises:
        BundleError: a missing path, a broken folder or another kind of file, naming it.
    """
    if not sam.exists():
        raise BundleError(f"--sam {sam} does not exist (expected a sam/ folder, an official SAM .pth or a "
                          "SAM 2.1 .pt file)")
    if sam.is_dir():
        check_sam_dir(sam)
    elif not (sam.is_file() and sam.suffix in (".pth", ".pt")):
        raise BundleError(f"--sam must be a sam/ folder (config.json + model.safetensors) or an official SAM .pth / "
                          f"SAM 2.1 .pt file: {sam}")


def _sam_section(sam: Path, out: Path) -> dict:
    """Put the SAM model into `out` (a bundle's sam/ folder) and return the manifest's sam section.

    `sam`, as `check_sam_source` accepts it (the caller checks it first), is a bundle's sam/ folder
    (config.json + model.safetensors: copied; left as it is when it is `out` itself) or an official
    SAM 1 .pth / SAM 2.1 .pt checkpoint (converted by
    `star_edge.export.sam_checkpoints.import_official_sam`, which checks it).
    """
    if sam.is_dir():
        config = read_sam_config(sam)
        if sam.resolve() != out.resolve():
            if out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True)
            for name in ("config.json", "model.safetensors"):
                shutil.copyfile(sam / name, out / name)
        return {"kind": config["kind"], "variant": config["variant"], "path": "sam", "image_size": config["image_size"]}
    try:
        from star_edge.export.sam_checkpoints import import_official_sam
    except ImportError as err:
        raise BundleError(
            f"converting the official SAM checkpoint {sam} needs star_edge.export.sam_checkpoints, which "
            "this build lacks; pass a bundle's sam/ folder instead"
        ) from err
    return {**import_official_sam(sam, out), "path": "sam"}


def write_merged_bundle(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    sam: str | Path,
    input_size: int | None = None,
    max_new_tokens: int = 1024,
    name: str | None = None,
    dtype: str | torch.dtype = "auto",
) -> tuple[Bundle, MergeReport]:
    """A bundle from a base checkpoint, a LoRA adapter and a SAM model (`star-edge export`).

    Args:
        base: the base Qwen2.5-VL / Qwen3-VL checkpoint folder.
        adapter: the peft LoRA adapter folder.
        out: the bundle folder (reasoner/, sam/ and star_edge.json are written into it).
        sam: a bundle's sam/ folder, an official SAM 1 .pth or an official SAM 2.1 .pt file.
        input_size: square reasoner input in pixels; None -> DEFAULT_INPUT_SIZE of the family. Must
            be a multiple of the vision tower's patch * merge size (28 for Qwen2.5-VL, 32 for Qwen3-VL).
        max_new_tokens: the most tokens per answer (StAR's answers think first: keep it generous).
        name: the bundle's name; None -> the adapter folder's name.
        dtype: see `merge_lora`.

    Returns:
        (the bundle as verified by the runtime's reader, the merge report).

    Raises:
        InvalidInputError: a bad input size or max_new_tokens; `out` is (or lies under) a file.
        BundleError: see `merge_lora` and `_sam_section`.
    """
    base, adapter, out, sam = Path(base), Path(adapter), check_out_folder(out), Path(sam)
    family = checkpoint_family(base)
    vision = FAMILIES[family][0].config_class.from_pretrained(base, local_files_only=True).vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    side = DEFAULT_INPUT_SIZE[family] if input_size is None else input_size
    if isinstance(side, bool) or not isinstance(side, int) or side <= 0 or side % factor:
        raise InvalidInputError(f"input size must be a positive multiple of {factor} for {family}, got {side!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise InvalidInputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    check_sam_source(sam)  # before the merge, which takes minutes for a 7B model; _sam_section relies on it
    report = merge_lora(base, adapter, out / "reasoner", dtype=dtype)
    sam_section = _sam_section(sam, out / "sam")
    reasoner_section = {
        "family": family,
        "path": "reasoner",
        "input_size": [side, side],
        "frame": FAMILY_FRAMES[family],
        "prompt_template": "star_v1",
        "max_new_tokens": max_new_tokens,
    }
    bundle = write_manifest(out, name=name or adapter.name, reasoner=reasoner_section, sam=sam_section, trained=True)
    return bundle, report
