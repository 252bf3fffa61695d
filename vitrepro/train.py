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

import contextlib
import dataclasses
import difflib
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from . import __version__, typed
from .data import AUGMENTATIONS, Batches, DataError, StreamBatches, ImageArrays, load_arrays, resolve_source, \
    training_split
from .machine import _cpu_flags, resolve_compile, resolve_precision, tune_cpu_allocator  # noqa: F401 (_cpu_flags: tests)
from .store import RunStore, atomic_torch_save, code_versions, run_id_for

__all__ = ["TrainConfig", "ConfigError", "DivergedError", "run", "run_many", "run_id_of", "resolved_identity", "main",
           "resolve_precision", "lr_at"]


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any compute and before anything is stored."""


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


# The configuration keys that choose the architecture (create_model options beyond the name and shapes).
ARCH_KEYS = ("pool", "pos_embed", "pos_embed_at", "head", "representation_size", "drop_rate", "attn_drop_rate",
             "drop_path_rate")


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
    augment: str = "none"                   # none | flip | crop | crop_flip | rrc_flip | auto
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
    compile: str = "auto"                   # auto | on | off: torch.compile the training step (machine.resolve_compile)
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
        cfg = cls(**{k: typed.check(cls, k, v, ConfigError, widen=True) for k, v in d.items()})
        cfg.check()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def model_options(self) -> dict:
        return {k: getattr(self, k) for k in ARCH_KEYS if getattr(self, k) is not None}

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
        choice("compile", ("auto", "on", "off"))
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


# ---------------------------------------------------------------------- helpers

def init_names_a_file(init: str | None) -> bool:
    """Whether ``init`` is a weights file path, not a stored run (``run:``) or a hub model (``timm:``, ``hf-hub:``)."""
    return bool(init) and not init.startswith(("run:", "timm:", "hf-hub:", "hf_hub:"))


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
class TrainingPlan:
    """What `prepare` found out before any compute: the data, the evaluators and the shapes to build."""
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


def _check_sources(cfg: TrainConfig) -> None:
    """The datasets can be found and the model name parses (ConfigError otherwise)."""
    from . import models
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


def _find_init_run(cfg: TrainConfig, store: RunStore) -> tuple[Path | None, dict | None]:
    """For ``init=run:<experiment>/<id>``: that run's folder and stored config (it must have finished and
    be the same model); (None, None) for any other init. A missing init file is a ConfigError."""
    if init_names_a_file(cfg.init) and not Path(cfg.init).exists():
        raise ConfigError(f"init={cfg.init!r}: no such file (use run:<experiment>/<run_id>, timm:<name>.<tag> "
                          "or a .pth/.safetensors/.npz path)")
    if not (cfg.init and cfg.init.startswith("run:")):
        return None, None
    try:
        init_run = store.resolve(cfg.init)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from e
    if not (init_run / "model.pt").exists():
        raise ConfigError(f"init={cfg.init!r}: that run has no model.pt (not finished?)")
    from .store import DamagedRunError
    exp, rid = cfg.init[4:].strip("/").split("/", 1)
    try:
        init_config = store.config(exp, rid)
    except DamagedRunError as e:
        raise ConfigError(f"init={cfg.init!r}: the parent run's configuration cannot be read: {e}") from e
    if not isinstance(init_config.get("_resolved"), dict):  # rebuilt from a checkpoint by `store repair`
        raise ConfigError(f"init={cfg.init!r}: the parent run has not finished since its config.json was rebuilt; "
                          "run its configuration again (it resumes from its checkpoint), then fine-tune")
    if init_config.get("model") != cfg.model:
        raise ConfigError(f"init={cfg.init!r} is a {init_config.get('model')} but model={cfg.model!r}")
    return init_run, init_config


def _prepare(cfg: TrainConfig, store: RunStore) -> TrainingPlan:
    """Every check that needs I/O (data location, model shapes), before any compute or store write."""
    from .evaluate import Accuracy
    _check_sources(cfg)
    if cfg.img_size:  # shape check before touching any data (num_classes does not matter here)
        check_shapes(cfg, cfg.img_size, cfg.in_chans or 3, 10)
    init_run, init_config = _find_init_run(cfg, store)
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
    check_shapes(cfg, img_size, in_chans, num_classes)
    evaluators = _make_evaluators(cfg, val)
    selector = Accuracy(cfg.dataset, "val", arrays=val) if cfg.select_on == "val" else None
    return TrainingPlan(cfg, arrays, evaluators, img_size, in_chans, num_classes, steps, init_run, init_config,
                        selector)


def _make_evaluators(cfg: TrainConfig, val: ImageArrays | None) -> list:
    """The configured evaluators; accuracy on ``val`` and few-shot shots from ``val`` use the held-out
    part of this run's training set."""
    from .evaluate import Accuracy, FewShot, make_evaluator
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
    return evaluators


