"""Pretrained weights: loading (timm / local files / official .npz) and resolution change.

Three layouts meet here:
  * ours   : the state_dict of our modules (names chosen to equal timm's where they exist);
  * timm   : timm's VisionTransformer / hybrid / ResNetV2 state_dict. Differences from ours are only
             `pos_embed` (ours: `pos_embed.table`) and the BiT classifier `head.fc` (1x1 conv, ours: Linear);
  * npz    : the official JAX checkpoints. vit_jax (`Transformer/encoderblock_0/...`) and big_vision
             (`params/` prefix, `MultiHeadDotProductAttention_0`, optionally layers stacked in one
             `encoderblock` array) for ViT and hybrids; BiT's `resnet/...` layout for BiT ResNets.
npz is converted to the timm layout, timm to ours, then loaded strictly (see load_pretrained).
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

# ----------------------------------------------------------------------------------------------------
# resize


def resize(model: nn.Module, img_size: int) -> nn.Module:
    """Change the input resolution in place, keeping the patch size (fine-tuning at higher resolution).

    Grid position embeddings are 2-D bilinearly interpolated "according to their location in the
    original image" (Section 3.2); the class-token position is kept as is. 2d: each axis table is
    interpolated along its axis; relative: the offset table; every_layer: each layer's table.
    """
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


# ----------------------------------------------------------------------------------------------------
# npz <-> timm layout


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy()


def _conv_to_jax(w):  # torch OIHW -> jax HWIO
    return np.ascontiguousarray(_np(w).transpose(2, 3, 1, 0))


def _conv_from_jax(a):  # jax HWIO -> torch OIHW
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(3, 2, 0, 1)))


def _dense_to_jax(w):  # torch (out, in) -> jax (in, out)
    return np.ascontiguousarray(_np(w).T)


def _dense_from_jax(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).T))


def _vec(a):
    return torch.from_numpy(np.asarray(a).reshape(-1).copy())


def _resnet_pairs(keys, timm_prefix: str, npz_prefix: str, bit: bool):
    """(timm key, npz key, kind) for the ResNet part. bit=True: BiT `resnet/` layout (pre-activation);
    bit=False: the vit_jax hybrid layout (conv_root, gn_root, blockI/unitJ/convR, gnR, conv_proj, gn_proj)."""
    pairs = []
    for k in keys:
        if not k.startswith(timm_prefix):
            continue
        s = k[len(timm_prefix):]
        if bit:
            conv = "standardized_conv2d"
            if s == "stem.conv.weight":
                pairs.append((k, f"{npz_prefix}root_block/{conv}/kernel", "conv"))
            elif s in ("norm.weight", "norm.bias"):
                pairs.append((k, f"{npz_prefix}group_norm/{'gamma' if s.endswith('weight') else 'beta'}", "vec"))
            elif m := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", s):
                bp = f"{npz_prefix}block{int(m[1]) + 1}/unit{int(m[2]) + 1:02d}/"
                rest = m[3]
                if rm := re.fullmatch(r"conv(\d)\.weight", rest):
                    pairs.append((k, f"{bp}{'abc'[int(rm[1]) - 1]}/{conv}/kernel", "conv"))
                elif rm := re.fullmatch(r"norm(\d)\.(weight|bias)", rest):
                    pairs.append((k, f"{bp}{'abc'[int(rm[1]) - 1]}/group_norm/"
                                     f"{'gamma' if rm[2] == 'weight' else 'beta'}", "vec"))
                elif rest == "downsample.conv.weight":
                    pairs.append((k, f"{bp}a/proj/{conv}/kernel", "conv"))
        else:
            if s == "stem.conv.weight":
                pairs.append((k, f"{npz_prefix}conv_root/kernel", "conv"))
            elif s in ("stem.norm.weight", "stem.norm.bias"):
                pairs.append((k, f"{npz_prefix}gn_root/{'scale' if s.endswith('weight') else 'bias'}", "vec"))
            elif m := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", s):
                bp = f"{npz_prefix}block{int(m[1]) + 1}/unit{int(m[2]) + 1}/"
                rest = m[3]
                if rm := re.fullmatch(r"conv(\d)\.weight", rest):
                    pairs.append((k, f"{bp}conv{rm[1]}/kernel", "conv"))
                elif rm := re.fullmatch(r"norm(\d)\.(weight|bias)", rest):
                    pairs.append((k, f"{bp}gn{rm[1]}/{'scale' if rm[2] == 'weight' else 'bias'}", "vec"))
                elif rest == "downsample.conv.weight":
                    pairs.append((k, f"{bp}conv_proj/kernel", "conv"))
                elif rm := re.fullmatch(r"downsample\.norm\.(weight|bias)", rest):
                    pairs.append((k, f"{bp}gn_proj/{'scale' if rm[1] == 'weight' else 'bias'}", "vec"))
    return pairs


def _vit_pairs(keys, p: str = "", big_vision: bool = False):
    """(timm key, npz key(s), kind) for the ViT part; vit_jax names unless big_vision."""
    mha, mlp, ln2 = ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1") if big_vision else \
        ("MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")
    pos = f"{p}pos_embedding" if big_vision else f"{p}Transformer/posembed_input/pos_embedding"
    fixed = {
        "patch_embed.proj.weight": (f"{p}embedding/kernel", "conv"),
        "patch_embed.proj.bias": (f"{p}embedding/bias", "vec"),
        "cls_token": (f"{p}cls", "raw"),
        "pos_embed": (pos, "raw"),
        "norm.weight": (f"{p}Transformer/encoder_norm/scale", "vec"),
        "norm.bias": (f"{p}Transformer/encoder_norm/bias", "vec"),
        "pre_logits.fc.weight": (f"{p}pre_logits/kernel", "dense"),
        "pre_logits.fc.bias": (f"{p}pre_logits/bias", "vec"),
        "head.weight": (f"{p}head/kernel", "dense"),
        "head.bias": (f"{p}head/bias", "vec"),
    }
    pairs = []
    for k in keys:
        if k in fixed:
            pairs.append((k, *fixed[k]))
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.*)", k)
        if not m:
            continue
        bp, rest = f"{p}Transformer/encoderblock_{m[1]}/", m[2]
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


def _all_pairs(keys, p="", big_vision=False):
    keys = list(keys)
    if any(k.startswith("stem.") for k in keys):  # BiT ResNet
        pairs = _resnet_pairs(keys, "", "resnet/", bit=True)
        pairs += [(k, f"resnet/head/conv2d/{'kernel' if k.endswith('weight') else 'bias'}",
                   "conv" if k.endswith("weight") else "vec") for k in keys if k.startswith("head.fc.")]
        return pairs
    return _vit_pairs(keys, p, big_vision) + _resnet_pairs(keys, "patch_embed.backbone.", p, bit=False)


def timm_to_npz(state_dict: dict, num_heads: int | None = None) -> dict[str, np.ndarray]:
    """timm-layout state dict -> official npz layout (vit_jax names / BiT names).

    The inverse of what load_pretrained reads; used by the tests (no internet) and to export.
    num_heads is needed for the attention kernels of a ViT (their npz shape is (D, heads, D/heads)).
    """
    out = {}
    pairs = _all_pairs(state_dict.keys())
    covered = set()
    for k, nk, kind in pairs:
        t = state_dict[k]
        covered.add(k)
        if kind == "conv":
            out[nk] = _conv_to_jax(t)
        elif kind == "vec":
            out[nk] = _np(t)
        elif kind == "raw":
            out[nk] = _np(t)
        elif kind == "dense":
            out[nk] = _dense_to_jax(t)
        elif kind in ("qkv_w", "qkv_b", "out_w"):
            if num_heads is None:
                raise ValueError("timm_to_npz needs num_heads for a ViT state dict")
            if kind == "qkv_w":
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


def npz_to_timm(arrays: dict) -> dict[str, torch.Tensor]:
    """Official npz (vit_jax, big_vision, BiT) -> timm-layout state dict. Every array must be used."""
    arrays = dict(arrays)
    # Strip the container prefixes of the various releases.
    for pre in ("opt/target/", "params/img/", "params/"):
        if any(k.startswith(pre) for k in arrays):
            arrays = {k[len(pre):] if k.startswith(pre) else k: v for k, v in arrays.items()}
            big_vision_prefix = pre.startswith("params")
            break
    else:
        big_vision_prefix = False
    big_vision = big_vision_prefix or "pos_embedding" in arrays
    # big_vision may stack all layers in one `encoderblock` array (scan): unstack into encoderblock_i.
    stacked = [k for k in arrays if k.startswith("Transformer/encoderblock/")]
    for k in stacked:
        a = arrays.pop(k)
        for i in range(a.shape[0]):
            arrays[k.replace("encoderblock/", f"encoderblock_{i}/")] = a[i]

    if any(k.startswith("resnet/") for k in arrays):
        keys = _bit_keys_from_npz(arrays)
    else:
        keys = _vit_keys_from_npz(arrays, big_vision)
    out, used = {}, set()
    for k, nk, kind in _all_pairs(keys, "", big_vision):
        names = nk if isinstance(nk, tuple) else (nk,)
        if not all(n in arrays for n in names):
            continue  # reported as missing by the strict load
        used.update(names)
        a = [np.asarray(arrays[n], dtype=np.float32) for n in names]
        if kind == "conv":
            out[k] = _conv_from_jax(a[0])
        elif kind == "vec":
            out[k] = _vec(a[0])
        elif kind == "raw":
            out[k] = torch.from_numpy(a[0].copy())
        elif kind == "dense":
            out[k] = _dense_from_jax(a[0])
        elif kind == "qkv_w":
            out[k] = torch.cat([_dense_from_jax(x.reshape(x.shape[0], -1)) for x in a], 0)  # (3D, D)
        elif kind == "qkv_b":
            out[k] = torch.cat([_vec(x) for x in a], 0)
        elif kind == "out_w":
            out[k] = _dense_from_jax(a[0].reshape(-1, a[0].shape[-1]))  # (D, D)
    unused = sorted(set(arrays) - used)
    if unused:
        raise KeyError(f"npz arrays not understood (unexpected): {unused[:20]}{' ...' if len(unused) > 20 else ''}")
    return out


def _vit_keys_from_npz(arrays, big_vision):
    """The timm keys an npz file could map to (a superset; unmatched ones are skipped)."""
    depth = 1 + max((int(m[1]) for k in arrays if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))), default=-1)
    block_keys = [f"blocks.{i}.{s}" for i in range(depth) for s in (
        "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.qkv.weight", "attn.qkv.bias",
        "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]
    keys = ["patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "norm.weight",
            "norm.bias", "pre_logits.fc.weight", "pre_logits.fc.bias", "head.weight", "head.bias"] + block_keys
    for k in arrays:  # hybrid ResNet part
        if m := re.fullmatch(r"block(\d+)/unit(\d+)/(conv\d|gn\d|conv_proj|gn_proj)/(kernel|scale|bias)", k):
            i, j, layer, what = int(m[1]) - 1, int(m[2]) - 1, m[3], m[4]
            pre = f"patch_embed.backbone.stages.{i}.blocks.{j}."
            if layer.startswith("conv_proj"):
                keys.append(pre + "downsample.conv.weight")
            elif layer.startswith("gn_proj"):
                keys.append(pre + f"downsample.norm.{'weight' if what == 'scale' else 'bias'}")
            elif layer.startswith("conv"):
                keys.append(pre + f"conv{layer[-1]}.weight")
            else:
                keys.append(pre + f"norm{layer[-1]}.{'weight' if what == 'scale' else 'bias'}")
    if "conv_root/kernel" in arrays:
        keys += ["patch_embed.backbone.stem.conv.weight", "patch_embed.backbone.stem.norm.weight",
                 "patch_embed.backbone.stem.norm.bias"]
    return keys


def _bit_keys_from_npz(arrays):
    keys = ["stem.conv.weight", "norm.weight", "norm.bias", "head.fc.weight", "head.fc.bias"]
    for k in arrays:
        if m := re.fullmatch(r"resnet/block(\d+)/unit(\d+)/([abc])/(proj/)?(standardized_conv2d|group_norm)/(\w+)", k):
            i, j, abc, proj, layer, what = int(m[1]) - 1, int(m[2]) - 1, m[3], m[4], m[5], m[6]
            pre = f"stages.{i}.blocks.{j}."
            r = "abc".index(abc) + 1
            if proj:
                keys.append(pre + "downsample.conv.weight")
            elif layer == "standardized_conv2d":
                keys.append(pre + f"conv{r}.weight")
            else:
                keys.append(pre + f"norm{r}.{'weight' if what == 'gamma' else 'bias'}")
    return keys


# ----------------------------------------------------------------------------------------------------
# timm layout -> ours, and the strict load


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
    if isinstance(owner, PosEmbed2D) and key.endswith(("x_table", "y_table")) and src.shape[1:] == dst.shape[1:]:
        return resample_1d(src, dst.shape[0])
    if isinstance(owner, RelativeBias) and key.endswith(".table") and src.shape[1:] == dst.shape[1:]:
        return resample_1d(src, dst.shape[0])
    raise ValueError(f"shape mismatch for {key}: checkpoint {tuple(src.shape)} vs model {tuple(dst.shape)}")


def _is_head(key: str) -> bool:
    return key.startswith(("head.", "pre_logits."))


@torch.no_grad()
def load_state(model: nn.Module, sd: dict, source: str = "state_dict") -> dict:
    """Strictly load a state dict in timm or our layout. Returns a report dict.

    Everything but the head must match exactly (missing or unexpected keys raise KeyError; position
    embeddings of another grid size are resampled bilinearly). The head: the pre-logits layer is
    loaded when both have it; if the model wants one and the checkpoint has none, the whole head is
    replaced by a zero-initialised linear layer (reset_head); if only the checkpoint has one, it is
    dropped (as when fine-tuning from the in21k checkpoints). The classifier is loaded when its
    shape matches and zero-initialised otherwise.
    """
    sd = timm_to_ours({k: v for k, v in sd.items()}, model)
    own = model.state_dict()
    report = {"source": source, "resampled": [], "head": ""}

    body_src = {k for k in sd if not _is_head(k)}
    body_own = {k for k in own if not _is_head(k)}
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
    has_pre_src = "pre_logits.fc.weight" in sd
    has_pre_own = "pre_logits.fc.weight" in own
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
    for k in own:
        if _is_head(k) and k not in new:
            raise KeyError(f"{source}: no value for head parameter {k}")
    result = model.load_state_dict(new, strict=True)
    report["head"] = "; ".join(notes)
    report["missing"], report["unexpected"] = list(result.missing_keys), list(result.unexpected_keys)
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
