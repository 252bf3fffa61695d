"""Training-throughput benchmark: vitrepro's ViT against timm's, and against the machine's matmul peak.

    python -m benchmarks.bench                       # default models, fp32 + bf16, CPU (+ CUDA if present)
    python -m benchmarks.bench --quick               # a seconds-long check (what tests/test_bench.py runs)
    python -m benchmarks.bench --models ViT-Nano/7:28:1:128 --precisions fp32 --devices cpu
    python -m benchmarks.bench --sweep               # sweep throughput per layout (benchmarks/bench_sweep.py)

For every (device, model configuration, precision), in one process:

* **throughput**: full training steps (autocast forward, cross-entropy, backward, gradient clipping at
  norm 1, AdamW step, zero_grad -- the trainer's step) of a vitrepro ViT (``create_model``) and of
  ``timm.models.vision_transformer.VisionTransformer`` built with the identical configuration (width,
  depth, heads, MLP ratio, patch, resolution, channels, classes, class token, LayerNorm eps 1e-6, no
  dropout) and loaded with the *same weights* (checked: equal parameter counts and equal logits). Both
  get the same synthetic batch, the same optimizer and the same precision. After warm-up the two are
  timed in interleaved repeats (the order alternates), each repeat ``--steps`` steps between device
  synchronisations; images/s is the median over repeats, and ``ratio`` = vitrepro / timm, the median of
  the per-repeat ratios (robust to load changing during the run). timm runs twice: with its default fused
  attention (``F.scaled_dot_product_attention``) and with its explicit attention path (``fused_attn =
  False``); ``ratio_vs_best_timm`` compares with the faster of the two, repeat by repeat, since which one
  wins depends on the device (on CPUs the explicit one, on GPUs the fused one).
* **FLOP/s**: 3 x ``vitrepro.models.flops(model, img_size)`` x images/s (forward + backward ~ 3 forwards),
  and its fraction of the **peak**: the best dense square matmul rate measured in the same run, same
  device, threads and dtype (fp32 tensors for fp32; bf16 tensors for bf16).
* **matmul kernels**: every matmul-like kernel one vitrepro training step dispatches (mm, addmm, bmm and,
  on GPUs, the fused attention kernels, forward and backward, after autocast chose their dtype) is recorded with
  its shapes, strides and dtype (a ``TorchDispatchMode``) and replayed alone. Their summed time gives the
  share of the step spent in matmuls, and the fraction of peak the step would reach if everything else
  were free: the ceiling that the kernels themselves set at the model's own (small) shapes.
* **data wait**: training the vitrepro model through the trainer's data path (``vitrepro.data.Batches``
  over Fashion-MNIST from ``$VITREPRO_DATA``, or scikit-learn digits if absent, with the trainer's
  ``crop_flip`` augmentation by default): the share of step time spent inside ``Batches.next()``
  (fetch + preprocess + augment), device-synchronised on CUDA.

``--models BiT-R14x0.25:28:1:128`` compares a BiT ResNet with ``timm.models.resnetv2.ResNetV2`` the same way
(vitrepro's BiT is built on it, so the ratio measures only the head and the interface).

Results go to ``<out>/<device-kind>.json`` and ``.md`` (written atomically), with the machine described.
Configurations whose estimated time exceeds ``--budget`` seconds are shortened (fewer steps), and skipped
with a reason when even one warm-up step each would not fit (e.g. bf16 ViT-B/16 on a CPU without bf16
instructions); ``--no-skip`` measures them anyway.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BenchConfig", "parse_model_spec", "machine_info", "matmul_peak", "capture_matmuls", "time_matmuls",
           "bench_config", "main"]

# The cpu profiles' ViTs with their batch size (vitrepro/experiments/*.py: all train at batch 64), ViT-Mini/4
# (width 192, depth 6 at 28 px: the configuration the performance issue quotes timm at) and the paper's
# ViT-B/16 at 224 px (few steps on a CPU); on CUDA also the gpu profiles' ViT-S/4. Fashion-MNIST, 1 channel.
DEFAULT_MODELS = {
    "cpu": ["ViT-Nano/7:28:1:64", "ViT-Micro/7:28:1:64", "ViT-Nano/4:28:1:64", "ViT-Micro/4:28:1:64",
            "ViT-Mini/4:28:1:64", "ViT-B/16:224:3:4"],
    "cuda": ["ViT-Nano/7:28:1:64", "ViT-Micro/7:28:1:64", "ViT-Nano/4:28:1:64", "ViT-Micro/4:28:1:64",
             "ViT-Mini/4:28:1:64", "ViT-S/4:32:3:512", "ViT-B/16:224:3:128"],
}
QUICK_MODELS = ["ViT-Nano/7:28:1:16"]


@dataclass(frozen=True)
class BenchConfig:
    model: str
    img_size: int
    in_chans: int
    batch: int
    num_classes: int = 10

    @property
    def label(self) -> str:
        return f"{self.model} {self.img_size}px {self.in_chans}ch"


def parse_model_spec(spec: str, batch_override: int | None = None) -> BenchConfig:
    """``NAME[:IMG_SIZE[:IN_CHANS[:BATCH]]]``, e.g. ``ViT-Nano/7:28:1:128`` (defaults 224, 3, 32)."""
    parts = spec.split(":")
    if not 1 <= len(parts) <= 4 or not parts[0]:
        raise ValueError(f"bad model spec {spec!r}: expected NAME[:IMG_SIZE[:IN_CHANS[:BATCH]]]")
    try:
        nums = [int(p) for p in parts[1:]]
    except ValueError:
        raise ValueError(f"bad model spec {spec!r}: IMG_SIZE, IN_CHANS and BATCH are integers") from None
    img, chans, batch = (nums + [224, 3, 32][len(nums):])[:3]
    if batch_override:
        batch = batch_override
    if img <= 0 or chans not in (1, 3) or batch <= 0:
        raise ValueError(f"bad model spec {spec!r}: need IMG_SIZE > 0, IN_CHANS 1 or 3, BATCH > 0")
    return BenchConfig(parts[0], img, chans, batch)


# ---------------------------------------------------------------------------------------------- machine
# The machine description and the matmul peak live in vitrepro/machine.py (the sweep benchmark uses them too).
from .machine_info import CPU_FLAGS_OF_INTEREST, _best_time, _cpuinfo, _sync, machine_info, matmul_peak  # noqa: E402,F401


# ---------------------------------------------------------------------------------------------- models

def _timm_twin(ours: nn.Module, cfg: BenchConfig) -> nn.Module:
    """timm's own model class with the identical configuration (weights copied by the caller)."""
    from functools import partial

    from vitrepro.models.bit import STAGE_CHANNELS, BiTResNet, group_norm
    from vitrepro.models.vit import VisionTransformer

    if isinstance(ours, VisionTransformer):
        from timm.models.vision_transformer import VisionTransformer as TimmViT
        if ours.pos_embed_kind != "1d" or ours.pool != "token" or ours.pos_embed_at != "stem":
            raise ValueError(f"{cfg.model}: the timm comparison needs a plain ViT (token pool, 1-D position embedding)")
        if not hasattr(ours.patch_embed, "patch_size"):
            raise ValueError(f"{cfg.model}: hybrids have no timm VisionTransformer twin here")
        return TimmViT(
            img_size=cfg.img_size, patch_size=ours.patch_embed.patch_size, in_chans=cfg.in_chans,
            num_classes=cfg.num_classes, global_pool="token", embed_dim=ours.dim, depth=ours.depth,
            num_heads=ours.num_heads, mlp_ratio=ours.blocks[0].mlp.fc1.out_features / ours.dim, qkv_bias=True,
            class_token=True, drop_rate=0.0, pos_drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=0.0,
            drop_path_rate=0.0, weight_init="skip")
    if isinstance(ours, BiTResNet):
        from timm.layers import StdConv2d
        from timm.models.resnetv2 import ResNetV2
        from vitrepro.models.registry import parse_name
        spec = parse_name(cfg.model).resnet
        return ResNetV2(layers=list(spec.blocks), channels=STAGE_CHANNELS, num_classes=cfg.num_classes,
                        in_chans=cfg.in_chans, global_pool="avg", width_factor=spec.width, stem_type="fixed",
                        preact=True, conv_layer=partial(StdConv2d, eps=1e-8), norm_layer=group_norm(spec.width))
    raise ValueError(f"{cfg.model}: no timm twin for {type(ours).__name__}")


