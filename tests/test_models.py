"""Tests for vitrepro.models: offline, CPU, small models (the few B-sized checks use batch 1-2)."""

import math
from unittest import mock

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vitrepro.models import create_model, flops, list_models, load_pretrained, resize, vit
from vitrepro.models.weights import load_state, npz_to_timm, ours_to_timm, timm_to_npz

timm = pytest.importorskip("timm")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The test machine is small and shared: one intra-op thread avoids OpenMP oversubscription,
    # which made tiny models 100x slower under load. Restored after this module.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small(name="ViT-Nano/4", **kw):
    kw.setdefault("img_size", 16)
    kw.setdefault("num_classes", 5)
    torch.manual_seed(0)
    return create_model(name, **kw).eval()


def randomize_head(model):
    # Heads are zero-initialised; give them values so that comparisons test them too.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("head"):
                p.normal_()
    return model


# ---------------------------------------------------------------------------------------------------
# equivalence with timm (the few large checks)


def fast_random_(model):
    """Fill every tensor with random values of a sensible scale (much faster than timm's init)."""
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.ndim > 1:
                v.normal_().mul_(v[0].numel() ** -0.5)  # ~ 1/sqrt(fan_in)
            elif k.endswith("weight") and "head" not in k:
                v.normal_(1.0, 0.1)  # norm scales
            else:
                v.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("ours, theirs", [
    ("ViT-B/16", "vit_base_patch16_224"),
    ("R50+ViT-B/16", "vit_base_r50_s16_224"),
    ("BiT-R50x1", "resnetv2_50x1_bit"),
])
def test_same_logits_as_timm_pth_and_npz(tmp_path, ours, theirs):
    torch.manual_seed(0)
    size = 64  # smaller than 224 to keep the test fast; timm's models take img_size too
    kw = {} if ours.startswith("BiT") else {"img_size": size}
    # Build both on the meta device and materialise without running the (slow) initialisers:
    # every value is overwritten by the checkpoint anyway.
    with torch.device("meta"):
        ref = timm.create_model(theirs, pretrained=False, num_classes=7, **kw)
        model = create_model(ours, img_size=size, num_classes=7, head="linear")
    ref = fast_random_(ref.to_empty(device="cpu")).eval()
    model = model.to_empty(device="cpu").eval()
    sd = ref.state_dict()
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    report = load_pretrained(model, str(path))
    assert "classifier loaded" in report["head"] and report["resampled"] == []
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        want = ref(x)
        got = model(x)
    assert want.abs().max() > 0.1
    assert (want - got).abs().max() < 1e-4

    # npz round trip: timm layout -> official npz layout (in memory) -> our loader.
    # (the .npz file path itself is tested on small models below)
    arrays = timm_to_npz(sd, num_heads=12)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    load_state(model, npz_to_timm(arrays))
    with torch.no_grad():
        assert (want - model(x)).abs().max() < 1e-4


