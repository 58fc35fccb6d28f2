"""The PyTorch reasoner: a Hugging Face Qwen2.5-VL / Qwen3-VL checkpoint on the shared-prefill decoder.

`TorchReasoner.from_dir(bundle / "reasoner", manifest["reasoner"])` loads the model and a processor
offline; `generate(image, query, n)` returns n decoded answers with stage timings. Underneath,
`prefill(image, query)` encodes the image and reads the prompt once, and `sample(prefilled, rows,
seed)` decodes any rows of the seeded sample stream from it, in one batch (`reasoner/sampling`,
DESIGN.md section 11); rows drawn in several rounds equal the same rows drawn at once.

Decoding follows the StAR defaults: n == 1 is greedy (token for token what `model.generate(...,
do_sample=False)` gives); n > 1 samples with temperature 1.0, top-p 0.9 and no top-k. The checkpoint's
own `generation_config.json` contributes only its end and padding token ids, so sampling knobs
shipped with a base model (repetition penalty, top-k, ...) never leak in.

No torchvision: in transformers 5 every video processor needs torchvision, and the Qwen-VL processors
refuse to be built without one (even `AutoProcessor` fails). We build the processor from its parts
(`AutoTokenizer`, the PIL backend of `AutoImageProcessor`) with the video slot removed; images are
all a reasoner ever sees.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from safetensors import SafetensorError
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.utils import logging as hf_logging

from star_edge.bundle import checkpoint_weight_files
from star_edge.errors import BackendUnavailableError, BundleError, InvalidInputError
from star_edge.reasoner import ReasonerOutput, decoding, sampling
from star_edge.reasoner.prompts import (
    FRAMES, PROMPT_TEMPLATES, build_messages, check_prompt_length, context_length,
)

logger = logging.getLogger(__name__)


def _image_only(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`processor_class` without its video processor.

    `ProcessorMixin` derives a processor's parts from its `__init__` parameters; a subclass whose
    `__init__` has no `video_processor` parameter is a processor of images and text only, which can be
    built without torchvision.
    """

    class ImageOnlyProcessor(processor_class):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"ImageOnly{processor_class.__name__}"
    return ImageOnlyProcessor


#: family -> (model class, processor class), the families a bundle may declare.
FAMILIES: dict[str, tuple[type[PreTrainedModel], type[ProcessorMixin]]] = {
    "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, _image_only(Qwen2_5_VLProcessor)),
    "qwen3_vl": (Qwen3VLForConditionalGeneration, _image_only(Qwen3VLProcessor)),
}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars (loading and saving weights) inside the block.

    The switch is process-wide in transformers; it is restored on exit.
    """
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _require_files(directory: Path) -> None:
    """Raise BundleError naming the first file a loadable checkpoint lacks."""
    if not directory.is_dir():
        raise BundleError(f"reasoner checkpoint directory {directory} does not exist")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        if not (directory / name).is_file():
            raise BundleError(f"reasoner checkpoint {directory} lacks {name}")
    for path in checkpoint_weight_files(directory):
        if not path.is_file():
            raise BundleError(f"reasoner checkpoint {directory} lacks {path.name}")


def _read_chat_template(directory: Path) -> str:
    """The chat template from chat_template.jinja, chat_template.json or tokenizer_config.json."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = directory / name
        if path.is_file():
            try:
                template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
            except json.JSONDecodeError as err:
                raise BundleError(f"{path} is not valid JSON: {err}") from err
            if isinstance(template, str):
                return template
    raise BundleError(f"reasoner checkpoint {directory} lacks a chat template (chat_template.jinja)")


def _checked_manifest(manifest: dict) -> tuple[str, tuple[int, int], str, str, int]:
    """(family, (W, H), frame, prompt template id, max_new_tokens) of a manifest's reasoner section."""
    try:
        family = manifest["family"]
        width, height = (int(v) for v in manifest["input_size"])
        frame = manifest["frame"]
        template = manifest["prompt_template"]
        max_new_tokens = int(manifest["max_new_tokens"])
    except KeyError as err:
        raise BundleError(f"the reasoner manifest lacks {err.args[0]!r}") from err
    except (TypeError, ValueError) as err:
        raise BundleError(f"malformed reasoner manifest {manifest!r}: {err}") from err
    if family not in FAMILIES:
        raise BundleError(f"unknown reasoner family {family!r}; expected one of {sorted(FAMILIES)}")
    if frame not in FRAMES:
        raise BundleError(f"unknown coordinate frame {frame!r}; expected one of {list(FRAMES)}")
    if template not in PROMPT_TEMPLATES:
        raise BundleError(f"unknown prompt template {template!r}; expected one of {sorted(PROMPT_TEMPLATES)}")
    if width <= 0 or height <= 0 or max_new_tokens <= 0:
        raise BundleError(f"input_size and max_new_tokens must be positive in {manifest!r}")
    return family, (width, height), frame, template, max_new_tokens


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InvalidInputError(f"invalid device {device!r}: {err}") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"device {device!r} needs CUDA, which this torch build cannot use; install a CUDA build of torch "
            "or use device='cpu'"
        )
    return resolved


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise InvalidInputError(f"dtype must be a floating torch dtype or its name, got {dtype!r}")
    return resolved


