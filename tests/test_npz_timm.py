"""Our weights against an implementation we did not write: timm.

* our ``.npz`` export (vitrepro.models.weights.timm_to_npz, the official vit_jax / BiT layout) is read by
  timm's *own* npz readers (``timm.models.vision_transformer._load_weights`` for ViT and R+ViT hybrids,
  ``timm.models.resnetv2._load_weights`` for BiT) into timm models built here with matching arguments, and
  gives the same logits as our model. Every timm parameter starts as NaN (so one that timm did not load
  shows), and every exported array must be read by timm (so a misnamed or superfluous one shows).
* the success path of ``load_pretrained(model, "timm:<name>.<tag>")`` offline: a random timm model saved in
  a local Hugging Face cache layout is what timm's pretrained loading finds, and our model then gives
  timm's logits.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from vitrepro.models import create_model, load_pretrained
from vitrepro.models.weights import ours_to_timm, timm_to_npz

timm = pytest.importorskip("timm")
from timm.layers import GroupNormAct, StdConv2d, StdConv2dSame  # noqa: E402
from timm.models import resnetv2 as timm_resnetv2  # noqa: E402
from timm.models import vision_transformer as timm_vit  # noqa: E402
from timm.models.vision_transformer_hybrid import HybridEmbed  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py




def _randomise(model, seed=0):
    """Every parameter random at a sensible scale (heads are zero-initialised, norms are ones): so that a
    weight that is dropped, transposed or misplaced changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(r * p[0].numel() ** -0.5)
            elif n.endswith("weight"):
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(0.1 * r)
    return model.eval()


def _export_npz(model, path):
    arrays = timm_to_npz(ours_to_timm(model.state_dict(), model), num_heads=getattr(model, "num_heads", None))
    np.savez(path, **arrays)
    return set(arrays)


def _nan_(model):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return model


# timm models written out here with the architecture our registry names (registry.py / hybrid.py / bit.py
# docstrings): ViT-Nano = D 64, 4 layers, MLP 256, 2 heads; R14 = one bottleneck per stage, R26 = two;
# width 0.25 -> 8 GroupNorm groups (32 x width); hybrid stride 4 keeps 1 stage (blocks 1+1+1+1), stride 8
# keeps 2 (blocks 2, 2+2+2).
def _timm_vit(img, pool="token", **kw):
    return timm_vit.VisionTransformer(
        img_size=img, patch_size=kw.pop("patch_size", 4), in_chans=3, num_classes=5, embed_dim=kw.pop("dim", 64),
        depth=kw.pop("depth", 4), num_heads=kw.pop("heads", 2), mlp_ratio=4.0, qkv_bias=True,
        class_token=pool == "token", global_pool="token" if pool == "token" else "avg", fc_norm=False,
        weight_init="skip", **kw)


def _timm_hybrid(img, layers, dim=64, depth=4, heads=2):
    backbone = timm_resnetv2.ResNetV2(
        layers=list(layers), channels=(256, 512, 1024, 2048)[:len(layers)], num_classes=0, global_pool="",
        in_chans=3, width_factor=0.25, preact=False, stem_type="same",
        conv_layer=partial(StdConv2dSame, eps=1e-8), norm_layer=partial(GroupNormAct, num_groups=8))
    return _timm_vit(img, patch_size=1, embed_layer=partial(HybridEmbed, backbone=backbone), dim=dim,
                     depth=depth, heads=heads)


def _timm_bit(layers):
    return timm_resnetv2.ResNetV2(
        layers=list(layers), channels=(256, 512, 1024, 2048), num_classes=5, in_chans=3, global_pool="avg",
        width_factor=0.25, stem_type="fixed", preact=True, conv_layer=partial(StdConv2d, eps=1e-8),
        norm_layer=partial(GroupNormAct, num_groups=8))


CASES = [
    # (our name, our options, timm builder, timm's npz reader, img size)
    ("ViT-Nano/4", {"head": "linear"}, lambda: _timm_vit(16), timm_vit._load_weights, 16),
    ("ViT-Nano/4", {"head": "linear", "pool": "gap"}, lambda: _timm_vit(16, pool="gap"), timm_vit._load_weights, 16),
    ("R14x0.25+ViT-Nano/4", {"head": "linear"}, lambda: _timm_hybrid(16, (4,)), timm_vit._load_weights, 16),
    ("R26x0.25+ViT-Micro/8", {"head": "linear"}, lambda: _timm_hybrid(32, (2, 6), dim=128, depth=6, heads=4),
     timm_vit._load_weights, 32),
    ("BiT-R14x0.25", {}, lambda: _timm_bit((1, 1, 1, 1)), timm_resnetv2._load_weights, 32),
]


@pytest.mark.parametrize("name, opts, build_timm, timm_load, img", CASES,
                         ids=["vit-token", "vit-gap", "hybrid-R14-s4", "hybrid-R26-s8", "bit-R14"])
def test_our_npz_read_by_timm_gives_our_logits(tmp_path, monkeypatch, name, opts, build_timm, timm_load, img):
    torch.manual_seed(0)
    ours = _randomise(create_model(name, img_size=img, num_classes=5, **opts))
    exported = _export_npz(ours, tmp_path / "w.npz")
    theirs = _nan_(build_timm()).eval()
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in theirs.parameters()), "not the same architecture"

    read = set()
    orig_getitem = np.lib.npyio.NpzFile.__getitem__

    def getitem(self, key):
        read.add(key)
        return orig_getitem(self, key)

    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", getitem)
    with torch.no_grad():
        timm_load(theirs, str(tmp_path / "w.npz"))
    monkeypatch.undo()

    assert not [n for n, p in theirs.named_parameters() if torch.isnan(p).any()], "not loaded by timm"
    assert exported <= read, f"exported but never read by timm: {sorted(exported - read)[:10]}"
    x = torch.rand(2, 3, img, img, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want, got = theirs(x), ours(x)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- timm:


def _hf_cache_snapshot(cache, repo_id, files: dict):
    """The Hugging Face hub cache layout (what hf_hub_download writes and, offline, reads):
    <cache>/models--<org>--<name>/refs/main holding a commit hash, snapshots/<hash>/<file>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, write in files.items():
        write(snap / name)


def test_timm_source_loads_offline_from_the_hub_cache(tmp_path, monkeypatch):
    """load_pretrained(model, "timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k") with the Hub unreachable
    (offline mode) and its weights in the local cache: a *random* timm model's, so the logits can only match
    if these very weights went through timm's pretrained loading into our ViT-Ti/16."""
    from huggingface_hub import constants
    from safetensors.torch import save_file

    tag = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    cfg = timm.models.get_pretrained_cfg(tag)
    assert cfg.hf_hub_id, "this tag is expected to be served from the Hugging Face Hub"
    torch.manual_seed(0)
    with torch.device("meta"):
        ref = timm.create_model(tag.split(".")[0], pretrained=False)
    ref = _randomise(ref.to_empty(device="cpu"))
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    cache = tmp_path / "hub"
    _hf_cache_snapshot(cache, cfg.hf_hub_id, {"model.safetensors": lambda p: save_file(sd, str(p))})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with torch.device("meta"):
        ours = create_model("ViT-Ti/16", num_classes=1000, head="linear")
    ours = _nan_(ours.to_empty(device="cpu")).eval()
    report = load_pretrained(ours, f"timm:{tag}")
    assert report["source"] == f"timm:{tag}" and "classifier loaded" in report["head"]
    assert report["resampled"] == []
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    # and with nothing in the cache, the same call fails (offline) with the documented message
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="could not get timm weights"):
        load_pretrained(ours, f"timm:{tag}")
