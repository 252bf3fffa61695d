"""Model names (the paper's Table 1 and Section 4; the grammar: docs/design.md) and the variant table.

A hybrid of total stride s keeps the first log2(s) - 1 of the ResNet's stages (strides 4, 8, 16, 32) and appends
the removed stages' blocks to the last kept one, so the depth is unchanged: s = 32 is the paper's option (i)
(R50+ViT-B/32, blocks (3, 4, 6, 3)), s = 16 option (ii) (R50+ViT-B/16, blocks (3, 4, 9)); s = 8 and 4 are CPU
sizes. Fractional ResNet widths (x0.25) are for CPU runs; GroupNorm then has 32 * width groups.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# Transformer shapes: (hidden size D, layers, MLP size, heads).
# Ti/S/B/L/H: Table 1 of the paper (Ti and S from the AugReg configs in vit_jax/configs/models.py).
# Nano/Micro/Mini: our small sizes for CPU runs (not in the paper).
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "Nano": (64, 4, 256, 2), "Micro": (128, 6, 512, 4), "Mini": (192, 6, 768, 3),
    "Ti": (192, 12, 768, 3), "S": (384, 12, 1536, 6), "B": (768, 12, 3072, 12), "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16)}

# ResNet depth -> blocks per stage (bottleneck blocks; depth = 3 * sum(blocks) + 2).
RESNET_BLOCKS: dict[int, tuple[int, int, int, int]] = {  # 14: timm's resnet14t layout
    14: (1, 1, 1, 1), 26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}

# Every name the suite registers (list_models()). The grammar accepts more (any patch size, any
# listed ResNet depth and width); these are the ones the experiments use and the tests exercise.
REGISTERED: tuple[str, ...] = (
    # paper / AugReg plain ViTs
    "ViT-Ti/16", "ViT-S/16", "ViT-B/32", "ViT-B/16", "ViT-L/32", "ViT-L/16", "ViT-H/14",
    # CPU-sized ViTs
    "ViT-Nano/4", "ViT-Micro/4", "ViT-Mini/4", "ViT-Nano/8", "ViT-Micro/8", "ViT-Mini/8",
    # hybrids
    "R50+ViT-B/16", "R50+ViT-B/32", "R26x0.25+ViT-Micro/8", "R14x0.25+ViT-Nano/4",
    # BiT ResNets
    "BiT-R50x1", "BiT-R50x3", "BiT-R101x1", "BiT-R101x3", "BiT-R152x2", "BiT-R152x4", "BiT-R26x1",
    "BiT-R26x0.25", "BiT-R14x0.25",
)


@dataclass(frozen=True)
class ViTSpec:
    size: str
    dim: int
    depth: int
    mlp_dim: int
    heads: int
    patch: int  # patch size (plain ViT) or total ResNet stride (hybrid)


@dataclass(frozen=True)
class ResNetSpec:
    depth: int
    width: float
    blocks: tuple[int, ...]  # blocks per stage


@dataclass(frozen=True)
class ParsedName:
    family: str  # "vit" | "hybrid" | "bit"
    vit: ViTSpec | None = None
    resnet: ResNetSpec | None = None


_VIT_RE = re.compile(r"^ViT-(?P<size>[A-Za-z]+)/(?P<patch>\d+)$")
_HYBRID_RE = re.compile(r"^R(?P<depth>\d+)(?:x(?P<width>\d+(?:\.\d+)?))?\+ViT-(?P<size>[A-Za-z]+)/(?P<stride>\d+)$")
_BIT_RE = re.compile(r"^BiT-R(?P<depth>\d+)x(?P<width>\d+(?:\.\d+)?)$")


def _unknown(name: str, why: str) -> ValueError:
    return ValueError(
        f"unknown model name {name!r}: {why}. Expected ViT-{{size}}/{{patch}}, "
        f"R{{depth}}x{{width}}+ViT-{{size}}/{{stride}} or BiT-R{{depth}}x{{width}}; "
        f"sizes {sorted(VIT_SIZES)}, ResNet depths {sorted(RESNET_BLOCKS)}; registered: {list(REGISTERED)}"
    )


def _vit_spec(name: str, size: str, patch: str) -> ViTSpec:
    if size not in VIT_SIZES:
        raise _unknown(name, f"ViT size {size!r} not in {sorted(VIT_SIZES)}")
    p = int(patch)
    if p < 1:
        raise _unknown(name, "patch size must be >= 1")
    return ViTSpec(size, *VIT_SIZES[size], patch=p)


# Names of earlier versions that miscounted the depth: "R10" was (1, 1, 1, 1) blocks, i.e. 14 layers.
DEPRECATED_DEPTHS = {10: 14}


def _resnet_spec(name: str, depth: str, width: str | None) -> ResNetSpec:
    d = int(depth)
    if d in DEPRECATED_DEPTHS:
        import warnings

        new = DEPRECATED_DEPTHS[d]
        warnings.warn(f"{name!r}: R{d} is the old name of R{new} (depth = 3 x blocks + 2 = {new}); "
                      f"use {name.replace(f'R{d}', f'R{new}')!r}", DeprecationWarning, stacklevel=3)
        d = new
    if d not in RESNET_BLOCKS:
        raise _unknown(name, f"ResNet depth {d} not in {sorted(RESNET_BLOCKS)}")
    w = float(width) if width is not None else 1.0
    if w <= 0:
        raise _unknown(name, "ResNet width must be positive")
    return ResNetSpec(d, w, RESNET_BLOCKS[d])


def hybrid_blocks(blocks: tuple[int, ...], stride: int) -> tuple[int, ...]:
    """Blocks per stage for a ResNet cut to total stride `stride` in (4, 8, 16, 32) (see module docstring)."""
    keep = int(math.log2(stride)) - 1  # number of stages kept
    return tuple(blocks[: keep - 1]) + (sum(blocks[keep - 1:]),)


def parse_name(name: str) -> ParsedName:
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    if m := _VIT_RE.match(name):
        return ParsedName("vit", vit=_vit_spec(name, m["size"], m["patch"]))
    if m := _HYBRID_RE.match(name):
        vit = _vit_spec(name, m["size"], m["stride"])
        if vit.patch not in (4, 8, 16, 32):
            raise _unknown(name, f"hybrid total stride must be one of 4, 8, 16, 32, got {vit.patch}")
        return ParsedName("hybrid", vit=vit, resnet=_resnet_spec(name, m["depth"], m["width"]))
    if m := _BIT_RE.match(name):
        return ParsedName("bit", resnet=_resnet_spec(name, m["depth"], m["width"]))
    raise _unknown(name, "does not match the grammar")


def list_models() -> list[str]:
    return list(REGISTERED)
