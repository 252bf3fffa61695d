"""Inspecting a Vision Transformer: the analyses behind Fig. 6 (attention rollout, Abnar & Zuidema 2020) and
Fig. 7 (patch-embedding filters' principal components, position-embedding similarity, mean attention distance)
of the paper (Section 4.5). Each is a pure function of plain tensors; the ``model_*`` wrappers pull those out of
a model. Tokens are ``[class token] + patches in row-major order``; ``pool="gap"`` models have no class token.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


class FilterComponents(NamedTuple):
    components: torch.Tensor  # (k, C, p, p), orthonormal when flattened
    explained_variance_ratio: torch.Tensor  # (k,), fraction of the total variance per component
    mean: torch.Tensor  # (C, p, p), the mean filter removed before the SVD


def filter_principal_components(weight: torch.Tensor, k: int = 28) -> FilterComponents:
    """Top-``k`` principal components of the (D, C, p, p) patch-embedding filters (Fig. 7 left): the
    right singular vectors of the centred (D, C p p) matrix, each signed so that its largest-magnitude
    entry is positive (a deterministic plot); ``k`` is clipped to min(D, C p p)."""
    if weight.dim() != 4:
        raise ValueError(f"expected a (D, C, p, p) conv weight, got shape {tuple(weight.shape)}")
    d, c, ph, pw = weight.shape
    x = weight.detach().to(torch.float64).reshape(d, -1)
    mean = x.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    k = max(1, min(int(k), vh.shape[0]))
    var = s.square()
    ratio = var / var.sum() if var.sum() > 0 else torch.zeros_like(var)
    comps = vh[:k]
    signs = torch.sign(comps.gather(1, comps.abs().argmax(dim=1)[:, None]))
    signs[signs == 0] = 1
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    return FilterComponents((comps * signs).reshape(k, c, ph, pw).to(dtype), ratio[:k].to(dtype),
                            mean.reshape(c, ph, pw).to(dtype))


def plot_filters(components, ncols: int = 7, title: Optional[str] = None):
    """Filter principal components as an image grid (Fig. 7 left: 28 components, 7 x 4), each min-max
    normalised on its own (their scale and sign are arbitrary); C == 3 as RGB, else the grey channel mean."""
    import matplotlib.pyplot as plt

    if isinstance(components, FilterComponents):
        components = components.components
    comps = torch.as_tensor(components).detach().float().cpu()
    k, c = comps.shape[:2]
    nrows = max(1, math.ceil(k / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(0.6 * ncols, 0.6 * nrows), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.set(xticks=[], yticks=[])
        if i >= k:
            ax.axis("off")
            continue
        f = (comps[i] - comps[i].min()) / (comps[i].max() - comps[i].min()).clamp_min(1e-12)
        if c == 3:
            ax.imshow(f.permute(1, 2, 0).numpy(), interpolation="nearest")
        else:
            ax.imshow(f.mean(0).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    if title:
        fig.suptitle(title)
    return fig


def position_similarity(pos: torch.Tensor) -> torch.Tensor:
    """(gh, gw, D) patch position embeddings -> (gh, gw, gh, gw) cosine similarities: ``sim[i, j]`` is the
    map of patch (i, j)'s similarity with every patch, one tile of Fig. 7 centre."""
    if pos.dim() != 3:
        raise ValueError(f"expected (gh, gw, D) position embeddings, got {tuple(pos.shape)}")
    gh, gw, d = pos.shape
    x = F.normalize(pos.detach().reshape(gh * gw, d).float(), dim=-1)
    return (x @ x.T).reshape(gh, gw, gh, gw)


