"""The trainer: one strictly validated configuration -> one stored, resumable run.

    from vitrepro.train import TrainConfig, run
    record = run({"experiment": "demo", "model": "ViT-Nano/4", "dataset": "digits", "steps": 300})

    python -m vitrepro.train experiment=demo model=ViT-Nano/4 dataset=digits steps=300
    torchrun --standalone --nproc_per_node=2 -m vitrepro.train ...      (DDP; gloo on CPU, NCCL on GPU)

Determinism: the model is initialised from ``seed``; the data order of epoch e comes from
(seed, e), the augmentation of a batch from (seed, epoch, index), and the dropout RNG is reseeded
from (seed, step, rank) before every step. So a run killed and resumed from its checkpoint ends
with exactly the parameters and metrics of an uninterrupted run (same device and world size).

Optimisers: ``adam`` = torch AdamW (β 0.9/0.999, eps 1e-8, decoupled weight decay, i.e. the
decay is multiplied by the current learning rate), the paper's pre-training optimiser (Table 3);
``sgd`` = plain momentum 0.9 (not Nesterov), the fine-tuning optimiser (App. B.1.1). Weight decay
applies to matrices / conv kernels only (not biases, norms, class token or position embeddings).
Schedule (``lr_at``, as big_vision): linear warmup from exactly 0 at step 0 to ``lr`` at step
``warmup_steps`` (lr * step / warmup_steps), then ``cosine`` or ``linear`` decay towards 0 at step
``steps`` (or ``constant``). Gradients are clipped at global norm ``grad_clip`` (paper: 1).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from . import __version__
from .data import AUGMENTATIONS, DATASETS, Batches, DataError, StreamBatches, ImageArrays, load_arrays, resolve_source, \
    train_val_split, balanced_subset, training_split
from .store import RunStore, atomic_torch_save, code_versions, run_id_for

__all__ = ["TrainConfig", "ConfigError", "DivergedError", "run", "run_many", "run_id_of", "resolved_identity", "main",
           "resolve_precision", "lr_at"]


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any compute and before anything is stored."""


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


_NONE = type(None)
# field -> allowed python types (after from_dict's int->float widening)
_TYPES: dict[str, tuple] = {}


