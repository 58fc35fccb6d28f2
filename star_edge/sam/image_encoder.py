"""SAM 1's ViT image encoder run in cache-sized tiles: the same operations as segment_anything's
`ImageEncoderViT.forward`, in the same order, so the embedding is the same up to the last bits of
float rounding in the matrix products, but with far less memory traffic.

The official attention builds the full (heads, L, L) logits, then adds the decomposed relative
position terms through two broadcast 5-D additions that each allocate a new logits tensor: for a
global-attention block of ViT-B at 1024 px that is 805 MB written three times. Here the logits are
formed a few query rows at a time (at most `_TILE_BYTES`), the relative terms are added in place,
and the softmax and value product follow on the same tile. The MLP runs in row tiles with its GELU
in place, for the same reason.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from star_edge.sam.official import import_segment_anything

_TILE_BYTES = 12 << 20


def _attention(attention: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """segment_anything's image-encoder `Attention.forward`, tiled over query rows.

    x: (B, h, w, C) -> (B, h, w, C).
    """
    batch, height, width, channels = x.shape
    heads = attention.num_heads
    length = height * width
    qkv = attention.qkv(x).reshape(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
    query, key, value = qkv.reshape(3, batch * heads, length, -1).unbind(0)
    key_t = key.transpose(-2, -1)
    scaled = query * attention.scale
    rel_h = rel_w = None
    if attention.use_rel_pos:
        get_rel_pos = import_segment_anything().image_encoder.get_rel_pos
        grid = query.reshape(batch * heads, height, width, -1)
        along_h = get_rel_pos(height, height, attention.rel_pos_h)
        along_w = get_rel_pos(width, width, attention.rel_pos_w)
        rel_h = torch.einsum("bhwc,hkc->bhwk", grid, along_h)
        rel_w = torch.einsum("bhwc,wkc->bhwk", grid, along_w)
    out = torch.empty_like(query)
    row_bytes = width * length * query.element_size()
    rows = max(1, min(height, _TILE_BYTES // row_bytes))
    groups = max(1, _TILE_BYTES // (rows * row_bytes))
    for first in range(0, batch * heads, groups):
        members = slice(first, first + groups)
        for top in range(0, height, rows):
            bottom = min(height, top + rows)
            span = slice(top * width, bottom * width)
            logits = scaled[members, span] @ key_t[members]
            if rel_h is not None:
                grid = logits.view(-1, bottom - top, width, height, width)
                grid += rel_h[members, top:bottom, :, :, None]
                grid += rel_w[members, top:bottom, :, None, :]
            weights = torch.softmax(logits, dim=-1)
            torch.matmul(weights, value[members], out=out[members, span])
    merged = out.view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4)
    return attention.proj(merged.reshape(batch, height, width, channels))


def _mlp(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """segment_anything's `MLPBlock` (lin1, GELU, lin2) in row tiles. x: (..., C) -> (..., C)."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    hidden = mlp.lin1.weight.shape[0]
    step = max(1, _TILE_BYTES // (hidden * rows.element_size()))
    first, second = mlp.lin1.weight.t(), mlp.lin2.weight.t()
    for top in range(0, rows.shape[0], step):
        inner = mlp.act(torch.addmm(mlp.lin1.bias, rows[top : top + step], first))
        torch.addmm(mlp.lin2.bias, inner, second, out=out[top : top + step])
    return out.view_as(x)


def _window_partition(x: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, h, w, C) -> (B * windows, size, size, C) zero-padded to whole windows, and the padded
    (h, w)."""
    batch, height, width, channels = x.shape
    pad_h, pad_w = (size - height % size) % size, (size - width % size) % size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    rows, cols = (height + pad_h) // size, (width + pad_w) // size
    windows = x.view(batch, rows, size, cols, size, channels).permute(0, 1, 3, 2, 4, 5)
    return windows.reshape(-1, size, size, channels), (height + pad_h, width + pad_w)


def _window_unpartition(
    windows: torch.Tensor, size: int, padded: tuple[int, int], original: tuple[int, int]
) -> torch.Tensor:
    """Inverse of `_window_partition`, cropping the padding: -> (B, h, w, C)."""
    rows, cols = padded[0] // size, padded[1] // size
    batch = windows.shape[0] // (rows * cols)
    x = windows.view(batch, rows, cols, size, size, -1).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch, padded[0], padded[1], -1)
    return x[:, : original[0], : original[1], :]


def _block(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """segment_anything's image-encoder `Block.forward`. x: (B, h, w, C) -> (B, h, w, C)."""
    shortcut = x
    x = block.norm1(x)
    if block.window_size > 0:
        original = (x.shape[1], x.shape[2])
        windows, padded = _window_partition(x, block.window_size)
        attended = _attention(block.attn, windows)
        x = _window_unpartition(attended, block.window_size, padded, original)
    else:
        x = _attention(block.attn, x)
    x = shortcut + x
    return x + _mlp(block.mlp, block.norm2(x))


def encode(encoder: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Run a segment_anything `ImageEncoderViT` on (B, 3, S, S) normalised, padded pixels.

    Returns the embedding (B, C_out, S / patch, S / patch) in the encoder's dtype.
    """
    x = encoder.patch_embed(pixels)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    for block in encoder.blocks:
        x = _block(block, x)
    return encoder.neck(x.permute(0, 3, 1, 2))