def plot_position_similarity(sim: torch.Tensor, ax=None, colorbar: bool = True, title: Optional[str] = None):
    """Fig. 7 centre: a gh x gw grid of gh x gw similarity tiles, drawn as one mosaic image (tiles one blank
    pixel apart; much faster than gh * gw subplots); axis labels are 1-based patch rows/columns."""
    import matplotlib.pyplot as plt

    s = torch.as_tensor(sim).detach().float().cpu().numpy()
    gh, gw, th, tw = s.shape
    step_h, step_w = th + 1, tw + 1
    canvas = np.pad(s.astype(np.float64), ((0, 0), (0, 0), (0, 1), (0, 1)), constant_values=np.nan)
    canvas = canvas.transpose(0, 2, 1, 3).reshape(gh * step_h, gw * step_w)[:-1, :-1]  # tiles NaN-separated
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 5.5 * gh / gw))
    fig = ax.figure
    cm = plt.get_cmap("viridis").with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(canvas), cmap=cm, vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([j * step_w + (tw - 1) / 2 for j in range(gw)], [str(j + 1) for j in range(gw)])
    ax.set_yticks([i * step_h + (th - 1) / 2 for i in range(gh)], [str(i + 1) for i in range(gh)])
    ax.tick_params(length=0, labelsize=7)
    ax.set(xlabel="Input patch column", ylabel="Input patch row")
    ax.spines[:].set_visible(False)
    if colorbar:
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Cosine similarity")
    if title:
        ax.set_title(title)
    return fig


def patch_distances(grid_size: Sequence[int], patch_size: float) -> torch.Tensor:
    """(N, N) distances in pixels between the centres of the N = gh * gw patches (row-major)."""
    rows, cols = torch.meshgrid(torch.arange(int(grid_size[0])), torch.arange(int(grid_size[1])), indexing="ij")
    centres = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1).to(torch.float64)
    return torch.cdist(centres, centres) * float(patch_size)


def uniform_attention_distance(grid_size: Sequence[int], patch_size: float) -> float:
    """The mean attention distance of a head attending uniformly to every patch (self included): Fig. 7
    right's reference line; a head below it prefers nearby patches."""
    return float(patch_distances(grid_size, patch_size).mean())


def position_similarity_vs_distance(sim: torch.Tensor) -> float:
    """Pearson r between two patches' embedding similarity and their distance, over all pairs of distinct
    patches (Fig. 7 centre as one number: strongly negative when nearby patches are alike)."""
    gh, gw = sim.shape[:2]
    dist = patch_distances((gh, gw), 1.0).flatten()
    s = sim.reshape(gh * gw, gh * gw).flatten().to(torch.float64)
    return float(torch.corrcoef(torch.stack([dist[dist > 0], s[dist > 0]]))[0, 1])


def _cls_offset(n_tokens: int, grid_size: Sequence[int], has_cls_token: Optional[bool]) -> int:
    extra = n_tokens - int(grid_size[0]) * int(grid_size[1])
    if extra not in ((0, 1) if has_cls_token is None else (int(bool(has_cls_token)),)):
        raise ValueError(f"{n_tokens} tokens do not fit a {tuple(grid_size)} grid with has_cls_token={has_cls_token} "
                         "(None: with or without a class token)")
    return extra


def _per_image_attention_distance(attn, grid_size, patch_size, has_cls_token=None, renormalize=True):
    """(B, H) mean attention distance per image and head (see `mean_attention_distance`)."""
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"expected attention (B, heads, N, N), got {tuple(attn.shape)}")
    off = _cls_offset(attn.shape[-1], grid_size, has_cls_token)
    a = attn.detach()[..., off:, off:].to(torch.float64)  # patch queries -> patch keys
    weighted = (a * patch_distances(grid_size, patch_size).to(a.device)).sum(-1)  # (B, H, Nq)
    if not renormalize:
        return weighted.mean(-1)
    return (weighted / a.sum(-1)).nanmean(-1)  # a query with no mass on patches: 0 / 0 = NaN, left out


def mean_attention_distance(attn: torch.Tensor, grid_size: Sequence[int], patch_size: float,
                            has_cls_token: Optional[bool] = None, renormalize: bool = True) -> torch.Tensor:
    """(H,) mean attention distance in pixels of each head of one layer (B, H, N, N) (Fig. 7 right): for
    query patch q, sum_k a[q, k] * ||c_q - c_k|| over the patch centres c (``patch_size`` apart: for hybrids
    the backbone's total stride), averaged over query patches and images. The class token has no place in the
    image: it is dropped; ``renormalize`` rescales each query's patch weights to sum to one, so mass on the class
    token does not pull the distance to zero (a query with all its mass there is left out)."""
    return _per_image_attention_distance(attn, grid_size, patch_size, has_cls_token,
                                         renormalize).nanmean(0).to(torch.float32)