@dataclass
class TrainConfig:
    experiment: str = "default"
    # model
    model: str = "ViT-Nano/4"
    pool: str | None = None                 # token | gap          (None: the model's default)
    pos_embed: str | None = None            # none | 1d | 2d | relative
    pos_embed_at: str | None = None         # stem | every_layer | every_layer_shared
    head: str | None = None                 # mlp | linear
    representation_size: int | None = None
    drop_rate: float | None = None
    attn_drop_rate: float | None = None
    drop_path_rate: float | None = None
    # data
    dataset: str = "digits"
    train_split: str = "train"
    train_examples: int | None = None       # None: all; else a class-balanced subset
    data_seed: int | None = None            # seed of the subset / validation draw (None: seed)
    val_fraction: float = 0.0               # hold out this fraction of train (stratified)
    eval_split: str = "test"                # "test" or "val" (the held-out part of train)
    img_size: int | None = None             # None: the dataset's image size
    in_chans: int | None = None             # None: the dataset's channels (3 when fine-tuning a 3-channel init)
    augment: str = "none"                   # none | flip | crop_flip | rrc_flip | auto
    # optimisation
    batch_size: int = 64                    # global batch
    accum_steps: int = 1
    steps: int | None = None
    epochs: float | None = None
    optimizer: str = "adam"                 # adam | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"                # cosine | linear | constant
    grad_clip: float | None = 1.0
    label_smoothing: float = 0.0
    precision: str = "auto"                 # auto | fp32 | bf16
    seed: int = 0
    # fine-tuning
    init: str | None = None                 # None | run:<experiment>/<run_id> | a load_pretrained source
    reset_head: bool | None = None          # None: True when init is given
    # evaluation, logging
    evaluators: list = field(default_factory=lambda: [{"type": "accuracy"}])
    eval_every: int | None = None           # also log eval accuracy every N steps
    select_on: str | None = None            # "val": keep the parameters with the best held-out accuracy
    select_every: int | None = None         # steps between those validation checks (None: once per epoch)
    snapshot_every: int | None = None       # also store the model every N steps (analysis over training)
    log_every: int = 50
    checkpoint_every: int | None = 100      # None: only at the end
    device: str = "auto"                    # auto | cpu | cuda | cuda:N

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        if isinstance(d, TrainConfig):
            return d
        if not isinstance(d, dict):
            raise ConfigError(f"a configuration is a dict, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in names]
        if unknown:
            msgs = []
            for k in unknown:
                close = difflib.get_close_matches(str(k), names, n=1, cutoff=0.5)
                msgs.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"unknown configuration key(s): {', '.join(msgs)}. Valid keys: {', '.join(names)}")
        kw = {}
        for k, v in d.items():
            allowed = _TYPES[k]
            if isinstance(v, tuple):
                v = list(v)
            if float in allowed and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
                want = " or ".join("None" if t is _NONE else t.__name__ for t in allowed)
                raise ConfigError(f"{k}={v!r}: expected {want}, got {type(v).__name__}")
            kw[k] = v
        cfg = cls(**kw)
        cfg.check()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def model_options(self) -> dict:
        keys = ("pool", "pos_embed", "pos_embed_at", "head", "representation_size", "drop_rate",
                "attn_drop_rate", "drop_path_rate")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def check(self) -> None:
        """Static checks (no I/O)."""
        def choice(name, options):
            v = getattr(self, name)
            if v not in options:
                close = difflib.get_close_matches(str(v), [str(o) for o in options], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{name}={v!r} is not one of {list(options)}{hint}")

        def positive(name, allow_none=False, strict=True):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if v is None or (v <= 0 if strict else v < 0):
                raise ConfigError(f"{name}={v!r} must be {'> 0' if strict else '>= 0'}")

        if not self.experiment or "/" in self.experiment or self.experiment.startswith("."):
            raise ConfigError(f"experiment={self.experiment!r} must be a non-empty name without '/'")
        choice("optimizer", ("adam", "sgd"))
        choice("schedule", ("cosine", "linear", "constant"))
        choice("precision", ("auto", "fp32", "bf16"))
        choice("augment", AUGMENTATIONS)
        if self.select_on not in (None, "val"):
            raise ConfigError(f"select_on={self.select_on!r}: use 'val' (the held-out part of train) or None; "
                              "a selection on the test split is not offered")
        if self.select_on == "val" and self.val_fraction <= 0:
            raise ConfigError("select_on='val' needs val_fraction > 0 (the held-out part of train)")
        positive("select_every", allow_none=True)
        positive("snapshot_every", allow_none=True)
        if self.eval_split == "val" and self.val_fraction <= 0:
            raise ConfigError("eval_split='val' needs val_fraction > 0 (the held-out part of train)")
        if not (0.0 <= self.val_fraction < 1.0):
            raise ConfigError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError("give exactly one of steps and epochs "
                              f"(got steps={self.steps!r}, epochs={self.epochs!r})")
        positive("steps", allow_none=True)
        positive("epochs", allow_none=True)
        positive("batch_size")
        positive("accum_steps")
        positive("lr")
        positive("log_every")
        positive("train_examples", allow_none=True)
        positive("img_size", allow_none=True)
        positive("checkpoint_every", allow_none=True)
        positive("eval_every", allow_none=True)
        positive("grad_clip", allow_none=True)
        for name in ("weight_decay", "warmup_steps"):
            positive(name, strict=False)
        if self.in_chans not in (None, 1, 3):
            raise ConfigError(f"in_chans={self.in_chans} must be 1, 3 or None")
        if not (0.0 <= self.label_smoothing < 1.0):
            raise ConfigError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.batch_size % self.accum_steps:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by accum_steps={self.accum_steps}")
        if self.steps is not None and self.warmup_steps >= self.steps and self.schedule != "constant":
            raise ConfigError(f"warmup_steps={self.warmup_steps} leaves no decay within steps={self.steps}")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")
                or self.device == "mps"):
            raise ConfigError(f"device={self.device!r}: use auto, cpu, cuda or cuda:N")
        from .evaluate import make_evaluator
        for e in self.evaluators:
            if not isinstance(e, dict):
                raise ConfigError(f"evaluators entries must be dicts like {{'type': 'accuracy'}}, got {e!r}")
            try:
                make_evaluator({"dataset": self.dataset, **e})
            except ValueError as err:
                raise ConfigError(str(err)) from err


_TYPES.update({
    "experiment": (str,), "model": (str,), "pool": (str, _NONE), "pos_embed": (str, _NONE),
    "pos_embed_at": (str, _NONE), "head": (str, _NONE), "representation_size": (int, _NONE),
    "drop_rate": (float, _NONE), "attn_drop_rate": (float, _NONE), "drop_path_rate": (float, _NONE),
    "dataset": (str,), "train_split": (str,), "train_examples": (int, _NONE), "data_seed": (int, _NONE),
    "val_fraction": (float,), "eval_split": (str,), "img_size": (int, _NONE), "in_chans": (int, _NONE),
    "augment": (str,), "batch_size": (int,), "accum_steps": (int,), "steps": (int, _NONE),
    "epochs": (float, _NONE), "optimizer": (str,), "lr": (float,), "weight_decay": (float,),
    "warmup_steps": (int,), "schedule": (str,), "grad_clip": (float, _NONE), "label_smoothing": (float,),
    "precision": (str,), "seed": (int,), "init": (str, _NONE), "reset_head": (bool, _NONE),
    "evaluators": (list,), "eval_every": (int, _NONE), "log_every": (int,),
    "select_on": (str, _NONE), "select_every": (int, _NONE), "snapshot_every": (int, _NONE),
    "checkpoint_every": (int, _NONE), "device": (str,),
})
assert set(_TYPES) == {f.name for f in dataclasses.fields(TrainConfig)}


# ---------------------------------------------------------------------- helpers