def test_safetensors_and_big_vision_npz(tmp_path):
    from safetensors.torch import save_file
    src = randomize_head(small("ViT-Micro/4"))
    sd = ours_to_timm(src.state_dict(), src)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    dst = small("ViT-Micro/4", head="linear")
    load_pretrained(dst, str(tmp_path / "w.safetensors"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # the checkpoint's pre-logits layer is dropped, the encoder is the same
        assert torch.allclose(src.forward_tokens(x)[0], dst.forward_tokens(x)[0], atol=1e-5)
    # big_vision layout: params/ prefix, pos_embedding at the top, *_0 names, stacked layers.
    arrays = timm_to_npz(sd, num_heads=4)
    bv = {}
    for k, v in arrays.items():
        k = (k.replace("Transformer/posembed_input/pos_embedding", "pos_embedding")
             .replace("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0")
             .replace("MlpBlock_3", "MlpBlock_0").replace("LayerNorm_2", "LayerNorm_1"))
        bv["params/" + k] = v
    stacked = {}
    for k in list(bv):
        if "encoderblock_" in k:
            i = int(k.split("encoderblock_")[1].split("/")[0])
            stacked.setdefault(k.replace(f"encoderblock_{i}/", "encoderblock/"), {})[i] = bv.pop(k)
    for k, d in stacked.items():
        bv[k] = np.stack([d[i] for i in range(len(d))])
    np.savez(tmp_path / "bv.npz", **bv)
    dst2 = small("ViT-Micro/4")  # mlp head, checkpoint has pre_logits
    report = load_pretrained(dst2, str(tmp_path / "bv.npz"))
    assert "pre-logits loaded" in report["head"]
    with torch.no_grad():
        assert (src(x) - dst2(x)).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["R26x0.25+ViT-Micro/8", "BiT-R14x0.25", "ViT-Nano/4"])
def test_npz_round_trip_small(tmp_path, name):
    src = randomize_head(small(name, img_size=32))
    arrays = timm_to_npz(ours_to_timm(src.state_dict(), src), num_heads=getattr(src, "num_heads", None))
    np.savez(tmp_path / "w.npz", **arrays)
    dst = small(name, img_size=32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in dst.parameters():
            p.normal_()
    load_pretrained(dst, str(tmp_path / "w.npz"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (src(x) - dst(x)).abs().max() < 1e-5


def test_load_head_handling_and_strictness(tmp_path):
    src = randomize_head(small("ViT-Nano/4", head="linear", num_classes=10))
    path = tmp_path / "w.pth"
    torch.save(ours_to_timm(src.state_dict(), src), path)
    # other number of classes: classifier zero-initialised and reported
    dst = small("ViT-Nano/4", head="linear", num_classes=3)
    rep = load_pretrained(dst, str(path))
    assert "zero-initialised" in rep["head"] and dst.head.weight.abs().sum() == 0
    # mlp model, checkpoint without pre-logits: whole head replaced by a zero linear layer
    dst = small("ViT-Nano/4", head="mlp", num_classes=10)
    rep = load_pretrained(dst, str(path))
    assert "replaced" in rep["head"] and isinstance(dst.pre_logits, torch.nn.Identity)
    assert torch.equal(dst.head.weight, src.head.weight)
    # missing / unexpected keys and wrong shapes raise
    sd = ours_to_timm(src.state_dict(), src)
    bad = dict(sd)
    bad.pop("blocks.0.attn.qkv.weight")
    with pytest.raises(KeyError, match="missing"):
        load_state(small("ViT-Nano/4", head="linear"), bad)
    bad = dict(sd, extra_param=torch.zeros(3))
    with pytest.raises(KeyError, match="unexpected"):
        load_state(small("ViT-Nano/4", head="linear"), bad)
    with pytest.raises(KeyError):
        load_state(small("ViT-Micro/4", head="linear"), sd)  # other depth
    with pytest.raises(ValueError, match="shape mismatch"):
        load_state(small("ViT-Nano/8", head="linear"), sd)  # other patch size
    with pytest.raises(FileNotFoundError):
        load_pretrained(small(), str(tmp_path / "nope.pth"))
    with pytest.raises(RuntimeError, match="could not get timm weights"):
        load_pretrained(small(), "timm:not_a_model_name_xyz.tag")


def test_load_resamples_position_embeddings(tmp_path):
    src = small("ViT-Nano/4", img_size=16, head="linear")
    torch.save(ours_to_timm(src.state_dict(), src), tmp_path / "w.pth")
    dst = small("ViT-Nano/4", img_size=32, head="linear")
    rep = load_pretrained(dst, str(tmp_path / "w.pth"))
    assert rep["resampled"] == ["pos_embed.table"]
    resize(src, 32)
    assert torch.allclose(src.pos_embed.table, dst.pos_embed.table)


# ---------------------------------------------------------------------------------------------------
# sizes


@pytest.mark.parametrize("name, paper", [("ViT-B/16", 86e6), ("ViT-L/16", 307e6), ("ViT-H/14", 632e6)])
def test_param_counts_table1(name, paper):
    with torch.device("meta"):  # no memory allocated
        model = create_model(name, head="linear")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - paper) / paper < 0.01


def test_vit_shapes_table1():
    for name, (d, depth, mlp, heads) in {"ViT-Ti/16": (192, 12, 768, 3), "ViT-S/16": (384, 12, 1536, 6),
                                         "ViT-B/16": (768, 12, 3072, 12), "ViT-L/16": (1024, 24, 4096, 16),
                                         "ViT-H/14": (1280, 32, 5120, 16), "ViT-Nano/4": (64, 4, 256, 2),
                                         "ViT-Micro/4": (128, 6, 512, 4), "ViT-Mini/4": (192, 6, 768, 3)}.items():
        with torch.device("meta"):
            m = create_model(name)
        assert (m.dim, m.depth, m.blocks[0].mlp.fc1.out_features, m.num_heads) == (d, depth, mlp, heads)


def test_hybrid_blocks():
    with torch.device("meta"):
        assert create_model("R50+ViT-B/16").resnet_blocks == (3, 4, 9)
        assert create_model("R50+ViT-B/32").resnet_blocks == (3, 4, 6, 3)
        assert create_model("R26x0.25+ViT-Micro/8").resnet_blocks == (2, 6)
        assert create_model("R14x0.25+ViT-Nano/4").resnet_blocks == (4,)
        m = create_model("R50+ViT-B/16")
    assert m.grid_size == (14, 14)
    assert [len(s.blocks) for s in m.patch_embed.backbone.stages] == [3, 4, 9]


# ---------------------------------------------------------------------------------------------------
# every registered name runs forward + backward


def _is_big(name):
    return any(s in name for s in ("-B/", "-L/", "-H/", "R50+", "x3", "x2", "x4", "R101x1", "R50x1"))


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_every_name(name):
    img = 28 if name.endswith("/14") else 32
    if _is_big(name):
        # Large models: shapes and the autograd graph on the meta device (no memory, no compute;
        # meta kernels are slow per op, so one forward + backward at batch 1).
        with torch.device("meta"):
            model = create_model(name, img_size=img, num_classes=3)
            x = torch.randn(1, 3, img, img)
        y = model.train()(x)
        assert y.shape == (1, 3)
        y.sum().backward()
        assert model.head.weight.grad is not None
        assert (model.name, model.img_size, model.in_chans, model.num_classes) == (name, img, 3, 3)
        model.reset_head(4)
        assert model.head.weight.shape == (4, model.num_features)
        return
    torch.manual_seed(0)
    model = create_model(name, img_size=img, num_classes=3).train()
    x = torch.randn(2, 3, img, img)
    y = model(x)
    assert y.shape == (2, 3)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features)
    (y.sum() + feats.sum()).backward()
    assert (model.name, model.img_size, model.in_chans, model.num_classes) == (name, img, 3, 3)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.reset_head(4)
    assert model.head.weight.shape == (4, model.num_features)
    assert model(x).shape == (2, 4)


def test_return_attention_and_in_chans():
    model = small("ViT-Micro/4", in_chans=1)
    x = torch.randn(2, 1, 16, 16)
    logits, attns = model(x, return_attention=True)
    assert len(attns) == 6 and attns[0].shape == (2, 4, 17, 17)
    assert torch.allclose(attns[3].sum(-1), torch.ones(2, 4, 17))
    assert torch.allclose(logits, model(x), atol=1e-5)
    hybrid = small("R14x0.25+ViT-Nano/4", img_size=32)
    logits, attns = hybrid(torch.randn(1, 3, 32, 32), return_attention=True)
    assert attns[0].shape == (1, 2, 65, 65)


# ---------------------------------------------------------------------------------------------------
# options do what they claim


def _permute_patches(x, patch, perm):
    B, C, H, W = x.shape
    g = H // patch
    p = x.reshape(B, C, g, patch, g, patch).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C, patch, patch)
    p = p[:, perm]
    return p.reshape(B, g, g, C, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def test_no_pos_embed_gap_is_permutation_invariant():
    x = torch.randn(2, 3, 16, 16)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    xp = _permute_patches(x, 4, perm)
    bag = randomize_head(small(pos_embed="none", pool="gap"))
    with torch.no_grad():
        assert torch.allclose(bag(x), bag(xp), atol=1e-5)
        pos = randomize_head(small(pos_embed="1d", pool="gap"))
        assert not torch.allclose(pos(x), pos(xp), atol=1e-4)
        rel = randomize_head(small(pos_embed="relative", pool="gap"))
        assert not torch.allclose(rel(x), rel(xp), atol=1e-4)


def test_pos_embed_1d_2d_tables():
    m1 = small(pos_embed="1d")
    assert m1.pos_embed.table.shape == (1, 17, 64) and m1.position_embeddings().shape == (4, 4, 64)
    m2 = small(pos_embed="2d")
    assert m2.pos_embed.x_table.shape == (4, 32) and m2.pos_embed.y_table.shape == (4, 32)
    pe = m2.position_embeddings()  # (gh, gw, D): patch (r, c) = concat(X[c], Y[r])
    assert torch.equal(pe[1, 2], torch.cat([m2.pos_embed.x_table[2], m2.pos_embed.y_table[1]]))
    assert torch.equal(pe[0, 2, :32], pe[3, 2, :32]) and torch.equal(pe[1, 0, 32:], pe[1, 3, 32:])
    assert small(pos_embed="none").position_embeddings() is None
    assert small(pos_embed="relative").position_embeddings() is None


def test_relative_bias_depends_only_on_offset():
    m = small(pos_embed="relative", pool="gap")
    rb = m.rel_bias[0]
    q = torch.randn(1, 2, 16, 32)
    q[:] = q[:, :, :1]  # same query at every position -> bias must be a function of p_q - p_k only
    bias = rb(q)[0, 0]  # (16, 16)
    for off in range(-15, 16):
        diag = torch.diagonal(bias, offset=-off)
        assert torch.allclose(diag, diag[0].expand_as(diag))
    assert rb.table.shape == (31, 2, 32) and len(m.rel_bias) == m.depth
    mt = small(pos_embed="relative")  # with class token: 3 extra embeddings
    assert mt.rel_bias[0].offset_table().shape[0] == 34 and mt.rel_bias[0].index.shape == (17, 17)


def test_every_layer_tables():
    m = small(pos_embed="1d", pos_embed_at="every_layer")
    assert m.pos_embed is None and len(m.layer_pos_embed) == m.depth
    tables = {id(t.table) for t in m.layer_pos_embed}
    assert len(tables) == m.depth
    s = small(pos_embed="2d", pos_embed_at="every_layer_shared")
    assert s.pos_embed is None and s.layer_pos_embed is None and s.shared_pos_embed is not None
    n_shared = sum(p.numel() for p in s.parameters())
    n_stem = sum(p.numel() for p in small(pos_embed="2d").parameters())
    assert n_shared == n_stem
    # the last layer's own table is really added (at the input of the last block)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        before = m.forward_tokens(x)[0]
        m.layer_pos_embed[-1].table.normal_()
        assert not torch.allclose(before, m.forward_tokens(x)[0], atol=1e-4)
    # shared: adding the table at every layer differs from adding it once at the stem
    stem = small(pos_embed="2d")
    stem.load_state_dict({k.replace("shared_pos_embed", "pos_embed"): v for k, v in s.state_dict().items()})
    with torch.no_grad():
        assert not torch.allclose(stem.forward_tokens(x)[0], s.forward_tokens(x)[0], atol=1e-4)
        assert s.shared_pos_embed.x_table.shape == (4, 32)


def test_relative_backward_and_meta_build():
    m = small(pos_embed="relative", img_size=16)
    m.train()(torch.randn(2, 3, 16, 16)).sum().backward()
    assert m.head.weight.grad is not None
    # gradients reach the offset tables (through the SDPA float mask)
    m2 = small(pos_embed="relative", img_size=16, head="linear")
    with torch.no_grad():
        m2.head.weight.normal_()
    m2(torch.randn(2, 3, 16, 16)).sum().backward()
    assert m2.rel_bias[0].table.grad.abs().sum() > 0
    # built on meta, then materialised: the offset index is still right
    with torch.device("meta"):
        mm = create_model("ViT-Nano/4", img_size=16, pos_embed="relative")
    mm = mm.to_empty(device="cpu")
    assert torch.equal(mm.rel_bias[0].index, m.rel_bias[0].index)


def test_heads_zero_init():
    lin = small(head="linear")
    assert lin.head.weight.abs().sum() == 0 and lin.head.bias.abs().sum() == 0
    assert isinstance(lin.pre_logits, torch.nn.Identity) and lin.num_features == 64
    mlp = small(head="mlp", representation_size=32)
    assert mlp.pre_logits.fc.weight.abs().sum() > 0 and mlp.head.weight.abs().sum() == 0
    assert mlp.num_features == 32
    f = mlp.forward_features(torch.randn(2, 3, 16, 16))
    assert f.shape == (2, 32) and f.abs().max() <= 1  # after tanh
    mlp.reset_head(7)
    assert isinstance(mlp.pre_logits, torch.nn.Identity) and mlp.head.weight.shape == (7, 64)
    assert mlp.head.weight.abs().sum() == 0 and mlp.num_features == 64


# ---------------------------------------------------------------------------------------------------
# resize


def test_resize_identity_and_timm_match():
    from timm.layers import resample_abs_pos_embed
    m = small(img_size=16)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert resize(m, 16) is m
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    want = resample_abs_pos_embed(m.pos_embed.table.detach(), new_size=[8, 8], num_prefix_tokens=1,
                                  interpolation="bilinear", antialias=False)
    resize(m, 32)
    assert m.img_size == 32 and m.grid_size == (8, 8)
    assert torch.allclose(m.pos_embed.table, want, atol=1e-6)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(ValueError, match="divisible"):
        resize(m, 30)


@pytest.mark.parametrize("kw", [dict(pos_embed="none"), dict(pos_embed="2d"), dict(pos_embed="relative"),
                                dict(pos_embed="1d", pos_embed_at="every_layer"),
                                dict(pos_embed="2d", pos_embed_at="every_layer_shared"),
                                dict(pos_embed="1d", pool="gap")])
def test_resize_every_kind_runs(kw):
    m = small(**kw)
    resize(m, 24)
    logits, attns = m(torch.randn(1, 3, 24, 24), return_attention=True)
    assert logits.shape == (1, 5) and attns[0].shape[-1] == 36 + (kw.get("pool", "token") == "token")
    if kw["pos_embed"] == "relative":
        assert m.rel_bias[0].table.shape[0] == 2 * 36 - 1
    if kw["pos_embed"] == "2d":
        assert m.position_embeddings().shape == (6, 6, 64)


def test_resize_hybrid_and_bit():
    h = small("R14x0.25+ViT-Nano/4", img_size=32)
    resize(h, 64)
    assert h.grid_size == (16, 16) and h(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    b = small("BiT-R14x0.25", img_size=32)
    assert resize(b, 48).img_size == 48


# ---------------------------------------------------------------------------------------------------
# bad inputs


def test_bad_inputs():
    with pytest.raises(ValueError, match="divisible"):
        create_model("ViT-B/16", img_size=100)
    with pytest.raises(ValueError, match="divisible"):
        create_model("R50+ViT-B/16", img_size=200)
    with pytest.raises(ValueError, match="unknown model name"):
        create_model("ViT-X/16")
    with pytest.raises(ValueError, match="unknown model name"):
        create_model("ResNet50")
    with pytest.raises(ValueError, match="unknown model name"):
        create_model("R50+ViT-B/12")
    with pytest.raises(TypeError, match="colour"):
        create_model("ViT-Nano/4", colour=1)
    with pytest.raises(TypeError, match="pos_embed"):
        create_model("BiT-R14x0.25", pos_embed="1d")
    with pytest.raises(ValueError, match="pos_embed_at"):
        create_model("ViT-Nano/4", pos_embed="none", pos_embed_at="every_layer")
    with pytest.raises(ValueError, match="pos_embed_at"):
        create_model("ViT-Nano/4", pos_embed="relative", pos_embed_at="every_layer_shared")
    with pytest.raises(ValueError, match="pool"):
        create_model("ViT-Nano/4", pool="max")
    with pytest.raises(ValueError, match="head"):
        create_model("ViT-Nano/4", head="conv")


# ---------------------------------------------------------------------------------------------------
# flops


@pytest.mark.parametrize("name, img, kw", [
    ("ViT-Micro/4", 32, {}),
    ("ViT-Nano/4", 32, dict(pos_embed="relative", pool="gap", head="linear")),
    ("R26x0.25+ViT-Micro/8", 64, {}),
    ("BiT-R26x0.25", 64, {}),
])
def test_flops_match_counter(name, img, kw):
    m = small(name, img_size=img, **kw)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        # attention as explicit matmuls, which the counter sees (a fused SDPA kernel it would not count)
        m(torch.randn(1, 3, img, img), **({} if name.startswith("BiT") else {"return_attention": True}))
    measured = counter.get_total_flops()
    assert abs(flops(m) - measured) / measured < 0.05
    assert flops(m, img * 2) > 3 * flops(m)


def test_flops_b16_paper_scale():
    with torch.device("meta"):
        m = create_model("ViT-B/16")
    # ~17.6 GFLOPs (multiply-add = 2) for B/16 at 224
    assert math.isclose(flops(m), 35.1e9, rel_tol=0.03)


@pytest.mark.parametrize("kw", [dict(pos_embed="relative"), dict(pos_embed="2d", pos_embed_at="every_layer"),
                                dict(pool="gap", head="mlp", representation_size=16)])
def test_native_checkpoint_round_trip(tmp_path, kw):
    src = randomize_head(small("ViT-Nano/4", **kw))
    torch.save(src.state_dict(), tmp_path / "m.pth")
    dst = small("ViT-Nano/4", **kw)
    with torch.no_grad():
        for p in dst.parameters():
            p.normal_()
    load_pretrained(dst, str(tmp_path / "m.pth"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(src(x), dst(x), atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# the class-token-only last block (token pooling reads z_L^0 alone)


@pytest.mark.parametrize("name, kw", [
    ("ViT-Nano/4", {}),
    ("ViT-Micro/4", dict(pos_embed="2d", pos_embed_at="every_layer")),
    ("R14x0.25+ViT-Nano/4", {}),
])
def test_cls_only_last_block_same_logits_and_gradients(name, kw):
    m = small(name, img_size=16, **kw)
    randomize_head(m)
    assert m.cls_only_last_block()
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2])

    def run(flag):
        m.last_block_cls_only = flag
        m.zero_grad()
        logits = m(x)
        torch.nn.functional.cross_entropy(logits, y).backward()
        return logits.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}

    (l_fast, g_fast), (l_full, g_full) = run(True), run(False)
    torch.testing.assert_close(l_fast, l_full, rtol=1e-5, atol=1e-6)
    assert g_fast.keys() == g_full.keys() == {k for k, _ in m.named_parameters()}  # every weight still trains
    for k in g_full:
        torch.testing.assert_close(g_fast[k], g_full[k], rtol=1e-3, atol=1e-5, msg=k)  # float summation order differs
    # the tokens and attentions used by the analysis are unaffected
    m.last_block_cls_only = True
    tokens, att = m.forward_tokens(x, return_attention=True)
    assert tokens.shape[1] == m.grid_size[0] * m.grid_size[1] + 1 and len(att) == m.depth


@pytest.mark.parametrize("kw", [dict(pool="gap", head="linear"), dict(pos_embed="relative")])
def test_cls_only_last_block_not_used_where_it_does_not_apply(kw):
    m = small("ViT-Nano/4", **kw)
    assert not m.cls_only_last_block()
    assert flops(m, executed=True) == flops(m)


def test_executed_flops_match_counter():
    m = small("ViT-Micro/4", img_size=32)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(torch.randn(1, 3, 32, 32))  # on the CPU attention is explicit matmuls, which the counter sees
    n, d = m.grid_size[0] * m.grid_size[1] + 1, m.dim
    attention = (m.depth - 1) * 2 * 2 * n * n * d + 2 * 2 * n * d  # last block: one query
    measured = counter.get_total_flops()
    assert math.isclose(measured, flops(m, executed=True), rel_tol=1e-3)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), mock.patch.object(vit, "attend", _sdpa_attend):
        m(torch.randn(1, 3, 32, 32))  # a fused kernel the counter cannot see: only the attention is missing
    assert math.isclose(counter.get_total_flops() + attention, flops(m, executed=True), rel_tol=1e-3)
    assert flops(m, executed=True) < 0.9 * flops(m)  # a 6-layer model saves most of one layer


def _sdpa_attend(q, k, v, bias=None, drop=0.0, return_attention=False):
    assert not return_attention
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop), None


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("nq", [17, 1])
def test_attend_matches_sdpa_forward_backward_and_bf16(with_bias, nq):
    """vit.attend (explicit on the CPU, chosen for speed) against torch's fused SDPA kernel."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, nq, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(3, 2, 17, 16, generator=g, requires_grad=True) for _ in range(2))
    bias = torch.randn(3, 2, nq, 17, generator=g, requires_grad=True) if with_bias else None
    tensors = [t for t in (q, k, v, bias) if t is not None]

    def grads(fn):
        out = fn(q, k, v, bias)
        (out * torch.arange(out.numel()).reshape(out.shape).sin()).sum().backward()
        gs = [t.grad.clone() for t in tensors]
        for t in tensors:
            t.grad = None
        return out.detach(), gs

    ours, g_ours = grads(lambda *a: vit.attend(*a)[0])
    ref, g_ref = grads(lambda *a: _sdpa_attend(*a)[0])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    out, attn = vit.attend(q, k, v, bias, return_attention=True)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 2, nq))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = vit.attend(q, k, v, bias)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)


def test_r10_is_the_deprecated_name_of_r14():
    """depth = 3 x blocks + 2: one bottleneck per stage is 14 layers (timm's resnet14t layout). The old
    name still builds the same network, with a deprecation warning naming the new one."""
    from vitrepro.models.registry import parse_name

    assert parse_name("BiT-R14x0.25").resnet.blocks == (1, 1, 1, 1)
    assert 3 * sum(parse_name("BiT-R14x0.25").resnet.blocks) + 2 == 14
    with pytest.warns(DeprecationWarning, match="R14x0.25"):
        old = parse_name("BiT-R10x0.25")
    assert old.resnet == parse_name("BiT-R14x0.25").resnet
    with pytest.warns(DeprecationWarning):
        a = create_model("R10x0.25+ViT-Nano/4", img_size=16)
    b = create_model("R14x0.25+ViT-Nano/4", img_size=16)
    assert [p.shape for p in a.state_dict().values()] == [p.shape for p in b.state_dict().values()]
