"""Initial values for the demo reasoner's weights that give a model trained from scratch a start on
where things are (DESIGN section 12); the architecture stays the stock Qwen3-VL.

- `position_grid`: the vision tower's learned absolute position embeddings start as a 2-D sine /
  cosine code of each patch's row and column (as fixed in MAE), so image features carry their
  position from the first step instead of growing it out of a 0.02-std random table.
- `number_rows`: the rows of the coordinate tokens 0..1000 in the token embedding and in the output
  head start as a smooth code of the number (sines and cosines of value / 1000 at geometric
  frequencies), so neighbouring coordinates start out alike and a hidden state that points at a
  place scores the coordinates around it, instead of 1,001 unrelated classes.
Both are only starting values: every weight stays trainable.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

#: Tensor names in a Qwen3-VL checkpoint.
POSITION_TABLE = "model.visual.pos_embed.weight"
TOKEN_EMBEDDING = "model.language_model.embed_tokens.weight"
OUTPUT_HEAD = "lm_head.weight"
#: Root-mean-square of each initialised row's entries (Hugging Face's normal init has std 0.02).
NUMBER_ROW_RMS = 0.02
POSITION_ROW_RMS = 0.25
#: The slowest and fastest number-code frequencies, in cycles over 0..1000.
NUMBER_FREQUENCIES = (0.5, 64.0)


def position_grid(side: int, width: int, rms: float = POSITION_ROW_RMS) -> torch.Tensor:
    """2-D sine/cosine position code: (side * side, width) float32, row-major (row * side + column).

    A quarter of the channels each hold sin/cos of the row and sin/cos of the column at
    frequencies 1 / 100 ** (k / quarter); every entry's RMS is `rms`.
    """
    if width % 4:
        raise ValueError(f"the position width must be a multiple of 4, got {width}")
    quarter = width // 4
    frequencies = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    rows, columns = torch.meshgrid(torch.arange(side, dtype=torch.float64),
                                   torch.arange(side, dtype=torch.float64), indexing="ij")
    row_angles = rows.reshape(-1, 1) * frequencies
    column_angles = columns.reshape(-1, 1) * frequencies
    code = torch.cat([row_angles.sin(), row_angles.cos(), column_angles.sin(), column_angles.cos()], dim=1)
    return (code * rms * math.sqrt(2.0)).float()


def number_rows(count: int, width: int, rms: float = NUMBER_ROW_RMS,
                frequencies: tuple[float, float] = NUMBER_FREQUENCIES) -> torch.Tensor:
    """Smooth code of the numbers 0..count-1: (count, width) float32.

    Channel pairs hold sin/cos(2 pi f u) with u = n / (count - 1) and f geometric from
    `frequencies[0]` to `frequencies[1]`; every entry's RMS is `rms`.
    """
    if width % 2 or width < 4:
        raise ValueError(f"the number-code width must be even and >= 4, got {width}")
    half = width // 2
    low, high = frequencies
    cycles = low * (high / low) ** (torch.arange(half, dtype=torch.float64) / (half - 1))
    values = torch.arange(count, dtype=torch.float64).reshape(-1, 1) / (count - 1)
    angles = 2.0 * math.pi * values * cycles
    return (torch.cat([angles.sin(), angles.cos()], dim=1) * rms * math.sqrt(2.0)).float()


def apply_demo_init(weights_file: str | Path, number_token_ids: list[int]) -> None:
    """Rewrite a Qwen3-VL `model.safetensors` in place with both initialisations.

    Args:
        weights_file: the checkpoint's single safetensors file.
        number_token_ids: token id of each coordinate integer, in order (id of "0", "1", ...).

    Raises:
        KeyError: the file lacks one of the three tensors (not a Qwen3-VL checkpoint).
    """
    weights = load_file(str(weights_file))
    table = weights[POSITION_TABLE]
    side = math.isqrt(table.shape[0])
    weights[POSITION_TABLE] = position_grid(side, table.shape[1]).to(table.dtype)
    ids = torch.tensor(number_token_ids)
    for name in (TOKEN_EMBEDDING, OUTPUT_HEAD):
        rows = weights[name].clone()
        rows[ids] = number_rows(len(number_token_ids), rows.shape[1]).to(rows.dtype)
        weights[name] = rows
    save_file(weights, str(weights_file), metadata={"format": "pt"})