def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' only where bf16 is fast: CUDA with bf16 support, or a CPU with
    avx512_bf16 / amx_bf16 (on AVX2-only CPUs bf16 autocast is ~40x slower than fp32)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if _cpu_flags() & {"avx512_bf16", "amx_bf16"} else "fp32"
    return "fp32"


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based; ``total`` steps in all).

    As the official code: big_vision/utils.py ``create_learning_rate_schedule`` (and vit_jax/utils.py)
    multiplies by min(1, step / warmup_steps) and decays over progress = (step - w) / (total - w), and is
    called with the optimizer's update count, which starts at 0 (optax ``scale_by_schedule``; big_vision's
    train.py logs ``sched_fn(step - 1)`` for its 1-based update ``step``). So warm-up starts at exactly 0
    (the first update has lr 0) and reaches ``cfg.lr`` at step ``w``; linear decay ends at 0 (big_vision's
    default ``linear_end``)."""
    w = cfg.warmup_steps
    if step < w:
        return cfg.lr * step / w
    if cfg.schedule == "constant":
        return cfg.lr
    frac = (step - w) / max(1, total - w)
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - frac)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def _git_revision() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) if rev else None
    except Exception:  # noqa: BLE001
        return None


def _versions() -> dict:
    import numpy
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
           "vitrepro": __version__}
    for mod in ("timm", "datasets"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    return out


def _dist_env() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _resolve_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    d = torch.device(spec)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", local_rank)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={spec!r} but CUDA is not available")
    return d


def _progress_mode(progress: str) -> str:
    progress = os.environ.get("VITREPRO_PROGRESS", progress)
    if progress != "auto":
        return progress
    if os.environ.get("PAPERMILL_EXECUTION") or os.environ.get("PAPERMILL"):
        return "log"
    if "ipykernel" in sys.modules:
        return "bar"
    try:
        return "bar" if sys.stderr.isatty() else "log"
    except Exception:  # noqa: BLE001
        return "log"


def _seed_for(*parts: int) -> int:
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p) + 1) % (2**62)
    return s


# ---------------------------------------------------------------------- preparation

@dataclass
class _Plan:
    cfg: TrainConfig
    train: ImageArrays | None       # None: streamed
    evaluators: list
    img_size: int
    in_chans: int
    num_classes: int
    steps: int
    init_run: Path | None
    init_config: dict | None
    selector: Any = None            # Accuracy on the held-out split when cfg.select_on == "val"


def _prepare(cfg: TrainConfig, store: RunStore) -> _Plan:
    """Every check that needs I/O (data location, model shapes), before any compute or store write."""
    from . import models
    from .evaluate import Accuracy, FewShot, make_evaluator
    try:
        resolve_source(cfg.dataset)
        for e in cfg.evaluators:
            if e.get("dataset"):
                resolve_source(e["dataset"])
    except DataError as e:
        raise ConfigError(str(e)) from e
    try:
        models.parse_name(cfg.model)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if cfg.img_size:  # shape check before touching any data (num_classes does not matter here)
        _check_shapes(cfg, cfg.img_size, cfg.in_chans or 3, 10)
    init_run, init_config = None, None
    if cfg.init and not cfg.init.startswith(("run:", "timm:", "hf-hub:", "hf_hub:")) and not Path(cfg.init).exists():
        raise ConfigError(f"init={cfg.init!r}: no such file (use run:<experiment>/<run_id>, timm:<name>.<tag> "
                          "or a .pth/.safetensors/.npz path)")
    if cfg.init and cfg.init.startswith("run:"):
        try:
            init_run = store.resolve(cfg.init)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from e
        if not (init_run / "model.pt").exists():
            raise ConfigError(f"init={cfg.init!r}: that run has no model.pt (not finished?)")
        with open(init_run / "config.json") as f:
            init_config = json.load(f)
        if init_config["model"] != cfg.model:
            raise ConfigError(f"init={cfg.init!r} is a {init_config['model']} but model={cfg.model!r}")
    src = resolve_source(cfg.dataset)
    if src.spec is not None and src.spec.streaming:
        return _prepare_streamed(cfg, src, init_run, init_config)
    try:
        arrays = load_arrays(cfg.dataset, cfg.train_split)
    except DataError as e:
        raise ConfigError(str(e)) from e
    data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
    try:
        arrays, val = training_split(arrays, cfg.val_fraction, cfg.train_examples, data_seed)
    except DataError as e:
        raise ConfigError(f"{cfg.dataset}: {e}") from e
    if cfg.batch_size > len(arrays):
        raise ConfigError(f"batch_size={cfg.batch_size} exceeds the {len(arrays)} training examples")
    img_size = cfg.img_size or (init_config["_resolved"]["img_size"] if init_config else arrays.img_size)
    in_chans = cfg.in_chans or (init_config["_resolved"]["in_chans"] if init_config else
                                (3 if cfg.init else arrays.in_chans))
    num_classes = arrays.num_classes
    steps = cfg.steps if cfg.steps is not None else int(round(cfg.epochs * (len(arrays) // cfg.batch_size)))
    if steps <= 0:
        raise ConfigError(f"epochs={cfg.epochs} gives 0 steps with {len(arrays)} examples and batch {cfg.batch_size}")
    if cfg.warmup_steps >= steps and cfg.schedule != "constant":
        raise ConfigError(f"warmup_steps={cfg.warmup_steps} >= steps={steps}")
    _check_shapes(cfg, img_size, in_chans, num_classes)
    evaluators = []
    for e in cfg.evaluators:
        e = dict(e)
        if e.get("type") == "accuracy" and not e.get("dataset"):
            e["dataset"] = cfg.dataset
            e.setdefault("split", cfg.eval_split)
            if e["split"] == "val":
                evaluators.append(Accuracy(cfg.dataset, "val", arrays=val,
                                           **{k: v for k, v in e.items() if k not in ("type", "dataset", "split")}))
                continue
        if e.get("type") == "fewshot" and e.get("train_split") == "val":
            # shots from the held-out part of this run's training set: images the model never trained on
            if e.get("dataset", cfg.dataset) != cfg.dataset or val is None:
                raise ConfigError(f"few-shot train_split='val' draws its shots from the held-out part of "
                                  f"dataset={cfg.dataset!r}: give val_fraction > 0 and no other dataset")
            evaluators.append(FewShot(cfg.dataset, train_arrays=val,
                                      **{k: v for k, v in e.items() if k not in ("type", "dataset")}))
            continue
        e.setdefault("dataset", cfg.dataset)
        evaluators.append(make_evaluator(e))
    selector = None
    if cfg.select_on == "val":
        selector = Accuracy(cfg.dataset, "val", arrays=val)
    return _Plan(cfg, arrays, evaluators, img_size, in_chans, num_classes, steps, init_run, init_config, selector)


def _check_shapes(cfg: TrainConfig, img_size: int, in_chans: int, num_classes: int) -> None:
    """Build the model on the meta device (no memory, no compute) so that impossible shapes
    (patch size not dividing img_size, bad options) fail before anything runs."""
    from . import models
    try:
        with torch.device("meta"):
            models.create_model(cfg.model, img_size=img_size, in_chans=in_chans, num_classes=num_classes,
                                **cfg.model_options())
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model {cfg.model!r} at img_size={img_size}, in_chans={in_chans}: {e}") from e
    except (RuntimeError, NotImplementedError):
        pass  # an op without meta support: create_model validates its arguments before allocating


def _prepare_streamed(cfg: TrainConfig, src, init_run, init_config) -> _Plan:
    """Large datasets (imagenet-1k): streamed through `datasets`; steps only, no subsets."""
    from . import models
    from .evaluate import make_evaluator
    if cfg.steps is None:
        raise ConfigError(f"{cfg.dataset} is streamed: give steps, not epochs")
    if cfg.train_examples is not None or cfg.val_fraction > 0:
        raise ConfigError(f"{cfg.dataset} is streamed: train_examples and val_fraction are not supported; "
                          "use a split expression in train_split (e.g. 'train[:99%]')")
    img_size = cfg.img_size or (init_config["_resolved"]["img_size"] if init_config else 224)
    in_chans = cfg.in_chans or (init_config["_resolved"]["in_chans"] if init_config else 3)
    _check_shapes(cfg, img_size, in_chans, src.spec.num_classes)
    evs = [make_evaluator({"dataset": cfg.dataset, **({"split": cfg.eval_split} if e.get("type") == "accuracy"
                                                      else {}), **e}) for e in cfg.evaluators]
    return _Plan(cfg, None, evs, img_size, in_chans, src.spec.num_classes, cfg.steps, init_run, init_config)


def _build_model(plan: _Plan, device: torch.device):
    from . import models
    cfg = plan.cfg
    torch.manual_seed(cfg.seed)
    report = None
    if plan.init_run is not None:
        ic = plan.init_config
        r = ic["_resolved"]
        opts = {k: ic.get(k) for k in ("pool", "pos_embed", "pos_embed_at", "head", "representation_size",
                                        "drop_rate", "attn_drop_rate", "drop_path_rate") if ic.get(k) is not None}
        opts = {**{k: v for k, v in (r.get("arch") or {}).items() if v is not None}, **opts}  # inherited, complete
        opts.update(cfg.model_options())
        model = models.create_model(cfg.model, img_size=r["img_size"], in_chans=r["in_chans"],
                                    num_classes=r["num_classes"], **opts)
        state = torch.load(plan.init_run / "model.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        report = {"source": cfg.init}
        if r["img_size"] != plan.img_size:
            models.resize(model, plan.img_size)
        if cfg.reset_head is not False or r["num_classes"] != plan.num_classes:
            model.reset_head(plan.num_classes)
    else:
        model = models.create_model(cfg.model, img_size=plan.img_size, in_chans=plan.in_chans,
                                    num_classes=plan.num_classes, **cfg.model_options())
        if cfg.init:
            report = models.load_pretrained(model, cfg.init)
            if cfg.reset_head is not False:
                model.reset_head(plan.num_classes)
    return model.to(device), report


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(k in name for k in ("pos_embed", "cls_token", "rel_", "relative"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _fused_ok(model) -> bool:
    """torch's fused optimizer kernels (one kernel for all parameters) run on CPU and CUDA, fp32/bf16/fp16."""
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters())


