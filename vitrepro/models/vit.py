"""Vision Transformer (Dosovitskiy et al. 2021, Eq. 1-4, pre-LN), as one readable module. Parameter names follow
timm's VisionTransformer, so timm checkpoints map onto it with a handful of renames (weights.py). Position-embedding
variants (App. D.4, Table 8): ``pos_embed`` none | 1d | 2d | relative, ``pos_embed_at`` stem | every_layer |
every_layer_shared.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp

POOLS = ("token", "gap")
POS_EMBEDS = ("none", "1d", "2d", "relative")
POS_EMBED_ATS = ("stem", "every_layer", "every_layer_shared")
HEADS = ("mlp", "linear")

# Speed paths: the reference computation is the paper's (every token through every block, torch's fused
# attention). SPEED_PATHS computes the same numbers faster on the CPU (measurements: benchmarks/README.md):
#   1. attention as explicit matmuls with an fp32 softmax (`attend`): torch's CPU flash-attention backward
#      costs 2-11x more at 17-197 tokens. CUDA keeps the fused kernel either way.
#   2. with token pooling the last block runs for the class token only (`Block.forward_cls`; every token is
#      still a key and a value): 13-21% fewer executed FLOPs per step on the cpu-profile ViTs. A model's
#      `last_block_cls_only = False` turns this off for that model alone.
SPEED_PATHS = True


def resample_grid(table: torch.Tensor, new_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resample a (gh, gw, D) grid of embeddings to new_hw, as timm's resample_abs_pos_embed does
    (align_corners=False; vit_jax's scipy zoom aligns the corners instead): resized models match timm's."""
    gh, gw, d = table.shape
    if (gh, gw) == tuple(new_hw):
        return table
    x = table.float().permute(2, 0, 1).unsqueeze(0)  # (1, D, gh, gw)
    x = F.interpolate(x, size=tuple(new_hw), mode="bilinear", align_corners=False, antialias=False)
    return x[0].permute(1, 2, 0).to(table.dtype)  # (gh', gw', D)


def resample_1d(table: torch.Tensor, new_len: int) -> torch.Tensor:
    """Linearly resample a (L, ...) table along its first axis (same convention as resample_grid)."""
    if table.shape[0] == new_len:
        return table
    x = table.float().reshape(table.shape[0], -1).t().unsqueeze(0)  # (1, C, L)
    x = F.interpolate(x, size=new_len, mode="linear", align_corners=False)
    return x[0].t().reshape(new_len, *table.shape[1:]).to(table.dtype)


