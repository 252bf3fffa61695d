"""Inspecting a Vision Transformer: the analyses behind Fig. 6 and Fig. 7 of the ViT paper.

Dosovitskiy et al. 2021 ("An Image is Worth 16x16 Words", arXiv 2010.11929), Section 4.5:

* Fig. 7 left  -- the first 28 principal components of the learned RGB embedding filters
  (:func:`filter_principal_components`, :func:`plot_filters`).  They look like plausible basis
  functions for a low-dimensional representation of the fine structure inside each patch.
* Fig. 7 centre -- cosine similarity between the position embedding of each patch and those of
  all other patches (:func:`position_similarity`, :func:`plot_position_similarity`).  Closer
  patches have more similar embeddings, and a row/column structure appears.
* Fig. 7 right -- "mean attention distance" per head against network depth
  (:func:`mean_attention_distance`, :func:`attention_distances`, :func:`plot_attention_distance`):
  the image-space distance across which each head integrates information, the analogue of a CNN's
  receptive field.  Some heads attend globally already in the lowest layers, others stay local.
* Fig. 6 (and Fig. 14) -- attention rollout (Abnar & Zuidema 2020) from the output token to the
  input space (:func:`attention_rollout`, :func:`plot_rollout`).

Every analysis is a pure function of plain tensors, so it can be tested on hand-made attention
matrices; the ``model_*`` wrappers at the end pull those tensors out of a vitrepro model (the
interface of ``docs/design.md``: ``forward(x, return_attention=True)``, ``grid_size``,
``patch_size``, ``pool``, ``position_embeddings()``).

Token layout convention (the paper's): the sequence is ``[class token] + patches in row-major
order``; models pooled by global average (``pool="gap"``) have no class token.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "FilterComponents",
    "filter_principal_components",
    "plot_filters",
    "position_similarity",
    "plot_position_similarity",
    "patch_distances",
    "mean_attention_distance",
    "attention_distances",
    "plot_attention_distance",
    "attention_rollout",
    "plot_rollout",
    "patch_embedding_weight",
    "model_attention",
    "model_filter_components",
    "model_position_similarity",
    "model_attention_distance",
    "model_rollout",
]


# --------------------------------------------------------------------------------------------
# Fig. 7 left: principal components of the patch-embedding filters
# --------------------------------------------------------------------------------------------


class FilterComponents(NamedTuple):
    """Result of :func:`filter_principal_components`."""

    components: torch.Tensor  # (k, C, p, p), orthonormal when flattened
    explained_variance_ratio: torch.Tensor  # (k,), fraction of the total variance per component
    mean: torch.Tensor  # (C, p, p), the mean filter that was removed before the SVD


def filter_principal_components(weight: torch.Tensor, k: int = 28) -> FilterComponents:
    """Top-``k`` principal components of the ``D`` patch-embedding filters (Fig. 7 left).

    ``weight`` is the (D, C, p, p) weight of the patch-embedding convolution (kernel = stride = p),
    i.e. the paper's linear projection E of flattened patches, one filter per embedding dimension.
    Each filter is a sample in R^{C p p}; we centre the samples (subtract the mean filter) and take
    the right singular vectors of the centred (D, C p p) matrix.  Singular vectors are only defined
    up to sign; we fix the sign so that each component's largest-magnitude entry is positive,
    which makes the plot deterministic.  ``k`` is clipped to the rank bound min(D, C p p).

    Returns components (k, C, p, p), explained variance ratios (k,) (squared singular value over
    the total, so they sum to <= 1) and the mean filter.
    """
    if weight.dim() != 4:
        raise ValueError(f"expected a (D, C, p, p) conv weight, got shape {tuple(weight.shape)}")
    d, c, ph, pw = weight.shape
    x = weight.detach().to(torch.float64).reshape(d, -1)
    mean = x.mean(dim=0, keepdim=True)
    xc = x - mean
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    k = max(1, min(int(k), vh.shape[0]))
    var = s.square()
    total = var.sum()
    ratio = var / total if total > 0 else torch.zeros_like(var)
    comps = vh[:k]
    idx = comps.abs().argmax(dim=1)
    signs = torch.sign(comps.gather(1, idx[:, None]))
    signs[signs == 0] = 1
    comps = comps * signs
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    return FilterComponents(
        comps.reshape(k, c, ph, pw).to(dtype),
        ratio[:k].to(dtype),
        mean.reshape(c, ph, pw).to(dtype),
    )


def _grid_figure(n: int, ncols: int, axes=None, fig=None, cell: float = 0.6):
    import matplotlib.pyplot as plt

    if axes is not None:
        flat = list(np.asarray(axes).ravel())
        return flat[0].figure, flat
    nrows = max(1, math.ceil(n / ncols))
    if fig is None:
        fig = plt.figure(figsize=(cell * ncols, cell * nrows))
    flat = list(np.asarray(fig.subplots(nrows, ncols, squeeze=False)).ravel())
    return fig, flat


def plot_filters(components, axes=None, fig=None, ncols: int = 7, title: Optional[str] = None):
    """Render filter principal components as an image grid (Fig. 7 left: 28 components, 7 x 4).

    ``components``: (k, C, p, p) tensor or a :class:`FilterComponents`.  Each component is
    min-max normalised to [0, 1] on its own (their scale is arbitrary: they are unit vectors and
    their sign is a convention).  C == 3 is shown as RGB, any other C as the grey-level mean over
    channels.  Draw into ``axes`` (any array of at least k axes) or ``fig``; returns the figure.
    """
    if isinstance(components, FilterComponents):
        components = components.components
    comps = torch.as_tensor(components).detach().float().cpu()
    k, c = comps.shape[:2]
    fig, flat = _grid_figure(k, ncols, axes=axes, fig=fig)
    for i, ax in enumerate(flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= k:
            ax.axis("off")
            continue
        f = comps[i]
        f = (f - f.min()) / (f.max() - f.min()).clamp_min(1e-12)
        if c == 3:
            ax.imshow(f.permute(1, 2, 0).numpy(), interpolation="nearest")
        else:
            ax.imshow(f.mean(0).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    if title:
        fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------------------------
# Fig. 7 centre: position-embedding similarity
# --------------------------------------------------------------------------------------------


def position_similarity(pos: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every patch's position embedding with every other (Fig. 7 centre).

    ``pos``: (gh, gw, D) position embeddings of the patch tokens (the class token's embedding is
    not part of the figure).  Returns (gh, gw, gh, gw): ``sim[i, j]`` is the (gh, gw) map of the
    similarity of patch (i, j) with every patch, which is what each tile of the figure shows.
    """
    if pos.dim() != 3:
        raise ValueError(f"expected (gh, gw, D) position embeddings, got {tuple(pos.shape)}")
    gh, gw, d = pos.shape
    x = F.normalize(pos.detach().reshape(gh * gw, d).float(), dim=-1)
    return (x @ x.T).reshape(gh, gw, gh, gw)


