"""A small Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

Pre-norm encoder with a class token and learned position embedding, scaled down so that CPU
runs are feasible on 28/32-pixel images. Defaults at width 1 are fishprune's own choice (the
paper's smallest model, ViT-B/16, is far too large here): patch 4 (28 px → 7×7 = 49 patches,
32 px → 8×8 = 64), embed dim 128, depth 6, 4 heads, MLP ratio 2, GELU, no dropout.

Attention uses explicit ``nn.Linear`` layers for ``qkv`` and ``proj`` (not
``nn.MultiheadAttention``, whose ``in_proj_weight`` is a raw parameter) so that every weight
matrix is a prunable ``Linear.weight``; the product itself is
``torch.nn.functional.scaled_dot_product_attention``. The width multiplier scales the embed
dim, rounded to a multiple of the head count (at least one channel per head).
Class token and position embedding start from N(0, 0.02²) truncated at ±2 (as in timm).
3×32×32, 10 classes, width 1: 811,146 parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fishprune.models._common import check_input, scale_width

PATCH_SIZE = 4
EMBED_DIM = 128
DEPTH = 6
HEADS = 4
MLP_RATIO = 2


class Attention(nn.Module):
    """Multi-head self-attention: softmax(q kᵀ / √d_head) v, heads concatenated, then ``proj``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        # (B, N, 3·D) -> (3, B, heads, N, D / heads)
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class MLP(nn.Module):
    """Position-wise feed-forward network: fc2(gelu(fc1 x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1 x), then x + mlp(norm2 x)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Patch embedding conv, class token + position embedding, ``blocks``, ``norm``, ``head``."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        patch_size: int = PATCH_SIZE,
        dim: int = EMBED_DIM,
        depth: int = DEPTH,
        heads: int = HEADS,
        mlp_ratio: int = MLP_RATIO,
    ) -> None:
        super().__init__()
        if image_size % patch_size or dim % heads:
            raise ValueError(
                f"image_size {image_size} must be divisible by patch_size {patch_size} "
                f"and dim {dim} by heads {heads}"
            )
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h·w, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1 + h·w, D)
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit(*, in_channels: int, num_classes: int, image_size: int, width: float) -> nn.Module:
    """Build the small ViT (patch 4, depth 6, 4 heads, embed 128·width, MLP ratio 2)."""
    check_input(in_channels, image_size)
    dim = HEADS * scale_width(EMBED_DIM // HEADS, width)
    return VisionTransformer(in_channels, num_classes, image_size, dim=dim)
