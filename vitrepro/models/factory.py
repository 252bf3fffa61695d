"""create_model: name (registry.py grammar) + options -> model."""

from __future__ import annotations

import torch.nn as nn

from .bit import RESNET_OPTIONS, BiTResNet
from .hybrid import hybrid_vit
from .registry import parse_name
from .vit import VisionTransformer, check_vit_options

VIT_OPTIONS = ("img_size", "in_chans", "num_classes", "pool", "pos_embed", "pos_embed_at", "head",
               "representation_size", "drop_rate", "attn_drop_rate", "drop_path_rate")


def _check_option_names(name: str, options: dict, allowed) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"create_model({name!r}): unknown option(s) {unknown}; allowed: {list(allowed)}")


def _check_img_size(name: str, img_size, step: int, what: str) -> None:
    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size <= 0:
        raise ValueError(f"create_model({name!r}): img_size must be a positive int, got {img_size!r}")
    if img_size % step:
        raise ValueError(f"create_model({name!r}): img_size={img_size} is not divisible by the {what} {step}")


def create_model(name: str, **options) -> nn.Module:
    """Build a model by its paper name, e.g. create_model("ViT-B/16", img_size=384, num_classes=10).

    ViT / hybrid options: img_size (224), in_chans (3), num_classes (1000), pool ("token"|"gap"),
    pos_embed ("1d"|"none"|"2d"|"relative"), pos_embed_at ("stem"|"every_layer"|"every_layer_shared"),
    head ("mlp"|"linear"), representation_size (D), drop_rate, attn_drop_rate, drop_path_rate (0).
    BiT options: img_size, in_chans, num_classes, head ("linear"|"mlp"), representation_size,
    drop_rate, drop_path_rate.
    All arguments are validated before any parameter is allocated.
    """
    spec = parse_name(name)
    img_size = options.get("img_size", 224)
    if spec.family == "bit":
        _check_option_names(name, options, RESNET_OPTIONS)
        _check_img_size(name, img_size, 1, "stride")
        opts = dict(options, img_size=img_size)
        return BiTResNet(name, spec.resnet.blocks, spec.resnet.width, **opts)

    _check_option_names(name, options, VIT_OPTIONS)
    vit = spec.vit
    _check_img_size(name, img_size, vit.patch, "patch size" if spec.family == "vit" else "total stride")
    opts = dict(options)
    opts["img_size"] = img_size
    check_vit_options(opts.get("pool", "token"), opts.get("pos_embed", "1d"), opts.get("pos_embed_at", "stem"),
                      opts.get("head", "mlp"))
    shape = dict(dim=vit.dim, depth=vit.depth, mlp_dim=vit.mlp_dim, num_heads=vit.heads)
    if spec.family == "vit":
        return VisionTransformer(name=name, patch_size=vit.patch, **shape, **opts)
    in_chans = opts.pop("in_chans", 3)
    img_size = opts.pop("img_size")
    return hybrid_vit(name, spec.resnet.blocks, spec.resnet.width, vit.patch, img_size, in_chans,
                      **shape, **opts)