def plot_position_similarity(sim: torch.Tensor, ax=None, gap: int = 1, cmap: str = "viridis",
                             colorbar: bool = True, title: Optional[str] = None):
    """Fig. 7 centre: a gh x gw grid of small gh x gw cosine-similarity heatmaps.

    Tile (i, j) -- input patch row i, column j -- shows the similarity of that patch's embedding
    with all patches.  Drawn as one mosaic image (tiles separated by ``gap`` blank pixels) rather
    than gh * gw subplots, which is much faster for a 14 x 14 grid and looks the same.  Axis
    labels are 1-based patch row/column, like the paper.  Returns the figure.
    """
    import matplotlib.pyplot as plt

    s = torch.as_tensor(sim).detach().float().cpu().numpy()
    gh, gw = s.shape[:2]
    th, tw = s.shape[2:]
    step_h, step_w = th + gap, tw + gap
    canvas = np.full((gh * step_h - gap, gw * step_w - gap), np.nan)
    for i in range(gh):
        for j in range(gw):
            canvas[i * step_h:i * step_h + th, j * step_w:j * step_w + tw] = s[i, j]
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 5.5 * gh / gw))
    else:
        fig = ax.figure
    cm = plt.get_cmap(cmap).with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(canvas), cmap=cm, vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([j * step_w + (tw - 1) / 2 for j in range(gw)])
    ax.set_xticklabels([str(j + 1) for j in range(gw)])
    ax.set_yticks([i * step_h + (th - 1) / 2 for i in range(gh)])
    ax.set_yticklabels([str(i + 1) for i in range(gh)])
    ax.tick_params(length=0, labelsize=7)
    ax.set_xlabel("Input patch column")
    ax.set_ylabel("Input patch row")
    for side in ax.spines.values():
        side.set_visible(False)
    if colorbar:
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Cosine similarity")
    if title:
        ax.set_title(title)
    return fig


# --------------------------------------------------------------------------------------------
# Fig. 7 right: mean attention distance
# --------------------------------------------------------------------------------------------