class TorchReasoner:
    """A Qwen2.5-VL / Qwen3-VL reasoner on PyTorch.

    Attributes:
        model: the Hugging Face model (eval mode, on `device`).
        processor: the Hugging Face processor (tokenizer + PIL image processor, no video part), its
            image size pinned to `input_size`.
        family: "qwen2_5_vl" or "qwen3_vl".
        input_size: (W, H) in pixels every image is resized to; multiples of patch * merge size.
        frame: coordinate frame of the answers, "pixels" or "grid1000".
        prompt_template: id of the prompt template (a key of `PROMPT_TEMPLATES`).
        max_new_tokens: the most tokens one answer may have.
        device: where the model runs.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        family: str,
        input_size: tuple[int, int],
        frame: str,
        prompt_template: str,
        max_new_tokens: int,
    ) -> None:
        self.model = model
        self.processor = processor
        self.family = family
        self.input_size = input_size
        self.frame = frame
        self.prompt_template = prompt_template
        self.max_new_tokens = max_new_tokens
        self.device = model.device
        self._context = context_length(model.config.to_dict())
        self._lock = threading.Lock()
        self._special_tokens = tuple(
            token.content for token in processor.tokenizer.added_tokens_decoder.values() if token.special
        )

    @classmethod
    def from_dir(
        cls,
        directory: str | Path,
        reasoner_manifest: dict,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
    ) -> TorchReasoner:
        """Load a Hugging Face checkpoint folder offline.

        Args:
            directory: the checkpoint (config.json, model.safetensors or an index + shards, tokenizer
                files, preprocessor_config.json, a chat template).
            reasoner_manifest: the manifest's reasoner section: family, input_size [W, H], frame,
                prompt_template, max_new_tokens.
            device: "cpu", "cuda", "cuda:1", ...
            dtype: weights dtype; None -> float32 on CPU, bfloat16 on CUDA.

        Raises:
            BundleError: a missing or unreadable file (named), a malformed manifest, an unknown family,
                a checkpoint of another family, an input size the vision tower cannot take.
            BackendUnavailableError: a CUDA device without CUDA.
        """
        directory = Path(directory)
        family, input_size, frame, template, max_new_tokens = _checked_manifest(reasoner_manifest)
        _require_files(directory)
        try:
            model_type = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("model_type")
        except json.JSONDecodeError as err:
            raise BundleError(f"{directory / 'config.json'} is not valid JSON: {err}") from err
        if model_type != family:
            raise BundleError(
                f"{directory / 'config.json'} describes a {model_type!r} model, the manifest a {family!r}"
            )
        torch_device = _resolve_device(device)
        torch_dtype = _resolve_dtype(dtype, torch_device)
        model_class, processor_class = FAMILIES[family]
        pixels = input_size[0] * input_size[1]
        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
                image_processor = AutoImageProcessor.from_pretrained(
                    directory, local_files_only=True, backend="pil", min_pixels=pixels, max_pixels=pixels
                )
                model = model_class.from_pretrained(directory, local_files_only=True, dtype=torch_dtype)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
            raise BundleError(f"cannot load the reasoner checkpoint {directory}: {err}") from err
        factor = image_processor.patch_size * image_processor.merge_size
        if input_size[0] % factor or input_size[1] % factor:
            raise BundleError(f"reasoner input_size {list(input_size)} is not a multiple of {factor} (patch x merge)")
        processor = processor_class(image_processor, tokenizer, chat_template=_read_chat_template(directory))
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else tokenizer.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos)
        pad = model.generation_config.pad_token_id
        model.generation_config = GenerationConfig(
            eos_token_id=eos_ids, pad_token_id=pad if pad is not None else eos_ids[0]
        )
        model.to(torch_device).eval()
        logger.debug("loaded %s reasoner from %s on %s (%s)", family, directory, torch_device, torch_dtype)
        return cls(model, processor, family, input_size, frame, template, max_new_tokens)

    def hf_inputs(self, image: PIL.Image.Image, query: str) -> dict[str, torch.Tensor]:
        """The model inputs for one image and query, on the model's device.

        The image is converted to RGB and resized to `input_size` (PIL bicubic); the processor then
        takes it as is (its pixel budget is pinned to exactly that size).

        Returns:
            input_ids (1, L) int64 with one image token per merged patch,
            attention_mask (1, L) int64, mm_token_type_ids (1, L) int64 (1 at image tokens),
            pixel_values (P, 3 * temporal_patch * patch * patch) float32 with P = (H / patch) * (W / patch),
            image_grid_thw (1, 3) int64 = [[1, H / patch, W / patch]].

        Raises:
            InvalidInputError: not a PIL image; an empty query or one containing special tokens; a
                prompt that with `max_new_tokens` passes the model's context.
        """
        if not isinstance(image, PIL.Image.Image):
            raise InvalidInputError(f"the reasoner takes a PIL image, got {type(image).__name__}")
        messages = build_messages(query, frame=self.frame, template=self.prompt_template)
        if any(token in query for token in self._special_tokens):
            raise InvalidInputError("the query contains a special token of the model's chat format")
        rgb = image.convert("RGB")
        if rgb.size != self.input_size:
            rgb = rgb.resize(self.input_size, PIL.Image.Resampling.BICUBIC)
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        batch = self.processor(text=[text], images=[rgb], return_tensors="pt")
        check_prompt_length(batch["input_ids"].shape[1], self.max_new_tokens, self._context)
        return {name: tensor.to(self.device) for name, tensor in batch.items()}


    def prefill(self, image: PIL.Image.Image, query: str) -> PreparedPrompt:
        """Encode `image` and read the prompt for `query` once; sample rows from it with `sample`.

        Raises:
            InvalidInputError: see `hf_inputs`.
        """
        with self._lock:
            start = time.perf_counter()
            inputs = self.hf_inputs(image, query)
            preprocessed = time.perf_counter()
            state = sampling.prefill(self.model, inputs)
        timings = {
            "preprocess": (preprocessed - start) * 1e3,
            "vision": state.vision_ms,
            "prefill": state.prefill_ms,
        }
        return PreparedPrompt(state=state, timings=timings)

    def sample(
        self,
        prepared: PreparedPrompt,
        rows: Sequence[int],
        seed: int | None = None,
        on_finished: Callable[[list[tuple[int, str]]], bool] | None = None,
    ) -> ReasonerOutput:
        """Sampled answers (temperature 1.0, top-p 0.9) for `rows` of the seeded sample stream, in one batch.

        Row i's answer depends only on (image, query, seed, i), so `sample(p, range(4, 8), s)` gives
        rows 4..7 of `sample(p, range(8), s)`.

        Args:
            prepared: from `prefill` on this reasoner (reusable: it is not modified).
            rows: distinct non-negative row indices.
            seed: the stream's seed; None draws a fresh one.
            on_finished: called after every decoding step at which answers finished, with their
                (row, text) in row order; returning True stops the rows still decoding.

        Returns:
            ReasonerOutput with the finished answers in the order of `rows` (`rows` says which),
            timings {"decode"} (ms) and token counts (all decoded tokens, stopped rows included).

        Raises:
            InvalidInputError: bad rows or seed.
        """
        rows = decoding.checked_rows(rows)
        decoding.check_seed(seed)
        return self._decode(prepared, rows, seed, greedy=False, on_finished=on_finished)

    def generate(self, image: PIL.Image.Image, query: str, n: int = 1, seed: int | None = None) -> ReasonerOutput:
        """n answers for `query` about `image` from one vision encode and one prefill.

        Args:
            image: any size; resized to `input_size`.
            query: what to find.
            n: 1 -> one greedy answer; > 1 -> rows 0..n-1 of the seeded sample stream (temperature
                1.0, top-p 0.9, no top-k), decoded in one batch.
            seed: makes sampling reproducible (see `sampling` for the per-row scheme); torch's global
                random state is never used. None draws a fresh seed.

        Returns:
            ReasonerOutput with n texts, their token ids, timings in ms ("preprocess", "vision",
            "prefill", "decode", and "generate" = vision + prefill + decode) and token counts
            ("prompt", "image", "generated").

        Raises:
            InvalidInputError: n not a positive integer; see `hf_inputs` for image and query.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InvalidInputError(f"n must be a positive integer, got {n!r}")
        prepared = self.prefill(image, query)
        if n == 1:
            output = self._decode(prepared, [0], None, greedy=True)
        else:
            output = self.sample(prepared, range(n), seed)
        timings = {**prepared.timings, **output.timings}
        timings["generate"] = timings["vision"] + timings["prefill"] + timings["decode"]
        output.timings = timings
        return output

    def _decode(
        self,
        prepared: PreparedPrompt,
        rows: list[int],
        seed: int | None,
        greedy: bool,
        on_finished: Callable[[list[tuple[int, str]]], bool] | None = None,
    ) -> ReasonerOutput:
        state = prepared.state
        with self._lock:
            decoded = sampling.decode(
                self.model,
                state,
                rows,
                seed,
                eos_token_ids=self.model.generation_config.eos_token_id,
                max_new_tokens=self.max_new_tokens,
                greedy=greedy,
                on_finished=decoding.text_hook(on_finished, rows, self._text),
            )
        return decoding.reasoner_output(decoded, rows, self._text, state.prompt_length, state.image_tokens)

    def _text(self, token_ids: list[int]) -> str:
        """An answer's text: special tokens (the end token) removed, spaces as generated."""
        return self.processor.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@dataclass
class PreparedPrompt:
    """One image and query, encoded and prefilled once (`TorchReasoner.prefill`).

    Attributes:
        state: the shared KV cache and first-token logits (see `sampling.Prefill`).
        timings: "preprocess", "vision", "prefill" in ms.
    """

    state: sampling.Prefill
    timings: dict[str, float]