def check_shapes(cfg: TrainConfig, img_size: int, in_chans: int, num_classes: int) -> None:
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


def _prepare_streamed(cfg: TrainConfig, src, init_run, init_config) -> TrainingPlan:
    """Large datasets (imagenet-1k): streamed through `datasets`; steps only; a class-balanced subset
    (train_examples) is drawn by streaming (`data.stream_batches`), no validation hold-out."""
    from . import models
    from .evaluate import make_evaluator
    if cfg.steps is None:
        raise ConfigError(f"{cfg.dataset} is streamed: give steps, not epochs")
    if cfg.val_fraction > 0:
        raise ConfigError(f"{cfg.dataset} is streamed: val_fraction is not supported; "
                          "use a split expression in train_split (e.g. 'train[:99%]')")
    img_size = cfg.img_size or (init_config["_resolved"]["img_size"] if init_config else 224)
    in_chans = cfg.in_chans or (init_config["_resolved"]["in_chans"] if init_config else 3)
    check_shapes(cfg, img_size, in_chans, src.spec.num_classes)
    evs = [make_evaluator({"dataset": cfg.dataset, **({"split": cfg.eval_split} if e.get("type") == "accuracy"
                                                      else {}), **e}) for e in cfg.evaluators]
    return TrainingPlan(cfg, None, evs, img_size, in_chans, src.spec.num_classes, cfg.steps, init_run, init_config)


def _build_model(plan: TrainingPlan, device: torch.device):
    from . import models
    cfg = plan.cfg
    torch.manual_seed(cfg.seed)
    report = None
    if plan.init_run is not None:
        ic = plan.init_config
        r = ic["_resolved"]
        opts = {k: ic.get(k) for k in ARCH_KEYS if ic.get(k) is not None}
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


# ---------------------------------------------------------------------- run

def data_used(cfg: TrainConfig) -> list[tuple[str, str]]:
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


def resolved_identity(cfg: TrainConfig | dict, threads: int | None = None) -> dict:
    """What a configuration resolves to on this machine, with this data: device type, precision
    (``auto`` resolved as ``resolve_precision`` does), on CPU the intra-op thread count (``threads``, else
    ``torch.get_num_threads()`` now: 1 and 2 threads split the reductions differently, so their results differ
    in the last bits; a CUDA run does not depend on it), a fingerprint of every dataset split it reads
    (``data.data_fingerprint``: source, size, content hash; cached per process) and, for an ``init``
    file, its size and modification time. Part of the run id and kept in the record."""
    from .data import data_fingerprint
    cfg = TrainConfig.from_dict(cfg) if not isinstance(cfg, TrainConfig) else cfg
    device = _resolve_device(cfg.device, 0)
    precision = resolve_precision(cfg.precision, device)
    ident: dict[str, Any] = {"device_type": device.type, "precision": precision}
    if device.type == "cpu":
        ident["cpu_threads"] = int(threads if threads is not None else torch.get_num_threads())
    data = {}
    for ds, split in data_used(cfg):
        try:
            data[f"{ds}:{split}"] = data_fingerprint(ds, split)
        except DataError as e:
            raise ConfigError(str(e)) from e
        except Exception as e:  # noqa: BLE001 - a corrupt file: name the dataset and the split
            raise ConfigError(f"dataset {ds!r}, split {split!r} cannot be read: {type(e).__name__}: {e}") from e
    ident["data"] = data
    # compiled kernels round differently from eager ones: whether this run compiles is part of its identity
    ident["compile"] = resolve_compile(cfg.compile, device, precision, _family(cfg.model),
                                       _expected_steps(cfg, data.get(f"{cfg.dataset}:{cfg.train_split}")))
    if init_names_a_file(cfg.init) and Path(cfg.init).is_file():
        st = Path(cfg.init).stat()
        ident["init_file"] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return ident