def patch_distances(grid_size: Sequence[int], patch_size: float) -> torch.Tensor:
    """(N, N) Euclidean distances, in pixels, between the centres of the N = gh * gw patches
    (row-major order).  Patch centres lie ``patch_size`` pixels apart, so the distance is the grid
    distance times ``patch_size``."""
    gh, gw = int(grid_size[0]), int(grid_size[1])
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    centres = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1).to(torch.float64)
    return torch.cdist(centres, centres) * float(patch_size)


def uniform_attention_distance(grid_size: Sequence[int], patch_size: float) -> float:
    """The mean attention distance of a head that attends uniformly to every patch: the mean of all
    patch-centre distances (self included), in pixels. The reference line of Fig. 7 right at this
    scale: a head below it prefers nearby patches, one at it has no spatial preference (7x7 grid of
    4 px patches: 14.4 px)."""
    return float(patch_distances(grid_size, patch_size).mean())


def position_similarity_vs_distance(sim: torch.Tensor) -> float:
    """Pearson correlation between the cosine similarity of two patches' position embeddings and the
    distance between the patches, over all pairs of distinct patches (Fig. 7 centre as one number:
    strongly negative when nearby patches have similar embeddings). ``sim``: (gh, gw, gh, gw)."""
    gh, gw = sim.shape[:2]
    dist = patch_distances((gh, gw), 1.0).flatten()
    s = sim.reshape(gh * gw, gh * gw).flatten().to(torch.float64)
    off = dist > 0
    return float(torch.corrcoef(torch.stack([dist[off], s[off]]))[0, 1])


def _cls_offset(n_tokens: int, grid_size: Sequence[int], has_cls_token: Optional[bool]) -> int:
    n_patches = int(grid_size[0]) * int(grid_size[1])
    extra = n_tokens - n_patches
    if has_cls_token is None:
        if extra not in (0, 1):
            raise ValueError(f"{n_tokens} tokens do not fit a {tuple(grid_size)} grid "
                             "with or without a class token")
        return extra
    if extra != int(bool(has_cls_token)):
        raise ValueError(f"{n_tokens} tokens, grid {tuple(grid_size)}, has_cls_token={has_cls_token}"
                         " are inconsistent")
    return extra


def _per_image_attention_distance(attn, grid_size, patch_size, has_cls_token=None,
                                  renormalize=True) -> torch.Tensor:
    """(B, H) mean attention distance per image and head (see :func:`mean_attention_distance`)."""
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"expected attention (B, heads, N, N), got {tuple(attn.shape)}")
    off = _cls_offset(attn.shape[-1], grid_size, has_cls_token)
    a = attn.detach()[..., off:, off:].to(torch.float64)  # patch queries -> patch keys
    dist = patch_distances(grid_size, patch_size).to(a.device)
    weighted = (a * dist).sum(-1)  # (B, H, Nq)
    if renormalize:
        mass = a.sum(-1)
        per_query = weighted / mass
        per_query = torch.where(mass > 0, per_query, torch.full_like(per_query, float("nan")))
        return per_query.nanmean(-1)
    return weighted.mean(-1)


def mean_attention_distance(attn: torch.Tensor, grid_size: Sequence[int], patch_size: float,
                            has_cls_token: Optional[bool] = None,
                            renormalize: bool = True) -> torch.Tensor:
    """Mean attention distance of each head of one layer, in pixels (Fig. 7 right, one column).

    The paper: "we compute the average distance in image space across which information is
    integrated, based on the attention weights".  For query patch q the head's attention distance
    is sum_k a[q, k] * ||c_q - c_k||, with c the patch centres in pixels (grid distance times
    ``patch_size``; for hybrids use the backbone's total stride).  We average it over all query
    patches and all images of the batch.

    ``attn``: (B, H, N, N) attention probabilities of one layer, rows = queries.
    ``has_cls_token``: whether token 0 is a class token; ``None`` infers it from N and the grid.

    The class token has no position in image space, so it is dropped both as a query and as a key.
    With ``renormalize=True`` (default) each query's patch-to-patch weights are rescaled to sum to
    one, i.e. the distance is the mean over *patches* the query attends to; the attention mass a
    query puts on the class token then does not pull its distance towards zero.  (A query that puts
    all its mass on the class token has no defined distance and is left out of the average.)
    ``renormalize=False`` uses the raw weights, so mass on the class token counts as distance 0.
    Without a class token both choices coincide.  Returns (H,).
    """
    return _per_image_attention_distance(attn, grid_size, patch_size, has_cls_token,
                                         renormalize).nanmean(0).to(torch.float32)


