"""Analytic forward FLOPs per image (one multiply-add = 2 FLOPs).

Counted, as torch.utils.flop_counter.FlopCounterMode does: matrix multiplies and convolutions
(incl. the two attention matmuls). Not counted: norms, activations, softmax, additions, pooling;
they are a few percent at most and the paper's compute axis (Fig. 5) ignores them too.
"""

from __future__ import annotations

import math

import torch.nn as nn

from .bit import BiTResNet
from .hybrid import HybridEmbed
from .vit import VisionTransformer


def _conv(conv: nn.Conv2d, h: int, w: int) -> int:
    """FLOPs of `conv` producing an (h, w) output map."""
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return 2 * h * w * conv.out_channels * (conv.in_channels // conv.groups) * k


def _resnet_body(body, img_size: int) -> tuple[int, int]:
    """(FLOPs, final spatial size) of a timm ResNetV2 stem + stages; every stride-s layer here pads SAME-like,
    mapping size h to ceil(h / s)."""
    h = math.ceil(img_size / 2)  # stem conv, stride 2
    total = _conv(body.stem.conv, h, h)
    h = math.ceil(h / 2)  # stem max-pool
    for stage in body.stages:
        for block in stage.blocks:
            s = block.conv2.stride[0]
            out = math.ceil(h / s)
            total += _conv(block.conv1, h, h)  # 1x1 at the input resolution
            total += _conv(block.conv2, out, out)  # 3x3, carries the stride
            total += _conv(block.conv3, out, out)
            if block.downsample is not None:
                total += _conv(block.downsample.conv, out, out)
            h = out
    return total, h


def _vit(model: VisionTransformer, img_size: int, executed: bool = False) -> int:
    stem = model.patch_embed
    if isinstance(stem, HybridEmbed):
        total, g = _resnet_body(stem.backbone, img_size)
    else:
        total, g = 0, img_size // stem.patch_size
    total += _conv(stem.proj, g, g)
    n = g * g + model.num_prefix  # sequence length
    d = model.dim
    mlp = model.blocks[0].mlp.fc1.out_features
    per_layer = (
        2 * n * d * 3 * d  # qkv projection
        + 2 * 2 * n * n * d  # q k^T and attn v, all heads
        + 2 * n * d * d  # output projection
        + 2 * 2 * n * d * mlp  # MLP fc1, fc2
    )
    if model.rel_bias is not None:
        offsets = model.rel_bias[0].offset_table().shape[0]
        per_layer += 2 * n * offsets * d  # content query x relative embeddings
    total += model.depth * per_layer
    if executed and model.cls_only_last_block():
        # the last block's query, attention, output projection and MLP run for the class token only
        last = 2 * 1 * d * d + 2 * n * d * 2 * d + 2 * 2 * 1 * n * d + 2 * 1 * d * d + 2 * 2 * 1 * d * mlp
        total += last - per_layer
    return total + _head(model)


def _head(model) -> int:
    layers = (getattr(model.pre_logits, "fc", None), model.head)  # the tanh layer, the classifier
    return sum(2 * m.in_features * m.out_features for m in layers if isinstance(m, nn.Linear))


def flops(model: nn.Module, img_size: int | None = None, executed: bool = False) -> int:
    """Forward FLOPs for one image at `img_size` (default: the model's): the architecture's, as the paper
    counts them (Fig. 5), or with executed=True what the forward pass runs (less for a token-pooled ViT)."""
    img_size = img_size or model.img_size
    if isinstance(model, VisionTransformer):
        return int(_vit(model, img_size, executed))
    if isinstance(model, BiTResNet):
        return int(_resnet_body(model, img_size)[0] + _head(model))
    raise TypeError(f"flops: unsupported model type {type(model).__name__}")
