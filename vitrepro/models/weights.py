"""Pretrained weights: loading (timm / local files / official .npz) and resolution change.

Three layouts: ours (timm's names, except `pos_embed.table` for timm's `pos_embed` and the BiT classifier
`head` Linear for timm's 1x1-conv `head.fc`); timm's; and the official JAX npz checkpoints (vit_jax, big_vision
with its `params/` prefix and optionally scan-stacked layers, BiT's `resnet/`). npz converts to timm, timm to
ours, then loads strictly (`load_state`).
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import torch
import torch.nn as nn

from .bit import BiTResNet
from .vit import PosEmbed1D, PosEmbed2D, RelativeBias, VisionTransformer, resample_1d, resample_grid

def resize(model: nn.Module, img_size: int) -> nn.Module:
    """Change the input resolution in place, keeping the patch size (fine-tuning at higher resolution):
    position embeddings are interpolated "according to their location in the original image" (Section 3.2)."""
    if not isinstance(img_size, int) or img_size <= 0:
        raise ValueError(f"img_size must be a positive int, got {img_size!r}")
    if img_size == model.img_size:
        return model
    if isinstance(model, VisionTransformer):
        step = getattr(model.patch_embed, "stride", None) or model.patch_embed.patch_size
        if img_size % step:
            raise ValueError(f"img_size={img_size} is not divisible by the patch size / stride {step} of {model.name}")
    model.set_img_size(img_size)
    return model


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy()


def _dense_to_jax(w):  # torch (out, in) -> jax (in, out)
    return np.ascontiguousarray(_np(w).T)


def _dense_from_jax(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).T))


def _vec(a):
    return torch.from_numpy(np.asarray(a).reshape(-1).copy())


# timm ResNet key -> npz name: BiT's `resnet/` layout (pre-activation) and the vit_jax hybrid's. {s}, {u}: 1-based
# stage and unit; {i}: the layer of a bottleneck (1-3; BiT calls them a-c); {gb} / {sb}: gamma|beta / scale|bias.
_B = r"stages\.(?P<s>\d+)\.blocks\.(?P<u>\d+)\."
_RESNET_NAMES = {
    True: ((r"stem\.conv\.weight", "root_block/standardized_conv2d/kernel"),
           (r"norm\.(?P<w>weight|bias)", "group_norm/{gb}"),
           (_B + r"conv(?P<i>\d)\.weight", "block{s}/unit{u:02d}/{abc}/standardized_conv2d/kernel"),
           (_B + r"norm(?P<i>\d)\.(?P<w>weight|bias)", "block{s}/unit{u:02d}/{abc}/group_norm/{gb}"),
           (_B + r"downsample\.conv\.weight", "block{s}/unit{u:02d}/a/proj/standardized_conv2d/kernel"),
           (r"head\.fc\.weight", "head/conv2d/kernel"), (r"head\.fc\.bias", "head/conv2d/bias")),
    False: ((r"stem\.conv\.weight", "conv_root/kernel"),
            (r"stem\.norm\.(?P<w>weight|bias)", "gn_root/{sb}"),
            (_B + r"conv(?P<i>\d)\.weight", "block{s}/unit{u}/conv{i}/kernel"),
            (_B + r"norm(?P<i>\d)\.(?P<w>weight|bias)", "block{s}/unit{u}/gn{i}/{sb}"),
            (_B + r"downsample\.conv\.weight", "block{s}/unit{u}/conv_proj/kernel"),
            (_B + r"downsample\.norm\.(?P<w>weight|bias)", "block{s}/unit{u}/gn_proj/{sb}")),
}


def _resnet_pairs(keys, timm_prefix: str, npz_prefix: str, bit: bool):
    """(timm key, npz key, kind) for the ResNet part (`_RESNET_NAMES`); a kernel is a conv, the rest vectors."""
    pairs = []
    for k in keys:
        for pattern, name in _RESNET_NAMES[bit]:
            if k.startswith(timm_prefix) and (m := re.fullmatch(pattern, k[len(timm_prefix):])):
                g = m.groupdict()
                i, bias = int(g.get("i") or 1), g.get("w") == "bias"
                nk = npz_prefix + name.format(s=int(g.get("s") or 0) + 1, u=int(g.get("u") or 0) + 1, i=i,
                                              abc="abc"[i - 1], gb="beta" if bias else "gamma",
                                              sb="bias" if bias else "scale")
                pairs.append((k, nk, "conv" if nk.endswith("kernel") else "vec"))
    return pairs


def _vit_pairs(keys, big_vision: bool = False):
    """(timm key, npz key(s), kind) for the ViT part; vit_jax names unless big_vision."""
    mha, mlp, ln2 = ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1") if big_vision else \
        ("MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")
    pos = "pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"
    fixed = {
        "patch_embed.proj.weight": ("embedding/kernel", "conv"), "patch_embed.proj.bias": ("embedding/bias", "vec"),
        "cls_token": ("cls", "raw"), "pos_embed": (pos, "raw"),
        "norm.weight": ("Transformer/encoder_norm/scale", "vec"), "norm.bias": ("Transformer/encoder_norm/bias", "vec"),
        "pre_logits.fc.weight": ("pre_logits/kernel", "dense"), "pre_logits.fc.bias": ("pre_logits/bias", "vec"),
        "head.weight": ("head/kernel", "dense"), "head.bias": ("head/bias", "vec"),
    }
    pairs = []
    for k in keys:
        if k in fixed:
            pairs.append((k, *fixed[k]))
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.*)", k)
        if not m:
            continue
        bp, rest = f"Transformer/encoderblock_{m[1]}/", m[2]
        table = {
            "norm1.weight": (f"{bp}LayerNorm_0/scale", "vec"), "norm1.bias": (f"{bp}LayerNorm_0/bias", "vec"),
            "norm2.weight": (f"{bp}{ln2}/scale", "vec"), "norm2.bias": (f"{bp}{ln2}/bias", "vec"),
            "attn.qkv.weight": (tuple(f"{bp}{mha}/{n}/kernel" for n in ("query", "key", "value")), "qkv_w"),
            "attn.qkv.bias": (tuple(f"{bp}{mha}/{n}/bias" for n in ("query", "key", "value")), "qkv_b"),
            "attn.proj.weight": (f"{bp}{mha}/out/kernel", "out_w"), "attn.proj.bias": (f"{bp}{mha}/out/bias", "vec"),
            "mlp.fc1.weight": (f"{bp}{mlp}/Dense_0/kernel", "dense"), "mlp.fc1.bias": (f"{bp}{mlp}/Dense_0/bias", "vec"),
            "mlp.fc2.weight": (f"{bp}{mlp}/Dense_1/kernel", "dense"), "mlp.fc2.bias": (f"{bp}{mlp}/Dense_1/bias", "vec"),
        }
        if rest in table:
            pairs.append((k, *table[rest]))
    return pairs


def _all_pairs(keys, big_vision=False):
    keys = list(keys)
    if any(k.startswith("stem.") for k in keys):  # BiT ResNet
        return _resnet_pairs(keys, "", "resnet/", bit=True)
    return _vit_pairs(keys, big_vision) + _resnet_pairs(keys, "patch_embed.backbone.", "", bit=False)


def timm_to_npz(state_dict: dict, num_heads: int | None = None) -> dict[str, np.ndarray]:
    """timm-layout state dict -> official npz layout (vit_jax / BiT names), the inverse of what load_pretrained
    reads (export; the tests). num_heads shapes a ViT's attention kernels (D, heads, D/heads)."""
    out, covered = {}, set()
    for k, nk, kind in _all_pairs(state_dict.keys()):
        t = state_dict[k]
        covered.add(k)
        if kind == "conv":
            out[nk] = np.ascontiguousarray(_np(t).transpose(2, 3, 1, 0))  # torch OIHW -> jax HWIO
        elif kind in ("vec", "raw"):
            out[nk] = _np(t)
        elif kind == "dense":
            out[nk] = _dense_to_jax(t)
        elif num_heads is None:  # the attention kernels
            raise ValueError("timm_to_npz needs num_heads for a ViT state dict")
        elif kind == "qkv_w":
            for name, w in zip(nk, t.chunk(3, 0)):  # (D, D) each, torch (out, in)
                out[name] = _dense_to_jax(w).reshape(w.shape[1], num_heads, -1)  # (D, h, dh)
        elif kind == "qkv_b":
            for name, b in zip(nk, t.chunk(3, 0)):
                out[name] = _np(b).reshape(num_heads, -1)  # (h, dh)
        else:
            out[nk] = _dense_to_jax(t).reshape(num_heads, -1, t.shape[0])  # (h, dh, D)
    left = set(state_dict) - covered
    if left:
        raise KeyError(f"no npz name for {sorted(left)}")
    return out