def attention_distances(attn_layers: Sequence[torch.Tensor], grid_size: Sequence[int],
                        patch_size: float, has_cls_token: Optional[bool] = None,
                        renormalize: bool = True):
    """Mean attention distance of every head of every layer as a long-form ``pandas.DataFrame``
    with columns ``layer`` (1-based network depth, the x axis of Fig. 7 right), ``head``
    (0-based) and ``distance`` (pixels)."""
    import pandas as pd

    rows = []
    for layer, attn in enumerate(attn_layers, start=1):
        d = mean_attention_distance(attn, grid_size, patch_size, has_cls_token, renormalize)
        rows.extend({"layer": layer, "head": h, "distance": float(v)} for h, v in enumerate(d))
    return pd.DataFrame(rows, columns=["layer", "head", "distance"])


def plot_attention_distance(df, ax=None, hue: Optional[str] = "head", max_distance=None,
                            title: Optional[str] = None):
    """Fig. 7 right: one point per head, x = network depth (layer), y = mean attention distance.

    ``df`` is the output of :func:`attention_distances` (extra columns are fine).  ``hue`` colours
    the points by a column (the paper colours by head; use e.g. ``"model"`` to overlay models, or
    ``None``).  ``max_distance`` sets the top of the y axis (e.g. the image diagonal).  Returns the
    figure.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
    else:
        fig = ax.figure
    if hue is not None and hue in df.columns:
        groups = list(df.groupby(hue, sort=True))
        cmap = plt.get_cmap("tab20" if len(groups) > 10 else "tab10")
        for i, (key, g) in enumerate(groups):
            label = f"Head {key + 1}" if hue == "head" else str(key)
            ax.scatter(g["layer"], g["distance"], s=12, color=cmap(i % cmap.N), label=label)
        if len(groups) <= 16:
            ax.legend(fontsize=6, markerscale=0.8, frameon=False, ncol=2 if len(groups) > 8 else 1)
    else:
        ax.scatter(df["layer"], df["distance"], s=12, color="C0")
    ax.set_xlabel("Network depth (layer)")
    ax.set_ylabel("Mean attention distance (pixels)")
    ax.set_ylim(0, max_distance if max_distance is not None else None)
    if title:
        ax.set_title(title)
    return fig


# --------------------------------------------------------------------------------------------
# Fig. 6: attention rollout
# --------------------------------------------------------------------------------------------


def _discard_lowest(a: torch.Tensor, ratio: float, keep_cls: bool) -> torch.Tensor:
    """Zero the ``ratio`` fraction of smallest entries of each query row (B, N, N)."""
    n = a.shape[-1]
    n_drop = int(n * ratio)
    if n_drop <= 0:
        return a
    scores = a.clone()
    if keep_cls:
        scores[..., 0] = float("inf")  # never drop attention to the class token
    idx = scores.topk(min(n_drop, n - 1), dim=-1, largest=False).indices
    return a.scatter(-1, idx, 0.0)


def attention_rollout(attn_layers: Sequence[torch.Tensor], has_cls_token: Optional[bool] = None,
                      discard_ratio: float = 0.0, head_fusion: str = "mean",
                      grid_size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020), the method of the paper's Fig. 6 and Fig. 14.

    Per layer: fuse the heads (``head_fusion``: ``mean`` as in the paper, or ``max``/``min``),
    optionally zero the ``discard_ratio`` smallest weights of each query row (a common
    de-noising variant; attention to the class token is never discarded), add the identity for the
    residual connection and renormalise the rows, i.e. A' = (A + I) / rowsum -- for row-stochastic
    A this is the paper's 0.5 A + 0.5 I.  Then multiply across layers, later layers on the left:
    R = A'_L ... A'_1, so R[q, k] is how much input token k flows into output token q.

    The returned map is, for models with a class token, the row of R for the class token restricted
    to the patches; for GAP models (no class token) the output is the mean over patch tokens, so
    the map is the mean over query rows of R.  The map is renormalised to sum to one over the
    patches; if the class token's flow to the patches is zero (e.g. every layer's attention is the
    identity, so the class token only ever sees itself) the map is undefined and we return the
    uniform map 1 / (gh gw), i.e. "no preference".  (For plotting, :func:`plot_rollout` rescales
    each map by its maximum anyway.)

    ``attn_layers``: per-layer (B, H, N, N) attention probabilities.  ``grid_size`` (gh, gw)
    defaults to a square grid.  Returns (B, gh, gw).
    """
    if len(attn_layers) == 0:
        raise ValueError("no attention layers")
    first = attn_layers[0]
    b, _, n, _ = first.shape
    if grid_size is None:
        n_p = n - 1 if has_cls_token else n
        if has_cls_token is None:
            n_p = n if math.isqrt(n) ** 2 == n else n - 1
        side = math.isqrt(n_p)
        if side * side != n_p:
            raise ValueError(f"cannot infer a square grid from {n} tokens; pass grid_size")
        grid_size = (side, side)
    off = _cls_offset(n, grid_size, has_cls_token)
    eye = torch.eye(n, dtype=torch.float64, device=first.device)
    rollout = eye.expand(b, n, n).clone()
    for attn in attn_layers:
        a = attn.detach().to(torch.float64)
        if head_fusion == "mean":
            a = a.mean(1)
        elif head_fusion == "max":
            a = a.amax(1)
        elif head_fusion == "min":
            a = a.amin(1)
        else:
            raise ValueError(f"unknown head_fusion {head_fusion!r}")
        if discard_ratio > 0:
            a = _discard_lowest(a, discard_ratio, keep_cls=bool(off))
        a = a + eye
        a = a / a.sum(-1, keepdim=True)
        rollout = a @ rollout
    if off:
        flow = rollout[:, 0, off:]
    else:
        flow = rollout.mean(1)
    mass = flow.sum(-1, keepdim=True)
    n_p = flow.shape[-1]
    uniform = torch.full_like(flow, 1.0 / n_p)
    flow = torch.where(mass > 1e-12, flow / mass.clamp_min(1e-300), uniform)
    return flow.reshape(b, int(grid_size[0]), int(grid_size[1])).to(torch.float32)


