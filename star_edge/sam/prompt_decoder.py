"""SAM 1's prompt encoder and mask decoder for many prompts on one image, re-expressed for speed.

Same weights and the same function as segment_anything's `PromptEncoder` + `MaskDecoder` (equal up
to float32 rounding), computed with less work when K prompts share one image:

- The image side of the first two-way block is the same for every prompt (the image embedding
  plus the no-mask embedding), so its projections are computed once, not K times.
- Where image tokens are per prompt (after the first block), the attention projections are moved
  to the token side: a (4096 x 256) @ (256 x 128) projection of the image tokens becomes a
  (heads * tokens = 64) x 256 product per prompt. Query-side biases that only shift every logit of
  a softmax row are dropped (softmax is shift-invariant), and the value and output projections
  are applied to the few token rows, not to the 4096 image rows.
- Softmaxes over the few tokens run along a non-innermost axis of length-4096 rows.
- The final token-to-image attention runs for the output tokens that are read: each token
  attends on its own, so `decode_best` runs it for the IoU token and the candidate mask tokens
  only (the prompt tokens' outputs, and the single-mask token when multimask, are never formed).
- The per-prompt image tokens go through the transformer in tiles of whole grid rows that stay
  in cache: each tile is normed and fed straight into the next attention to the image, its
  logits and its softmax-weighted sum both (a running-maximum softmax), so a block's image
  tokens are written once and read once by the next block. Only the normed tokens are kept;
  tokens + PE go to one buffer reused tile after tile (a fresh tensor per tile is written to
  memory not in cache: 480 -> 461 ms at K = 24 on one core).
- The upscaling (two stride-2 transposed convolutions) runs as two matrix products on
  channels-last pixel rows, tile by tile, and only for the image tokens whose logits survive the
  crop to the unpadded image (43 of 64 token rows for a 3:2 photo); only the hypernetwork
  outputs that are asked for are formed.
- `decode_best` works through the prompts in groups (`max_batch`): one batch of K = 24 prompts
  in (K, 4096, 256) tensors ran slower than a per-prompt loop, every large allocation a fresh
  mmap that page-faults on first touch.

Shapes below: K prompts, N prompt points, T = 1 + M + N tokens (IoU token, M mask tokens, the
points), C the decoder width, P = h * w image tokens, heads H, head width d.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

_WORKING_SET_BYTES = 32 << 20


class ImageContext(NamedTuple):
    """Per-image tensors that every prompt shares (computed once per `decode` call).

    keys: (P, C) image tokens entering the transformer (embedding + no-mask embedding);
    pe: (P, C) positional encoding; token_to_image_k: (H, d, P) and token_to_image_v: (H, P, d),
    the first block's projections of keys + pe and of keys for its token-to-image attention;
    image_to_token_q: (H, P, d), its projection of keys + pe for the image-to-token attention.
    """

    keys: torch.Tensor
    pe: torch.Tensor
    token_to_image_k: torch.Tensor
    token_to_image_v: torch.Tensor
    image_to_token_q: torch.Tensor


def _activate_(activation: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """activation(x), in place for GELU (the SAM default: no fresh, cache-cold output)."""
    if type(activation) is torch.nn.GELU:
        return torch.ops.aten.gelu_(x, approximate=activation.approximate)
    return activation(x)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H * d) -> (B, H, L, d)."""
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, d) -> (B, L, H * d)."""
    batch, heads, length, width = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * width)


def _project_heads(linear: torch.nn.Linear, x: torch.Tensor, heads: int) -> torch.Tensor:
    """(P, C) shared image rows -> (H, P, d) projected per head."""
    projected = linear(x)
    return projected.view(x.shape[0], heads, -1).transpose(0, 1)


def _self_attention(
    block: torch.nn.Module, queries: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """A two-way block's token self-attention and norm1: (K, T, C) -> (K, T, C)."""
    if block.skip_first_layer_pe:
        queries = block.self_attn(q=queries, k=queries, v=queries)
    else:
        query = queries + tokens
        queries = queries + block.self_attn(q=query, k=query, v=queries)
    return block.norm1(queries)


