"""BiT ResNets (Kolesnikov et al. 2020): the paper's CNN baseline, "ResNet (BiT)".

timm's ResNetV2 is exactly the BiT architecture (pre-activation bottlenecks, GroupNorm(32), weight-standardised
convs with eps 1e-8, the "fixed" stem); we add the suite's interface (`forward_features -> (B, F)`,
`reset_head`) and a Linear classifier `head` where timm has the 1x1-conv `head.fc` (weights.py converts).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import GroupNormAct
from timm.layers import StdConv2d as _TimmStdConv2d
from timm.layers import StdConv2dSame as _TimmStdConv2dSame
from timm.layers.padding import pad_same
from timm.models.resnetv2 import ResNetV2

from .vit import make_head, replace_head

RESNET_OPTIONS = ("img_size", "in_chans", "num_classes", "head", "representation_size", "drop_rate", "drop_path_rate")
STAGE_CHANNELS = (256, 512, 1024, 2048)  # bottleneck output channels per stage at width 1
_REDUCED = (torch.bfloat16, torch.float16)


def _cpu_reduced_precision(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a conv of `x` runs a reduced-precision (oneDNN bf16/fp16) kernel on the CPU."""
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in _REDUCED
    return x.device.type == "cpu" and (autocast or x.dtype in _REDUCED or weight.dtype in _REDUCED)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias, stride, padding, dilation, groups: int) -> torch.Tensor:
    """``F.conv2d``, routed around a oneDNN bug in CPU bf16 weight gradients (torch 2.x, AVX512-BF16/AMX):
    where the stride exceeds an axis's kernel positions (e.g. a 3x3/2 conv on a 1x1 map: BiT stage 3 at <= 16
    px), its backward-weights kernel leaves the taps that only see padding uninitialised (often NaN). Exact
    work-around: an axis with one output position never moves the kernel, so its stride becomes 1, what its
    window never reaches is cropped and the padding is explicit. fp32 and CUDA keep the plain call."""
    if isinstance(padding, str) or not _cpu_reduced_precision(x, weight):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    positions = [x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) for i in (0, 1)]
    single = [stride[i] > 1 and 1 <= positions[i] <= stride[i] for i in (0, 1)]  # one output position
    if not any(single):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    (ph, pw), (sh, sw) = padding, stride
    # F.pad order (w_before, w_after, h_before, h_after); a negative "after" crops unreachable positions
    x = F.pad(x, (pw, pw - (positions[1] - 1) if single[1] else pw, ph, ph - (positions[0] - 1) if single[0] else ph))
    return F.conv2d(x, weight, bias, (1 if single[0] else sh, 1 if single[1] else sw), 0, dilation, groups)


def _standardized(conv: nn.Conv2d) -> torch.Tensor:
    """Weight standardisation as timm computes it (per output channel, biased variance, `conv.eps`).
    The weights are fp32 parameters and batch_norm is not autocast to bf16, so this runs in fp32."""
    return F.batch_norm(conv.weight.reshape(1, conv.out_channels, -1), None, None, training=True,
                        momentum=0.0, eps=conv.eps).reshape_as(conv.weight)


class StdConv2d(_TimmStdConv2d):
    """timm's StdConv2d (same parameters, same maths), with the conv routed through `conv2d`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(x, _standardized(self), self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConv2dSame(_TimmStdConv2dSame):
    """timm's StdConv2dSame (TF 'SAME' padding), with the conv routed through `conv2d`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return conv2d(x, _standardized(self), self.bias, self.stride, self.padding, self.dilation, self.groups)


def group_norm(width: float):
    """GroupNorm(+ReLU) with 32 groups at width >= 1 (BiT); proportionally fewer for fractional widths
    so that a group never has fewer channels than the narrowest BiT-R50x1 layer (2 channels)."""
    groups = 32 if width >= 1 else max(1, int(round(32 * width)))
    return partial(GroupNormAct, num_groups=groups)


def resnetv2_body(blocks, width: float, in_chans: int) -> ResNetV2:
    """The ViT hybrid's backbone as vit_jax builds it: a timm ResNetV2 without pre-activation or classifier,
    TF 'SAME' padding everywhere, `blocks` bottlenecks per stage (1 to 4 stages)."""
    return ResNetV2(layers=list(blocks), channels=STAGE_CHANNELS[: len(blocks)], num_classes=0, in_chans=in_chans,
                    global_pool="", width_factor=width, stem_type="same", preact=False,
                    conv_layer=partial(StdConv2dSame, eps=1e-8), norm_layer=group_norm(width))


class BiTResNet(ResNetV2):
    """BiT ResNet-v2 with a linear (or tanh-MLP) head on globally average-pooled features."""

    def __init__(self, name: str, blocks, width: float, img_size: int = 224, in_chans: int = 3,
                 num_classes: int = 1000, head: str = "linear", representation_size: int | None = None,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0):
        if head not in ("linear", "mlp"):
            raise ValueError(f"head={head!r} is not one of ('mlp', 'linear')")
        super().__init__(
            layers=list(blocks), channels=STAGE_CHANNELS, num_classes=0, in_chans=in_chans,
            global_pool="", width_factor=width, stem_type="fixed", preact=True,
            conv_layer=partial(StdConv2d, eps=1e-8), norm_layer=group_norm(width),
            drop_rate=drop_rate, drop_path_rate=drop_path_rate)
        self.name, self.img_size, self.num_classes = name, img_size, num_classes
        self.body_features = self.num_features  # channels of the final feature map
        # BiT zero-initialises its classifier too (bit_pytorch: head conv weight zeros)
        make_head(self, self.body_features, head, representation_size, num_classes, drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_logits(super().forward_features(x).mean(dim=(2, 3)))  # (B, num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.forward_features(x)))  # (B, num_classes)

    def reset_head(self, num_classes: int) -> None:
        """Replace the whole head (pre-logits included) by one zero-initialised linear layer."""
        replace_head(self, self.body_features, num_classes)

    def set_img_size(self, img_size: int) -> None:
        self.img_size = img_size  # a CNN takes any resolution; only the metadata changes
