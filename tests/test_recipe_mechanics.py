"""The training recipe's mechanics, each against an expectation written here (from the paper, big_vision or
torch), never by calling the trainer's own code path:

* learning-rate schedule: values at chosen steps, worked out by hand, of big_vision's schedule
  (big_vision/utils.py ``create_learning_rate_schedule``: lr * min(1, step / warmup) times the cosine /
  linear decay over progress = (step - warmup) / (total - warmup), called with the update count from 0);
* which parameters get weight decay, per parameter-name pattern, on every model family;
* gradient clipping at a global norm, gradient accumulation and label smoothing, observed *inside* the
  trainer: hooks record the batch it drew, the model it trains and the gradients it hands to the optimizer,
  and a copy of the model recomputes them independently.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from vitrepro import data
from vitrepro.models import create_model
from vitrepro.models.bit import BiTResNet
from vitrepro.models.vit import VisionTransformer
from vitrepro.train import TrainConfig, lr_at, run

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py




# Deterministic, fp32, SGD (its first update is linear in the gradient), no decay / clipping / smoothing
# unless a test turns it on.
BASE = {"experiment": "mech", "model": "ViT-Nano/4", "dataset": "digits", "batch_size": 32, "optimizer": "sgd",
        "lr": 0.1, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0, "grad_clip": None,
        "label_smoothing": 0.0, "precision": "fp32", "drop_rate": 0.0, "attn_drop_rate": 0.0,
        "drop_path_rate": 0.0, "augment": "none", "evaluators": [], "log_every": 1, "checkpoint_every": None}


# ------------------------------------------------------------------------------------------ recording


class _Recording:
    def __init__(self):
        self.model = None       # the network the trainer trains (the live object)
        self.batches = []       # (x, y) of every Batches.next()
        self.steps = []         # per optimizer step: lrs, grads, the model before the update


@contextlib.contextmanager
def recording(monkeypatch):
    """Watch one trainer run from outside: the batches it draws (vitrepro.data.Batches.next), the model it
    trains (the first vitrepro model whose forward runs in training mode), and at every optimizer step the
    learning rates, the gradients it hands to the optimizer and a copy of the model before the update."""
    rec = _Recording()
    orig_next = data.Batches.next

    def next_(self):
        x, y = orig_next(self)
        rec.batches.append((x.detach().clone(), y.detach().clone()))
        return x, y

    def on_forward(module, args):
        if rec.model is None and module.training and isinstance(module, (VisionTransformer, BiTResNet)):
            rec.model = module

    def on_step(opt, args, kwargs):
        assert rec.model is not None, "the optimizer stepped before any model forward was seen"
        grads = {n: p.grad.detach().clone() for n, p in rec.model.named_parameters() if p.grad is not None}
        before = copy.deepcopy(rec.model)
        for p in before.parameters():
            p.grad = None
        rec.steps.append({"lrs": [g["lr"] for g in opt.param_groups], "grads": grads, "model": before})

    monkeypatch.setattr(data.Batches, "next", next_)
    h1 = torch.nn.modules.module.register_module_forward_pre_hook(on_forward)
    h2 = register_optimizer_step_pre_hook(on_step)
    try:
        yield rec
    finally:
        h1.remove()
        h2.remove()
        monkeypatch.setattr(data.Batches, "next", orig_next)


def _train(monkeypatch, store, **overrides):
    with recording(monkeypatch) as rec:
        record = run({**BASE, **overrides}, store, progress="none")
    assert record["status"] == "ok"
    assert len(rec.steps) == record["steps"] == len(rec.batches)
    return rec, record


def _reference_grads(model, x, y, loss_fn):
    """Gradients of loss_fn(model(x), y) on a copy of `model` (full batch, no accumulation, no clipping)."""
    ref = copy.deepcopy(model).train()
    loss = loss_fn(ref(x), y)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in ref.named_parameters() if p.grad is not None}, loss.item()


def _assert_grads_close(got, want, rtol, atol, what):
    assert set(got) == set(want), what
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=rtol, atol=atol, msg=lambda m: f"{what}: {n}: {m}")


def _global_norm(grads):
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))


# ------------------------------------------------------------------------------------------ lr schedule

# (schedule, step, lr / base lr) for warmup 4 of 12 steps, worked out by hand:
#   warm-up: step / 4 (0-based update count, as optax's scale_by_schedule counts: the first update has lr 0);
#   then progress p = (step - 4) / 8: cosine 0.5 (1 + cos(pi p)), linear 1 - p, constant 1.
HAND = [
    ("cosine", 0, 0.0), ("cosine", 1, 0.25), ("cosine", 2, 0.5), ("cosine", 3, 0.75), ("cosine", 4, 1.0),
    ("cosine", 6, 0.5 * (1 + math.sqrt(0.5))),         # p = 1/4: 0.8535533905932737
    ("cosine", 8, 0.5), ("cosine", 10, 0.5 * (1 - math.sqrt(0.5))),  # p = 3/4: 0.1464466094067262
    ("cosine", 11, 0.5 * (1 + math.cos(7 * math.pi / 8))),             # the last update: 0.0380602337443566
    ("linear", 0, 0.0), ("linear", 2, 0.5), ("linear", 4, 1.0), ("linear", 6, 0.75), ("linear", 8, 0.5),
    ("linear", 10, 0.25), ("linear", 11, 0.125),
    ("constant", 0, 0.0), ("constant", 3, 0.75), ("constant", 4, 1.0), ("constant", 11, 1.0),
]


@pytest.mark.parametrize("schedule, step, want", HAND)
def test_lr_schedule_values_at_chosen_steps(schedule, step, want):
    cfg = TrainConfig.from_dict({"steps": 12, "warmup_steps": 4, "lr": 3e-3, "schedule": schedule})
    assert lr_at(step, cfg, 12) == pytest.approx(3e-3 * want, rel=1e-12, abs=1e-15)


def test_lr_schedule_without_warmup_starts_at_the_base_rate():
    for schedule, first, mid in (("cosine", 1.0, 0.5), ("linear", 1.0, 0.5), ("constant", 1.0, 1.0)):
        cfg = TrainConfig.from_dict({"steps": 10, "warmup_steps": 0, "lr": 0.5, "schedule": schedule})
        assert lr_at(0, cfg, 10) == pytest.approx(0.5 * first)
        assert lr_at(5, cfg, 10) == pytest.approx(0.5 * mid)


def test_trainer_applies_the_schedule_at_every_step(monkeypatch, run_store):
    """The learning rate each optimizer step actually ran with (read from the optimizer's groups) and the
    one logged for it: the hand values above, step by step."""
    rec, record = _train(monkeypatch, run_store, steps=12, warmup_steps=4, schedule="cosine", lr=0.01,
                         batch_size=16)
    applied = [r["lrs"] for r in rec.steps]
    assert len(applied) == 12 and all(len(set(lrs)) == 1 for lrs in applied)  # all groups at one rate
    for schedule, step, want in HAND:
        if schedule == "cosine":
            assert applied[step][0] == pytest.approx(0.01 * want, rel=1e-12, abs=1e-15), step
    logged = [r["lr"] for r in run_store.metrics("mech", record["run_id"]) if "lr" in r]
    assert logged == pytest.approx([lrs[0] for lrs in applied], rel=1e-12, abs=1e-15)


# ------------------------------------------------------------------------------------------ weight decay

# The paper's recipe (and big_vision's default wd_mults ".*/kernel$", big_vision/optax.py): weight decay on
# dense matrices and conv kernels only. Every parameter name must match exactly one pattern.
DECAYED = [
    r"(^|.*\.)conv\d?\.weight",                 # ResNet convs: stem.conv, conv1-3, downsample.conv
    r"(^|.*\.)patch_embed\.proj\.weight",       # patch embedding (conv / 1x1 conv of the hybrid)
    r"blocks\.\d+\.attn\.(qkv|proj)\.weight",
    r"blocks\.\d+\.mlp\.fc[12]\.weight",
    r"pre_logits\.fc\.weight",
    r"head\.weight",
]
NOT_DECAYED = [
    r".*\.bias",                                # every bias
    r"(^|.*\.)norm\d?\.weight",                 # LayerNorm / GroupNorm scales
    r"cls_token",
    r"(pos_embed|shared_pos_embed)\.(table|x_table|y_table|prefix)",  # 1-D table, 2-D axis tables, class pos
    r"layer_pos_embed\.\d+\.(table|x_table|y_table|prefix)",          # every_layer: one per block
    r"rel_bias\.\d+\.(table|cls_table)",       # relative position tables
]

FAMILIES = [
    ("ViT-Nano/4", {"pos_embed": "1d"}),
    ("ViT-Nano/4", {"pos_embed": "2d"}),
    ("ViT-Nano/4", {"pos_embed": "relative"}),
    ("ViT-Nano/4", {"pos_embed": "none", "pool": "gap"}),
    ("ViT-Nano/4", {"pos_embed": "1d", "pos_embed_at": "every_layer"}),
    ("ViT-Nano/4", {"pos_embed": "2d", "pos_embed_at": "every_layer"}),
    ("ViT-Nano/4", {"pos_embed": "2d", "pos_embed_at": "every_layer_shared"}),
    ("R14x0.25+ViT-Nano/4", {}),
    ("BiT-R14x0.25", {}),
    ("BiT-R14x0.25", {"head": "mlp"}),
]


def _expected_decay(name: str) -> bool:
    hits = [True for p in DECAYED if re.fullmatch(p, name)] + [False for p in NOT_DECAYED if re.fullmatch(p, name)]
    assert len(hits) == 1, f"{name}: matches {len(hits)} patterns; classify it in DECAYED / NOT_DECAYED"
    return hits[0]


@pytest.mark.parametrize("name, opts", FAMILIES, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_weight_decay_split(name, opts):
    from vitrepro.train import _make_optimizer
    torch.manual_seed(0)
    model = create_model(name, img_size=16, num_classes=5, **opts)
    opt = _make_optimizer(model, TrainConfig.from_dict({"steps": 10, "weight_decay": 0.3, "optimizer": "adam"}))
    wd_of = {}
    for g in opt.param_groups:
        for p in g["params"]:
            assert id(p) not in wd_of, "a parameter in two groups"
            wd_of[id(p)] = g["weight_decay"]
    named = dict(model.named_parameters())
    assert len(wd_of) == len(named), "every trainable parameter in exactly one group"
    kinds = set()
    for n, p in named.items():
        want = 0.3 if _expected_decay(n) else 0.0
        assert wd_of[id(p)] == want, f"{name} {opts}: {n} {tuple(p.shape)} weight_decay {wd_of[id(p)]}, want {want}"
        kinds.add(want)
    assert kinds == {0.0, 0.3}


def test_weight_decay_is_decoupled_and_scaled_by_lr():
    """AdamW (Loshchilov & Hutter): with a zero gradient a step multiplies a decayed parameter by
    (1 - lr * wd) and leaves the others unchanged."""
    from vitrepro.train import _make_optimizer
    torch.manual_seed(0)
    model = create_model("ViT-Nano/4", img_size=8, in_chans=1, num_classes=3, pos_embed="2d")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = _make_optimizer(model, TrainConfig.from_dict({"steps": 10, "weight_decay": 0.5, "lr": 0.1}))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if _expected_decay(n) else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor, rtol=1e-6, atol=1e-7, msg=n)


# ------------------------------------------------------------------------------------------ clipping


def _plain_ce(logits, y):
    return F.cross_entropy(logits, y)


@pytest.mark.parametrize("clip", [0.01, 1e6])
def test_trainer_clips_the_global_gradient_norm(monkeypatch, run_store, clip):
    """Two steps (the second has gradients everywhere: the zero-initialised head has moved). At each, the
    gradient the optimizer receives equals the full-batch gradient of a copy scaled by min(1, clip / norm),
    and equals torch.nn.utils.clip_grad_norm_ applied to that copy. clip=0.01 is below every norm here
    (asserted), so an unclipped trainer fails; clip=1e6 must leave the gradient unchanged."""
    rec, _ = _train(monkeypatch, run_store, steps=2, grad_clip=clip)
    for i, (step, (x, y)) in enumerate(zip(rec.steps, rec.batches)):
        raw, _ = _reference_grads(step["model"], x, y, _plain_ce)
        norm = _global_norm(raw)
        if clip < 1:
            assert norm > 10 * clip, f"step {i}: norm {norm} too small for the test to see clipping"
        scale = min(1.0, clip / (norm + 1e-6))
        by_hand = {n: g * scale for n, g in raw.items()}
        _assert_grads_close(step["grads"], by_hand, 1e-4, 1e-7, f"step {i} vs hand-clipped")
        ref = copy.deepcopy(step["model"]).train()
        F.cross_entropy(ref(x), y).backward()
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), clip)
        torch_clipped = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        _assert_grads_close(step["grads"], torch_clipped, 1e-4, 1e-7, f"step {i} vs clip_grad_norm_")
        if clip < 1:
            assert _global_norm(step["grads"]) == pytest.approx(clip, rel=1e-4)


# ------------------------------------------------------------------------------------------ accumulation


@pytest.mark.parametrize("model", ["ViT-Nano/4", "BiT-R14x0.25"])
def test_accumulation_equals_one_large_batch(monkeypatch, run_store, model):
    """batch_size=32, accum_steps=4 (4 micro-batches of 8) == accum_steps=1 (one batch of 32): same data,
    and at each of two steps the same gradient (fp32, rtol 1e-4 / atol 1e-6: only the summation order
    differs) and the same logged loss; both equal the full-batch gradient of a copy. GroupNorm (BiT) has no
    batch statistics, so the equality holds for the ResNet too."""
    extra = {"img_size": 16, "attn_drop_rate": None} if model.startswith("BiT") else {}  # a ResNet: no attention
    one, rec1 = _train(monkeypatch, run_store, model=model, steps=2, accum_steps=1, **extra)
    acc, rec4 = _train(monkeypatch, run_store, model=model, steps=2, accum_steps=4, **extra)
    for (x1, y1), (x4, y4) in zip(one.batches, acc.batches):
        assert torch.equal(x1, x4) and torch.equal(y1, y4)
    for i, (s1, s4, (x, y)) in enumerate(zip(one.steps, acc.steps, one.batches)):
        ref, _ = _reference_grads(s1["model"], x, y, _plain_ce)
        assert _global_norm(ref) > 0
        _assert_grads_close(s1["grads"], ref, 1e-4, 1e-6, f"{model} step {i}: accum 1 vs full batch")
        _assert_grads_close(s4["grads"], s1["grads"], 1e-4, 1e-6, f"{model} step {i}: accum 4 vs accum 1")
    l1 = [r["loss"] for r in run_store.metrics("mech", rec1["run_id"]) if "loss" in r]
    l4 = [r["loss"] for r in run_store.metrics("mech", rec4["run_id"]) if "loss" in r]
    assert len(l1) == 2 and l4 == pytest.approx(l1, rel=1e-5)


# ------------------------------------------------------------------------------------------ label smoothing


def _smoothed_ce(eps):
    """Label smoothing (Szegedy et al. 2016) as torch defines it: the target is (1 - eps) one-hot + eps / K
    uniform, so loss_i = -(1 - eps) log p_i[y_i] - (eps / K) sum_k log p_i[k], averaged over the batch."""
    def loss(logits, y):
        logp = torch.log_softmax(logits.float(), dim=-1)
        k = logits.shape[-1]
        nll = -logp.gather(1, y[:, None])[:, 0]
        return ((1 - eps) * nll - (eps / k) * logp.sum(-1)).mean()
    return loss


def test_hand_label_smoothing_equals_torch():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(7, 5, generator=g) * 3, torch.randint(0, 5, (7,), generator=g)
    for eps in (0.0, 0.1, 0.4):
        assert float(_smoothed_ce(eps)(logits, y)) == pytest.approx(
            float(F.cross_entropy(logits, y, label_smoothing=eps)), rel=1e-6)


def test_trainer_uses_label_smoothing(monkeypatch, run_store):
    """With label_smoothing=0.2 the trainer's gradients and logged loss are those of the hand-written smoothed
    loss on the same batch, and differ from the unsmoothed ones by far more than the tolerance."""
    rec, record = _train(monkeypatch, run_store, steps=2, label_smoothing=0.2)
    losses = [r["loss"] for r in run_store.metrics("mech", record["run_id"]) if "loss" in r]
    for i, (step, (x, y)) in enumerate(zip(rec.steps, rec.batches)):
        want, want_loss = _reference_grads(step["model"], x, y, _smoothed_ce(0.2))
        plain, plain_loss = _reference_grads(step["model"], x, y, _smoothed_ce(0.0))
        _assert_grads_close(step["grads"], want, 1e-4, 1e-7, f"step {i}: smoothed")
        assert losses[i] == pytest.approx(want_loss, rel=1e-5)
        # the gradients differ from the first step on; the losses only once the logits are no longer all
        # zero (the head is zero-initialised, and smoothing leaves the loss of uniform predictions at log K)
        assert max(float((want[n] - plain[n]).abs().max()) for n in want) > 1e-3
        if i > 0:
            assert abs(want_loss - plain_loss) > 1e-3, (want_loss, plain_loss)
