"""Hybrid ViT (Section 3.1): the input sequence is a ResNet feature map, with "patch size 1".

R50+ViT-B/16 (timm `vit_base_r50_s16_224`) has blocks (3, 4, 9) at total stride 16; the stage cut of other
strides: registry.py. The backbone is vit_jax's (`bit.resnetv2_body`); parameter names match timm's
(`patch_embed.backbone.*`, `patch_embed.proj`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .bit import resnetv2_body
from .registry import hybrid_blocks
from .vit import VisionTransformer


class HybridEmbed(nn.Module):
    """ResNet feature map -> 1x1 projection to D -> tokens (B, h*w, D)."""

    def __init__(self, blocks, width: float, stride: int, img_size: int, in_chans: int, dim: int):
        super().__init__()
        self.stride = stride
        self.backbone = resnetv2_body(blocks, width, in_chans)
        self.grid_size = (img_size // stride, img_size // stride)
        # patch size 1 on the feature map
        self.proj = nn.Conv2d(self.backbone.num_features, dim, kernel_size=1, stride=1)

    def set_img_size(self, img_size: int) -> None:
        self.grid_size = (img_size // self.stride, img_size // self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone.forward_features(x)  # (B, F, H/s, W/s)
        x = self.proj(x)  # (B, D, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


def hybrid_vit(name: str, resnet_blocks, width: float, stride: int, img_size: int, in_chans: int,
               dim: int, **vit_kwargs) -> VisionTransformer:
    blocks = hybrid_blocks(tuple(resnet_blocks), stride)
    stem = HybridEmbed(blocks, width, stride, img_size, in_chans, dim)
    model = VisionTransformer(name=name, img_size=img_size, patch_size=stride, in_chans=in_chans, dim=dim,
                              stem=stem, **vit_kwargs)
    model.resnet_blocks = blocks
    return model