def _distance_frame(per_layer):
    """Long-form (layer 1-based, head 0-based, distance) frame of per-layer (H,) distances."""
    import pandas as pd

    rows = [{"layer": layer, "head": h, "distance": float(v)}
            for layer, d in enumerate(per_layer, start=1) for h, v in enumerate(d)]
    return pd.DataFrame(rows, columns=["layer", "head", "distance"])


def attention_distances(attn_layers: Sequence[torch.Tensor], grid_size: Sequence[int], patch_size: float,
                        has_cls_token: Optional[bool] = None, renormalize: bool = True):
    return _distance_frame(mean_attention_distance(a, grid_size, patch_size, has_cls_token, renormalize)
                           for a in attn_layers)


def plot_attention_distance(df, max_distance=None, title: Optional[str] = None):
    """Fig. 7 right: one point per head, x = depth (layer), y = mean attention distance, one colour per head
    (``df``: an `attention_distances` frame); ``max_distance`` tops the y axis."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    groups = list(df.groupby("head", sort=True))
    cmap = plt.get_cmap("tab20" if len(groups) > 10 else "tab10")
    for i, (key, g) in enumerate(groups):
        ax.scatter(g["layer"], g["distance"], s=12, color=cmap(i % cmap.N), label=f"Head {key + 1}")
    if len(groups) <= 16:
        ax.legend(fontsize=6, markerscale=0.8, frameon=False, ncol=2 if len(groups) > 8 else 1)
    ax.set(xlabel="Network depth (layer)", ylabel="Mean attention distance (pixels)", ylim=(0, max_distance))
    if title:
        ax.set_title(title)
    return fig


def _discard_lowest(a: torch.Tensor, ratio: float, keep_cls: bool) -> torch.Tensor:
    """Zero the ``ratio`` fraction of smallest entries of each query row (B, N, N)."""
    n = a.shape[-1]
    n_drop = int(n * ratio)
    if n_drop <= 0:
        return a
    scores = a.clone()
    if keep_cls:
        scores[..., 0] = float("inf")  # never drop attention to the class token
    return a.scatter(-1, scores.topk(min(n_drop, n - 1), dim=-1, largest=False).indices, 0.0)


def attention_rollout(attn_layers: Sequence[torch.Tensor], has_cls_token: Optional[bool] = None,
                      discard_ratio: float = 0.0, grid_size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020), the paper's Fig. 6 and 14: (B, gh, gw) maps from per-layer
    (B, H, N, N) attention. Per layer the heads' mean, less the ``discard_ratio`` smallest weights of each row
    (never those on the class token), plus the identity for the residual, rows renormalised (the paper's
    0.5 A + 0.5 I); R = A'_L ... A'_1. The map is the class token's row of R over the patches (GAP: the mean
    over query rows), summing to one, or uniform where that flow is zero; ``grid_size`` defaults to square."""
    if len(attn_layers) == 0:
        raise ValueError("no attention layers")
    b, _, n, _ = attn_layers[0].shape
    if grid_size is None:
        n_p = n - (math.isqrt(n) ** 2 != n if has_cls_token is None else bool(has_cls_token))
        side = math.isqrt(n_p)
        if side * side != n_p:
            raise ValueError(f"cannot infer a square grid from {n} tokens; pass grid_size")
        grid_size = (side, side)
    off = _cls_offset(n, grid_size, has_cls_token)
    eye = torch.eye(n, dtype=torch.float64, device=attn_layers[0].device)
    rollout = eye.expand(b, n, n).clone()
    for attn in attn_layers:
        a = attn.detach().to(torch.float64).mean(1)
        if discard_ratio > 0:
            a = _discard_lowest(a, discard_ratio, keep_cls=bool(off))
        a = a + eye
        rollout = a / a.sum(-1, keepdim=True) @ rollout
    flow = rollout[:, 0, off:] if off else rollout.mean(1)
    mass = flow.sum(-1, keepdim=True)
    flow = torch.where(mass > 1e-12, flow / mass.clamp_min(1e-300), torch.full_like(flow, 1.0 / flow.shape[-1]))
    return flow.reshape(b, int(grid_size[0]), int(grid_size[1])).to(torch.float32)


