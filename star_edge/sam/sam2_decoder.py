"""SAM 2's prompt encoder and mask decoder for box and point prompts, as in the `sam2` package.

Module and parameter names follow the official state dict (`sam_prompt_encoder.*`,
`sam_mask_decoder.*`). Only what box/point prompts use is built: no mask-prompt encoder and no
object-score head (the object-score *token* is built: it takes part in the attention).

Against SAM 1's decoder: the output tokens are [object score, IoU, 4 mask tokens]; the predicted
IoU goes through a sigmoid; the two upscaling steps add the encoder's stride-8 and stride-4
features (projected by `conv_s1` / `conv_s0` once per image, in `high_res_features`).

Shapes: K prompts, N points per prompt, D = 256 decoder width, (h, w) the stride-16 grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from star_edge.sam.sam2_encoder import NECK_DIM, Mlp

NUM_MASK_TOKENS = 4
"""Decoder outputs: 0 the single-mask output, 1-3 the multimask outputs."""
_DEPTH = 2
_HEADS = 8
_MLP_DIM = 2048
_ATTENTION_DOWNSAMPLE = 2
_IOU_HEAD_DEPTH = 3
_IOU_HEAD_HIDDEN = 256
_LABEL_PADDING = -1


class RandomPositionEncoding(nn.Module):
    """Fourier features of (x, y) in [0, 1]^2 with a fixed random (2, D / 2) frequency matrix."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, channels // 2))

    def forward(self, unit_xy: torch.Tensor) -> torch.Tensor:
        """unit_xy (..., 2) float32 -> (..., D): [sin, cos] of 2 pi (2 xy - 1) @ matrix."""
        angles = 2 * math.pi * ((2 * unit_xy - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class PromptEncoder(nn.Module):
    """Labelled points -> sparse prompt tokens; the dense positional encoding of the grid."""

    def __init__(self, image_size: int, grid: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.grid = grid
        self.pe_layer = RandomPositionEncoding(NECK_DIM)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, NECK_DIM) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, NECK_DIM)
        self.no_mask_embed = nn.Embedding(1, NECK_DIM)

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """coords (K, N, 2) float32 in the S x S input frame, labels (K, N) int64 (-1 padding,
        0 negative, 1 positive, 2 / 3 box corners) -> (K, N, D) float32 tokens.

        Coordinates are shifted to pixel centres (+0.5) and scaled to [0, 1] first."""
        encoded = self.pe_layer((coords + 0.5) / self.image_size)
        kinds = torch.cat([w.weight for w in self.point_embeddings])
        tokens = encoded + kinds[labels.clamp(min=0)]
        padding = (labels == _LABEL_PADDING).unsqueeze(-1)
        return torch.where(padding, self.not_a_point_embed.weight, tokens)

    def dense_pe(self) -> torch.Tensor:
        """(1, D, h, w) float32: the encoding of every grid cell's centre."""
        device = self.no_mask_embed.weight.device
        centres = (torch.arange(self.grid, device=device) + 0.5) / self.grid
        ys, xs = torch.meshgrid(centres, centres, indexing="ij")
        return self.pe_layer(torch.stack([xs, ys], dim=-1)).permute(2, 0, 1).unsqueeze(0)


class Attention(nn.Module):
    """Multi-head attention with q/k/v projected to D / downsample channels."""

    def __init__(self, downsample: int = 1) -> None:
        super().__init__()
        inner = NECK_DIM // downsample
        self.q_proj = nn.Linear(NECK_DIM, inner)
        self.k_proj = nn.Linear(NECK_DIM, inner)
        self.v_proj = nn.Linear(NECK_DIM, inner)
        self.out_proj = nn.Linear(inner, NECK_DIM)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(K, L, H * d) -> (K, H, L, d)."""
        return x.view(x.shape[0], x.shape[1], _HEADS, -1).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (K, Lq, D), k and v (K, Lk, D) -> (K, Lq, D)."""
        out = F.scaled_dot_product_attention(
            self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        )
        return self.out_proj(out.transpose(1, 2).flatten(2))


class TwoWayBlock(nn.Module):
    """Token self-attention, token-to-image attention, token MLP, image-to-token attention."""

    def __init__(self, skip_first_pe: bool) -> None:
        super().__init__()
        self.skip_first_pe = skip_first_pe
        self.self_attn = Attention()
        self.norm1 = nn.LayerNorm(NECK_DIM)
        self.cross_attn_token_to_image = Attention(_ATTENTION_DOWNSAMPLE)
        self.norm2 = nn.LayerNorm(NECK_DIM)
        self.mlp = Mlp(NECK_DIM, _MLP_DIM, NECK_DIM, 2)
        self.norm3 = nn.LayerNorm(NECK_DIM)
        self.norm4 = nn.LayerNorm(NECK_DIM)
        self.cross_attn_image_to_token = Attention(_ATTENTION_DOWNSAMPLE)

    def forward(
        self,
        tokens: torch.Tensor,
        image: torch.Tensor,
        token_pe: torch.Tensor,
        image_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (K, T, D), image (K, h * w, D), their encodings alike -> new tokens, image."""
        if self.skip_first_pe:
            tokens = self.self_attn(tokens, tokens, tokens)
        else:
            query = tokens + token_pe
            tokens = tokens + self.self_attn(query, query, tokens)
        tokens = self.norm1(tokens)
        keys = image + image_pe
        tokens = self.norm2(tokens + self.cross_attn_token_to_image(tokens + token_pe, keys, image))
        tokens = self.norm3(tokens + self.mlp(tokens))
        image = self.norm4(image + self.cross_attn_image_to_token(keys, tokens + token_pe, tokens))
        return tokens, image


class TwoWayTransformer(nn.Module):
    """Two `TwoWayBlock`s, then a final token-to-image attention and norm."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(skip_first_pe=i == 0) for i in range(_DEPTH))
        self.final_attn_token_to_image = Attention(_ATTENTION_DOWNSAMPLE)
        self.norm_final_attn = nn.LayerNorm(NECK_DIM)

    def forward(
        self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image (K, h * w, D), image_pe (1, h * w, D), tokens (K, T, D) -> tokens (K, T, D),
        image (K, h * w, D)."""
        queries, keys = tokens, image
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, image_pe)
        attended = self.final_attn_token_to_image(queries + tokens, keys + image_pe, keys)
        return self.norm_final_attn(queries + attended), keys


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of (K, C, h, w) maps (eps 1e-6)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        variance = (x - mean).pow(2).mean(1, keepdim=True)
        normed = (x - mean) / torch.sqrt(variance + 1e-6)
        return self.weight[:, None, None] * normed + self.bias[:, None, None]


class MaskDecoder(nn.Module):
    """Prompt tokens + image features -> mask logits and predicted IoU of every output."""

    def __init__(self) -> None:
        super().__init__()
        dim = NECK_DIM
        self.transformer = TwoWayTransformer()
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(NUM_MASK_TOKENS, dim)
        self.obj_score_token = nn.Embedding(1, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.conv_s0 = nn.Conv2d(dim, dim // 8, kernel_size=1)
        self.conv_s1 = nn.Conv2d(dim, dim // 4, kernel_size=1)
        self.output_hypernetworks_mlps = nn.ModuleList(
            Mlp(dim, dim, dim // 8, 3) for _ in range(NUM_MASK_TOKENS)
        )
        self.iou_prediction_head = Mlp(
            dim, _IOU_HEAD_HIDDEN, NUM_MASK_TOKENS, _IOU_HEAD_DEPTH, sigmoid_output=True
        )

    def forward(
        self,
        features: torch.Tensor,
        high_res: tuple[torch.Tensor, torch.Tensor],
        image_pe: torch.Tensor,
        dense: torch.Tensor,
        sparse: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All outputs for K prompts on one image.

        features (1, D, h, w); high_res: conv_s0 / conv_s1 features (1, D/8, 4h, 4w) and
        (1, D/4, 2h, 2w); image_pe (1, D, h, w); dense (1, D, 1, 1) no-mask embedding;
        sparse (K, N, D) prompt tokens. All in the decoder's dtype.

        Returns:
            logits (K, 4, 4h, 4w) and iou (K, 4), output 0 the single-mask one.
        """
        count = sparse.shape[0]
        outputs = torch.cat(
            [self.obj_score_token.weight, self.iou_token.weight, self.mask_tokens.weight]
        )
        tokens = torch.cat([outputs.expand(count, -1, -1), sparse], dim=1)
        _, dim, height, width = features.shape
        image = (features + dense).flatten(2).transpose(1, 2).expand(count, -1, -1)
        queries, image = self.transformer(image, image_pe.flatten(2).transpose(1, 2), tokens)
        iou = self.iou_prediction_head(queries[:, 1])
        mask_queries = queries[:, 2 : 2 + NUM_MASK_TOKENS]
        hyper = torch.stack(
            [mlp(mask_queries[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        up1, norm, act1, up2, act2 = self.output_upscaling
        grid = image.transpose(1, 2).reshape(count, dim, height, width)
        upscaled = act1(norm(up1(grid) + high_res[1]))
        upscaled = act2(up2(upscaled) + high_res[0])
        logits = hyper @ upscaled.flatten(2)
        return logits.view(count, NUM_MASK_TOKENS, *upscaled.shape[2:]), iou
