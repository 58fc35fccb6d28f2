"""SAM 2's image encoder: the Hiera trunk and the FPN neck, as in the `sam2` package's image path.

Module and parameter names follow the official state dict (`image_encoder.trunk.*`,
`image_encoder.neck.convs.*`), so an official checkpoint's image-encoder tensors load unchanged.

Hiera: a 7x7 stride-4 patch embedding plus a position embedding (a small background grid,
bicubically resized to the token grid, plus one window-sized pattern tiled over it), then four
stages of transformer blocks. The first block of stages 2-4 halves the grid by max-pooling its
queries (and its shortcut, after a linear widening) and doubles width and heads. Blocks attend
inside non-overlapping windows (zero-padded to whole windows) except the global-attention ones.
The FPN neck projects each stage's output to the decoder width with a 1x1 convolution and adds
the nearest-upsampled stride-32 level to the stride-16 level; the stride-32 level itself is not
returned (the official encoder's `scalp=1`).

Shapes: B images, S = image_size, C_i = embed_dim * 2**i, D = 256 decoder width.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from star_edge.sam.sam2_config import PATCH_STRIDE

NECK_DIM = 256
"""Channels of every FPN level (the SAM 2 decoder width)."""
_MLP_RATIO = 4
_LAYER_NORM_EPS = 1e-6
_POOL = 2


class Mlp(nn.Module):
    """Linear layers with an activation between them (`layers.0`, `layers.1`, ...), as the
    official `sam2_utils.MLP`; optional sigmoid on the output."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        depth: int,
        activation: type[nn.Module] = nn.ReLU,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        widths = [in_dim] + [hidden_dim] * (depth - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = activation()
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_dim) -> (..., out_dim)."""
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = self.act(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


def _pool(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pool of channels-last maps: (B, h, w, C) -> (B, h // 2, w // 2, C)."""
    return F.max_pool2d(x.permute(0, 3, 1, 2), _POOL, _POOL).permute(0, 2, 3, 1)


def _to_windows(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, h, w, C) -> (B * n, size, size, C), zero-padded bottom/right to whole windows."""
    batch, height, width, channels = x.shape
    rows, cols = -(-height // size), -(-width // size)
    x = F.pad(x, (0, 0, 0, cols * size - width, 0, rows * size - height))
    windows = x.view(batch, rows, size, cols, size, channels).permute(0, 1, 3, 2, 4, 5)
    return windows.reshape(-1, size, size, channels)


def _from_windows(windows: torch.Tensor, size: int, height: int, width: int) -> torch.Tensor:
    """(B * n, size, size, C) windows tiling a (height, width) grid padded to whole windows ->
    (B, height, width, C), the padding cropped."""
    rows, cols = -(-height // size), -(-width // size)
    batch = windows.shape[0] // (rows * cols)
    x = windows.view(batch, rows, cols, size, size, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, rows * size, cols * size, -1)[:, :height, :width]


class MultiScaleAttention(nn.Module):
    """Multi-head self-attention whose queries are optionally 2x2 max-pooled (stage changes)."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, pool_queries: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.pool_queries = pool_queries
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, h, w, dim) -> (B, h', w', dim_out); h' = h // 2 when pooling, else h."""
        batch, height, width, _ = x.shape
        qkv = self.qkv(x).view(batch, height * width, 3, self.num_heads, -1)
        query, key, value = qkv.unbind(2)
        if self.pool_queries:
            query = _pool(query.reshape(batch, height, width, -1))
            height, width = query.shape[1:3]
            query = query.reshape(batch, height * width, self.num_heads, -1)
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        )
        return self.proj(out.transpose(1, 2).reshape(batch, height, width, -1))