def _timm_unfused(theirs: nn.Module) -> nn.Module | None:
    """A copy of timm's ViT with its explicit attention (q k^T, softmax, v) instead of the fused SDPA kernel
    it uses by default (timm's Attention.fused_attn flag, as TIMM_FUSED_ATTN=0 sets it); None for models
    without that flag (ResNets)."""
    import copy
    if not any(hasattr(m, "fused_attn") for m in theirs.modules()):
        return None
    twin = copy.deepcopy(theirs)
    for m in twin.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return twin


def build_pair(cfg: BenchConfig, device: torch.device, seed: int = 0) -> tuple[nn.Module, nn.Module, dict]:
    """(vitrepro model, timm model with the identical configuration and the same weights, check report).

    ViTs are compared with timm.models.vision_transformer.VisionTransformer, BiT ResNets with
    timm.models.resnetv2.ResNetV2 (which vitrepro's BiT builds on)."""
    from vitrepro.models import create_model
    from vitrepro.models.weights import ours_to_timm

    torch.manual_seed(seed)
    opts = dict(img_size=cfg.img_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes, head="linear",
                drop_rate=0.0, drop_path_rate=0.0)
    if not cfg.model.startswith("BiT-"):
        opts["attn_drop_rate"] = 0.0
    # head="linear": timm's ViT has no tanh pre-logits layer; the two are otherwise the same network.
    ours = create_model(cfg.model, **opts)
    theirs = _timm_twin(ours, cfg)
    # Same weights in both (the head is zero-initialised in ours: give it values so logits are informative).
    with torch.no_grad():
        ours.head.weight.normal_(0, 0.2)
    missing = theirs.load_state_dict(ours_to_timm(ours.state_dict(), ours), strict=True)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    check = {"params": n_ours, "timm_params": n_theirs, "timm_class": f"{type(theirs).__module__}.{type(theirs).__name__}",
             "load": str(missing)}
    if n_ours != n_theirs:
        raise AssertionError(f"{cfg.model}: parameter counts differ: vitrepro {n_ours}, timm {n_theirs}")
    ours.eval(), theirs.eval()
    with torch.no_grad():
        x = torch.rand(2, cfg.in_chans, cfg.img_size, cfg.img_size) * 2 - 1
        want = theirs(x)
        diff = (ours(x) - want).abs().max().item()
    check["max_logit_diff_fp32"], check["max_logit_fp32"] = diff, want.abs().max().item()
    if not diff <= 1e-4 * max(1.0, check["max_logit_fp32"]):
        raise AssertionError(f"{cfg.model}: vitrepro and timm logits differ by {diff}")
    return ours.to(device).train(), theirs.to(device).train(), check


