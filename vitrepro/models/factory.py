"""create_model: name (registry.py grammar) + options -> model."""

from __future__ import annotations

import torch.nn as nn

from .bit import RESNET_OPTIONS, BiTResNet
from .hybrid import hybrid_vit
from .registry import parse_name
from .vit import VisionTransformer, check_vit_options

VIT_OPTIONS = ("img_size", "in_chans", "num_classes", "pool", "pos_embed", "pos_embed_at", "head",
               "representation_size", "drop_rate", "attn_drop_rate", "drop_path_rate")


def create_model(name: str, **options) -> nn.Module:
    """Build a model by its paper name, e.g. create_model("ViT-B/16", img_size=384, num_classes=10). The
    options (docs/design.md; img_size defaults to 224) are validated before any parameter is allocated."""
    spec = parse_name(name)
    bit = spec.family == "bit"
    allowed = RESNET_OPTIONS if bit else VIT_OPTIONS
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"create_model({name!r}): unknown option(s) {unknown}; allowed: {list(allowed)}")
    opts = dict(options, img_size=options.get("img_size", 224))
    img_size, step = opts["img_size"], 1 if bit else spec.vit.patch
    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size <= 0:
        raise ValueError(f"create_model({name!r}): img_size must be a positive int, got {img_size!r}")
    if img_size % step:
        what = "patch size" if spec.family == "vit" else "total stride"
        raise ValueError(f"create_model({name!r}): img_size={img_size} is not divisible by the {what} {step}")
    if bit:
        return BiTResNet(name, spec.resnet.blocks, spec.resnet.width, **opts)
    vit = spec.vit
    check_vit_options(opts.get("pool", "token"), opts.get("pos_embed", "1d"), opts.get("pos_embed_at", "stem"),
                      opts.get("head", "mlp"))
    shape = dict(dim=vit.dim, depth=vit.depth, mlp_dim=vit.mlp_dim, num_heads=vit.heads)
    if spec.family == "vit":
        return VisionTransformer(name=name, patch_size=vit.patch, **shape, **opts)
    in_chans = opts.pop("in_chans", 3)
    return hybrid_vit(name, spec.resnet.blocks, spec.resnet.width, vit.patch, opts.pop("img_size"), in_chans,
                      **shape, **opts)
