"""Tests of vitrepro.analysis on hand-computable attention / embedding tensors."""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from vitrepro import analysis as A  # noqa: E402


def _expand(attn_nn, b=2, h=3):
    """(N, N) -> (B, H, N, N)."""
    return attn_nn.expand(b, h, *attn_nn.shape).clone()


def _with_cls(patch_attn, cls_row=None):
    """Embed (Np, Np) patch attention into (Np+1, Np+1); patch queries give no mass to CLS."""
    n = patch_attn.shape[0]
    a = torch.zeros(n + 1, n + 1)
    a[1:, 1:] = patch_attn
    a[0] = torch.full((n + 1,), 1.0 / (n + 1)) if cls_row is None else cls_row
    return a


# ------------------------------------------------------------------ filter PCA (Fig. 7 left)


def test_filter_pca_recovers_planted_rank_two():
    g = torch.Generator().manual_seed(0)
    c, p, d = 3, 4, 64
    patterns = torch.randn(2, c * p * p, generator=g)
    mean = torch.randn(c * p * p, generator=g)
    coef = torch.randn(d, 2, generator=g)
    w = coef @ patterns + mean + 1e-4 * torch.randn(d, c * p * p, generator=g)
    res = A.filter_principal_components(w.reshape(d, c, p, p), k=28)
    assert res.components.shape == (28, c, p, p)
    assert res.explained_variance_ratio.shape == (28,)
    assert res.explained_variance_ratio[:2].sum() > 0.9999
    assert torch.all(res.explained_variance_ratio[:-1] >= res.explained_variance_ratio[1:] - 1e-7)
    v = res.components.reshape(28, -1).double()
    assert torch.allclose(v @ v.T, torch.eye(28, dtype=torch.float64), atol=1e-4)
    # the two planted patterns lie in the span of the first two components
    basis = v[:2]
    pat = patterns.double()
    resid = pat - (pat @ basis.T) @ basis
    assert resid.norm() / pat.norm() < 1e-3
    assert torch.allclose(res.mean.reshape(-1), w.mean(0), atol=1e-5)


def test_filter_pca_clips_k_and_plots():
    w = torch.randn(5, 1, 2, 2)
    res = A.filter_principal_components(w, k=28)
    assert res.components.shape[0] == 4  # min(D, C p p)
    fig = A.plot_filters(res)  # grey, C == 1
    plt.close(fig)
    fig = A.plot_filters(A.filter_principal_components(torch.randn(10, 3, 4, 4), k=9).components,
                         ncols=3)
    assert len(fig.axes) == 9
    plt.close(fig)


# ------------------------------------------------------- position similarity (Fig. 7 centre)


def test_position_similarity_one_hot_is_identity():
    gh, gw = 3, 4
    pos = torch.eye(gh * gw).reshape(gh, gw, gh * gw)
    sim = A.position_similarity(pos)
    assert sim.shape == (gh, gw, gh, gw)
    assert torch.allclose(sim.reshape(gh * gw, gh * gw), torch.eye(gh * gw))


def _smooth_pos(gh, gw, freqs=(0.3, 0.7, 1.1)):
    def feats(t):
        return torch.cat([torch.cos(t[:, None] * torch.tensor(freqs)),
                          torch.sin(t[:, None] * torch.tensor(freqs))], dim=1)

    r = feats(torch.arange(gh, dtype=torch.float32))  # (gh, 2F), each row of norm sqrt(F)
    c = feats(torch.arange(gw, dtype=torch.float32))
    return torch.cat([r[:, None, :].expand(gh, gw, -1), c[None, :, :].expand(gh, gw, -1)], dim=-1)


