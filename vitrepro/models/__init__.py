"""vitrepro.models: ViT, hybrid (ResNet + ViT) and BiT ResNet models under the paper's names.

    create_model(name, **options) -> nn.Module      see registry.py for the name grammar
    list_models() -> list[str]
    resize(model, img_size) -> model                 bilinear position-embedding interpolation
    load_pretrained(model, source) -> dict           timm:<name>, .pth/.bin, .safetensors, .npz
    flops(model, img_size=None) -> int               forward FLOPs per image (multiply-add = 2)
"""

from .factory import create_model
from .registry import list_models, parse_name
from .weights import load_pretrained, resize
from .flops import flops

__all__ = ["create_model", "list_models", "resize", "load_pretrained", "flops", "parse_name"]