_FROM_NPZ = {  # kind -> the timm tensor from the npz arrays of one key
    "conv": lambda a: torch.from_numpy(np.ascontiguousarray(a[0].transpose(3, 2, 0, 1))),  # jax HWIO -> torch OIHW
    "vec": lambda a: _vec(a[0]),
    "raw": lambda a: torch.from_numpy(a[0].copy()),
    "dense": lambda a: _dense_from_jax(a[0]),
    "qkv_w": lambda a: torch.cat([_dense_from_jax(x.reshape(x.shape[0], -1)) for x in a], 0),  # (3D, D)
    "qkv_b": lambda a: torch.cat([_vec(x) for x in a], 0),
    "out_w": lambda a: _dense_from_jax(a[0].reshape(-1, a[0].shape[-1])),  # (D, D)
}


def npz_to_timm(arrays: dict) -> dict[str, torch.Tensor]:
    """Official npz (vit_jax, big_vision, BiT) -> timm-layout state dict. Every array must be used."""
    # Strip the container prefix of the release (big_vision's: params/).
    pre = next((p for p in ("opt/target/", "params/img/", "params/") if any(k.startswith(p) for k in arrays)), "")
    arrays = {k.removeprefix(pre): v for k, v in arrays.items()}
    big_vision = pre.startswith("params") or "pos_embedding" in arrays
    # big_vision may stack all layers in one `encoderblock` array (scan): unstack into encoderblock_i.
    for k in [k for k in arrays if k.startswith("Transformer/encoderblock/")]:
        a = arrays.pop(k)
        for i in range(a.shape[0]):
            arrays[k.replace("encoderblock/", f"encoderblock_{i}/")] = a[i]
    out, used = {}, set()
    for k, nk, kind in _all_pairs(_npz_keys(arrays), big_vision):
        names = nk if isinstance(nk, tuple) else (nk,)
        if not all(n in arrays for n in names):
            continue  # reported as missing by the strict load
        used.update(names)
        out[k] = _FROM_NPZ[kind]([np.asarray(arrays[n], dtype=np.float32) for n in names])
    unused = sorted(set(arrays) - used)
    if unused:
        raise KeyError(f"npz arrays not understood (unexpected): {unused[:20]}{' ...' if len(unused) > 20 else ''}")
    return out