def test_position_similarity_smooth_embedding_structure():
    gh, gw = 5, 5
    sim = A.position_similarity(_smooth_pos(gh, gw))
    for i in range(gh):
        for j in range(gw):
            s = sim[i, j]
            assert s[i, j] == pytest.approx(1.0, abs=1e-5)
            # same-row patches are more similar than the same column in any other row
            for jj in range(gw):
                for ii in range(gh):
                    if ii != i:
                        assert s[i, jj] > s[ii, jj]
            # the most similar other patch is a 4-neighbour
            s2 = s.clone()
            s2[i, j] = -2
            k = int(s2.argmax())
            assert abs(k // gw - i) + abs(k % gw - j) == 1
    fig = A.plot_position_similarity(sim)
    plt.close(fig)


# ------------------------------------------------------- mean attention distance (Fig. 7 right)


def test_distance_identity_is_zero():
    for cls in (False, True):
        a = torch.eye(9)
        a = _with_cls(a) if cls else a
        d = A.mean_attention_distance(_expand(a), (3, 3), 16, has_cls_token=cls)
        assert d.shape == (3,)
        assert torch.allclose(d, torch.zeros(3))


def test_distance_uniform_2x2_hand_computed():
    # from every patch of a 2x2 grid the other centres are at 0, 1, 1, sqrt 2 patches
    expected = 16 * (2 + math.sqrt(2)) / 4  # = 13.657 px
    a = _expand(torch.full((4, 4), 0.25))
    assert torch.allclose(A.mean_attention_distance(a, (2, 2), 16), torch.full((3,), expected))
    # class token gets 1/5 of the mass: renormalised (default) -> same; raw -> scaled by 4/5
    a5 = _expand(torch.full((5, 5), 0.2))
    d = A.mean_attention_distance(a5, (2, 2), 16, has_cls_token=True)
    assert torch.allclose(d, torch.full((3,), expected))
    d_raw = A.mean_attention_distance(a5, (2, 2), 16, has_cls_token=True, renormalize=False)
    assert torch.allclose(d_raw, torch.full((3,), expected * 4 / 5))
    # inferred class token
    assert torch.allclose(A.mean_attention_distance(a5, (2, 2), 16), d)


def test_distance_neighbour_is_patch_size_and_per_head():
    gh, gw, p = 4, 3, 14
    n = gh * gw
    right = torch.zeros(n, n)  # attend to the right neighbour (last column: left neighbour)
    for q in range(n):
        i, j = divmod(q, gw)
        right[q, i * gw + (j + 1 if j < gw - 1 else j - 1)] = 1
    below = torch.zeros(n, n)  # attend two rows away (same column)
    for q in range(n):
        i, j = divmod(q, gw)
        below[q, ((i + 2) if i + 2 < gh else i - 2) * gw + j] = 1
    attn = torch.stack([right, torch.eye(n), below])[None].expand(2, 3, n, n)
    d = A.mean_attention_distance(attn, (gh, gw), p, has_cls_token=False)
    assert torch.allclose(d, torch.tensor([p, 0.0, 2 * p]))
    df = A.attention_distances([attn, torch.flip(attn, dims=[1])], (gh, gw), p)
    assert list(df.columns) == ["layer", "head", "distance"]
    assert len(df) == 6 and sorted(df.layer.unique()) == [1, 2]
    assert df.query("layer == 2 and head == 0").distance.item() == pytest.approx(2 * p)
    fig = A.plot_attention_distance(df, max_distance=100)
    plt.close(fig)


def test_distance_rejects_inconsistent_tokens():
    with pytest.raises(ValueError):
        A.mean_attention_distance(_expand(torch.eye(7)), (2, 2), 16)


# ------------------------------------------------------------------ rollout (Fig. 6)


def test_rollout_identity_gives_uniform_map():
    gh, gw = 2, 3
    n = gh * gw
    for cls in (True, False):
        eye = torch.eye(n + int(cls))
        maps = A.attention_rollout([_expand(eye)] * 3, has_cls_token=cls, grid_size=(gh, gw))
        assert maps.shape == (2, gh, gw)
        assert torch.allclose(maps, torch.full((2, gh, gw), 1 / n))


def test_rollout_cls_attends_to_one_patch():
    n_p, k = 9, 5
    cls_row = torch.zeros(n_p + 1)
    cls_row[1 + k] = 1
    layer = _with_cls(torch.eye(n_p), cls_row)
    eye = torch.eye(n_p + 1)
    maps = A.attention_rollout([_expand(eye), _expand(layer), _expand(eye)], has_cls_token=True)
    assert maps.shape == (2, 3, 3)
    flat = maps.reshape(2, -1)
    assert (flat.argmax(1) == k).all()
    assert torch.allclose(flat[:, k], torch.ones(2))


def test_rollout_multiplication_order():
    # layer 1: CLS -> patch k;  layer 2: CLS -> patch j.  With A' = (A + I) / 2 the CLS row of
    # A'2 @ A'1 is 1/4 cls + 1/4 k + 1/2 j, so the patch map is k: 1/3, j: 2/3 (the reverse
    # order would give k: 2/3, j: 1/3).
    n_p, k, j = 4, 0, 3
    r1 = torch.zeros(n_p + 1)
    r1[1 + k] = 1
    r2 = torch.zeros(n_p + 1)
    r2[1 + j] = 1
    l1 = _with_cls(torch.eye(n_p), r1)
    l2 = _with_cls(torch.eye(n_p), r2)
    m = A.attention_rollout([_expand(l1), _expand(l2)], has_cls_token=True).reshape(2, -1)
    assert torch.allclose(m[0], torch.tensor([1 / 3, 0, 0, 2 / 3]), atol=1e-6)


def test_rollout_gap_is_mean_over_queries_and_discard():
    # no class token: every patch attends to patch 2 -> (A+I)/2 rows: 1/2 self + 1/2 e_2;
    # mean over queries puts 1/2 + 1/(2*4) on patch 2 and 1/8 on each other patch.
    n = 4
    a = torch.zeros(n, n)
    a[:, 2] = 1
    m = A.attention_rollout([_expand(a)], has_cls_token=False).reshape(2, -1)
    assert torch.allclose(m[0], torch.tensor([1 / 8, 1 / 8, 5 / 8, 1 / 8]))
    # discarding the smallest weights of a noisy row keeps the peak
    g = torch.Generator().manual_seed(0)
    noisy = torch.softmax(torch.randn(2, 3, 10, 10, generator=g), -1)
    noisy[:, :, 0] = 0.0
    noisy[:, :, 0, 4] = 1.0
    m = A.attention_rollout([noisy], has_cls_token=True, discard_ratio=0.5)
    assert (m.reshape(2, -1).argmax(1) == 3).all()
    fig = A.plot_rollout(torch.rand(2, 3, 12, 12) * 2 - 1, m)
    plt.close(fig)
    fig = A.plot_rollout(torch.randint(0, 255, (2, 1, 12, 12), dtype=torch.uint8), m,
                         mode="overlay")
    plt.close(fig)


# ------------------------------------------------------------------ model wrappers


class _FakeViT(nn.Module):
    """Minimal stand-in for the design.md model API (the real models are tested elsewhere)."""

    def __init__(self, img_size=16, patch_size=4, dim=8, heads=2, depth=2, pool="token"):
        super().__init__()
        self.img_size, self.patch_size, self.pool = img_size, patch_size, pool
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.patch_embed = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.pos = nn.Parameter(torch.randn(*self.grid_size, dim))
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.qk = nn.ModuleList(nn.Linear(dim, 2 * dim) for _ in range(depth))
        self.heads = heads
        self.head = nn.Linear(dim, 3)

    def position_embeddings(self):
        return self.pos.detach()

    def forward(self, x, return_attention=False):
        t = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos.reshape(1, -1, self.pos.shape[-1])
        if self.pool == "token":
            t = torch.cat([self.cls.expand(len(x), -1, -1), t], 1)
        attns = []
        for qk in self.qk:
            q, k = qk(t).chunk(2, -1)
            b, n, d = q.shape
            q = q.reshape(b, n, self.heads, -1).transpose(1, 2)
            k = k.reshape(b, n, self.heads, -1).transpose(1, 2)
            a = torch.softmax(q @ k.transpose(-1, -2), -1)
            attns.append(a)
            t = t + (a.mean(1) @ t)
        logits = self.head(t[:, 0] if self.pool == "token" else t.mean(1))
        return (logits, attns) if return_attention else logits


@pytest.mark.parametrize("pool", ["token", "gap"])
def test_model_wrappers(pool):
    torch.manual_seed(0)
    model = _FakeViT(pool=pool).train()
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    attn = A.model_attention(model, x)
    assert model.training
    n = 16 + (pool == "token")
    assert len(attn) == 2 and attn[0].shape == (5, 2, n, n)
    df = A.model_attention_distance(model, x, batch_size=2)
    assert len(df) == 4
    full = A.attention_distances(attn, (4, 4), 4, has_cls_token=pool == "token")
    assert torch.allclose(torch.tensor(df.distance.values), torch.tensor(full.distance.values),
                          atol=1e-5)
    assert (df.distance > 0).all() and (df.distance < 4 * 3 * math.sqrt(2)).all()
    maps = A.model_rollout(model, x, batch_size=3)
    assert maps.shape == (5, 4, 4)
    assert torch.allclose(maps.sum((1, 2)), torch.ones(5), atol=1e-5)
    assert A.model_filter_components(model, k=6).components.shape == (6, 3, 4, 4)
    assert A.model_position_similarity(model).shape == (4, 4, 4, 4)


def test_wrappers_on_real_vit():
    """The wrappers on the suite's own ViT (a failure to build it is a failure, not a skip)."""
    from vitrepro.models import create_model

    torch.manual_seed(0)
    model = create_model("ViT-Nano/8", img_size=32, num_classes=3)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    attn = A.model_attention(model, x)
    n = 16 + (getattr(model, "pool", "token") == "token")
    assert attn[0].shape[0] == 2 and attn[0].shape[-1] == n
    df = A.model_attention_distance(model, x)
    assert len(df) == len(attn) * attn[0].shape[1]
    assert ((df.distance >= 0) & (df.distance <= 8 * 3 * math.sqrt(2))).all()
    assert A.model_rollout(model, x).shape == (2, 4, 4)
    assert A.model_filter_components(model).components.shape[1:] == (3, 8, 8)
    assert A.model_position_similarity(model).shape == (4, 4, 4, 4)