def _make_optimizer(model, cfg: TrainConfig):
    # fused=True: the same update rule, computed in one multi-tensor kernel (on CPU ~5x faster than the
    # default per-parameter loop: 15 -> 3 ms per step for ViT-Nano, ~5% of its training step).
    groups = _param_groups(model, cfg.weight_decay)
    fused = True if _fused_ok(model) else None
    if cfg.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=False, fused=fused)


_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Let glibc malloc keep freed memory for reuse instead of handing it back to the OS after every
    step (M_MMAP_THRESHOLD / M_TRIM_THRESHOLD), so that a CPU training step no longer page-faults its
    activations in afresh: ~4,000-20,000 page faults and 4-5% of the step time for the cpu-profile ViTs.
    The cost is that the process keeps its peak heap. Linux/glibc only; VITREPRO_TUNE_MALLOC=0 disables.
    Returns whether the tuning is in effect."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if os.environ.get("VITREPRO_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        _ALLOCATOR_TUNED = bool(libc.mallopt(m_mmap_threshold, 256 << 20)) and bool(
            libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False
    return _ALLOCATOR_TUNED


# ---------------------------------------------------------------------- run

def _data_used(cfg: TrainConfig) -> list[tuple[str, str]]:
    """(dataset, split) pairs a configuration reads: its training split and every evaluator's splits
    (an accuracy on ``val`` reads the held-out part of the training split)."""
    pairs = [(cfg.dataset, cfg.train_split)]
    for e in cfg.evaluators:
        ds = e.get("dataset") or cfg.dataset
        if e.get("type") == "accuracy":
            split = e.get("split") or (cfg.eval_split if not e.get("dataset") else "test")
            if split != "val":
                pairs.append((ds, split))
        elif e.get("type") == "fewshot":
            shots = e.get("train_split", "train")  # "val": the held-out part of this run's training split
            pairs += [(ds, cfg.train_split if shots == "val" else shots), (ds, e.get("test_split", "test"))]
    return list(dict.fromkeys(pairs))


def resolved_identity(cfg: TrainConfig | dict) -> dict:
    """What a configuration resolves to on this machine, with this data: device type, precision
    (``auto`` resolved as ``resolve_precision`` does), a fingerprint of every dataset split it reads
    (``data.data_fingerprint``: source, size, content hash; cached per process) and, for an ``init``
    file, its size and modification time. Part of the run id and kept in the record."""
    from .data import data_fingerprint
    cfg = TrainConfig.from_dict(cfg) if not isinstance(cfg, TrainConfig) else cfg
    device = _resolve_device(cfg.device, 0)
    ident: dict[str, Any] = {"device_type": device.type, "precision": resolve_precision(cfg.precision, device)}
    data = {}
    for ds, split in _data_used(cfg):
        try:
            data[f"{ds}:{split}"] = data_fingerprint(ds, split)
        except DataError as e:
            raise ConfigError(str(e)) from e
        except Exception as e:  # noqa: BLE001 - a corrupt file: name the dataset and the split
            raise ConfigError(f"dataset {ds!r}, split {split!r} cannot be read: {type(e).__name__}: {e}") from e
    ident["data"] = data
    if cfg.init and not cfg.init.startswith(("run:", "timm:", "hf-hub:", "hf_hub:")) and Path(cfg.init).is_file():
        st = Path(cfg.init).stat()
        ident["init_file"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return ident


def run_id_of(config: TrainConfig | dict) -> str:
    """The store id of a configuration (normalised through ``from_dict``, so lr=1 and lr=1.0 agree):
    the configuration, the code's numerics version (``store.NUMERICS_VERSION``) and what it resolves to
    here (``resolved_identity``). Cheap after the first call per dataset in a process."""
    cfg = TrainConfig.from_dict(config) if not isinstance(config, TrainConfig) else config
    return run_id_for(cfg.to_dict(), resolved=resolved_identity(cfg))


_ARCH_KEYS = ("pool", "pos_embed", "pos_embed_at", "head", "representation_size", "drop_rate",
              "attn_drop_rate", "drop_path_rate")


def _arch_of(cfg: TrainConfig, init_config: dict | None) -> dict:
    """The full architecture a run builds: its own options, else those inherited from the run it
    fine-tunes (``init=run:...``, whose ``_resolved.arch`` is complete), else the model's defaults."""
    import inspect

    from . import models
    arch: dict[str, Any] = {}
    if init_config is not None:
        arch.update({k: v for k, v in ((init_config.get("_resolved") or {}).get("arch") or {}).items()})
        arch.update({k: init_config[k] for k in _ARCH_KEYS if init_config.get(k) is not None})
    arch.update(cfg.model_options())
    try:
        family = models.parse_name(cfg.model).family
        cls = models.bit.BiTResNet if family == "bit" else models.vit.VisionTransformer
        sig = inspect.signature(cls.__init__).parameters
        for k in _ARCH_KEYS:
            if k in sig and k not in arch:
                arch[k] = sig[k].default
        arch = {k: v for k, v in arch.items() if k in sig}
    except Exception:  # noqa: BLE001 - the explicit options are still right
        pass
    return {k: arch[k] for k in _ARCH_KEYS if k in arch}


def _say(msg: str) -> None:
    print(f"[vitrepro] {msg}", file=sys.stderr, flush=True)


def _finished(store: RunStore, exp: str, rid: str, quiet: bool = False) -> dict | None:
    """The record of a finished run whose files read back, else None; a damaged record or model is
    reported (naming the file) and the run is done again (it resumes from its final checkpoint)."""
    from .store import DamagedRunError, check_torch_file
    say = (lambda m: None) if quiet else _say
    try:
        rec = store.record(exp, rid)
    except DamagedRunError as e:
        say(f"{e} -- evaluating the run again from its checkpoint.")
        return None
    if rec is None or rec.get("status") != "ok":
        return None
    model_pt = store.run_dir(exp, rid) / "model.pt"
    try:
        check_torch_file(model_pt, f"{exp}/{rid}")
    except FileNotFoundError:
        say(f"{model_pt} is missing although its record says finished -- resuming the run to write it.")
        return None
    except DamagedRunError as e:
        say(f"{e} -- resuming the run to write it again.")
        return None
    return rec


def _check_init_run(cfg: TrainConfig, store: RunStore) -> None:
    """A fine-tune's parent weights must read back: a damaged parent model.pt is named, with its remedy."""
    from .store import DamagedRunError, check_torch_file
    if not (cfg.init and cfg.init.startswith("run:")):
        return
    d = store.root / cfg.init[4:]
    if (d / "model.pt").exists():
        try:
            check_torch_file(d / "model.pt", cfg.init[4:])
        except DamagedRunError as e:
            raise ConfigError(f"init={cfg.init!r}: the parent run's weights cannot be loaded: {e}") from e


def run(config: TrainConfig | dict, store: RunStore | None = None, force: bool = False,
        progress: str = "auto") -> dict:
    """Train (or resume, or return the stored record of) one configuration. Returns the record.

    The run folder is owned by one process at a time (``RunStore.lock``, an OS lock released when
    the owner dies): a second process of the same configuration waits for the first and then returns
    its record (or resumes the run, if the owner died)."""
    from .store import DamagedRunError, check_torch_file
    cfg = TrainConfig.from_dict(config) if not isinstance(config, TrainConfig) else config
    cfg.check()
    store = store if store is not None else RunStore()
    conf = cfg.to_dict()
    identity = resolved_identity(cfg)
    rid = run_id_for(conf, resolved=identity)
    rank, world, local_rank = _dist_env()
    if not force:
        rec = _finished(store, cfg.experiment, rid)
        if rec is not None:
            return rec
    _check_init_run(cfg, store)
    plan = _prepare(cfg, store)
    device = _resolve_device(cfg.device, local_rank)
    if cfg.batch_size % (world * cfg.accum_steps):
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by world_size*accum_steps "
                          f"= {world}*{cfg.accum_steps}")
    ddp = world > 1
    if ddp and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend)
    run_dir = store.run_dir(cfg.experiment, rid)
    lock = store.lock(cfg.experiment, rid) if rank == 0 else None
    if lock is not None:
        lock.acquire(on_wait=lambda owner: _say(f"run {cfg.experiment}/{rid} is being trained by {owner}; waiting"))
    try:
        if lock is not None and (lock.waited or not force):
            rec = _finished(store, cfg.experiment, rid, quiet=not lock.waited)  # finished by the owner we waited for
            if rec is not None:
                return rec
        resolved = {"img_size": plan.img_size, "in_chans": plan.in_chans, "num_classes": plan.num_classes,
                    "steps": plan.steps, "train_size": len(plan.train) if plan.train is not None else None,
                    "arch": _arch_of(cfg, plan.init_config),
                    "head_reset": bool(cfg.init) and (cfg.reset_head is not False or (
                        plan.init_config is not None and plan.init_config["_resolved"]["num_classes"] != plan.num_classes)),
                    **identity, "numerics": code_versions()["numerics"]}
        if rank == 0:
            if force and run_dir.exists():
                for n in ("record.json", "checkpoint.pt", "metrics.jsonl", "model.pt"):
                    if (run_dir / n).exists():
                        (run_dir / n).unlink()
            ckpt = run_dir / "checkpoint.pt"
            if ckpt.exists():
                check_torch_file(ckpt, f"{cfg.experiment}/{rid}")  # DamagedRunError names it and the remedy
            elif (run_dir / "metrics.jsonl").exists():
                (run_dir / "metrics.jsonl").unlink()  # rows of an attempt that never checkpointed: start clean
            store.clear_record(cfg.experiment, rid)
            store.create(cfg.experiment, rid, {**conf, "_resolved": resolved})
        if ddp:
            torch.distributed.barrier()
        try:
            return _train(plan, store, rid, device, rank, world, progress, resolved)
        except Exception as e:  # record the failure (rank 0), then re-raise
            if rank == 0:
                rec = {"run_id": rid, "experiment": cfg.experiment, "status": "failed",
                       "error": f"{type(e).__name__}: {e}", "error_type": type(e).__name__, "config": conf,
                       "resolved": resolved, "run_dir": str(run_dir), "versions": _versions(),
                       "git_revision": _git_revision(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                try:
                    store.write_record(cfg.experiment, rid, rec)
                except OSError:
                    pass  # e.g. the disk is full: the original error says so
            raise
    finally:
        if lock is not None:
            lock.release()


def _train(plan: _Plan, store: RunStore, rid: str, device: torch.device, rank: int, world: int,
           progress: str, resolved: dict) -> dict:
    from . import models
    cfg = plan.cfg
    exp = cfg.experiment
    run_dir = store.run_dir(exp, rid)
    t_start = time.time()
    if device.type == "cpu":
        tune_cpu_allocator()
    model, init_report = _build_model(plan, device)
    n_params = sum(p.numel() for p in model.parameters())
    flops_error = None
    try:
        flops_per_image = int(models.flops(model, plan.img_size))
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        flops_per_image, flops_error = None, f"{type(e).__name__}: {e}"
    opt = _make_optimizer(model, cfg)
    if plan.train is not None:
        batches = Batches(plan.train, cfg.batch_size, plan.img_size, plan.in_chans, augment=cfg.augment,
                          seed=cfg.seed, rank=rank, world_size=world, device=device)
    else:
        batches = StreamBatches(cfg.dataset, cfg.train_split, cfg.batch_size, plan.img_size, plan.in_chans,
                                augment=cfg.augment, seed=cfg.seed, rank=rank, world_size=world, device=device)
    train_size = len(plan.train) if plan.train is not None else None
    precision = resolve_precision(cfg.precision, device)
    amp = torch.bfloat16 if precision == "bf16" else None
    step = 0
    elapsed_before = 0.0
    loss_sum = torch.zeros((), device=device)
    loss_n = 0
    resumed_from = None
    ckpt_path = run_dir / "checkpoint.pt"
    best = _BestOnValidation(plan.selector, cfg.select_every or max(1, (train_size or 0) // cfg.batch_size), amp)
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        batches.load_state_dict(ck["data"])
        step = resumed_from = int(ck["step"])
        elapsed_before = float(ck.get("elapsed", 0.0))
        loss_sum = ck["loss_sum"].to(device)
        loss_n = int(ck["loss_n"])
        torch.set_rng_state(ck["rng_cpu"])
        best.load_state_dict(ck.get("selection"))
        if rank == 0:
            store.truncate_metrics(exp, rid, step)
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    accum = cfg.accum_steps
    mode = _progress_mode(progress) if rank == 0 else "none"
    bar = None
    if mode == "bar":
        from tqdm.auto import tqdm
        bar = tqdm(total=plan.steps, initial=step, desc=f"{exp}/{rid}", dynamic_ncols=True)
    t_log, step_log = time.time(), step

    def log_row(row):
        if rank == 0:
            store.log(exp, rid, row)

    def save_checkpoint():
        if rank != 0:
            return
        atomic_torch_save(ckpt_path, {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "data": batches.state_dict(),
            "step": step, "elapsed": elapsed_before + time.time() - t_start, "loss_sum": loss_sum.cpu(),
            "loss_n": loss_n, "rng_cpu": torch.get_rng_state(), "config": cfg.to_dict(),
            "selection": best.state_dict()})

    def check_finite(value: float):
        if not math.isfinite(value):
            raise DivergedError(f"training loss became {value} by step {step} (lr={lr_at(step - 1, cfg, plan.steps):.3g}); "
                                "try a lower learning rate, warmup or grad_clip"
                                + ("; if precision=fp32 trains, it is a bf16 numerics problem, not the "
                                   "learning rate" if precision == "bf16" else ""))

    while step < plan.steps:
        lr = lr_at(step, cfg, plan.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        torch.manual_seed(_seed_for(cfg.seed, step, rank, 101))
        x, y = batches.next()
        xs, ys = x.chunk(accum), y.chunk(accum)
        for j in range(accum):
            sync_ctx = train_model.no_sync() if (world > 1 and j < accum - 1) else _null()
            with sync_ctx:
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    logits = train_model(xs[j])
                loss = F.cross_entropy(logits.float(), ys[j], label_smoothing=cfg.label_smoothing)
                (loss / accum).backward()
            loss_sum += loss.detach() / accum
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        loss_n += 1
        last = step == plan.steps
        if step % cfg.log_every == 0 or last:
            mean_loss = float(loss_sum) / max(1, loss_n)
            if world > 1:
                t = torch.tensor([mean_loss], device=device)
                torch.distributed.all_reduce(t)
                mean_loss = float(t) / world
            check_finite(mean_loss)
            now = time.time()
            ips = (step - step_log) * cfg.batch_size / max(1e-9, now - t_log)
            t_log, step_log = now, step
            log_row({"step": step, "loss": mean_loss, "lr": lr, "images_per_s": round(ips, 2),
                     "epoch": round(step * cfg.batch_size / train_size, 4) if train_size else None})
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
            elif mode == "log":
                print(f"[{exp}/{rid}] step {step}/{plan.steps} loss {mean_loss:.4f} lr {lr:.3g} "
                      f"{ips:.0f} img/s", flush=True)
            loss_sum = torch.zeros((), device=device)
            loss_n = 0
        if bar is not None:
            bar.update(1)
        if best.due(step, last):
            log_row({"step": step, "select/val": best.update(model, step)})
        if cfg.snapshot_every and step % cfg.snapshot_every == 0 and rank == 0:
            atomic_torch_save(run_dir / "snapshots" / f"step_{step:07d}.pt", model.state_dict())
        if cfg.eval_every and step % cfg.eval_every == 0 and not last and rank == 0:
            for ev in plan.evaluators:
                if ev.name.startswith("acc/"):
                    log_row({"step": step, **ev(model)})
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last:
            if not last:
                float_check = float(loss_sum) if loss_n else 0.0
                check_finite(float_check)
            save_checkpoint()
    if bar is not None:
        bar.close()
    train_time = elapsed_before + time.time() - t_start
    record = None
    best.restore(model)  # early stopping: evaluate (and store) the parameters chosen on validation
    if rank == 0:
        metrics: dict[str, float] = {}
        t_eval = time.time()
        for ev in plan.evaluators:
            metrics.update(ev(model, autocast_dtype=amp) if amp is not None else ev(model))
        eval_time = time.time() - t_eval
        rows = store.metrics(exp, rid)
        losses = [r["loss"] for r in rows if "loss" in r]
        if losses:
            metrics["train/loss"] = losses[-1]
        if best.selector is not None:
            metrics[best.selector.name] = best.best_acc
        log_row({"step": step, **metrics})
        atomic_torch_save(run_dir / "model.pt", model.state_dict())
        images_seen = plan.steps * cfg.batch_size
        record = {
            "run_id": rid, "experiment": exp, "status": "ok", "config": cfg.to_dict(), "resolved": resolved,
            "metrics": metrics, "steps": plan.steps, "images_seen": images_seen,
            "epochs_seen": images_seen / train_size if train_size else None, "wall_time_s": train_time, "eval_time_s": eval_time,
            "flops_per_image": flops_per_image, "flops_error": flops_error,
            "train_flops": (3 * flops_per_image * images_seen) if flops_per_image else None,
            "params": n_params, "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "precision": precision, "world_size": world, "resumed_from_step": resumed_from,
            "init_report": _small(init_report), "versions": _versions(), "git_revision": _git_revision(),
            "hostname": platform.node(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run_dir": str(run_dir), "selection": best.summary(),
        }
        store.write_record(exp, rid, record)
    if world > 1:
        torch.distributed.barrier()
        if record is None:
            record = {"run_id": rid, "experiment": exp, "status": "ok", "rank": rank}
    return record


class _BestOnValidation:
    """Early stopping on held-out data ([P] §4.3: "we ... use early-stopping, and report the best
    validation accuracy achieved during training"): every ``every`` steps and at the end, accuracy on
    the validation part of the training set; the parameters with the best value are the run's result.
    Without a selector (``select_on=None``) it does nothing and the final parameters are kept."""

    def __init__(self, selector, every: int, amp):
        self.selector, self.every, self.amp = selector, every, amp
        self.best_acc, self.best_step, self.best_state, self.curve = -1.0, None, None, []

    def due(self, step: int, last: bool) -> bool:
        return self.selector is not None and (step % self.every == 0 or last)

    def update(self, model, step: int) -> float:
        kw = {"autocast_dtype": self.amp} if self.amp is not None else {}
        acc = float(next(iter(self.selector(model, **kw).values())))
        self.curve.append([step, acc])
        if acc > self.best_acc:  # ties keep the earlier (cheaper) parameters
            self.best_acc, self.best_step = acc, step
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return acc

    def restore(self, model) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    def summary(self) -> dict | None:
        if self.selector is None:
            return None
        return {"on": self.selector.name, "best_step": self.best_step, "best_val": self.best_acc,
                "curve": self.curve}

    def state_dict(self) -> dict:
        return {"best_acc": self.best_acc, "best_step": self.best_step, "best_state": self.best_state,
                "curve": self.curve}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.best_acc, self.best_step = state["best_acc"], state["best_step"]
            self.best_state, self.curve = state["best_state"], state["curve"]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _small(report):
    if report is None:
        return None
    try:
        json.dumps(report)
        return report
    except TypeError:
        return str(report)[:2000]


def run_many(configs: Iterable[TrainConfig | dict], store: RunStore | None = None, force: bool = False,
             progress: str = "auto") -> list[dict]:
    """Run a sweep; a diverged or failing configuration is recorded as failed and the sweep goes on.
    Configuration errors (ConfigError) are raised at once, before anything runs."""
    cfgs = [TrainConfig.from_dict(c) for c in configs]
    store = store if store is not None else RunStore()
    out = []
    for c in cfgs:
        try:
            out.append(run(c, store, force=force, progress=progress))
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - recorded by run(); carry on
            rid = run_id_of(c)
            try:
                rec = store.record(c.experiment, rid)
            except Exception:  # noqa: BLE001 - a damaged record: the error below says what happened
                rec = None
            rec = rec or {"run_id": rid, "experiment": c.experiment, "status": "failed",
                          "error": f"{type(e).__name__}: {e}"}
            print(f"[vitrepro] run {c.experiment}/{rid} failed: {rec.get('error')}", file=sys.stderr)
            out.append(rec)
    return out


# ---------------------------------------------------------------------- CLI

def _parse_value(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .store import DamagedRunError, NoSpaceError
    p = argparse.ArgumentParser(prog="python -m vitrepro.train",
                                description="Train one configuration: key=value pairs (values parsed as JSON "
                                            "when possible) on top of an optional --config JSON file.")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. model=ViT-Nano/4 steps=300 lr=1e-3")
    p.add_argument("--config", help="JSON file with a configuration dict")
    p.add_argument("--store", help="run store root (default $VITREPRO_RUNS or <repo>/runs)")
    p.add_argument("--force", action="store_true", help="re-run even if a finished record exists")
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "log", "none"])
    a = p.parse_args(argv)
    d: dict[str, Any] = {}
    if a.config:
        with open(a.config) as f:
            d.update(json.load(f))
    for o in a.overrides:
        if "=" not in o:
            p.error(f"expected key=value, got {o!r}")
        k, v = o.split("=", 1)
        d[k] = _parse_value(v)
    try:
        rec = run(d, RunStore(a.store) if a.store else None, force=a.force, progress=a.progress)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    except DivergedError as e:
        print(f"diverged: {e}", file=sys.stderr)
        return 3
    except (DamagedRunError, NoSpaceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if _dist_env()[0] == 0:
        print(json.dumps({"run_id": rec.get("run_id"), "status": rec.get("status"), "metrics": rec.get("metrics"),
                          "run_dir": rec.get("run_dir")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