def _npz_keys(arrays) -> list[str]:
    """The timm keys an npz file could map to (a superset: `npz_to_timm` skips those without arrays)."""
    units = {(int(m[1]) - 1, int(m[2]) - 1) for k in arrays if (m := re.search(r"block(\d+)/unit(\d+)/", k))}
    resnet = ["stem.conv.weight", "stem.norm.weight", "stem.norm.bias", "norm.weight", "norm.bias"] + [
        f"stages.{i}.blocks.{j}.{s}" for i, j in sorted(units) for s in (
            "conv1.weight", "conv2.weight", "conv3.weight", "norm1.weight", "norm1.bias", "norm2.weight",
            "norm2.bias", "norm3.weight", "norm3.bias", "downsample.conv.weight", "downsample.norm.weight",
            "downsample.norm.bias")]
    if any(k.startswith("resnet/") for k in arrays):
        return resnet + ["head.fc.weight", "head.fc.bias"]
    depth = 1 + max((int(m[1]) for k in arrays if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))), default=-1)
    block_keys = [f"blocks.{i}.{s}" for i in range(depth) for s in (
        "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.qkv.weight", "attn.qkv.bias",
        "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]
    return ["patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "norm.weight", "norm.bias",
            "pre_logits.fc.weight", "pre_logits.fc.bias", "head.weight", "head.bias"] + block_keys + [
        "patch_embed.backbone." + k for k in resnet]


def timm_to_ours(sd: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename the few timm keys that differ from ours (see module docstring)."""
    out = {}
    for k, v in sd.items():
        if k == "pos_embed" and isinstance(getattr(model, "pos_embed", None), PosEmbed1D):
            out["pos_embed.table"] = v
        elif isinstance(model, BiTResNet) and k in ("head.fc.weight", "head.fc.bias"):
            out[k.replace("head.fc.", "head.")] = v.reshape(v.shape[0], -1) if v.ndim == 4 else v
        else:
            out[k] = v
    return out


def ours_to_timm(sd: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """Inverse of timm_to_ours (for exporting, and for timm_to_npz on our own models)."""
    out = {}
    for k, v in sd.items():
        if k == "pos_embed.table":
            out["pos_embed"] = v
        elif isinstance(model, BiTResNet) and k in ("head.weight", "head.bias"):
            out[k.replace("head.", "head.fc.")] = v[:, :, None, None] if v.ndim == 2 else v
        else:
            out[k] = v
    return out


def _resample_to(key: str, src: torch.Tensor, dst: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Resample a position-embedding tensor of another grid size to the model's (bilinear)."""
    owner = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else None
    if isinstance(owner, PosEmbed1D):
        prefix = owner.num_prefix
        n_src = src.shape[1] - prefix
        g = math.isqrt(n_src)
        if g * g != n_src or src.shape[-1] != dst.shape[-1]:
            raise ValueError(f"cannot resample {key}: {tuple(src.shape)} is not a square grid of width {dst.shape[-1]}")
        grid = resample_grid(src[0, prefix:].reshape(g, g, -1), owner.grid).reshape(1, -1, src.shape[-1])
        return torch.cat([src[:, :prefix], grid], dim=1)
    if isinstance(owner, (PosEmbed2D, RelativeBias)) and key.endswith("table") and src.shape[1:] == dst.shape[1:]:
        return resample_1d(src, dst.shape[0])  # a 2d axis table or the relative offset table
    raise ValueError(f"shape mismatch for {key}: checkpoint {tuple(src.shape)} vs model {tuple(dst.shape)}")


def _is_head(key: str) -> bool:
    return key.startswith(("head.", "pre_logits."))


@torch.no_grad()
def load_state(model: nn.Module, sd: dict, source: str = "state_dict") -> dict:
    """Strictly load a state dict in timm or our layout; returns a report dict. Everything but the head must
    match (else KeyError; position embeddings of another grid are resampled). The pre-logits layer loads when
    both have it, is dropped when only the checkpoint has it (fine-tuning from in21k), else the model gets a
    zero-initialised linear head; the classifier loads when its shape matches, else it is zero-initialised."""
    sd = timm_to_ours(sd, model)
    own = model.state_dict()
    report = {"source": source, "resampled": [], "head": ""}

    body_src, body_own = ({k for k in d if not _is_head(k)} for d in (sd, own))
    missing, unexpected = sorted(body_own - body_src), sorted(body_src - body_own)
    if missing or unexpected:
        raise KeyError(f"{source}: checkpoint does not match {getattr(model, 'name', type(model).__name__)}; "
                       f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                       f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    new = {}
    for k in body_own:
        v = sd[k].to(own[k].dtype)
        if v.shape != own[k].shape:
            v = _resample_to(k, v, own[k], model)
            report["resampled"].append(k)
        new[k] = v

    # --- head ---
    notes = []
    has_pre_src, has_pre_own = ("pre_logits.fc.weight" in d for d in (sd, own))
    if has_pre_own and not has_pre_src:
        model.reset_head(model.num_classes)
        notes.append("checkpoint has no pre-logits layer: head replaced by a zero-init linear layer")
    elif has_pre_src and not has_pre_own:
        notes.append("checkpoint pre-logits layer dropped (model has a linear head)")
    own = model.state_dict()  # the head may have changed
    if has_pre_src and has_pre_own:
        if sd["pre_logits.fc.weight"].shape != own["pre_logits.fc.weight"].shape:
            raise ValueError(f"{source}: pre-logits size {tuple(sd['pre_logits.fc.weight'].shape)} differs "
                             f"from the model's {tuple(own['pre_logits.fc.weight'].shape)}")
        new["pre_logits.fc.weight"], new["pre_logits.fc.bias"] = sd["pre_logits.fc.weight"], sd["pre_logits.fc.bias"]
        notes.append("pre-logits loaded")
    if "head.weight" in own:
        if "head.weight" in sd and sd["head.weight"].shape == own["head.weight"].shape:
            new["head.weight"], new["head.bias"] = sd["head.weight"], sd["head.bias"]
            notes.append("classifier loaded")
        else:
            new["head.weight"], new["head.bias"] = torch.zeros_like(own["head.weight"]), torch.zeros_like(own["head.bias"])
            have = tuple(sd["head.weight"].shape) if "head.weight" in sd else None
            notes.append(f"classifier zero-initialised (checkpoint head {have}, model {tuple(own['head.weight'].shape)})")
    model.load_state_dict(new, strict=True)  # strict: a missing or unexpected key raises
    report["head"] = "; ".join(notes)
    return report


def _read_file(path: str) -> dict:
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as f:
            return npz_to_timm({k: f[k] for k in f.files})
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "model_state"):  # common checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd


def load_pretrained(model: nn.Module, source: str) -> dict:
    """Load pretrained weights into `model` (in place). Returns a report dict.

    source: "timm:<model>.<tag>" (e.g. "timm:vit_base_patch16_224.orig_in21k"; needs the Hugging Face
    Hub or its cache), or a local file: timm/our state dict (.pth/.pt/.bin via torch.load,
    .safetensors) or an official JAX checkpoint (.npz: vit_jax, big_vision or BiT layout).
    """
    if source.startswith("timm:"):
        import timm
        name = source[len("timm:"):]
        try:
            ref = timm.create_model(name, pretrained=True)
        except Exception as e:  # offline, unknown tag, ...
            raise RuntimeError(f"could not get timm weights {name!r} (is the Hugging Face Hub reachable, "
                               f"or the file in its cache?): {type(e).__name__}: {e}") from e
        return load_state(model, ref.state_dict(), source)
    if not os.path.exists(source):
        raise FileNotFoundError(f"pretrained source {source!r}: no such file (and not 'timm:<name>')")
    return load_state(model, _read_file(source), source)