class MultiScaleBlock(nn.Module):
    """A Hiera block: (windowed) attention and MLP, each with a pre-norm and a residual. The first
    block of a stage (dim_out = 2 dim) pools its queries and widens and pools its shortcut."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.downsample = dim != dim_out
        self.norm1 = nn.LayerNorm(dim, eps=_LAYER_NORM_EPS)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, pool_queries=self.downsample)
        self.norm2 = nn.LayerNorm(dim_out, eps=_LAYER_NORM_EPS)
        self.mlp = Mlp(dim_out, dim_out * _MLP_RATIO, dim_out, 2, activation=nn.GELU)
        if self.downsample:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, h, w, dim) -> (B, h', w', dim_out); h' = h // 2 when downsampling, else h."""
        normed = self.norm1(x)
        shortcut = _pool(self.proj(normed)) if self.downsample else x
        size = self.window_size
        if size == 0:
            attended = self.attn(normed)
        else:
            attended = self.attn(_to_windows(normed, size))
            if self.downsample:
                size //= _POOL
            attended = _from_windows(attended, size, *shortcut.shape[1:3])
        x = shortcut + attended
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """7x7 convolution with stride 4 (padding 3): (B, 3, S, S) -> (B, S/4, S/4, C_0)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=7, stride=PATCH_STRIDE, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Hiera(nn.Module):
    """The Hiera trunk; `forward` returns the output of each of its four stages."""

    def __init__(self, config: dict[str, Any]) -> None:
        """config: a checked sam/config.json dict of kind "sam2" (see `sam2_config`)."""
        super().__init__()
        dim, heads = config["hiera_embed_dim"], config["hiera_num_heads"]
        stages, windows = config["hiera_stages"], config["hiera_window_spec"]
        global_blocks = set(config["hiera_global_attn_blocks"])
        self.patch_embed = PatchEmbed(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, *config["hiera_pos_embed_size"]))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, dim, windows[0], windows[0]))
        starts = {sum(stages[:stage]) for stage in range(1, len(stages))}
        self.stage_ends = [sum(stages[: stage + 1]) - 1 for stage in range(len(stages))]
        self.stage_channels = [dim * 2**stage for stage in range(len(stages))]
        self.blocks = nn.ModuleList()
        stage = 0
        for index in range(sum(stages)):
            # A stage's first block still uses the previous stage's window (the official lag).
            window = 0 if index in global_blocks else windows[stage]
            dim_out = dim
            if index in starts:
                dim_out, heads, stage = dim * 2, heads * 2, stage + 1
            self.blocks.append(MultiScaleBlock(dim, dim_out, heads, window))
            dim = dim_out

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """(1, height, width, C_0): the background embedding resized (bicubic) plus the window
        pattern tiled over the grid."""
        background = F.interpolate(self.pos_embed, size=(height, width), mode="bicubic")
        window = self.pos_embed_window
        tiles = (height // window.shape[2], width // window.shape[3])
        return (background + window.tile(1, 1, *tiles)).permute(0, 2, 3, 1)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """pixels (B, 3, S, S) -> [(B, C_i, S / 2**(i + 2), S / 2**(i + 2)) for i in 0..3]."""
        x = self.patch_embed(pixels)
        x = x + self.position_embedding(x.shape[1], x.shape[2])
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.stage_ends:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs


class FpnNeck(nn.Module):
    """1x1 lateral convolutions to NECK_DIM channels; top-down only into the stride-16 level."""

    def __init__(self, stage_channels: list[int]) -> None:
        """stage_channels: C_i of the trunk's outputs, highest resolution first."""
        super().__init__()
        # Official order: the lowest-resolution level's convolution first.
        self.convs = nn.ModuleList(
            nn.Sequential(OrderedDict(conv=nn.Conv2d(channels, NECK_DIM, kernel_size=1)))
            for channels in reversed(stage_channels)
        )

    def forward(self, stages: list[torch.Tensor]) -> list[torch.Tensor]:
        """The trunk's four outputs -> levels of stride 4, 8, 16: (B, D, S/4 | S/8 | S/16, ...).

        The stride-16 level adds the nearest 2x upsampled stride-32 level, summed in float32 (as
        the official neck upcasts the top-down path) and cast back to the input dtype."""
        last = len(stages) - 1
        lateral = [self.convs[last - level](x) for level, x in enumerate(stages)]
        top_down = F.interpolate(lateral[last].float(), scale_factor=2.0, mode="nearest")
        fused = (lateral[last - 1] + top_down).to(lateral[last - 1].dtype)
        return [*lateral[: last - 1], fused]


class ImageEncoder(nn.Module):
    """Hiera trunk + FPN neck (official names `trunk`, `neck`)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.trunk = Hiera(config)
        self.neck = FpnNeck(self.trunk.stage_channels)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """pixels (B, 3, S, S) normalised -> [(B, D, S/4, S/4), (B, D, S/8, S/8),
        (B, D, S/16, S/16)]."""
        return self.neck(self.trunk(pixels))
