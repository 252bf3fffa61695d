"""Hybrid ViT (Section 3.1): the input sequence is a ResNet feature map, with "patch size 1".

R50+ViT-B/16 (paper option ii, vit_jax `R50+ViT-B_16`, timm `vit_base_r50_s16_224`): a BiT-style
ResNet-50 whose stage 4 is removed and its blocks added to stage 3, i.e. blocks (3, 4, 9), total
stride 16. R50+ViT-B/32 (option i): the regular 4-stage R50, stride 32. Other strides: registry.py.

The backbone follows vit_jax's hybrid exactly as timm does: ResNetV2 *without* pre-activation
(conv -> GroupNorm -> ReLU bottlenecks), StdConv with TF "SAME" padding, GroupNorm(32).
Parameter names match timm: `patch_embed.backbone.*`, `patch_embed.proj`.
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
        self.backbone = resnetv2_body(blocks, width, in_chans, preact=False, same_padding=True)
        feat = self.backbone.num_features
        self.grid_size = (img_size // stride, img_size // stride)
        self.proj = nn.Conv2d(feat, dim, kernel_size=1, stride=1)  # patch size 1 on the feature map

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