def make_optimizer(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.1) -> torch.optim.Optimizer:
    """The trainer's ``adam`` optimizer (vitrepro.train), built the same way for both models."""
    try:
        from vitrepro.train import TrainConfig, _make_optimizer
        return _make_optimizer(model, TrainConfig(optimizer="adam", lr=lr, weight_decay=weight_decay, steps=10))
    except (ImportError, AttributeError, TypeError):  # the trainer's helper moved: its documented optimizer
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            skip = p.ndim < 2 or any(k in name for k in ("pos_embed", "cls_token"))
            (no_decay if skip else decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def train_step(model, opt, x, y, amp_dtype, device_type: str, grad_clip: float | None = 1.0):
    """One full training step, as the trainer does it (no host synchronisation)."""
    with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


# ---------------------------------------------------------------------------------------------- measuring

# The kernels whose FLOPs vitrepro.models.flops counts: dense matmuls (linear layers, the patch embedding
# as a matmul, their backward products) and the fused attention kernel (QK^T and AV).
_MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm")


@dataclass(frozen=True)
class _TensorMeta:
    """The layout of a recorded tensor argument (a pytree leaf, unlike a tuple)."""
    size: tuple
    stride: tuple
    dtype: torch.dtype
    device: torch.device


def _is_matmul(func) -> bool:
    name = func._schema.name.split("::")[-1]
    return name in _MATMUL_OPS or name.startswith("_scaled_dot_product") or name.startswith("_efficient_attention") \
        or name.startswith("_flash_attention")


def capture_matmuls(fn) -> list[dict]:
    """Run ``fn()`` once and record every matmul-like kernel it dispatches (forward and backward, after
    autocast has chosen the dtype): op, and shape/stride/dtype of each tensor argument. Returns the unique
    calls with their counts."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map

    def meta(a):
        if isinstance(a, torch.Tensor):
            return _TensorMeta(tuple(a.shape), tuple(a.stride()), a.dtype, a.device)
        return a

    seen: dict[str, dict] = {}

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if _is_matmul(func):
                a, k = tree_map(meta, args), tree_map(meta, kwargs)
                key = f"{func}|{a}|{k}"
                if key in seen:
                    seen[key]["count"] += 1
                else:
                    seen[key] = {"op": func._schema.name.split("::")[-1], "func": func, "args": a, "kwargs": k, "count": 1}
            return func(*args, **kwargs)

    with Recorder():
        fn()
    return list(seen.values())


def _materialise(a, gen: torch.Generator):
    """A tensor with the recorded shape, strides (including broadcast strides of 0) and dtype."""
    if not isinstance(a, _TensorMeta):
        return a
    size, stride, dtype, device = a.size, a.stride, a.dtype, a.device
    n = 1 + sum((s - 1) * st for s, st in zip(size, stride) if s > 0) if all(size) else 0
    if dtype.is_floating_point:
        base = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
    else:
        base = torch.zeros(n, dtype=dtype, device=device)
    return base.as_strided(size, stride)


def time_matmuls(calls: list[dict], device: torch.device, min_time: float = 0.02, repeats: int = 3) -> dict:
    """Replay each recorded kernel alone on fresh tensors of the same layout; the matmul time of one step is
    sum(count x best time). What a step would take if everything else (norms, GELU, softmax outside SDPA,
    casts, optimizer) were free: the ceiling the kernels themselves set on the fraction of peak."""
    from torch.utils._pytree import tree_map
    gen = torch.Generator().manual_seed(0)
    total, per_op = 0.0, {}
    for c in calls:
        args = tree_map(lambda a: _materialise(a, gen), c["args"])
        kwargs = tree_map(lambda a: _materialise(a, gen), c["kwargs"])
        fn = lambda: c["func"](*args, **kwargs)  # noqa: E731
        best = _best_time(fn, device, min_time, repeats=repeats, max_reps=200)
        total += c["count"] * best
        name = c["op"]
        per_op[name] = per_op.get(name, 0.0) + c["count"] * best
    return {"matmul_s": total, "per_op_s": per_op, "unique_calls": len(calls),
            "calls": sum(c["count"] for c in calls),
            "dtypes": sorted({str(a.dtype).replace("torch.", "") for c in calls for a in c["args"]
                              if isinstance(a, _TensorMeta) and a.dtype.is_floating_point})}


def _load_train_arrays(dataset: str):
    from vitrepro.data import DataError, load_arrays
    try:
        return load_arrays(dataset, "train"), None
    except (DataError, OSError, ImportError) as e:  # no local copy and no Hub: fall back to digits
        if dataset == "digits":
            raise
        return load_arrays("digits", "train"), f"{dataset} unavailable ({type(e).__name__}); used digits"


def _time_steps(fn, n: int, device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(device)
    return time.perf_counter() - t


def bench_config(cfg: BenchConfig, precision: str, device: torch.device, peak: float, args, arrays,
                 log=print) -> dict:
    """One benchmark row: ours vs timm (and timm's unfused attention) training steps of one configuration,
    timed in alternating repeats within ``args.budget``; then the matmul share of our step and the data wait."""
    from vitrepro.models import flops
    amp = torch.bfloat16 if precision == "bf16" else None
    row = {"model": cfg.model, "img_size": cfg.img_size, "in_chans": cfg.in_chans, "batch": cfg.batch,
           "precision": precision, "device": device.type}
    ours, theirs, check = build_pair(cfg, device, seed=args.seed)
    fwd = flops(ours, cfg.img_size)
    # What each implementation computes per image: timm runs every token through every block; ours
    # runs the last block for the class token only when pooling by token (same logits, fewer FLOPs).
    executed = {"vitrepro": flops(ours, cfg.img_size, executed=True), "timm": fwd, "timm_unfused": fwd}
    row.update(check=check, flops_per_image=fwd, train_flops_per_image=3 * fwd,
               executed_flops_per_image=executed)
    protocol = _protocol(row, 3 * fwd * cfg.batch, peak, args, log)
    if protocol is None:
        return row
    steps, repeats, warmup = protocol
    g = torch.Generator().manual_seed(args.seed)
    x = (torch.rand(cfg.batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g) * 2 - 1).to(device)
    y = torch.randint(0, cfg.num_classes, (cfg.batch,), generator=g).to(device)
    impls = {"vitrepro": ours, "timm": theirs}
    unfused = _timm_unfused(theirs)
    if unfused is not None:  # timm's other attention path: its best may be either on a given machine
        impls["timm_unfused"] = unfused
    opts = {k: make_optimizer(m) for k, m in impls.items()}
    o = opts["vitrepro"]
    row["optimizer"] = (f"{type(o).__name__}(fused={o.defaults.get('fused')}, foreach={o.defaults.get('foreach')}), "
                        "grad clip 1.0")
    fns = {k: (lambda m=m, o=opts[k]: train_step(m, o, x, y, amp, device.type)) for k, m in impls.items()}
    step_s = _time_alternating(row, fns, steps, repeats, warmup, cfg.batch, executed, peak, args, device)
    row["matmuls"] = _matmul_share(fns["vitrepro"], cfg.batch / row["vitrepro"]["images_per_s"],
                                   3 * executed["vitrepro"] * cfg.batch, peak, device)
    del opts, fns, theirs, impls, unfused
    row["data"] = data_wait(ours, cfg, amp, device, arrays, args, step_s)
    _log_row(row, log)
    return row


def _protocol(row: dict, train_flops_per_step: float, peak: float, args, log) -> tuple[int, int, int] | None:
    """(steps per repeat, repeats, warm-up steps) that fit ``args.budget`` at an estimated half of the matmul
    peak; None (the row says why) when even the shortest protocol would take over twice the budget."""
    steps, repeats, warmup = args.steps, args.repeats, args.warmup
    est = train_flops_per_step / (0.5 * peak)  # seconds per step at half the matmul peak
    row["estimated_step_s"] = est
    if 2 * est * (warmup + repeats * steps) > args.budget:
        steps, warmup = 1, 1
        repeats = max(2, min(repeats, int(args.budget / (2 * est)) - 1))
    if est * (2 * (1 + 2) + 3) > 2 * args.budget and not args.no_skip:  # even the shortest protocol
        row.update(skipped=f"estimated {est:.0f} s per step (3 x {row['flops_per_image'] / 1e9:.2f} GFLOP x batch "
                           f"{row['batch']} at 50% of the measured {peak / 1e9:.1f} GFLOP/s peak): even the shortest "
                           f"protocol (9 steps) would take over twice --budget {args.budget:.0f} s")
        log(f"  skip: {row['skipped']}")
        return None
    return steps, repeats, warmup


def _time_alternating(row: dict, fns: dict, steps: int, repeats: int, warmup: int, batch: int, executed: dict,
                      peak: float, args, device: torch.device) -> float:
    """Warm up every implementation, then time them in repeats whose order alternates; the speeds and the
    ratios go into ``row``. Returns the slowest implementation's best warm-up step time (seconds)."""
    t_budget = time.perf_counter()
    warm = {k: [_time_steps(fns[k], 1, device) for _ in range(warmup)] for k in fns}
    step_s = max(min(v) for v in warm.values())
    # Fit the timed repeats into what is left of the budget (at least 1 step x 2 repeats).
    left = args.budget - (time.perf_counter() - t_budget)
    fit = int(left / (2 * step_s * repeats)) if step_s > 0 else steps
    if fit < steps:
        steps = max(1, fit)
        if fit < 1:
            repeats = max(2, min(repeats, int(left / (2 * step_s))))
    times = {k: [] for k in fns}
    order = list(fns)
    for r in range(repeats):
        for k in (order if r % 2 == 0 else order[::-1]):
            times[k].append(_time_steps(fns[k], steps, device))
    for k in fns:
        ips = [steps * batch / t for t in times[k]]
        med = statistics.median(ips)
        row[k] = {"images_per_s": med, "step_ms": 1e3 * batch / med, "repeat_images_per_s": ips,
                  "warmup_step_s": warm[k], "flops_per_s": 3 * executed[k] * med,
                  "fraction_of_peak": 3 * executed[k] * med / peak}
    # The ratio is the median of the per-repeat ratios: each pair of repeats ran back to back, so a change
    # of the load on the machine during the run affects both sides of a pair alike.
    paired = [a / b for a, b in zip(row["vitrepro"]["repeat_images_per_s"], row["timm"]["repeat_images_per_s"])]
    row.update(steps_per_repeat=steps, repeats=repeats, warmup=warmup, ratio=statistics.median(paired),
               repeat_ratios=paired,
               ratio_of_medians=row["vitrepro"]["images_per_s"] / row["timm"]["images_per_s"])
    if "timm_unfused" in row:
        # Against the faster of timm's two attention paths, repeat by repeat.
        best = [max(a, b) for a, b in zip(row["timm"]["repeat_images_per_s"], row["timm_unfused"]["repeat_images_per_s"])]
        row["ratio_vs_best_timm"] = statistics.median(a / b for a, b in zip(row["vitrepro"]["repeat_images_per_s"], best))
    return step_s


def _matmul_share(step_fn, step_s: float, executed_flops_per_step: float, peak: float, device: torch.device) -> dict:
    """How much of our step is matmul kernels, and the fraction of peak those kernels allow at this model's
    own shapes (the peak is measured on large square products; small-K products run slower)."""
    mm = time_matmuls(capture_matmuls(step_fn), device)
    mm.update(share_of_step=mm["matmul_s"] / step_s, ceiling_flops_per_s=executed_flops_per_step / mm["matmul_s"])
    mm["ceiling_fraction_of_peak"] = mm["ceiling_flops_per_s"] / peak
    return mm


def _log_row(row: dict, log) -> None:
    mm = row["matmuls"]
    unf = (f" (unfused attention {row['timm_unfused']['images_per_s']:.1f}, ratio to the faster "
           f"{row['ratio_vs_best_timm']:.3f})") if "timm_unfused" in row else ""
    log(f"  vitrepro {row['vitrepro']['images_per_s']:.1f} img/s, timm {row['timm']['images_per_s']:.1f} img/s{unf}, "
        f"ratio {row['ratio']:.3f}, {row['vitrepro']['flops_per_s'] / 1e9:.1f} GFLOP/s = "
        f"{100 * row['vitrepro']['fraction_of_peak']:.1f}% of the start peak; matmul kernels "
        f"{100 * mm['share_of_step']:.0f}% of the step, alone {100 * mm['ceiling_fraction_of_peak']:.1f}% of the peak; "
        f"data wait {100 * row['data']['wait_fraction']:.1f}%")


def data_wait(model, cfg: BenchConfig, amp, device: torch.device, arrays, args, step_s: float) -> dict:
    """Train `model` on batches from vitrepro.data.Batches; time inside Batches.next() vs the whole step."""
    from vitrepro.data import Batches
    batch = min(cfg.batch, len(arrays))
    batches = Batches(arrays, batch, cfg.img_size, cfg.in_chans, augment=args.augment, seed=args.seed,
                      device=device)
    opt = make_optimizer(model)
    n = max(2, min(args.data_steps, int(args.budget / 3 / max(step_s, 1e-6))))
    fetch, total = [], []
    for i in range(n + 1):  # the first step is a warm-up (new input shapes, allocator)
        _sync(device)
        t0 = time.perf_counter()
        xb, yb = batches.next()
        _sync(device)
        t1 = time.perf_counter()
        train_step(model, opt, xb, yb, amp, device.type)
        _sync(device)
        t2 = time.perf_counter()
        if i:
            fetch.append(t1 - t0)
            total.append(t2 - t0)
    return {"dataset": arrays.name, "augment": args.augment, "steps": n, "batch": batch,
            "fetch_ms": 1e3 * sum(fetch) / n, "step_ms": 1e3 * sum(total) / n,
            "wait_fraction": sum(fetch) / sum(total)}


# ---------------------------------------------------------------------------------------------- output

def _atomic_write(path: Path, text: str) -> None:
    from vitrepro.store import atomic_write
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


def _ips(v: float) -> str:
    """images/s with ~3 significant digits for the slow rows (ViT-B/16 on a CPU: 0.3 img/s)."""
    return f"{v:.1f}" if v >= 100 else f"{v:.3g}"


def _pct(row: dict, key: str) -> str:
    v = row.get("matmuls", {}).get(key)
    return "—" if v is None else f"{100 * v:.1f}"


def to_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# vitrepro training benchmark: {m['device_kind']}", ""]
    if m["device_kind"] == "cuda":
        lines.append(f"- GPU: {m.get('gpu')} (capability {m.get('gpu_capability')}, {m.get('gpu_memory_gib')} GiB, "
                     f"CUDA {m.get('cuda')}, TF32 matmul {m.get('tf32_matmul')})")
    flags = ", ".join(f for f, on in m["cpu_flags"].items() if on) or "unknown"
    lines += [
        f"- CPU: {m['cpu']}; {m['cpu_count']} logical cores ({m['cpus_usable']} usable); torch threads "
        f"{m['torch_threads']}; glibc malloc tuned as in the trainer: {m.get('malloc_tuned')}",
        f"- CPU flags: {flags}; native bf16 (AVX512-BF16/AMX): {'yes' if m['cpu_bf16_native'] else 'no'}",
        f"- torch {m['torch']}, timm {m['timm']}, Python {m['python']}; {m['platform']}",
        f"- started {result['started']}, took {result['wall_s']:.0f} s; command `{result['command']}`",
    ]
    for prec, p in result["peak"].items():
        lines.append(f"- measured {prec} matmul peak: {p['flops_per_s'] / 1e9:.1f} GFLOP/s (best of all the "
                     f"measurements in the run: start, between configurations, end; n={p['size']}, {p['op']}; GFLOP/s per size/op: {p['per_size_gflops']})")
    lines += ["", "| model | precision | batch | vitrepro img/s | timm img/s | ratio | timm unfused img/s | "
                  "ratio to faster timm | GFLOP/s | % of peak | timm % of peak | matmul % of step | "
                  "matmul-only % of peak | data-wait % |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for r in result["rows"]:
        name = f"{r['model']} @{r['img_size']}px×{r['in_chans']}"
        if "skipped" in r or "error" in r:
            why = r.get("skipped") or r.get("error")
            notes.append(f"- {name} {r['precision']}: {'skipped' if 'skipped' in r else 'failed'}: {why}")
            lines.append(f"| {name} | {r['precision']} | {r['batch']} |" + " — |" * 11)
            continue
        ours, theirs = r["vitrepro"], r["timm"]
        unfused = _ips(r["timm_unfused"]["images_per_s"]) if "timm_unfused" in r else "—"
        vs_best = f"{r['ratio_vs_best_timm']:.3f}" if "ratio_vs_best_timm" in r else "—"
        lines.append(
            f"| {name} | {r['precision']} | {r['batch']} | {_ips(ours['images_per_s'])} | {_ips(theirs['images_per_s'])} | "
            f"{r['ratio']:.3f} | {unfused} | {vs_best} | "
            f"{ours['flops_per_s'] / 1e9:.1f} | {100 * ours['fraction_of_peak']:.1f} | "
            f"{100 * theirs['fraction_of_peak']:.1f} | {_pct(r, 'share_of_step')} | "
            f"{_pct(r, 'ceiling_fraction_of_peak')} | {100 * r['data']['wait_fraction']:.1f} |")
    lines += ["", "Columns: images/s = median over interleaved repeats of full training steps (forward, loss, "
              "backward, clip, AdamW) after warm-up; ratio = vitrepro / timm (median of the per-repeat ratios; same "
              "configuration, same weights; timm with its default fused SDPA attention); timm unfused = timm's "
              "explicit attention path (Attention.fused_attn = False, as TIMM_FUSED_ATTN=0), ratio to faster timm = "
              "vitrepro over the faster of the two per repeat; "
              "GFLOP/s = 3 × the forward FLOPs vitrepro executes (vitrepro.models.flops(model, executed=True): "
              "its last block runs for the class token only) × vitrepro images/s; % of peak = that over the "
              "matmul peak of the same precision; timm % of peak = the same for timm, whose forward runs every token "
              "through every block (flops(model)); matmul % of step = the time of the step's matmul kernels "
              "(every mm/addmm/bmm and fused-attention call of one vitrepro training step, forward and backward, "
              "recorded with their shapes, strides and dtypes and replayed alone) over the step time; matmul-only "
              "% of peak = the executed FLOPs over that matmul time, over the peak: the fraction of peak the step "
              "would reach if everything but the matmul kernels were free, i.e. the ceiling the kernels set at this "
              "model's own (small) shapes; data-wait % = share of a trainer-data-path step "
              "(vitrepro.data.Batches, fetch + preprocess + augment) spent waiting for the batch."]
    if notes:
        lines += ["", "Notes:"] + notes
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main

def run_device(device: torch.device, args, log=print) -> dict:
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.perf_counter()
    models = args.models or (QUICK_MODELS if args.quick else DEFAULT_MODELS["cuda" if device.type == "cuda" else "cpu"])
    cfgs = [parse_model_spec(s, args.batch_size) for s in models]
    info = machine_info(device)
    info["malloc_tuned"] = getattr(args, "malloc_tuned", False)
    log(f"[bench] {device.type}: {info.get('gpu') or info['cpu']}, torch threads {info['torch_threads']}")
    if device.type == "cuda":
        sizes = (1024, 2048) if args.quick else (2048, 4096, 8192)
    else:
        sizes = (128, 256) if args.quick else (128, 256, 512, 1024, 2048)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peak = {}
    for prec in args.precisions:
        peak[prec] = matmul_peak(device, dtypes[prec], sizes, min_time=0.05 if args.quick else 0.25)
        peak[prec]["start_flops_per_s"] = peak[prec]["flops_per_s"]
        log(f"[bench] {prec} matmul peak {peak[prec]['flops_per_s'] / 1e9:.1f} GFLOP/s {peak[prec]['per_size_gflops']}")
    arrays, note = _load_train_arrays(args.dataset)
    if note:
        log(f"[bench] {note}")
    rows = []
    for cfg in cfgs:
        for prec in args.precisions:
            log(f"[bench] {cfg.label} batch {cfg.batch} {prec}")
            try:
                rows.append(bench_config(cfg, prec, device, peak[prec]["flops_per_s"], args, arrays, log))
            except Exception as e:  # noqa: BLE001 - recorded in the table, the run goes on
                if args.strict:
                    raise
                log(f"  failed: {type(e).__name__}: {e}")
                rows.append({"model": cfg.model, "img_size": cfg.img_size, "in_chans": cfg.in_chans,
                             "batch": cfg.batch, "precision": prec, "device": device.type,
                             "error": f"{type(e).__name__}: {e}"})
            # Re-measure the peak (best size only) between configurations: with other load on the
            # machine, the best of several measurements is the closest to what the machine can do.
            again = matmul_peak(device, dtypes[prec], (peak[prec]["size"],), min_time=0.1)
            peak[prec].setdefault("between_flops_per_s", []).append(again["flops_per_s"])
            if again["flops_per_s"] > peak[prec]["flops_per_s"]:
                peak[prec]["flops_per_s"] = again["flops_per_s"]
    # The peak again at the end (other load on the machine may have changed): the best measurement counts.
    for prec in args.precisions:
        again = matmul_peak(device, dtypes[prec], sizes, min_time=0.05 if args.quick else 0.25)
        peak[prec]["end_flops_per_s"] = again["flops_per_s"]
        if again["flops_per_s"] > peak[prec]["flops_per_s"]:
            peak[prec].update({k: again[k] for k in ("flops_per_s", "size", "op", "per_size_gflops")})
        log(f"[bench] {prec} matmul peak at the end {again['flops_per_s'] / 1e9:.1f} GFLOP/s; "
            f"using {peak[prec]['flops_per_s'] / 1e9:.1f}")
    for r in rows:
        for impl in ("vitrepro", "timm", "timm_unfused"):
            if impl in r:
                r[impl]["fraction_of_peak"] = r[impl]["flops_per_s"] / peak[r["precision"]]["flops_per_s"]
        if "matmuls" in r:
            r["matmuls"]["ceiling_fraction_of_peak"] = (r["matmuls"]["ceiling_flops_per_s"]
                                                        / peak[r["precision"]]["flops_per_s"])
    result = {"machine": info, "peak": peak, "rows": rows, "started": started,
              "wall_s": time.perf_counter() - t0, "command": " ".join(["python -m benchmarks.bench", *args.argv]),
              "settings": {k: v for k, v in vars(args).items() if k != "argv"}, "data_note": note}
    out = Path(args.out)
    _atomic_write(out / f"{device.type}.json", json.dumps(result, indent=1, default=str) + "\n")
    _atomic_write(out / f"{device.type}.md", to_markdown(result))
    log(f"[bench] wrote {out / (device.type + '.json')} and .md")
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", metavar="SPEC",
                   help="NAME[:IMG_SIZE[:IN_CHANS[:BATCH]]], e.g. ViT-Nano/7:28:1:128 (default: the cpu-profile "
                        "models and ViT-B/16:224:3)")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"],
                   help="default: fp32 and bf16; with --sweep, the one precision the trainer's 'auto' picks here")
    p.add_argument("--devices", nargs="+", choices=["cpu", "cuda"],
                   help="default: cpu, plus cuda when available")
    p.add_argument("--batch-size", type=int, help="override every model's batch size")
    p.add_argument("--steps", type=int, default=5, help="training steps per timed repeat")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per implementation (median taken)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per implementation")
    p.add_argument("--data-steps", type=int, default=10, help="steps through the trainer data path")
    p.add_argument("--budget", type=float, default=120.0,
                   help="seconds per (model, precision); longer configurations are shortened or skipped")
    p.add_argument("--no-skip", action="store_true", help="never skip a configuration for its estimated time")
    p.add_argument("--dataset", default="fashion_mnist", help="data-path dataset (digits if unavailable)")
    p.add_argument("--augment", default="crop_flip", help="data-path augmentation (vitrepro.data.AUGMENTATIONS)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "results" / "benchmarks"))
    p.add_argument("--quick", action="store_true", help="a seconds-long check: one tiny model, few steps")
    p.add_argument("--strict", action="store_true", help="raise on the first failing configuration")
    g = p.add_argument_group("sweep benchmark (benchmarks/bench_sweep.py)")
    g.add_argument("--sweep", action="store_true", help="aggregate sweep throughput per layout (process pool, "
                   "one process, compiled, stacked) instead of the vitrepro-vs-timm table")
    g.add_argument("--sweep-models", nargs="+", metavar="NAME", help="default: ViT-Nano/4 ViT-Nano/7 ViT-Micro/7")
    g.add_argument("--jobs", type=int, default=6, help="runs (seeds) per model in the sweep")
    g.add_argument("--sweep-steps", type=int, default=30, help="timed steps per run")
    g.add_argument("--sweep-warmup", type=int, default=3, help="untimed steps per run (compiling included)")
    g.add_argument("--sweep-workers", type=int, help="processes of the pool layouts (default: the cores)")
    g.add_argument("--layouts", nargs="+", help="measure only these layouts (pool is always measured)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.steps, args.repeats, args.warmup = min(args.steps, 2), min(args.repeats, 2), 1
        args.data_steps = min(args.data_steps, 3)
        args.budget = min(args.budget, 20.0)
    return args


def _tune_allocator() -> bool:
    """The trainer's CPU allocator setting (vitrepro.machine.tune_cpu_allocator), for both implementations."""
    try:
        from vitrepro.machine import tune_cpu_allocator
    except ImportError:
        return False
    return tune_cpu_allocator()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sweep:
        from . import bench_sweep
        return bench_sweep.main(args)
    args.precisions = args.precisions or ["fp32", "bf16"]
    if args.threads:
        torch.set_num_threads(args.threads)
    args.malloc_tuned = _tune_allocator() if "cpu" in (args.devices or ["cpu"]) else False
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        print("[bench] cuda requested but not available", file=sys.stderr)
        return 2
    for d in devices:
        run_device(torch.device(d), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
