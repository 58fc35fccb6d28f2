"""Tiny Qwen2.5-VL / Qwen3-VL checkpoints built from scratch, offline, in about a second.

`write_tiny_reasoner(directory)` writes a complete Hugging Face checkpoint folder (config.json,
generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json, chat_template.jinja,
preprocessor_config.json, video_preprocessor_config.json) that the real model classes and
`TorchReasoner.from_dir` load offline, and returns the manifest's reasoner section for it.

Two uses:
- The demo model and every test start from it: the architecture is the real one, only small
  (`TinyDims`); the weights are a seeded random initialisation.
- Test fixture: with `scripted_answers`, the weights are *crafted* so that the real model class
  generates exactly one of the given texts, which lets end-to-end tests run a genuine
  `generate` with a known output:
    * each answer is cut into a chain of chunks, each chunk an added token of its own, so an answer
      is a short chain of unique tokens;
    * every attention `o_proj` and MLP `down_proj` is zero, so each layer adds nothing and the last
      hidden state is the embedding of the current token, whatever came before;
    * the embeddings of the chain tokens and of the last prompt token are orthonormal, and `lm_head`
      maps each of them to its successor with a logit margin of `SCRIPT_MARGIN` (the last chunk of
      an answer is followed by <|im_end|>);
    * after the prompt, the first chunks of all answers get equal logits, the first answer's
      `SCRIPT_TIE_BREAK` higher: greedy decoding yields the first answer, sampling (temperature
      1, top-p 0.9) yields each answer with probability ~1/len(answers) (top-p keeps all of
      them up to 9 answers).

The tokenizer is ours: byte-level BPE trained with the `tokenizers` library on generated text about
objects, shapes and colours, the StAR prompt and JSON answers; every integer 0..1000 is one token
(coordinates are single tokens, see DESIGN.md section 12); plus the Qwen chat special tokens. It does
not depend on the seed: all tiny checkpoints share one tokenizer (apart from scripted chunks).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedConfig, Qwen2_5_VLConfig, Qwen3VLConfig

from star_edge.errors import InvalidInputError
from star_edge.reasoner.prompts import FRAMES, PROMPT_TEMPLATES
from star_edge.reasoner.torch_backend import FAMILIES, quiet_transformers

#: Logit margin of every scripted step over any other token.
SCRIPT_MARGIN = 40.0
#: Extra logit of the first scripted answer at the branch point (greedy picks it).
SCRIPT_TIE_BREAK = 0.01
#: Characters per chunk of a scripted answer (chunks grow where needed to stay unique).
SCRIPT_CHUNK_CHARS = 16

#: Qwen's chat special tokens, in Qwen's order.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: Largest integer that is a single token.
MAX_NUMBER_TOKEN = 1000
#: Size of the trained BPE vocabulary (byte alphabet + merges), before numbers and special tokens.
BPE_VOCAB_SIZE = 768
#: Qwen's pre-tokenizer split, changed in three places: digit runs stay whole (so "123" can be one
#: token), a word may go on with digits and underscores ("bbox_2d"), and punctuation takes the
#: space after it (", " and ": " are one token in JSON).
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}[\p{L}\p{N}_]*|\p{N}+|[^\s\p{L}\p{N}]+ ?[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: One user turn per message; an image part becomes the vision tokens the processor expands.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GENERATION_PROMPT = "<|im_start|>assistant\n"


@dataclass(frozen=True)
class FamilySpec:
    """What differs between the two families in a tiny checkpoint."""

    patch_size: int
    frame: str
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    processor_class: str
    video_processor_class: str


_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FAMILY_SPECS = {
    "qwen2_5_vl": FamilySpec(
        14, "pixels", _CLIP_MEAN, _CLIP_STD, "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"
    ),
    "qwen3_vl": FamilySpec(
        16, "grid1000", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "Qwen3VLProcessor", "Qwen3VLVideoProcessor"
    ),
}
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2


@dataclass(frozen=True)
class TinyDims:
    """Sizes of a tiny reasoner; the defaults give ~1.5 M parameters (~6 MB) and 64 image tokens.

    Attributes:
        hidden_size: language model width (also the vision merger's output width).
        num_layers: language model layers.
        num_heads: attention heads of the language model (head dim = hidden_size / num_heads).
        num_kv_heads: key/value heads of the language model (grouped-query attention).
        intermediate_size: language model MLP width.
        vision_hidden_size: vision tower width.
        vision_depth: vision tower blocks.
        vision_heads: vision tower attention heads.
        vision_intermediate_size: vision tower MLP width.
        image_tokens_per_side: image tokens per row and column; the input is this times
            patch * merge pixels square (8 -> 224 px for Qwen2.5-VL, 256 px for Qwen3-VL).
    """

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    vision_hidden_size: int = 64
    vision_depth: int = 2
    vision_heads: int = 2
    vision_intermediate_size: int = 128
    image_tokens_per_side: int = 8


def write_tiny_reasoner(
    directory: str | Path,
    seed: int = 0,
    family: str = "qwen2_5_vl",
    scripted_answers: list[str] | None = None,
    dims: TinyDims = TinyDims(),
    max_new_tokens: int = 256,
) -> dict:
    """Write a tiny, randomly initialised (or scripted) reasoner checkpoint into `directory`.

    Args:
        directory: created if missing; existing files of the same names are replaced.
        seed: seeds the weights (the caller's torch random state is left untouched); the same seed
            writes the same bytes.
        family: "qwen2_5_vl" (pixel coordinates) or "qwen3_vl" (0-1000 grid).
        scripted_answers: test fixture: craft the weights so that the model generates one of these
            texts (greedy: the first); see the module docstring.
        dims: the model sizes.
        max_new_tokens: written into the returned manifest section.

    Returns:
        The manifest's reasoner section: {"family", "input_size": [W, H], "frame",
        "prompt_template": "star_v1", "max_new_tokens"}.

    Raises:
        InvalidInputError: unknown family; scripted answers that are empty, repeated, contain special
            tokens, or need more chain tokens than the hidden size.

    video_preprocessor_config.json names the real video processor class, so that `AutoProcessor`
    loads the folder wherever torchvision is installed; star-edge itself never reads it.
    """
    if family not in FAMILY_SPECS:
        raise InvalidInputError(f"unknown reasoner family {family!r}; expected one of {sorted(FAMILY_SPECS)}")
    spec = FAMILY_SPECS[family]
    side = dims.image_tokens_per_side * spec.patch_size * MERGE_SIZE
    tokenizer = build_tokenizer()
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    chains = _add_chain_tokens(tokenizer, scripted_answers, dims.hidden_size) if scripted_answers is not None else []

    config = _model_config(family, dims, tokenizer.get_vocab_size(), ids)
    model_class = FAMILIES[family][0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )
    if chains:
        _script_weights(model, chains, tokenizer.encode(GENERATION_PROMPT).ids[-1], ids["<|im_end|>"], seed)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(directory)

    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    _write_json(directory / "tokenizer_config.json", _tokenizer_config(spec))
    processor_fields = {
        "patch_size": spec.patch_size,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "merge_size": MERGE_SIZE,
        "size": {"shortest_edge": side * side, "longest_edge": side * side},
        "image_mean": list(spec.image_mean),
        "image_std": list(spec.image_std),
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "resample": 3,
        "processor_class": spec.processor_class,
    }
    _write_json(
        directory / "preprocessor_config.json", {"image_processor_type": "Qwen2VLImageProcessor", **processor_fields}
    )
    _write_json(
        directory / "video_preprocessor_config.json",
        {"video_processor_type": spec.video_processor_class, **processor_fields},
    )
    return {
        "family": family,
        "input_size": [side, side],
        "frame": spec.frame,
        "prompt_template": "star_v1",
        "max_new_tokens": max_new_tokens,
    }


def build_tokenizer() -> Tokenizer:
    """Our byte-level BPE tokenizer: trained words, integers 0..1000 as single tokens, Qwen specials.

    Ids: byte alphabet and merges first, then the number tokens the merges did not produce, then
    `SPECIAL_TOKENS` (added tokens). Deterministic.
    """
    trainee = Tokenizer(models.BPE())
    trainee.normalizer = normalizers.NFC()
    trainee.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainee.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trainee.train_from_iterator(_training_corpus(), trainer=trainer)
    trained = json.loads(trainee.to_str())["model"]
    vocab: dict[str, int] = dict(trained["vocab"])
    for number in range(MAX_NUMBER_TOKEN + 1):
        vocab.setdefault(str(number), len(vocab))
    merges = [tuple(pair) for pair in trained["merges"]]
    # ignore_merges: a pre-token found whole in the vocabulary (any number up to 1000) is one token.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.normalizer = trainee.normalizer
    tokenizer.pre_tokenizer = trainee.pre_tokenizer
    tokenizer.decoder = trainee.decoder
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    return tokenizer


_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray", "cyan")
_SHAPES = (
    "circle", "square", "triangle", "rectangle", "star", "hexagon", "ellipse", "diamond", "cross", "heart", "ring"
)
_OBJECTS = {
    "knife": "is used for cutting",
    "cup": "holds a hot drink",
    "bottle": "holds water",
    "apple": "is a fruit you can eat",
    "banana": "is a yellow fruit",
    "chair": "is for sitting",
    "laptop": "is a computer you can carry",
    "phone": "is used to make calls",
    "book": "is for reading",
    "scissors": "cut paper",
    "spoon": "is used to eat soup",
    "plate": "holds food",
    "lamp": "gives light",
    "plant": "needs water and light",
    "clock": "tells the time",
    "hammer": "drives nails",
    "pen": "is used for writing",
    "umbrella": "keeps you dry in the rain",
    "key": "opens a lock",
    "towel": "dries your hands",
}
_RELATIONS = ("left of", "right of", "above", "below", "next to", "on top of", "in front of", "behind", "near")


def _training_corpus() -> list[str]:
    """Generated text the tokenizer is trained on (fixed, seed-independent)."""
    rng = random.Random(0)
    lines = [template.render("the red circle", frame) for template in PROMPT_TEMPLATES.values() for frame in FRAMES]
    lines += ["user\n", "assistant\n", "system\n"] * 50
    objects = list(_OBJECTS)
    for _ in range(1500):
        colour, colour2 = rng.choice(_COLOURS), rng.choice(_COLOURS)
        shape, shape2 = rng.choice(_SHAPES), rng.choice(_SHAPES)
        thing = rng.choice(objects)
        relation = rng.choice(_RELATIONS)
        target = f"{colour} {shape}"
        box = sorted(rng.sample(range(MAX_NUMBER_TOKEN + 1), 2)) + sorted(rng.sample(range(MAX_NUMBER_TOKEN + 1), 2))
        point = [(box[0] + box[1]) // 2, (box[2] + box[3]) // 2]
        answer = json.dumps([{"bbox_2d": [box[0], box[2], box[1], box[3]], "point_2d": point, "label": target}])
        lines += [
            f"the {target} {relation} the {colour2} {shape2}",
            f"Which object {_OBJECTS[thing]}? The {thing} {_OBJECTS[thing]}, so the answer is the {thing}.",
            f"<think>The request asks for the {target}. I can see a {target} {relation} a {colour2} {shape2}, "
            f"so the {target} is the target.</think><answer>{answer}</answer>",
            f"<think>There is no {thing} in the image, so nothing matches.</think><answer>[]</answer>",
            f"Find the largest {shape} and the smallest {colour} object.",
        ]
    return lines


def _tokenizer_config(spec: FamilySpec) -> dict:
    """The content of tokenizer_config.json.

    The class is TokenizersBackend, which loads tokenizer.json as written; Qwen2Tokenizer would
    rebuild the pipeline with Qwen's pre-tokenizer, which splits numbers into digits.
    """
    return {
        "tokenizer_class": "TokenizersBackend",
        "processor_class": spec.processor_class,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
    }


def _model_config(family: str, dims: TinyDims, vocab_size: int, ids: dict[str, int]) -> PreTrainedConfig:
    """The model config; M-RoPE sections scaled from the real models to the tiny head dim."""
    half = dims.hidden_size // dims.num_heads // 2
    token_ids = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }
    text = {
        "vocab_size": vocab_size,
        "hidden_size": dims.hidden_size,
        "intermediate_size": dims.intermediate_size,
        "num_hidden_layers": dims.num_layers,
        "num_attention_heads": dims.num_heads,
        "num_key_value_heads": dims.num_kv_heads,
        "max_position_embeddings": 8192,
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {
        "depth": dims.vision_depth,
        "hidden_size": dims.vision_hidden_size,
        "intermediate_size": dims.vision_intermediate_size,
        "num_heads": dims.vision_heads,
        "patch_size": FAMILY_SPECS[family].patch_size,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "out_hidden_size": dims.hidden_size,
    }
    patches_per_side = dims.image_tokens_per_side * MERGE_SIZE
    if family == "qwen2_5_vl":
        height = 3 * half // 8  # Qwen2.5-VL: [16, 24, 24] of 64
        text.update(
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [half - 2 * height, height, height],
            },
        )
        # window attention over 4x4 merged patches; the last block attends globally
        vision.update(
            window_size=4 * MERGE_SIZE * FAMILY_SPECS[family].patch_size,
            fullatt_block_indexes=[dims.vision_depth - 1],
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **token_ids)
    height = 5 * half // 16  # Qwen3-VL: [24, 20, 20] of 64, interleaved
    text.update(
        head_dim=2 * half,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": [half - 2 * height, height, height],
            "mrope_interleaved": True,
        },
    )
    vision.update(num_position_embeddings=patches_per_side**2, deepstack_visual_indexes=[0])
    return Qwen3VLConfig(text_config=text, vision_config=vision, **token_ids)


def _add_chain_tokens(tokenizer: Tokenizer, answers: list[str], hidden_size: int) -> list[list[int]]:
    """Add each answer's chunks to `tokenizer` as tokens; return per answer its chain of token ids.

    Raises:
        InvalidInputError: the chains need more tokens than `hidden_size` - 1 (chain tokens and the
            prompt's last token get orthogonal embeddings), or a chunk is an existing special token.
    """
    chunk_texts = _split_into_chunks(answers)
    count = sum(map(len, chunk_texts))
    if count + 1 > hidden_size:
        raise InvalidInputError(
            f"scripted answers need {count} chain tokens; at most {hidden_size - 1} fit a hidden size of "
            f"{hidden_size}: use fewer or shorter answers"
        )
    chunks = [chunk for chain in chunk_texts for chunk in chain]
    if set(chunks) & set(SPECIAL_TOKENS) or GENERATION_PROMPT[-1] in chunks:
        raise InvalidInputError("scripted answers must not be cut into special tokens or a lone newline")
    tokenizer.add_tokens([AddedToken(chunk, special=False, normalized=False) for chunk in chunks])
    return [[tokenizer.token_to_id(chunk) for chunk in chain] for chain in chunk_texts]


def _split_into_chunks(answers: list[str]) -> list[list[str]]:
    """Cut each answer into chunks of ~SCRIPT_CHUNK_CHARS characters, every chunk unique overall.

    A chunk that already exists grows by a character at a time; a final remainder that exists is
    joined to the chunk before it.
    """
    if (
        not isinstance(answers, (list, tuple))
        or not answers
        or any(not isinstance(answer, str) or not answer for answer in answers)
        or len(set(answers)) != len(answers)
    ):
        raise InvalidInputError("scripted_answers must be a list of distinct non-empty strings")
    used: set[str] = set()
    chains = []
    for text in answers:
        chunks: list[str] = []
        position = 0
        while position < len(text):
            end = min(position + SCRIPT_CHUNK_CHARS, len(text))
            while text[position:end] in used and end < len(text):
                end += 1
            chunk = text[position:end]
            if chunk in used:
                if not chunks or chunks[-1] + chunk in used:
                    raise InvalidInputError(f"scripted answer {text!r} cannot be cut into unique chunks")
                used.discard(chunks[-1])
                chunk = chunks.pop() + chunk
            chunks.append(chunk)
            used.add(chunk)
            position = end
        chains.append(chunks)
    return chains


@torch.no_grad()
def _script_weights(model: torch.nn.Module, chains: list[list[int]], prompt_end: int, eos: int, seed: int) -> None:
    """Make `model` follow the token chains (see the module docstring).

    Args:
        chains: per answer, its chunk token ids in order.
        prompt_end: the last token of the prompt (the newline after "assistant").
        eos: the token that ends every chain.
    """
    language_model = model.model.language_model
    for layer in language_model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    embedding = language_model.embed_tokens.weight  # (V, d)
    width = embedding.shape[1]
    sources = [prompt_end] + [token for chain in chains for token in chain]  # at most d (_add_chain_tokens)
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(width, len(sources), generator=generator)).Q.T  # (k, d) orthonormal
    embedding[sources] = basis.to(embedding.dtype)
    # RMSNorm (weight 1) maps a unit vector u to ~sqrt(d) u, so a head row s * u scores s * sqrt(d).
    step = SCRIPT_MARGIN / math.sqrt(width)
    head = model.lm_head.weight  # (V, d)
    head.zero_()
    unit = dict(zip(sources, basis.to(head.dtype)))
    for rank, chain in enumerate(chains):
        boost = SCRIPT_TIE_BREAK / math.sqrt(width) if rank == 0 else 0.0
        head[chain[0]] += (step + boost) * unit[prompt_end]
        for token, successor in zip(chain, chain[1:] + [eos]):
            head[successor] += step * unit[token]


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