def _family(model: str) -> str:
    from . import models
    try:
        return models.parse_name(model).family
    except ValueError:
        return "unknown"


def _expected_steps(cfg: TrainConfig, fingerprint: dict | None) -> int | None:
    """The optimiser steps a configuration will take, from its data fingerprint (``_prepare``'s rule:
    epochs x whole batches of the training part); None where the size is unknown (streamed)."""
    if cfg.steps is not None:
        return cfg.steps
    n = (fingerprint or {}).get("n")
    if n is None:
        return None
    # the stratified hold-out rounds per class, so this can be off by a few examples: enough for a threshold
    n_train = cfg.train_examples or int(round(n * (1.0 - cfg.val_fraction)))
    return int(round(cfg.epochs * (n_train // cfg.batch_size)))


def run_id_of(config: TrainConfig | dict, threads: int | None = None) -> str:
    """The store id of a configuration (normalised through ``from_dict``, so lr=1 and lr=1.0 agree):
    the configuration, the code's numerics version (``store.NUMERICS_VERSION``) and what it resolves to
    here (``resolved_identity``). Cheap after the first call per dataset in a process. ``threads``: the
    intra-op thread count of the process that trains it (None: this process's), for a scheduler that
    looks up the runs its workers train."""
    cfg = TrainConfig.from_dict(config) if not isinstance(config, TrainConfig) else config
    return run_id_for(cfg.to_dict(), resolved=resolved_identity(cfg, threads))


def _arch_of(cfg: TrainConfig, init_config: dict | None) -> dict:
    """The full architecture a run builds: its own options, else those inherited from the run it
    fine-tunes (``init=run:...``, whose ``_resolved.arch`` is complete), else the model's defaults."""
    import inspect

    from . import models
    arch: dict[str, Any] = {}
    if init_config is not None:
        arch.update({k: v for k, v in ((init_config.get("_resolved") or {}).get("arch") or {}).items()})
        arch.update({k: init_config[k] for k in ARCH_KEYS if init_config.get(k) is not None})
    arch.update(cfg.model_options())
    try:
        family = models.parse_name(cfg.model).family
        cls = models.bit.BiTResNet if family == "bit" else models.vit.VisionTransformer
        sig = inspect.signature(cls.__init__).parameters
        for k in ARCH_KEYS:
            if k in sig and k not in arch:
                arch[k] = sig[k].default
        arch = {k: v for k, v in arch.items() if k in sig}
    except Exception:  # noqa: BLE001 - the explicit options are still right
        pass
    return {k: arch[k] for k in ARCH_KEYS if k in arch}


def _say(msg: str) -> None:
    print(f"[vitrepro] {msg}", file=sys.stderr, flush=True)


def finished_record(store: RunStore, exp: str, rid: str, quiet: bool = False) -> dict | None:
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
    try:  # a finished run is reused only with its configuration intact (the store lists it by it)
        store.config(exp, rid)
    except (DamagedRunError, FileNotFoundError) as e:
        what = e if isinstance(e, DamagedRunError) else f"{store.run_dir(exp, rid) / 'config.json'} is missing"
        say(f"{what} -- evaluating the run again from its checkpoint, which writes config.json again.")
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
    its record (or resumes the run, if the owner died). Under torchrun (DDP) rank 0 takes the lock and
    decides, for every rank (`_agree`): return the finished record, or train."""
    cfg = TrainConfig.from_dict(config) if not isinstance(config, TrainConfig) else config
    cfg.check()
    store = store if store is not None else RunStore()
    identity = resolved_identity(cfg)
    rid = run_id_for(cfg.to_dict(), resolved=identity)
    rank, world, local_rank = _dist_env()
    device = _resolve_device(cfg.device, local_rank)
    _start_distributed(world, device)  # from here on, every rank follows rank 0's decisions
    if not force:
        rec = _agree(finished_record(store, cfg.experiment, rid) if rank == 0 else None, world)
        if rec is not None:
            return rec
    _check_init_run(cfg, store)
    plan = _prepare(cfg, store)
    if cfg.batch_size % (world * cfg.accum_steps):
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by world_size*accum_steps "
                          f"= {world}*{cfg.accum_steps}")
    lock = store.lock(cfg.experiment, rid) if rank == 0 else None
    owners: list[str] = []
    if lock is not None:
        lock.acquire(on_wait=lambda owner: (owners.append(owner),
                                            _say(f"run {cfg.experiment}/{rid} is being trained by {owner}; waiting")))
    try:
        rec = None
        if lock is not None and (lock.waited or not force):
            rec = finished_record(store, cfg.experiment, rid, quiet=not lock.waited)  # finished by the owner we waited for
            if rec is None and lock.waited:
                _say(f"run {cfg.experiment}/{rid}: its owner ({owners[0] if owners else 'unknown'}) let go of it "
                     "without finishing it (it died or failed); this process takes it over"
                     + (", resuming from its checkpoint" if (store.run_dir(cfg.experiment, rid) / "checkpoint.pt")
                        .exists() else ", from step 0"))
        rec = _agree(rec, world)  # the other ranks wait here while rank 0 waits for the lock
        if rec is not None:
            return rec
        facts = _resolved_facts(plan, identity)
        if rank == 0:
            _open_run_folder(store, cfg, rid, facts, force)
        if world > 1:
            torch.distributed.barrier()
        try:
            return _train(plan, store, rid, device, rank, world, progress, facts)
        except Exception as e:  # record the failure (rank 0), then re-raise
            if rank == 0:
                _record_failure(store, cfg, rid, facts, e)
            raise
    finally:
        if lock is not None:
            lock.release()


def _agree(record: dict | None, world: int) -> dict | None:
    """Rank 0's decision, made collective: the finished record every rank returns, or None (every rank
    trains). A collective call: every rank must reach it (under DDP)."""
    if world <= 1:
        return record
    box = [record]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _start_distributed(world: int, device: torch.device) -> None:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA) when there is more than one process."""
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend)


def _resolved_facts(plan: TrainingPlan, identity: dict) -> dict:
    """What the configuration resolved to for this run: shapes, steps, the full architecture, whether the
    head was reset, plus ``resolved_identity`` and the numerics version. Stored under the key ``_resolved``
    of config.json and ``resolved`` of record.json (the on-disk names stored runs keep)."""
    cfg = plan.cfg
    head_reset = bool(cfg.init) and (cfg.reset_head is not False or (
        plan.init_config is not None and plan.init_config["_resolved"]["num_classes"] != plan.num_classes))
    return {"img_size": plan.img_size, "in_chans": plan.in_chans, "num_classes": plan.num_classes,
            "steps": plan.steps, "train_size": len(plan.train) if plan.train is not None else None,
            "arch": _arch_of(cfg, plan.init_config), "head_reset": head_reset,
            **identity, "numerics": code_versions()["numerics"]}


def _open_run_folder(store: RunStore, cfg: TrainConfig, rid: str, facts: dict, force: bool) -> None:
    """Rank 0, holding the run's lock: start clean where forced or never checkpointed, check a checkpoint
    to resume from, and write config.json (with ``_resolved``)."""
    from .store import check_torch_file
    run_dir = store.run_dir(cfg.experiment, rid)
    if force and run_dir.exists():
        for n in ("record.json", "checkpoint.pt", "metrics.jsonl", "model.pt"):
            store.drop(cfg.experiment, rid, n)
    checkpoint = run_dir / "checkpoint.pt"
    if checkpoint.exists():
        check_torch_file(checkpoint, f"{cfg.experiment}/{rid}")  # DamagedRunError names it and the remedy
    else:
        store.drop(cfg.experiment, rid, "metrics.jsonl")  # rows of an attempt that never checkpointed: start clean
    store.clear_record(cfg.experiment, rid)
    store.create(cfg.experiment, rid, {**cfg.to_dict(), "_resolved": facts})


def _record_failure(store: RunStore, cfg: TrainConfig, rid: str, facts: dict, error: Exception) -> None:
    rec = {"run_id": rid, "experiment": cfg.experiment, "status": "failed",
           "error": f"{type(error).__name__}: {error}", "error_type": type(error).__name__, "config": cfg.to_dict(),
           "resolved": facts, "run_dir": str(store.run_dir(cfg.experiment, rid)), "versions": _versions(),
           "git_revision": _git_revision(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        store.write_record(cfg.experiment, rid, rec)
    except OSError:
        pass  # e.g. the disk is full: the original error says so


# ---------------------------------------------------------------------- training: build, loop, evaluate, record

def _train(plan: TrainingPlan, store: RunStore, rid: str, device: torch.device, rank: int, world: int,
           progress: str, facts: dict) -> dict:
    """Build (or resume), run the training loop, evaluate and write the record (rank 0)."""
    t = _build(plan, store, rid, device, rank, world)
    t.compiled = bool(facts.get("compile"))
    _resume(t)
    _loop(t, progress)
    t.best.restore(t.model)  # early stopping: evaluate (and store) the parameters chosen on validation
    record = None
    if rank == 0:
        t_eval = time.time()
        metrics = _evaluate(t)
        record = _record(t, metrics, facts, eval_time=time.time() - t_eval)
    if world > 1:
        torch.distributed.barrier()
        if record is None:
            record = {"run_id": rid, "experiment": plan.cfg.experiment, "status": "ok", "rank": rank}
    return record


@dataclass
class _Training:
    """One run in progress: what `_build` made, and the counters the loop advances and checkpoints."""
    plan: TrainingPlan
    store: RunStore
    rid: str
    device: torch.device
    rank: int
    world: int
    model: torch.nn.Module
    train_model: torch.nn.Module    # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    batches: Any
    precision: str
    amp: Any                        # torch.bfloat16 under bf16 autocast, else None
    best: "_BestOnValidation"
    init_report: Any
    flops_per_image: int | None
    flops_error: str | None
    t_start: float
    step: int = 0
    elapsed_before: float = 0.0     # training seconds before the checkpoint this run resumed from
    loss_sum: Any = None            # sum of the step losses since the last log row (a tensor on the device)
    loss_n: int = 0
    resumed_from: int | None = None
    train_time: float = 0.0         # seconds of training in all (this process and the ones it resumed)
    compiled: bool = False          # train_model is torch.compile'd (resolved_identity's "compile")
    rows: int = 0                   # metrics rows written (rank 0); a checkpoint keeps the count to resume to

    @property
    def cfg(self) -> TrainConfig:
        return self.plan.cfg

    @property
    def run_dir(self) -> Path:
        return self.store.run_dir(self.cfg.experiment, self.rid)

    @property
    def train_size(self) -> int | None:
        return len(self.plan.train) if self.plan.train is not None else None

    def log_row(self, row: dict) -> None:
        if self.rank == 0:
            self.store.log(self.cfg.experiment, self.rid, row)
            self.rows += 1


def _build(plan: TrainingPlan, store: RunStore, rid: str, device: torch.device, rank: int, world: int) -> _Training:
    """The model (initialised from the seed, or from ``init``), its optimiser, the batch stream and the
    validation selector."""
    from . import models
    cfg = plan.cfg
    t_start = time.time()
    if device.type == "cpu":
        tune_cpu_allocator()
    model, init_report = _build_model(plan, device)
    flops_error = None
    try:
        flops_per_image = int(models.flops(model, plan.img_size))
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        flops_per_image, flops_error = None, f"{type(e).__name__}: {e}"
    optimizer = _make_optimizer(model, cfg)
    if plan.train is not None:
        batches = Batches(plan.train, cfg.batch_size, plan.img_size, plan.in_chans, augment=cfg.augment,
                          seed=cfg.seed, rank=rank, world_size=world, device=device)
    else:
        batches = StreamBatches(cfg.dataset, cfg.train_split, cfg.batch_size, plan.img_size, plan.in_chans,
                                augment=cfg.augment, seed=cfg.seed, rank=rank, world_size=world, device=device,
                                train_examples=cfg.train_examples, num_classes=plan.num_classes,
                                subset_seed=cfg.seed if cfg.data_seed is None else cfg.data_seed)
    train_size = len(plan.train) if plan.train is not None else None
    precision = resolve_precision(cfg.precision, device)
    amp = torch.bfloat16 if precision == "bf16" else None
    best = _BestOnValidation(plan.selector, cfg.select_every or max(1, (train_size or 0) // cfg.batch_size), amp)
    return _Training(plan, store, rid, device, rank, world, model, model, optimizer, batches, precision, amp, best,
                     init_report, flops_per_image, flops_error, t_start, loss_sum=torch.zeros((), device=device))


def _resume(t: _Training) -> None:
    """Continue from the run's checkpoint when there is one (model, optimiser, data order, loss sums, RNG,
    selection), then wrap the model for DDP and put it in training mode."""
    from .store import check_torch_content, load_weights
    path = t.run_dir / "checkpoint.pt"
    if path.exists():
        ref = f"{t.cfg.experiment}/{t.rid}"
        checkpoint = check_torch_content(torch.load(path, map_location="cpu", weights_only=False), path,
                                         ref)  # the right keys, else DamagedRunError
        load_weights(t.model, checkpoint["model"], path, ref)
        t.optimizer.load_state_dict(checkpoint["optimizer"])
        t.batches.load_state_dict(checkpoint["data"])
        t.step = t.resumed_from = int(checkpoint["step"])
        t.elapsed_before = float(checkpoint.get("elapsed", 0.0))
        t.loss_sum = checkpoint["loss_sum"].to(t.device)
        t.loss_n = int(checkpoint["loss_n"])
        torch.set_rng_state(checkpoint["rng_cpu"])
        t.best.load_state_dict(checkpoint.get("selection"))
        if t.rank == 0:  # the rows the checkpoint had written: a final evaluation row after it is written again
            t.rows = t.store.truncate_metrics(t.cfg.experiment, t.rid, t.step, checkpoint.get("metrics_rows"))
    if t.world > 1:
        t.train_model = torch.nn.parallel.DistributedDataParallel(
            t.model, device_ids=[t.device.index] if t.device.type == "cuda" else None)
    if t.compiled:  # the training step only: evaluation, selection and checkpoints use the eager t.model
        # a sweep worker trains many models in one process: without a reset each new model counts as a
        # recompile of the same frame, and after dynamo's recompile limit (8) later runs train eagerly while
        # their record says compile=on. Compiled kernels stay cached on disk (inductor), so this costs seconds.
        torch._dynamo.reset()
        t.train_model = torch.compile(t.train_model)
    t.model.train()


def _save_checkpoint(t: _Training) -> None:
    if t.rank != 0:
        return
    atomic_torch_save(t.run_dir / "checkpoint.pt", {
        "model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(), "data": t.batches.state_dict(),
        "step": t.step, "elapsed": t.elapsed_before + time.time() - t.t_start, "loss_sum": t.loss_sum.cpu(),
        "loss_n": t.loss_n, "rng_cpu": torch.get_rng_state(), "config": t.cfg.to_dict(),
        "selection": t.best.state_dict(), "metrics_rows": t.rows})


def _check_finite(t: _Training, value: float) -> None:
    if not math.isfinite(value):
        raise DivergedError(f"training loss became {value} by step {t.step} "
                            f"(lr={lr_at(t.step - 1, t.cfg, t.plan.steps):.3g}); "
                            "try a lower learning rate, warmup or grad_clip"
                            + ("; if precision=fp32 trains, it is a bf16 numerics problem, not the "
                               "learning rate" if t.precision == "bf16" else ""))


def _train_step(t: _Training) -> float:
    """One optimiser step: set the scheduled lr, reseed dropout from (seed, step, rank), accumulate the
    gradients of ``accum_steps`` micro-batches, clip, update. Returns the step's lr."""
    cfg, accum = t.cfg, t.cfg.accum_steps
    lr = lr_at(t.step, cfg, t.plan.steps)
    for g in t.optimizer.param_groups:
        g["lr"] = lr
    torch.manual_seed(_seed_for(cfg.seed, t.step, t.rank, 101))
    x, y = t.batches.next()
    xs, ys = x.chunk(accum), y.chunk(accum)
    for j in range(accum):
        # DDP: all-reduce the gradients on the last micro-batch only
        sync = t.train_model.no_sync() if (t.world > 1 and j < accum - 1) else contextlib.nullcontext()
        with sync:
            with torch.autocast(t.device.type, dtype=t.amp, enabled=t.amp is not None):
                logits = t.train_model(xs[j])
            loss = F.cross_entropy(logits.float(), ys[j], label_smoothing=cfg.label_smoothing)
            (loss / accum).backward()
        t.loss_sum += loss.detach() / accum
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), cfg.grad_clip)
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.step += 1
    t.loss_n += 1
    return lr


class _Progress:
    """Progress output of rank 0: a tqdm bar, one printed line per logged step, or nothing."""

    def __init__(self, t: _Training, progress: str):
        self.mode = _progress_mode(progress) if t.rank == 0 else "none"
        self.bar = None
        self.name = f"{t.cfg.experiment}/{t.rid}"
        if self.mode == "bar":
            from tqdm.auto import tqdm
            self.bar = tqdm(total=t.plan.steps, initial=t.step, desc=self.name, dynamic_ncols=True)
        self.t_log, self.step_log = time.time(), t.step

    def images_per_s(self, step: int, batch_size: int) -> float:
        now = time.time()
        ips = (step - self.step_log) * batch_size / max(1e-9, now - self.t_log)
        self.t_log, self.step_log = now, step
        return ips

    def show(self, step: int, steps: int, loss: float, lr: float, ips: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
        elif self.mode == "log":
            print(f"[{self.name}] step {step}/{steps} loss {loss:.4f} lr {lr:.3g} {ips:.0f} img/s", flush=True)


def _log_loss(t: _Training, lr: float, progress: _Progress) -> None:
    """A metrics row with the mean loss since the last row (averaged over DDP ranks); resets the sums."""
    cfg = t.cfg
    mean_loss = float(t.loss_sum) / max(1, t.loss_n)
    if t.world > 1:
        total = torch.tensor([mean_loss], device=t.device)
        torch.distributed.all_reduce(total)
        mean_loss = float(total) / t.world
    _check_finite(t, mean_loss)
    ips = progress.images_per_s(t.step, cfg.batch_size)
    t.log_row({"step": t.step, "loss": mean_loss, "lr": lr, "images_per_s": round(ips, 2),
               "epoch": round(t.step * cfg.batch_size / t.train_size, 4) if t.train_size else None})
    progress.show(t.step, t.plan.steps, mean_loss, lr, ips)
    t.loss_sum = torch.zeros((), device=t.device)
    t.loss_n = 0


def _loop(t: _Training, progress: str) -> None:
    """Train until ``plan.steps``: log, select on validation, snapshot, evaluate and checkpoint on schedule."""
    cfg = t.cfg
    shown = _Progress(t, progress)
    while t.step < t.plan.steps:
        lr = _train_step(t)
        last = t.step == t.plan.steps
        if t.step % cfg.log_every == 0 or last:
            _log_loss(t, lr, shown)
        if shown.bar is not None:
            shown.bar.update(1)
        if t.best.due(t.step, last):
            t.log_row({"step": t.step, "select/val": t.best.update(t.model, t.step)})
        if cfg.snapshot_every and t.step % cfg.snapshot_every == 0 and t.rank == 0:
            atomic_torch_save(t.run_dir / "snapshots" / f"step_{t.step:07d}.pt", t.model.state_dict())
        if cfg.eval_every and t.step % cfg.eval_every == 0 and not last and t.rank == 0:
            for ev in t.plan.evaluators:
                if ev.name.startswith("acc/"):
                    t.log_row({"step": t.step, **ev(t.model)})
        if (cfg.checkpoint_every and t.step % cfg.checkpoint_every == 0) or last:
            if not last:
                _check_finite(t, float(t.loss_sum) if t.loss_n else 0.0)
            _save_checkpoint(t)
    if shown.bar is not None:
        shown.bar.close()
    t.train_time = t.elapsed_before + time.time() - t.t_start


def _evaluate(t: _Training) -> dict[str, float]:
    """Every evaluator on the final (or validation-chosen) parameters, the last logged training loss and
    the best validation accuracy; logged as the run's last metrics row."""
    metrics: dict[str, float] = {}
    for ev in t.plan.evaluators:
        metrics.update(ev(t.model, autocast_dtype=t.amp) if t.amp is not None else ev(t.model))
    losses = [r["loss"] for r in t.store.metrics(t.cfg.experiment, t.rid) if "loss" in r]
    if losses:
        metrics["train/loss"] = losses[-1]
    if t.best.selector is not None:
        metrics[t.best.selector.name] = t.best.best_acc
    t.log_row({"step": t.step, **metrics})
    return metrics


def _record(t: _Training, metrics: dict, facts: dict, eval_time: float) -> dict:
    """Store the model and write record.json: metrics, cost (steps, images, FLOPs, time), versions."""
    cfg, device = t.cfg, t.device
    atomic_torch_save(t.run_dir / "model.pt", t.model.state_dict())
    images_seen = t.plan.steps * cfg.batch_size
    flops = t.flops_per_image
    record = {
        "run_id": t.rid, "experiment": cfg.experiment, "status": "ok", "config": cfg.to_dict(), "resolved": facts,
        "metrics": metrics, "steps": t.plan.steps, "images_seen": images_seen,
        "epochs_seen": images_seen / t.train_size if t.train_size else None, "wall_time_s": t.train_time,
        "eval_time_s": eval_time, "flops_per_image": flops, "flops_error": t.flops_error,
        "train_flops": (3 * flops * images_seen) if flops else None,
        "params": sum(p.numel() for p in t.model.parameters()),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "precision": t.precision, "world_size": t.world, "resumed_from_step": t.resumed_from,
        "init_report": _json_safe(t.init_report), "versions": _versions(), "git_revision": _git_revision(),
        "hostname": platform.node(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_dir": str(t.run_dir), "selection": t.best.summary(),
    }
    t.store.write_record(cfg.experiment, t.rid, record)
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


def _json_safe(report):
    """A load report as stored in the record: itself when it is JSON, else its text (at most 2,000 characters)."""
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

    from .store import DamagedRunError, NoSpaceError, NotWritableError
    p = argparse.ArgumentParser(prog="python -m vitrepro.train",
                                description="Train one configuration: key=value pairs (values parsed as JSON "
                                            "when possible) on top of an optional --config JSON file.",
                                epilog="exit status: 0 finished (or reused), 2 configuration error, 3 diverged, "
                                       "4 run-store error (a damaged run file, no space left, a folder that "
                                       "cannot be written), each with its remedy")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. model=ViT-Nano/4 steps=300 lr=1e-3")
    p.add_argument("--config", help="JSON file with a configuration dict")
    p.add_argument("--store", help="run store root (default: vitrepro.settings: $VITREPRO_RUNS, vitrepro.toml, <repo>/runs)")
    p.add_argument("--force", action="store_true", help="re-run even if a finished record exists")
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "log", "none"])
    a = p.parse_intermixed_args(argv)  # key=value pairs before and after the options
    d: dict[str, Any] = {}
    if a.config:
        try:
            with open(a.config) as f:
                d.update(json.load(f))
        except (OSError, ValueError) as e:
            p.error(f"--config {a.config}: cannot be read as a JSON configuration ({e})")
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
    except (DamagedRunError, NoSpaceError, NotWritableError) as e:
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