def _attend_shared_image(
    attention: torch.nn.Module, queries: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """Token-to-image attention against image tokens shared by all prompts.

    queries: (K, T, C) tokens + PE; keys_t: (H, d, P) projected keys; values: (H, P, d) projected
    values. Returns the attention output (K, T, C).
    """
    heads = attention.num_heads
    batch, tokens, _ = queries.shape
    projected = attention.q_proj(queries)
    width = projected.shape[-1] // heads
    projected = projected.view(batch * tokens, heads, width).transpose(0, 1)
    weights = torch.softmax((projected * (1.0 / math.sqrt(width))) @ keys_t, dim=-1)
    out = (weights @ values).transpose(0, 1).reshape(batch, tokens, heads * width)
    return attention.out_proj(out)


def _fold_token_queries(attention: torch.nn.Module, queries: torch.Tensor) -> torch.Tensor:
    """Token-to-image attention against per-prompt image tokens, query side: the projected,
    scaled queries folded through the key projection, (K, T, C) -> (K, H * T, C).

    logits = q_h . (Wk_h x + bk_h) = (Wk_h^T q_h) . x + const(row); the constant cancels in the
    softmax over the image tokens, so logits = folded @ x.T.
    """
    heads = attention.num_heads
    batch, count, width = queries.shape
    projected = _split_heads(attention.q_proj(queries), heads)
    head_width = projected.shape[-1]
    key_weight = attention.k_proj.weight.view(heads, head_width, width)
    return ((projected * (1.0 / math.sqrt(head_width))) @ key_weight).view(batch, -1, width)


class _PooledTokens:
    """Softmax-weighted sums of image tokens, accumulated tile by tile.

    For logits (K, S, P) over all image tokens and the tokens (K, P, C), `pooled()` returns
    softmax(logits, dim=-1) @ tokens (K, S, C), computed from tiles along P with a running
    maximum (each tile's weights are exp(logits - running max), earlier sums rescaled when the
    maximum grows), so each tile is read once, while it is in cache.
    """

    def __init__(self) -> None:
        self._peak: torch.Tensor | None = None
        self._total: torch.Tensor | None = None
        self._sums: torch.Tensor | None = None

    def add(self, logits: torch.Tensor, tile: torch.Tensor) -> None:
        """logits: (K, S, R) of this tile's R tokens (overwritten); tile: (K, R, C)."""
        peak = logits.amax(dim=2, keepdim=True)
        if self._peak is not None:
            peak = torch.maximum(peak, self._peak)
        weights = logits.sub_(peak).exp_()
        if self._peak is None:
            self._total = weights.sum(dim=2, keepdim=True)
            self._sums = weights @ tile
        else:
            scale = torch.exp(self._peak - peak)
            self._total = self._total.mul_(scale).add_(weights.sum(dim=2, keepdim=True))
            self._sums = self._sums.mul_(scale).baddbmm_(weights, tile)
        self._peak = peak

    def pooled(self) -> torch.Tensor:
        """(K, S, C): the softmax-weighted sums over every tile added."""
        return self._sums / self._total


def _token_to_image_output(attention: torch.nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """Token-to-image attention output from the attention-weighted sums of the image tokens
    pooled: (K, H * T, C) (head-major rows): sum_n a_n (Wv_h x_n + bv_h) = Wv_h (sum_n a_n x_n)
    + bv_h, as the weights of a row sum to one. Returns (K, T, C)."""
    heads = attention.num_heads
    batch, rows, width = pooled.shape
    pooled = pooled.view(batch, heads, rows // heads, width)
    head_width = attention.v_proj.weight.shape[0] // heads
    value_weight = attention.v_proj.weight.view(heads, head_width, width).transpose(1, 2)
    values = pooled @ value_weight + attention.v_proj.bias.view(heads, 1, head_width)
    return attention.out_proj(_merge_heads(values))


class _ImageToTokens(NamedTuple):
    """Token-side operands of one image-to-token attention, for a group of K prompts.

    keys: (K, H, T, d) projected token keys, scaled by 1 / sqrt(d); folded: (K, H * T, C) those
    keys folded through the query projection, and offset: (K, H, T, 1) the query bias' share of
    each logit (both used when the image rows are per prompt); rows: (K, H * T, C) token values
    folded through the output projection; bias: (C,) the output projection's bias.
    """

    keys: torch.Tensor
    folded: torch.Tensor
    offset: torch.Tensor
    rows: torch.Tensor
    bias: torch.Tensor


def _image_to_tokens_operands(
    attention: torch.nn.Module, tokens_pe: torch.Tensor, tokens: torch.Tensor
) -> _ImageToTokens:
    """tokens_pe: (K, T, C) tokens + PE (the attention's keys); tokens: (K, T, C) its values."""
    heads = attention.num_heads
    batch, count, width = tokens.shape
    keys = _split_heads(attention.k_proj(tokens_pe), heads)
    head_width = keys.shape[-1]
    keys = keys * (1.0 / math.sqrt(head_width))
    query_weight = attention.q_proj.weight.view(heads, head_width, width)
    folded = (keys @ query_weight).view(batch, heads * count, width)
    offset = (keys * attention.q_proj.bias.view(heads, 1, head_width)).sum(-1, keepdim=True)
    values = _split_heads(attention.v_proj(tokens), heads)
    out_weight = attention.out_proj.weight.view(width, heads, head_width).permute(1, 2, 0)
    rows = (values @ out_weight).reshape(batch, heads * count, width)
    return _ImageToTokens(keys, folded, offset, rows, attention.out_proj.bias)


def _image_to_tokens_tile(
    operands: _ImageToTokens,
    image_queries: torch.Tensor | None,
    image_pe: torch.Tensor | None,
    residual: torch.Tensor,
) -> torch.Tensor:
    """residual + image-to-token attention output for R image tokens, before the block's norm.

    Each image token attends over the T tokens of each head. With image tokens shared by the
    prompts, image_queries: (H, R, d) is their query projection; with per-prompt image tokens,
    image_pe: (K, R, C) is them + PE, and the query projection is folded onto the token keys.
    The output (R, H * T) @ (H * T, C) has the value and output projections folded into the
    token rows; their bias is added once (each head's weights sum to one).

    residual: (R, C) shared or (K, R, C), which is then updated in place. Returns (K, R, C).
    """
    batch, heads, count, head_width = operands.keys.shape
    if image_queries is not None:
        keys = operands.keys.transpose(0, 1).reshape(heads, batch * count, head_width)
        logits = (keys @ image_queries.transpose(1, 2)).view(heads, batch, count, -1)
        logits = logits.transpose(0, 1)
    else:
        logits = (operands.folded @ image_pe.transpose(1, 2)).view(batch, heads, count, -1)
        logits = logits + operands.offset
    weights = torch.softmax(logits, dim=2).reshape(batch, heads * count, -1)
    if residual.dim() == 3:
        updated = residual.baddbmm_(weights.transpose(1, 2), operands.rows)
    else:
        updated = torch.baddbmm(residual, weights.transpose(1, 2), operands.rows)
    return updated.add_(operands.bias)


class PromptDecoder(torch.nn.Module):
    """Labelled points -> mask logits and predicted IoU, for K prompts on one image embedding.

    Wraps (does not copy) a segment_anything `PromptEncoder` and `MaskDecoder`; the mask decoder's
    parameters decide the compute dtype. Masks are never given as prompts here.
    """

    def __init__(self, prompt_encoder: torch.nn.Module, mask_decoder: torch.nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    @property
    def num_outputs(self) -> int:
        """M: the single-mask output (index 0) plus the multimask outputs."""
        return int(self.mask_decoder.num_mask_tokens)

    @property
    def low_res_size(self) -> tuple[int, int]:
        """(4h, 4w) of the logits."""
        height, width = self.prompt_encoder.image_embedding_size
        return 4 * height, 4 * width

    def default_max_batch(self) -> int:
        """Prompts per group on CPU: as many as keep twice a group's per-prompt image tokens
        ((P, C) per prompt, kept between blocks; the factor two leaves room for a block's
        intermediates) within 32 MiB; 4 for a 64 x 64 x 256 embedding. Measured on a 2-core CPU
        (ViT-B, one thread, benchmarks/sam_decode.py): max_batch 1 / 4 / 64 -> K = 24 in 0.52 /
        0.47 / 0.47 s, K = 64 in 1.47 / 1.24 / 1.53 s."""
        height, width = self.prompt_encoder.image_embedding_size
        per_prompt = 2 * height * width * self.prompt_encoder.embed_dim * 4
        return max(1, _WORKING_SET_BYTES // per_prompt)

    def embed_prompts(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Labelled points -> sparse prompt embeddings, as PromptEncoder embeds points and boxes.

        coords: (K, N, 2) float32 (x, y) in the SAM frame; labels: (K, N) int64 in {-1, 0, 1, 2,
        3} (see star_edge.sam.inputs). Returns (K, N, C) float32.
        """
        encoder = self.prompt_encoder
        height, width = encoder.input_image_size
        scale = torch.tensor([1.0 / width, 1.0 / height], dtype=torch.float32)
        unit = (coords + 0.5) * scale.to(coords.device)
        gaussian = encoder.pe_layer.positional_encoding_gaussian_matrix
        angles = (2.0 * math.pi) * ((2.0 * unit - 1.0) @ gaussian)
        encoding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
        table = torch.cat(
            [encoder.not_a_point_embed.weight] + [e.weight for e in encoder.point_embeddings]
        )
        is_point = (labels >= 0).to(encoding.dtype)[..., None]
        return encoding * is_point + table[labels + 1]

    def image_context(self, features: torch.Tensor) -> ImageContext:
        """features (1, C, h, w) -> the tensors every prompt shares (see ImageContext)."""
        dtype = features.dtype
        width = features.shape[1]
        no_mask = self.prompt_encoder.no_mask_embed.weight.to(dtype).view(width, 1, 1)
        keys = (features[0] + no_mask).flatten(1).t().contiguous()
        pe = self.prompt_encoder.get_dense_pe().to(dtype)[0].flatten(1).t().contiguous()
        keys_pe = keys + pe
        block = self.mask_decoder.transformer.layers[0]
        to_image = block.cross_attn_token_to_image
        to_token = block.cross_attn_image_to_token
        return ImageContext(
            keys=keys,
            pe=pe,
            token_to_image_k=_project_heads(to_image.k_proj, keys_pe, to_image.num_heads)
            .transpose(1, 2)
            .contiguous(),
            token_to_image_v=_project_heads(to_image.v_proj, keys, to_image.num_heads).contiguous(),
            image_to_token_q=_project_heads(
                to_token.q_proj, keys_pe, to_token.num_heads
            ).contiguous(),
        )

    def tile_rows(self, batch: int, tile_tokens: int | None) -> int:
        """Grid rows per tile of image tokens for a group of `batch` prompts: about
        `tile_tokens` tokens in all, at least one row; None: the whole grid."""
        height, width = self.prompt_encoder.image_embedding_size
        if tile_tokens is None:
            return height
        return max(1, min(height, tile_tokens // (batch * width)))

    def run_transformer(
        self,
        context: ImageContext,
        sparse: torch.Tensor,
        tile_rows: int | None = None,
        outputs: tuple[int, ...] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The two-way transformer: sparse (K, N, C) -> the chosen output tokens (K, S, C) and
        the image tokens as tiles (K, tile_rows * w, C) of whole grid rows, top to bottom (one
        tile of all P tokens when tile_rows is None); as TwoWayTransformer with the output tokens
        prepended to the prompt tokens.

        outputs: which output tokens go through the final token-to-image attention (0 the IoU
        token, 1 + i mask token i), in that order; None: all 1 + M. Each token attends on its
        own, so the others are never computed.

        Each tile goes through a block's image-to-token attention and norm and straight on into
        the next attention to the image (the next block's, or the final one), whose queries are
        known by then: its logits and its running softmax-weighted sum (`_PooledTokens`) take
        the tile while it is in cache. The per-prompt image tokens are written once per block
        and read once by the next; tile + PE is formed in one buffer that every tile reuses.
        """
        decoder = self.mask_decoder
        transformer = decoder.transformer
        blocks = transformer.layers
        batch = sparse.shape[0]
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])
        tokens = torch.cat([output_tokens.expand(batch, -1, -1), sparse.to(output_tokens.dtype)], 1)
        first = blocks[0]
        queries = _self_attention(first, tokens, tokens)
        out = _attend_shared_image(
            first.cross_attn_token_to_image,
            queries + tokens,
            context.token_to_image_k,
            context.token_to_image_v,
        )
        queries = first.norm2(queries + out)
        queries = first.norm3(queries + first.mlp(queries))
        height, width = self.prompt_encoder.image_embedding_size
        step = width * (tile_rows or height)
        spans = [slice(top, top + step) for top in range(0, height * width, step)]
        tiles: list[torch.Tensor] = []
        # tile + PE of the tile at hand; only the normed tiles are kept between blocks
        scratch = context.pe.new_empty((batch, step, context.pe.shape[1]))
        for index, block in enumerate(blocks):
            operands = _image_to_tokens_operands(
                block.cross_attn_image_to_token, queries + tokens, queries
            )
            if index + 1 < len(blocks):
                following = blocks[index + 1]
                attention = following.cross_attn_token_to_image
                queries = _self_attention(following, queries, tokens)
            else:
                attention = transformer.final_attn_token_to_image
                chosen = list(outputs) if outputs is not None else list(range(1 + decoder.num_mask_tokens))
                queries, tokens = queries[:, chosen], tokens[:, chosen]
            folded = _fold_token_queries(attention, queries + tokens)
            norm = block.norm4
            pooled = _PooledTokens()
            for number, span in enumerate(spans):
                pe = context.pe[span]
                tile_pe = scratch[:, : pe.shape[0]]
                if index == 0:
                    tile = _image_to_tokens_tile(
                        operands, context.image_to_token_q[:, span], None, context.keys[span]
                    )
                else:
                    torch.add(tiles[number], pe, out=tile_pe)
                    tile = _image_to_tokens_tile(operands, None, tile_pe, tiles[number])
                tile = F.layer_norm(tile, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
                if index == 0:
                    tiles.append(tile)
                else:
                    tiles[number] = tile
                torch.add(tile, pe, out=tile_pe)
                pooled.add(folded @ tile_pe.transpose(1, 2), tile)
            out = _token_to_image_output(attention, pooled.pooled())
            if index + 1 < len(blocks):
                queries = following.norm2(queries + out)
                queries = following.norm3(queries + following.mlp(queries))
            else:
                queries = transformer.norm_final_attn(queries + out)
        return queries, tiles

    def hypernetwork_weights(self, queries: torch.Tensor, outputs: torch.Tensor | None = None) -> torch.Tensor:
        """Mask-token outputs (K, S, C) -> per-output mask weights (K, S, C / 8).

        outputs: (K, S) int64 in 0..M-1, the mask output each row of `queries` belongs to (its
        hypernetwork MLP); None: queries holds all M mask tokens in order.
        """
        mlps = self.mask_decoder.output_hypernetworks_mlps
        if outputs is None:
            return torch.stack([mlp(queries[:, i]) for i, mlp in enumerate(mlps)], 1)
        every = torch.stack([mlp(queries) for mlp in mlps], 2)
        index = outputs[..., None, None].expand(-1, -1, 1, every.shape[-1])
        return every.gather(2, index)[:, :, 0]

    def upscale(
        self, tiles: list[torch.Tensor], weights: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Image tokens and mask weights (K, S, C / 8) -> logits (K, S, 4r, 4c) float32.

        tiles: the image tokens as `run_transformer` returns them, (K, rows_i * w, C) each.
        grid: (r, c), only the top-left r x c image tokens are upscaled (the rest of the logits
        would be cropped away); default all h x w.

        The two kernel-2, stride-2 transposed convolutions are per-pixel linear maps
        C -> 4 * C/4 and C/4 -> 4 * C/8; they run as matrix products on rows of channels, the
        LayerNorm2d as a layer norm over the last axis, one tile at a time (the intermediates are
        16 times the tile), the activations in place.
        """
        up1, norm, act1, up2, act2 = self.mask_decoder.output_upscaling
        batch, _, width = tiles[0].shape
        height, span = self.prompt_encoder.image_embedding_size
        rows, cols = grid or (height, span)
        mid, out = up1.weight.shape[1], up2.weight.shape[1]
        first = up1.weight.permute(0, 2, 3, 1).reshape(width, 4 * mid)
        second = up2.weight.permute(0, 2, 3, 1).reshape(mid, 4 * out)
        first_bias, second_bias = up1.bias.repeat(4), up2.bias.repeat(4)
        mixing = weights.transpose(1, 2).to(tiles[0].dtype)
        count = weights.shape[1]
        logits = torch.empty(
            (batch, count, rows, 2, 2, cols, 2, 2), dtype=torch.float32, device=tiles[0].device
        )
        top = 0
        for tile in tiles:
            bottom = min(rows, top + tile.shape[1] // span)
            if bottom <= top:
                break
            grid_tile = tile.view(batch, -1, span, width)[:, : bottom - top, :cols]
            x = torch.addmm(first_bias, grid_tile.reshape(-1, width), first).view(-1, mid)
            x = _activate_(act1, F.layer_norm(x, (mid,), norm.weight, norm.bias, norm.eps))
            x = _activate_(act2, torch.addmm(second_bias, x, second)).view(batch, -1, out)
            # rows (i, j, a, b, a2, b2) of a tile -> pixel (4i + 2a + a2, 4j + 2b + b2)
            values = torch.bmm(x, mixing).view(batch, bottom - top, cols, 2, 2, 2, 2, count)
            logits[:, :, top:bottom] = values.permute(0, 7, 1, 3, 5, 2, 4, 6)
            top = bottom
        return logits.view(batch, count, 4 * rows, 4 * cols)

    def forward(
        self, features: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every output for K prompts (the function the ONNX decoder graph holds).

        features: (1, C, h, w); coords: (K, N, 2) float32 SAM frame; labels: (K, N) int64.

        Returns:
            low_res_masks: (K, M, 4h, 4w) float32 logits; output 0 is the single-mask output,
                1.. the multimask outputs.
            iou_predictions: (K, M) float32.
        """
        context = self.image_context(features)
        queries, tiles = self.run_transformer(context, self.embed_prompts(coords, labels))
        iou = self.mask_decoder.iou_prediction_head(queries[:, 0]).float()
        return self.upscale(tiles, self.hypernetwork_weights(queries[:, 1:])), iou

    def decode_best(
        self,
        features: torch.Tensor,
        coords: torch.Tensor,
        labels: torch.Tensor,
        multimask: bool,
        max_batch: int,
        extent: tuple[int, int] | None = None,
        tile_tokens: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen output of each prompt, in groups of at most `max_batch` prompts.

        multimask: choose, per prompt, the multimask output with the highest predicted IoU (as
        SamPredictor with multimask_output=True, then argmax); else the single-mask output.
        extent: (rows, cols) of the low-resolution logits that will be used (the unpadded part
        of the image); only the image tokens covering them are upscaled. None: all.
        tile_tokens: about this many image tokens (over the group's prompts) per tile of
            `run_transformer` and `upscale`; None: one tile.

        Returns:
            logits: (K, 4r, 4c) float32 with 4r >= rows, 4c >= cols (all of 4h x 4w by default);
            scores: (K,) float32 predicted IoU of those outputs.
        """
        grid = None if extent is None else (-(-extent[0] // 4), -(-extent[1] // 4))
        context = self.image_context(features)
        sparse = self.embed_prompts(coords, labels)
        # The IoU token and the candidate mask tokens: multimask outputs 1.., or output 0.
        candidates = range(1, self.num_outputs) if multimask else range(1)
        outputs = (0, *(1 + c for c in candidates))
        logits, scores = [], []
        for start in range(0, sparse.shape[0], max_batch):
            group = sparse[start : start + max_batch]
            rows_per_tile = self.tile_rows(len(group), tile_tokens)
            queries, tiles = self.run_transformer(context, group, rows_per_tile, outputs)
            iou = self.mask_decoder.iou_prediction_head(queries[:, 0]).float()[:, list(candidates)]
            best = iou.argmax(dim=1, keepdim=True)
            rows = torch.arange(len(group), device=best.device)
            chosen = queries[rows, 1 + best[:, 0]][:, None]
            weights = self.hypernetwork_weights(chosen, best + candidates[0])
            logits.append(self.upscale(tiles, weights, grid)[:, 0])
            scores.append(iou.gather(1, best)[:, 0])
        return torch.cat(logits), torch.cat(scores)