class PatchEmbed(nn.Module):
    """Split the image into P x P patches and project each linearly to D (a stride-P convolution)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def set_img_size(self, img_size: int) -> None:
        self.grid_size = (img_size // self.patch_size, img_size // self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The stride-P convolution computed as one matmul over flattened patches (the weight keeps the
        # convolution's (D, C, P, P) layout): the same numbers up to float rounding, and several times
        # faster to train on a CPU, where a convolution's backward with few input channels is slow.
        B, C, H, W = x.shape
        p = self.patch_size
        gh, gw = H // p, W // p
        x = x[:, :, : gh * p, : gw * p]  # like the convolution, ignore a remainder that is not a whole patch
        x = x.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * p * p)
        w = self.proj.weight
        return F.linear(x, w.reshape(w.shape[0], -1), self.proj.bias)  # (B, N, D), raster order (row-major)


class PosEmbed1D(nn.Module):
    """One learned D-vector per position in raster order, plus one per prefix (class) token."""

    def __init__(self, grid: tuple[int, int], num_prefix: int, dim: int):
        super().__init__()
        self.grid, self.num_prefix = tuple(grid), num_prefix
        # "from BERT": normal(0.02) init (vit_jax models_vit.AddPositionEmbs).
        self.table = nn.Parameter(torch.randn(1, num_prefix + grid[0] * grid[1], dim) * 0.02)  # (1, N, D)

    def forward(self) -> torch.Tensor:
        return self.table  # (1, N, D)

    def grid_embedding(self) -> torch.Tensor:
        gh, gw = self.grid
        return self.table[0, self.num_prefix:].reshape(gh, gw, -1)  # (gh, gw, D)

    @torch.no_grad()
    def resize(self, grid: tuple[int, int]) -> None:
        # The class-token position has no location in the image, so it is kept as is.
        prefix = self.table[:, : self.num_prefix]
        new = resample_grid(self.grid_embedding(), grid).reshape(1, -1, prefix.shape[-1])
        self.table = nn.Parameter(torch.cat([prefix, new], dim=1))
        self.grid = tuple(grid)


class PosEmbed2D(nn.Module):
    """Two learned tables, X (per column) and Y (per row), each of width D/2 (App. D.4).

    Patch (r, c) gets concat(X[c], Y[r]); the class token has its own learned D-vector.
    """

    def __init__(self, grid: tuple[int, int], num_prefix: int, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"pos_embed='2d' needs an even hidden size, got {dim}")
        self.grid, self.num_prefix = tuple(grid), num_prefix
        self.x_table = nn.Parameter(torch.randn(grid[1], dim // 2) * 0.02)  # (gw, D/2)
        self.y_table = nn.Parameter(torch.randn(grid[0], dim // 2) * 0.02)  # (gh, D/2)
        self.prefix = nn.Parameter(torch.randn(1, num_prefix, dim) * 0.02) if num_prefix else None

    def grid_embedding(self) -> torch.Tensor:
        gh, gw = self.grid
        x = self.x_table[None, :, :].expand(gh, gw, -1)  # (gh, gw, D/2), varies along columns
        y = self.y_table[:, None, :].expand(gh, gw, -1)  # (gh, gw, D/2), varies along rows
        return torch.cat([x, y], dim=-1)  # (gh, gw, D)

    def forward(self) -> torch.Tensor:
        grid = self.grid_embedding().reshape(1, -1, self.x_table.shape[1] * 2)  # (1, gh*gw, D)
        return grid if self.prefix is None else torch.cat([self.prefix, grid], dim=1)  # (1, N, D)

    @torch.no_grad()
    def resize(self, grid: tuple[int, int]) -> None:
        # Each axis table is interpolated along its own axis (the 1-D restriction of bilinear).
        self.x_table = nn.Parameter(resample_1d(self.x_table, grid[1]))
        self.y_table = nn.Parameter(resample_1d(self.y_table, grid[0]))
        self.grid = tuple(grid)


def make_pos_embed(kind: str, grid, num_prefix: int, dim: int) -> nn.Module:
    return {"1d": PosEmbed1D, "2d": PosEmbed2D}[kind](grid, num_prefix, dim)


class RelativeBias(nn.Module):
    """The paper's "1-D relative attention" (App. D.4): an attention-logit bias from learned embeddings of
    the query-key offset p_q - p_k of raster-order patches (2n-1 offsets, per head, head_dim wide), used as
    keys of an extra attention of the content query. The class token has no position: pairs with it use 3
    more embeddings (cls->patch, patch->cls, cls->cls), as if it were equally far from every patch.
    """

    def __init__(self, grid: tuple[int, int], num_prefix: int, num_heads: int, head_dim: int):
        super().__init__()
        if num_prefix > 1:
            raise ValueError("relative position bias supports at most one prefix (class) token")
        self.grid, self.num_prefix = tuple(grid), num_prefix
        n = grid[0] * grid[1]
        self.table = nn.Parameter(torch.randn(2 * n - 1, num_heads, head_dim) * 0.02)  # (2n-1, h, dh)
        self.cls_table = nn.Parameter(torch.randn(3, num_heads, head_dim) * 0.02) if num_prefix else None
        # (N, N) index into cat(table, cls_table). Kept as a plain cache rather than a buffer so that it is
        # never saved, and stays valid when the model is built on the meta device and materialised later.
        self._index_cache: dict = {}

    def _index(self) -> torch.Tensor:
        n = self.grid[0] * self.grid[1]
        pos = torch.arange(n)
        idx = pos[:, None] - pos[None, :] + (n - 1)  # (n, n), offset p_q - p_k shifted to [0, 2n-2]
        if self.num_prefix:
            idx = F.pad(idx, (1, 0, 1, 0), value=2 * n)  # column 0: patch query -> cls key
            idx[0, 1:] = 2 * n - 1  # cls query -> patch key
            idx[0, 0] = 2 * n + 1  # cls -> cls
        return idx

    @property
    def index(self) -> torch.Tensor:
        return self.index_on(self.table.device)

    def index_on(self, device) -> torch.Tensor:
        key = (self.grid, str(device))
        if key not in self._index_cache:
            self._index_cache = {key: self._index().to(device)}
        return self._index_cache[key]

    def offset_table(self) -> torch.Tensor:
        return self.table if self.cls_table is None else torch.cat([self.table, self.cls_table], 0)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        # q: (B, h, N, dh) content queries
        table = self.offset_table()  # (O, h, dh)
        logits = torch.einsum("bhqd,ohd->bhqo", q, table) / math.sqrt(q.shape[-1])  # (B, h, N, O)
        index = self.index_on(q.device)[None, None].expand(q.shape[0], q.shape[1], -1, -1)  # (B, h, N, N)
        return torch.gather(logits, -1, index)  # (B, h, N, N): bias[b, h, q, k] = q . R[p_q - p_k]

    @torch.no_grad()
    def resize(self, grid: tuple[int, int]) -> None:
        n = grid[0] * grid[1]
        # Linear interpolation of the 2n-1 offset table; the centre (offset 0) maps onto itself.
        self.table = nn.Parameter(resample_1d(self.table, 2 * n - 1))
        self.grid = tuple(grid)


def attend(q, k, v, bias=None, drop: float = 0.0, return_attention: bool = False):
    """softmax(q k^T / sqrt(dh) + bias) v for (B, h, Nq, dh) queries and (B, h, N, dh) keys/values -> (out,
    attention probabilities or None): torch's fused kernel on CUDA, else (SPEED_PATHS) the explicit form,
    whose softmax runs in fp32 so that bf16 autocast rounds only the matmuls."""
    if not return_attention and (q.is_cuda or not SPEED_PATHS):
        # The relative bias goes in as an additive float mask.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop), None
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, h, Nq, N)
    if bias is not None:
        logits = logits + bias
    attn = logits.float().softmax(dim=-1).to(logits.dtype)  # (B, h, Nq, N)
    out = F.dropout(attn, drop, training=drop > 0) @ v  # (B, h, Nq, dh)
    return out, (attn if return_attention else None)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, rel_bias: RelativeBias | None = None, return_attention: bool = False):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, h, N, dh)
        bias = rel_bias(q) if rel_bias is not None else None  # (B, h, N, N) or None
        out, attn = attend(q, k, v, bias, self.attn_drop if self.training else 0.0, return_attention)
        out = out.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj_drop(self.proj(out)), attn

    def forward_cls(self, x):
        """Attention output for the first (class) token only: (B, N, D) -> (B, 1, D).

        Keys and values still come from every token; the query, the attention and the output
        projection are computed for one token instead of N (the same numbers as forward(x)[0][:, :1])."""
        B, N, D = x.shape
        w, b = self.qkv.weight, self.qkv.bias  # rows: q (D), k (D), v (D)
        q = F.linear(x[:, :1], w[:D], b[:D]).reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)
        kv = F.linear(x, w[D:], b[D:]).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (B, h, N, dh); q is (B, h, 1, dh)
        out, _ = attend(q, k, v, None, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, 1, D)))  # (B, 1, D)


class Block(nn.Module):
    """Pre-LN transformer block (Eqs. 2-3)."""

    def __init__(self, dim, num_heads, mlp_dim, drop=0.0, attn_drop=0.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)  # eps as in flax / vit_jax
        self.attn = Attention(dim, num_heads, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim, act_layer=nn.GELU, drop=drop)  # fc1 -> GELU -> fc2

    def forward(self, x, rel_bias=None, return_attention=False):
        y, attn = self.attn(self.norm1(x), rel_bias, return_attention)
        x = x + self.drop_path(y)  # (B, N, D)
        x = x + self.drop_path(self.mlp(self.norm2(x)))  # (B, N, D)
        return x, attn

    def forward_cls(self, x):
        """The block's output for the class token only, (B, N, D) -> (B, 1, D): every token is still a
        key and a value, but the residual branch, the second LayerNorm and the MLP run on one token."""
        x0 = x[:, :1] + self.drop_path(self.attn.forward_cls(self.norm1(x)))  # (B, 1, D)
        return x0 + self.drop_path(self.mlp(self.norm2(x0)))  # (B, 1, D)


def zero_linear(in_features: int, out_features: int) -> nn.Linear:
    """The paper's classifier init: kernel and bias zeros (vit_jax head_kernel_init=zeros)."""
    head = nn.Linear(in_features, out_features)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def make_head(model: nn.Module, width: int, head: str, representation_size: int | None, num_classes: int,
              drop_rate: float) -> None:
    """The pre-training head on ``width`` body features (ViT and BiT alike): "mlp" has one tanh hidden layer
    (``representation_size``, default ``width``), "linear" none; then dropout and the zero-initialised classifier."""
    if head == "linear" and representation_size is not None:
        raise ValueError("representation_size is only used with head='mlp'")
    model.pre_logits = (nn.Sequential(OrderedDict(fc=nn.Linear(width, representation_size or width), tanh=nn.Tanh()))
                        if head == "mlp" else nn.Identity())
    model.num_features = (representation_size or width) if head == "mlp" else width
    model.head_drop = nn.Dropout(drop_rate)
    model.head = zero_linear(model.num_features, num_classes) if num_classes > 0 else nn.Identity()