def _to_display(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) uint8 or float in [-1, 1] -> (B, H, W, 3) float in [0, 1]."""
    x = torch.as_tensor(images).detach().cpu()
    x = x.float() / 255.0 if x.dtype == torch.uint8 else ((x.float() + 1) / 2).clamp(0, 1)
    if x.shape[1] != 3:
        x = x.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).numpy()


def plot_rollout(images: torch.Tensor, maps: torch.Tensor, mode: str = "mask"):
    """Fig. 6: each image (uint8, or float in [-1, 1]) above its rollout map (`attention_rollout`), rescaled by
    its maximum and upsampled bilinearly; ``mask`` multiplies the image by it (the paper's look), ``overlay``
    draws a jet heatmap over the image."""
    import matplotlib.pyplot as plt

    if mode not in ("mask", "overlay"):
        raise ValueError(f"unknown mode {mode!r}")
    imgs = _to_display(images)
    b, h, w, _ = imgs.shape
    m = torch.as_tensor(maps).detach().float().cpu()
    m = m / m.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    up = F.interpolate(m[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1).numpy()
    fig, axes = plt.subplots(2, b, figsize=(1.8 * b, 3.8), squeeze=False, subplot_kw=dict(xticks=[], yticks=[]))
    for i in range(b):
        axes[0, i].imshow(imgs[i])
        if mode == "mask":
            axes[1, i].imshow(imgs[i] * up[i][..., None])
        else:
            axes[1, i].imshow(imgs[i])
            axes[1, i].imshow(up[i], cmap="jet", alpha=0.5, vmin=0, vmax=1)
    axes[0, 0].set_ylabel("Input")
    axes[1, 0].set_ylabel("Attention")
    return fig


# ----------------------------------------------------------------------- wrappers taking a vitrepro model
def _model_grid(model, n_tokens: Optional[int] = None) -> tuple[int, int]:
    """The model's patch grid (every ViT and hybrid has ``grid_size``; ``n_tokens`` is not needed)."""
    return int(model.grid_size[0]), int(model.grid_size[1])


def _model_patch_pixels(model, grid_size) -> float:
    """Pixels between neighbouring patch centres: the patch size (ViT) or the total stride (hybrid)."""
    return float(model.img_size) / grid_size[0]


def model_attention(model, x: torch.Tensor) -> list:
    """Per-layer attention probabilities [(B, heads, N, N)] of ``model`` on ``x`` in eval mode (no dropout)."""
    from .evaluate import _evaluating
    with _evaluating(model):
        _, attn = model(x, return_attention=True)
    return [a.detach() for a in attn]


def model_filter_components(model, k: int = 28) -> FilterComponents:
    """Fig. 7 left for a model: its (D, C, p, p) patch-embedding filters (meaningful for pure ViTs; a hybrid's
    are the 1x1 projection of backbone features)."""
    return filter_principal_components(getattr(model.patch_embed, "proj", model.patch_embed).weight.detach(), k)


def model_position_similarity(model) -> Optional[torch.Tensor]:
    """Fig. 7 centre for a model, or None without a learned embedding (``none``/``relative``)."""
    pos = model.position_embeddings()
    return None if pos is None else position_similarity(pos)


def model_attention_distance(model, x: torch.Tensor, batch_size: Optional[int] = None):
    """Fig. 7 right for a model: a (layer, head, distance) frame averaged over the images ``x``, taken
    ``batch_size`` at a time (the attention maps of every layer for one chunk are in memory at once)."""
    grid = _model_grid(model)
    args = (grid, _model_patch_pixels(model, grid), model.pool == "token")
    per_chunk = [[_per_image_attention_distance(a, *args).cpu() for a in model_attention(model, chunk)]
                 for chunk in ([x] if batch_size is None else torch.split(x, batch_size))]
    return _distance_frame(torch.cat(layer).nanmean(0) for layer in zip(*per_chunk))


def model_rollout(model, x: torch.Tensor, discard_ratio: float = 0.0, batch_size: Optional[int] = None):
    """Fig. 6 for a model: (B, gh, gw) attention-rollout maps of the images ``x``."""
    return torch.cat([attention_rollout(model_attention(model, chunk), model.pool == "token", discard_ratio,
                                        _model_grid(model)).cpu()
                      for chunk in ([x] if batch_size is None else torch.split(x, batch_size))])