def _to_display(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) uint8 or float in [-1, 1] -> (B, H, W, 3) float in [0, 1]."""
    x = torch.as_tensor(images).detach().cpu()
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    else:
        x = ((x.float() + 1) / 2).clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        x = x.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).numpy()


def plot_rollout(images: torch.Tensor, maps: torch.Tensor, mode: str = "mask", axes=None,
                 titles: Optional[Sequence[str]] = None):
    """Fig. 6: each input image above its attention-rollout visualisation.

    ``images``: (B, C, H, W) uint8 or float in [-1, 1] (the models' input convention);
    ``maps``: (B, gh, gw) from :func:`attention_rollout`.  Each map is rescaled by its maximum and
    bilinearly upsampled to the image size.  ``mode="mask"`` multiplies the image by the map (the
    paper's look: attended regions stay bright); ``mode="overlay"`` draws a jet heatmap over the
    image.  ``axes``: a (2, B) array of axes, else a new figure.  Returns the figure.
    """
    import matplotlib.pyplot as plt

    imgs = _to_display(images)
    b, h, w, _ = imgs.shape
    m = torch.as_tensor(maps).detach().float().cpu()
    m = m / m.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    up = F.interpolate(m[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    up = up.clamp(0, 1).numpy()
    if axes is None:
        fig, axes = plt.subplots(2, b, figsize=(1.8 * b, 3.8), squeeze=False)
    else:
        axes = np.asarray(axes).reshape(2, b)
        fig = axes[0, 0].figure
    for i in range(b):
        axes[0, i].imshow(imgs[i])
        if mode == "mask":
            axes[1, i].imshow(imgs[i] * up[i][..., None])
        elif mode == "overlay":
            axes[1, i].imshow(imgs[i])
            axes[1, i].imshow(up[i], cmap="jet", alpha=0.5, vmin=0, vmax=1)
        else:
            raise ValueError(f"unknown mode {mode!r}")
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
        if titles is not None:
            axes[0, i].set_title(str(titles[i]), fontsize=8)
    axes[0, 0].set_ylabel("Input")
    axes[1, 0].set_ylabel("Attention")
    return fig


# --------------------------------------------------------------------------------------------
# Thin wrappers taking a vitrepro model
# --------------------------------------------------------------------------------------------


def _model_grid(model, n_tokens: Optional[int] = None):
    gs = getattr(model, "grid_size", None)
    if gs is not None:
        if isinstance(gs, int):
            return (gs, gs)
        return (int(gs[0]), int(gs[1]))
    if n_tokens is None:
        raise ValueError("model has no grid_size")
    n_p = n_tokens if math.isqrt(n_tokens) ** 2 == n_tokens else n_tokens - 1
    side = math.isqrt(n_p)
    return (side, side)


def _model_has_cls(model) -> Optional[bool]:
    pool = getattr(model, "pool", None)
    if pool is None:
        return None  # infer from the token count
    return pool == "token"


def _model_patch_pixels(model, grid_size) -> float:
    """Pixels between neighbouring patch centres: ``img_size / grid`` (equals ``patch_size`` for
    ViT and the backbone's total stride for hybrids); falls back to ``model.patch_size``."""
    img = getattr(model, "img_size", None)
    if img is not None:
        img_h = img[0] if isinstance(img, (tuple, list)) else img
        return float(img_h) / grid_size[0]
    p = getattr(model, "patch_size")
    return float(p[0] if isinstance(p, (tuple, list)) else p)


@torch.no_grad()
def model_attention(model, x: torch.Tensor) -> list:
    """Per-layer attention probabilities [(B, heads, N, N)] of ``model`` on ``x``, in eval mode
    (no dropout); the model's training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        _, attn = model(x, return_attention=True)
    finally:
        model.train(was_training)
    return [a.detach() for a in attn]


def patch_embedding_weight(model) -> torch.Tensor:
    """The (D, C, p, p) weight of a ViT's patch-embedding convolution: the model's
    ``patch_embedding_weight()`` if it has one, else ``model.patch_embed.proj`` /
    ``model.patch_embed``, else the first Conv2d whose stride equals its kernel.  (For hybrids this
    is the 1x1 projection of backbone features, not an RGB filter.)"""
    getter = getattr(model, "patch_embedding_weight", None)
    if callable(getter):
        return getter().detach()
    pe = getattr(model, "patch_embed", None)
    for cand in (getattr(pe, "proj", None), pe):
        if isinstance(cand, torch.nn.Conv2d):
            return cand.weight.detach()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d) and tuple(mod.kernel_size) == tuple(mod.stride):
            return mod.weight.detach()
    raise ValueError("no patch-embedding convolution found")


def model_filter_components(model, k: int = 28) -> FilterComponents:
    """Fig. 7 left for a model: principal components of its patch-embedding filters (meaningful
    for pure ViTs, whose filters act on RGB pixels)."""
    return filter_principal_components(patch_embedding_weight(model), k)


def model_position_similarity(model) -> Optional[torch.Tensor]:
    """Fig. 7 centre for a model: (gh, gw, gh, gw) similarity, or None without position
    embeddings (``pos_embed="none"``/``"relative"``)."""
    pos = model.position_embeddings()
    return None if pos is None else position_similarity(pos)


def model_attention_distance(model, x: torch.Tensor, batch_size: Optional[int] = None,
                             renormalize: bool = True):
    """Fig. 7 right for a model: DataFrame (layer, head, distance) averaged over the images ``x``.

    ``batch_size`` bounds memory (attention maps of all layers for one chunk at a time)."""
    import pandas as pd

    chunks = [x] if batch_size is None else list(torch.split(x, batch_size))
    per_layer = None
    grid = cls = pix = None
    for chunk in chunks:
        attn = model_attention(model, chunk)
        if grid is None:
            grid = _model_grid(model, attn[0].shape[-1])
            cls = _model_has_cls(model)
            pix = _model_patch_pixels(model, grid)
            per_layer = [[] for _ in attn]
        for store, a in zip(per_layer, attn):
            store.append(_per_image_attention_distance(a, grid, pix, cls, renormalize).cpu())
    rows = []
    for layer, store in enumerate(per_layer, start=1):
        d = torch.cat(store).nanmean(0)
        rows.extend({"layer": layer, "head": h, "distance": float(v)} for h, v in enumerate(d))
    return pd.DataFrame(rows, columns=["layer", "head", "distance"])


def model_rollout(model, x: torch.Tensor, discard_ratio: float = 0.0, head_fusion: str = "mean",
                  batch_size: Optional[int] = None) -> torch.Tensor:
    """Fig. 6 for a model: (B, gh, gw) attention-rollout maps of the images ``x``."""
    chunks = [x] if batch_size is None else list(torch.split(x, batch_size))
    maps = []
    for chunk in chunks:
        attn = model_attention(model, chunk)
        grid = _model_grid(model, attn[0].shape[-1])
        maps.append(attention_rollout(attn, _model_has_cls(model), discard_ratio, head_fusion,
                                      grid).cpu())
    return torch.cat(maps)