def replace_head(model: nn.Module, num_features: int, num_classes: int) -> None:
    """The paper's fine-tuning head (ViT and BiT alike): the whole head, pre-logits included, replaced by one
    zero-initialised linear layer from the ``num_features`` body features, on the model's device."""
    device = model.norm.weight.device
    model.pre_logits = nn.Identity()
    model.num_features = num_features
    model.num_classes = num_classes
    model.head = zero_linear(num_features, num_classes).to(device) if num_classes > 0 else nn.Identity()


class VisionTransformer(nn.Module):
    def __init__(self, name: str = "ViT", img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, dim: int = 768, depth: int = 12, mlp_dim: int = 3072, num_heads: int = 12,
                 pool: str = "token", pos_embed: str = "1d", pos_embed_at: str = "stem", head: str = "mlp",
                 representation_size: int | None = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, stem: nn.Module | None = None):
        super().__init__()
        check_vit_options(pool=pool, pos_embed=pos_embed, pos_embed_at=pos_embed_at, head=head)
        self.name, self.img_size, self.in_chans, self.num_classes = name, img_size, in_chans, num_classes
        self.dim, self.depth, self.num_heads = dim, depth, num_heads
        self.pool, self.pos_embed_kind, self.pos_embed_at = pool, pos_embed, pos_embed_at

        # Stem: patches (plain ViT) or a CNN feature map with 1x1 "patches" (hybrid, see hybrid.py).
        self.patch_embed = stem if stem is not None else PatchEmbed(img_size, patch_size, in_chans, dim)
        grid = self.patch_embed.grid_size
        self.num_prefix = 1 if pool == "token" else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "token" else None  # zeros init (vit_jax)

        # Position information: where it enters, and how.
        self.pos_embed = self.layer_pos_embed = self.shared_pos_embed = None
        if pos_embed in ("1d", "2d"):
            if pos_embed_at == "stem":
                self.pos_embed = make_pos_embed(pos_embed, grid, self.num_prefix, dim)
            elif pos_embed_at == "every_layer":
                self.layer_pos_embed = nn.ModuleList(
                    make_pos_embed(pos_embed, grid, self.num_prefix, dim) for _ in range(depth))
            else:
                self.shared_pos_embed = make_pos_embed(pos_embed, grid, self.num_prefix, dim)
        # Relative attention: one offset table per layer (as in Shaw et al. 2018).
        self.rel_bias = nn.ModuleList(RelativeBias(grid, self.num_prefix, num_heads, dim // num_heads)
                                      for _ in range(depth)) if pos_embed == "relative" else None
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth grows linearly
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_dim, drop_rate, attn_drop_rate, dpr[i]) for i in range(depth))
        # With token pooling only z_L^0 is read, so the last block may run for the class token alone
        # (Block.forward_cls, speed path 2 of SPEED_PATHS). False runs every token through every block.
        self.last_block_cls_only = True
        self.norm = nn.LayerNorm(dim, eps=1e-6)

        make_head(self, dim, head, representation_size, num_classes, drop_rate)
        self._init_weights()

    def _init_weights(self):
        # vit_jax: Dense layers xavier_uniform, biases zero (MLP biases normal(1e-6)); the patch
        # projection uses lecun_normal (flax Conv default). The classifier stays zero.
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and m is not self.head:
                nn.init.xavier_uniform_(m.weight)
                if "mlp" in name:
                    nn.init.normal_(m.bias, std=1e-6)
                else:
                    nn.init.zeros_(m.bias)
        if isinstance(self.patch_embed, PatchEmbed):
            w = self.patch_embed.proj.weight
            nn.init.trunc_normal_(w, std=math.sqrt(1.0 / w[0].numel()))
            nn.init.zeros_(self.patch_embed.proj.bias)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    def position_embeddings(self) -> torch.Tensor | None:
        """The grid position embedding (gh, gw, D) for 1d/2d (the stem, shared, or first layer's table)."""
        pe = self.pos_embed or self.shared_pos_embed or (self.layer_pos_embed[0] if self.layer_pos_embed else None)
        return None if pe is None else pe.grid_embedding()

    def forward_tokens(self, x: torch.Tensor, return_attention: bool = False):
        """(B, C, H, W) -> encoder output after the final LayerNorm (B, N, D), list of attentions."""
        x, attentions = self._encode(x, return_attention)
        return self.norm(x), attentions

    def cls_only_last_block(self) -> bool:
        """Whether _pooled runs the last block for the class token only (token pooling, no relative bias)."""
        return SPEED_PATHS and self.last_block_cls_only and self.pool == "token" and self.rel_bias is None

    def _encode(self, x: torch.Tensor, return_attention: bool = False, cls_only_last: bool = False):
        """(B, C, H, W) -> encoder output before the final LayerNorm (B, N, D), list of attentions.
        With cls_only_last the last block returns the class token only: (B, 1, D)."""
        x = self.patch_embed(x)  # (B, n, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N = 1 + n, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed()
        x = self.pos_drop(x)
        attentions = []
        for i, block in enumerate(self.blocks):
            if self.layer_pos_embed is not None:
                x = x + self.layer_pos_embed[i]()  # a separately learned embedding per layer
            elif self.shared_pos_embed is not None:
                x = x + self.shared_pos_embed()  # the same embedding at every layer
            if cls_only_last and i == len(self.blocks) - 1:
                return block.forward_cls(x), attentions  # (B, 1, D)
            x, attn = block(x, self.rel_bias[i] if self.rel_bias is not None else None, return_attention)
            if return_attention:
                attentions.append(attn)
        return x, attentions

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        # token: y = LN(z_L^0); gap: mean over the (normalised) patch tokens, as in vit_jax.
        return x[:, 0] if self.pool == "token" else x.mean(dim=1)  # (B, D)

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> pooled encoder output (B, D). With token pooling the final LayerNorm (a per-token
        operation) is applied to the class token only: the same numbers as _pool(forward_tokens(x)),
        without normalising (and back-propagating through) the N - 1 tokens nobody reads; for the same
        reason the last block runs for the class token only (see cls_only_last_block)."""
        if self.pool != "token":
            return self._pool(self.forward_tokens(x)[0])
        return self.norm(self._encode(x, False, self.cls_only_last_block())[0][:, 0])  # (B, D)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logits representation (B, num_features): after the tanh layer for head='mlp'."""
        return self.pre_logits(self._pooled(x))

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        if return_attention:
            tokens, attentions = self.forward_tokens(x, True)
            return self.head(self.head_drop(self.pre_logits(self._pool(tokens)))), attentions
        return self.head(self.head_drop(self.pre_logits(self._pooled(x))))  # (B, num_classes)

    def reset_head(self, num_classes: int) -> None:
        """Replace the whole head (pre-logits included) by one zero-initialised linear layer."""
        replace_head(self, self.dim, num_classes)

    def set_img_size(self, img_size: int) -> None:
        """Change the input resolution in place (used by weights.resize)."""
        self.patch_embed.set_img_size(img_size)
        self.img_size = img_size
        for pe in (self.pos_embed, self.shared_pos_embed, *(self.layer_pos_embed or ()), *(self.rel_bias or ())):
            if pe is not None:
                pe.resize(self.grid_size)


def check_vit_options(pool, pos_embed, pos_embed_at, head) -> None:
    for opt, value, allowed in (("pool", pool, POOLS), ("pos_embed", pos_embed, POS_EMBEDS),
                                ("pos_embed_at", pos_embed_at, POS_EMBED_ATS), ("head", head, HEADS)):
        if value not in allowed:
            raise ValueError(f"{opt}={value!r} is not one of {allowed}")
    if pos_embed in ("none", "relative") and pos_embed_at != "stem":
        raise ValueError(f"pos_embed={pos_embed!r} cannot be combined with pos_embed_at={pos_embed_at!r} "
                         "(Table 8: only 1d and 2d embeddings can be added at every layer)")
