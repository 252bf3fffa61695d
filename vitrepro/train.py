"""The trainer: one strictly validated configuration -> one stored, resumable run.

    record = run({"experiment": "demo", "model": "ViT-Nano/4", "dataset": "digits", "steps": 300})
    python -m vitrepro.train experiment=demo model=ViT-Nano/4 dataset=digits steps=300
    torchrun --standalone --nproc_per_node=2 -m vitrepro.train ...      (DDP; gloo on CPU, NCCL on GPU)

Determinism: the model is initialised from ``seed``, the data order and augmentation come from (seed, epoch,
batch) and dropout is reseeded from (seed, step, rank) before every step, so a run resumed from its checkpoint
ends with exactly the parameters and metrics of an uninterrupted run (same device and world size).
Optimisers: ``adam`` = AdamW (paper Table 3, pre-training), ``sgd`` = momentum 0.9 (App. B.1.1, fine-tuning);
weight decay applies to matrices and conv kernels only; schedule ``lr_at``; gradients clipped at ``grad_clip``.
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
from .data import (AUGMENTATIONS, Batches, DataError, ImageArrays, StreamBatches, data_fingerprint, load_arrays,
                   resolve_source, training_split)
from .evaluate import Accuracy, make_evaluator
from .machine import _cpu_flags, resolve_compile, resolve_precision, tune_cpu_allocator  # noqa: F401 (tests)
from .store import (DamagedRunError, NoSpaceError, NotWritableError, RunStore, atomic_torch_save, check_torch_content,
                    check_torch_file, code_versions, load_weights, run_id_for)

__all__ = ["TrainConfig", "ConfigError", "DivergedError", "run", "run_many", "run_id_of", "resolved_identity", "main",
           "resolve_precision", "lr_at"]


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any compute and before anything is stored."""


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


# The configuration keys that choose the architecture (create_model options beyond the name and shapes).
ARCH_KEYS = ("pool", "pos_embed", "pos_embed_at", "head", "representation_size", "drop_rate", "attn_drop_rate",
             "drop_path_rate")


def _hint(word, options, cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


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

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        if isinstance(d, TrainConfig):
            return d
        if not isinstance(d, dict):
            raise ConfigError(f"a configuration is a dict, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [f"{k!r}{_hint(k, names, 0.5)}" for k in d if k not in names]
        if unknown:
            raise ConfigError(f"unknown configuration key(s): {', '.join(unknown)}. Valid keys: {', '.join(names)}")
        cfg = cls(**d)
        cfg.check()
        return cfg

    to_dict = dataclasses.asdict

    def model_options(self) -> dict:
        return {k: getattr(self, k) for k in ARCH_KEYS if getattr(self, k) is not None}

    def check(self) -> None:
        """Static checks (no I/O), the fields' types first (an int for a float becomes a float, a tuple a list,
        so that equal configurations have equal run ids)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, typed.check(type(self), f.name, getattr(self, f.name), ConfigError, widen=True))
        if not self.experiment or "/" in self.experiment or self.experiment.startswith("."):
            raise ConfigError(f"experiment={self.experiment!r} must be a non-empty name without '/'")
        for name, options in (("optimizer", ("adam", "sgd")), ("schedule", ("cosine", "linear", "constant")),
                              ("precision", ("auto", "fp32", "bf16")), ("compile", ("auto", "on", "off")),
                              ("augment", AUGMENTATIONS)):
            v = getattr(self, name)
            if v not in options:
                raise ConfigError(f"{name}={v!r} is not one of {list(options)}{_hint(v, options)}")
        if self.select_on not in (None, "val"):
            raise ConfigError(f"select_on={self.select_on!r}: use 'val' (the held-out part of train) or None; "
                              "a selection on the test split is not offered")
        for what in ("select_on", "eval_split"):
            if getattr(self, what) == "val" and self.val_fraction <= 0:
                raise ConfigError(f"{what}='val' needs val_fraction > 0 (the held-out part of train)")
        for name in ("val_fraction", "label_smoothing"):
            if not (0.0 <= getattr(self, name) < 1.0):
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError("give exactly one of steps and epochs "
                              f"(got steps={self.steps!r}, epochs={self.epochs!r})")
        for name in ("select_every", "snapshot_every", "steps", "epochs", "batch_size", "accum_steps", "lr",
                     "log_every", "train_examples", "img_size", "checkpoint_every", "eval_every", "grad_clip"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be > 0")
        for name in ("weight_decay", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be >= 0")
        if self.in_chans not in (None, 1, 3):
            raise ConfigError(f"in_chans={self.in_chans} must be 1, 3 or None")
        if self.batch_size % self.accum_steps:
            raise ConfigError(f"batch_size={self.batch_size} is not divisible by accum_steps={self.accum_steps}")
        if self.steps is not None and self.warmup_steps >= self.steps and self.schedule != "constant":
            raise ConfigError(f"warmup_steps={self.warmup_steps} leaves no decay within steps={self.steps}")
        if not (self.device in ("auto", "cpu", "mps") or self.device.startswith("cuda")):
            raise ConfigError(f"device={self.device!r}: use auto, cpu, cuda or cuda:N")
        for e in self.evaluators:
            try:
                make_evaluator({"dataset": self.dataset, **e} if isinstance(e, dict) else e)
            except ValueError as err:
                raise ConfigError(f"evaluators: {err}") from err


def init_names_a_file(init: str | None) -> bool:
    """Whether ``init`` is a weights file path, not a stored run (``run:``) or a hub model (``timm:``, ``hf-hub:``)."""
    return bool(init) and not init.startswith(("run:", "timm:", "hf-hub:", "hf_hub:"))


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Learning rate of optimiser update ``step`` (0-based, of ``total``), as big_vision's
    ``create_learning_rate_schedule`` called with optax's update count: warm-up from exactly 0 (the first update
    has lr 0) to ``cfg.lr`` at ``warmup_steps``, then cosine, linear (to 0) or constant."""
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
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                              text=True, timeout=5).stdout.strip()
    try:
        rev = git("rev-parse", "HEAD")
        return (rev + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) if rev else None
    except Exception:  # noqa: BLE001
        return None


def _versions() -> dict:
    out = {"python": platform.python_version(), "vitrepro": __version__}
    for mod in ("torch", "numpy", "timm", "datasets"):
        with contextlib.suppress(Exception):
            out[mod] = __import__(mod).__version__
    return out


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _resolve_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    d = torch.device(spec)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={spec!r} but CUDA is not available")
    return torch.device("cuda", local_rank) if d.type == "cuda" and d.index is None else d


def _progress_mode(progress: str) -> str:
    progress = os.environ.get("VITREPRO_PROGRESS", progress)
    if progress != "auto":
        return progress
    if os.environ.get("PAPERMILL_EXECUTION") or os.environ.get("PAPERMILL"):
        return "log"
    try:
        return "bar" if "ipykernel" in sys.modules or sys.stderr.isatty() else "log"
    except Exception:  # noqa: BLE001
        return "log"


def _seed_for(*parts: int) -> int:
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p) + 1) % (2**62)
    return s


@dataclass
class TrainingPlan:
    """What `_prepare` found out before any compute: the data, the evaluators and the shapes to build."""
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


def _find_init_run(cfg: TrainConfig, store: RunStore) -> tuple[Path | None, dict | None]:
    """``init=run:...``: that run's folder and config (finished, readable, the same model); else (None, None)."""
    if init_names_a_file(cfg.init) and not Path(cfg.init).exists():
        raise ConfigError(f"init={cfg.init!r}: no such file (use run:<experiment>/<run_id>, timm:<name>.<tag> "
                          "or a .pth/.safetensors/.npz path)")
    if not (cfg.init and cfg.init.startswith("run:")):
        return None, None
    try:
        init_run = store.resolve(cfg.init)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from e
    try:
        check_torch_file(init_run / "model.pt", cfg.init[4:])
    except FileNotFoundError:
        raise ConfigError(f"init={cfg.init!r}: that run has no model.pt (not finished?)") from None
    except DamagedRunError as e:
        raise ConfigError(f"init={cfg.init!r}: the parent run's weights cannot be loaded: {e}") from e
    try:
        init_config = store.config(init_run.parent.name, init_run.name)
    except DamagedRunError as e:
        raise ConfigError(f"init={cfg.init!r}: the parent run's configuration cannot be read: {e}") from e
    if not isinstance(init_config.get("_resolved"), dict):  # rebuilt from a checkpoint by `store repair`
        raise ConfigError(f"init={cfg.init!r}: the parent run has not finished since its config.json was rebuilt; "
                          "run its configuration again (it resumes from its checkpoint), then fine-tune")
    if init_config.get("model") != cfg.model:
        raise ConfigError(f"init={cfg.init!r} is a {init_config.get('model')} but model={cfg.model!r}")
    return init_run, init_config


def _prepare(cfg: TrainConfig, store: RunStore) -> TrainingPlan:
    """Every check that needs I/O (the init run, the subset, the model's shapes), before any compute or write."""
    init_run, init_config = _find_init_run(cfg, store)
    parent = init_config["_resolved"] if init_config else {}
    src = resolve_source(cfg.dataset)
    if src.spec is not None and src.spec.streaming:  # imagenet-1k: streamed (`data.stream_batches`)
        if cfg.steps is None:
            raise ConfigError(f"{cfg.dataset} is streamed: give steps, not epochs")
        if cfg.val_fraction > 0:
            raise ConfigError(f"{cfg.dataset} is streamed: val_fraction is not supported; "
                              "use a split expression in train_split (e.g. 'train[:99%]')")
        arrays = val = None
        img_size, in_chans = cfg.img_size or parent.get("img_size", 224), cfg.in_chans or parent.get("in_chans", 3)
        num_classes, steps = src.spec.num_classes, cfg.steps
    else:
        try:
            arrays, val = training_split(load_arrays(cfg.dataset, cfg.train_split), cfg.val_fraction,
                                         cfg.train_examples, cfg.seed if cfg.data_seed is None else cfg.data_seed)
        except DataError as e:
            raise ConfigError(f"{cfg.dataset}: {e}") from e
        if cfg.batch_size > len(arrays):
            raise ConfigError(f"batch_size={cfg.batch_size} exceeds the {len(arrays)} training examples")
        img_size = cfg.img_size or parent.get("img_size", arrays.img_size)
        in_chans = cfg.in_chans or parent.get("in_chans", 3 if cfg.init else arrays.in_chans)
        num_classes = arrays.num_classes
        steps = cfg.steps if cfg.steps is not None else int(round(cfg.epochs * (len(arrays) // cfg.batch_size)))
        if steps <= 0:
            raise ConfigError(f"epochs={cfg.epochs} gives 0 steps with {len(arrays)} examples and batch "
                              f"{cfg.batch_size}")
        if cfg.warmup_steps >= steps and cfg.schedule != "constant":
            raise ConfigError(f"warmup_steps={cfg.warmup_steps} >= steps={steps}")
    check_shapes(cfg, img_size, in_chans, num_classes)
    selector = Accuracy(cfg.dataset, "val", arrays=val) if cfg.select_on == "val" else None
    return TrainingPlan(cfg, arrays, _make_evaluators(cfg, val), img_size, in_chans, num_classes, steps, init_run,
                        init_config, selector)


def _make_evaluators(cfg: TrainConfig, val: ImageArrays | None) -> list:
    """The configured evaluators; an accuracy on ``val`` and few-shot shots from ``val`` use this run's hold-out."""
    evaluators = []
    for e in cfg.evaluators:
        own = not e.get("dataset")  # this run's dataset, by default
        e = dict(e, dataset=e.get("dataset") or cfg.dataset)
        if e.get("type") == "accuracy" and own:
            e.setdefault("split", cfg.eval_split)
            if e["split"] == "val":
                e["arrays"] = val
        if e.get("type") == "fewshot" and e.get("train_split") == "val":
            # shots from the held-out part of this run's training set: images the model never trained on
            if e["dataset"] != cfg.dataset or val is None:
                raise ConfigError(f"few-shot train_split='val' draws its shots from the held-out part of "
                                  f"dataset={cfg.dataset!r}: give val_fraction > 0 and no other dataset")
            e["train_arrays"] = val
        evaluators.append(make_evaluator(e))
    return evaluators


def check_shapes(cfg: TrainConfig, img_size: int, in_chans: int, num_classes: int) -> None:
    """Build the model on the meta device (no memory, no compute): impossible shapes or options fail early."""
    from . import models
    try:
        with torch.device("meta"):
            models.create_model(cfg.model, img_size=img_size, in_chans=in_chans, num_classes=num_classes,
                                **cfg.model_options())
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model {cfg.model!r} at img_size={img_size}, in_chans={in_chans}: {e}") from e
    except (RuntimeError, NotImplementedError):
        pass  # an op without meta support: create_model validates its arguments before allocating


def _build_model(plan: TrainingPlan, device: torch.device, facts: dict):
    """The model from the seed, or from ``init``; ``facts`` (`_resolved_facts`): its architecture, with what an
    ``init=run:`` parent had (its shapes too), and whether its head is reset."""
    from . import models
    cfg = plan.cfg
    torch.manual_seed(cfg.seed)
    report = None
    shapes = plan.init_config["_resolved"] if plan.init_run is not None else facts
    model = models.create_model(cfg.model, img_size=shapes["img_size"], in_chans=shapes["in_chans"],
                                num_classes=shapes["num_classes"], **facts["arch"])
    if plan.init_run is not None:
        model.load_state_dict(torch.load(plan.init_run / "model.pt", map_location="cpu", weights_only=True))
        report = {"source": cfg.init}
        if shapes["img_size"] != plan.img_size:
            models.resize(model, plan.img_size)
    elif cfg.init:
        report = models.load_pretrained(model, cfg.init)
    if facts["head_reset"]:
        model.reset_head(plan.num_classes)
    return model.to(device), report


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # one without a gradient: the optimiser skips it
        skip = p.ndim < 2 or any(k in name for k in ("pos_embed", "cls_token", "rel_", "relative"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _make_optimizer(model, cfg: TrainConfig):
    # fused: the same update rule in one multi-tensor kernel (on CPU ~5x faster than the per-parameter loop)
    groups = _param_groups(model, cfg.weight_decay)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters()) or None
    if cfg.optimizer == "adam":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=fused)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=False, fused=fused)


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
    """What a configuration resolves to on this machine and data (part of the run id: docs/design.md);
    ``threads``: the CPU threads of the process that trains it (None: this one's)."""
    cfg = TrainConfig.from_dict(cfg)
    device = _resolve_device(cfg.device, 0)
    precision = resolve_precision(cfg.precision, device)
    ident: dict[str, Any] = {"device_type": device.type, "precision": precision}
    if device.type == "cpu":
        ident["cpu_threads"] = int(threads if threads is not None else torch.get_num_threads())
    ident["data"] = data = {}
    for ds, split in data_used(cfg):
        try:
            data[f"{ds}:{split}"] = data_fingerprint(ds, split)
        except Exception as e:  # noqa: BLE001 - DataError says what is wrong; any other: name the dataset and split
            raise ConfigError(str(e) if isinstance(e, DataError) else
                              f"dataset {ds!r}, split {split!r} cannot be read: {type(e).__name__}: {e}") from e
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
    """The optimiser steps a configuration will take (``_prepare``'s rule; the stratified hold-out rounds per
    class, so a few examples off: enough for a threshold); None where the size is unknown (streamed)."""
    if cfg.steps is not None:
        return cfg.steps
    n = (fingerprint or {}).get("n")
    if n is None:
        return None
    n_train = cfg.train_examples or int(round(n * (1.0 - cfg.val_fraction)))
    return int(round(cfg.epochs * (n_train // cfg.batch_size)))


def run_id_of(config: TrainConfig | dict, threads: int | None = None) -> str:
    """The store id of a configuration (``from_dict`` normalises it: lr=1 and lr=1.0 agree) as it resolves here."""
    cfg = TrainConfig.from_dict(config)
    return run_id_for(cfg.to_dict(), resolved=resolved_identity(cfg, threads))


def _arch_of(cfg: TrainConfig, init_config: dict | None) -> dict:
    """The full architecture: the run's own options, else its ``init=run:`` parent's, else the model's defaults."""
    import inspect

    from . import models
    arch: dict[str, Any] = {}
    if init_config is not None:
        arch.update((init_config.get("_resolved") or {}).get("arch") or {})
        arch.update({k: init_config[k] for k in ARCH_KEYS if init_config.get(k) is not None})
    arch.update(cfg.model_options())
    cls = models.bit.BiTResNet if _family(cfg.model) == "bit" else models.vit.VisionTransformer
    sig = inspect.signature(cls.__init__).parameters
    return {k: arch.get(k, sig[k].default) for k in ARCH_KEYS if k in sig}


def _say(msg: str) -> None:
    print(f"[vitrepro] {msg}", file=sys.stderr, flush=True)


def finished_record(store: RunStore, exp: str, rid: str, quiet: bool = False) -> dict | None:
    """The record of a finished run whose files read back, else None; a damaged record or model is
    reported (naming the file) and the run is done again (it resumes from its final checkpoint)."""
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


def run(config: TrainConfig | dict, store: RunStore | None = None, force: bool = False, progress: str = "auto") -> dict:
    """Train (or resume, or return the stored record of) one configuration. Returns the record. A second
    process of the same configuration waits for the run folder's owner (``RunStore.lock``), then returns its
    record or takes the run over; under DDP rank 0 takes the lock and decides for every rank (`_agree`)."""
    cfg = TrainConfig.from_dict(config)
    cfg.check()  # a TrainConfig built directly
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
            rec = finished_record(store, cfg.experiment, rid, quiet=not lock.waited)  # by the owner we waited for
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
                rec = {**_record_base(store, cfg, rid, facts, "failed"), "error": f"{type(e).__name__}: {e}",
                       "error_type": type(e).__name__}
                with contextlib.suppress(OSError):  # e.g. the disk is full: the original error says so
                    store.write_record(cfg.experiment, rid, rec)
            raise
    finally:
        if lock is not None:
            lock.release()


def _agree(record: dict | None, world: int) -> dict | None:
    """Rank 0's decision for every rank (a collective call): the finished record to return, or None (train)."""
    if world <= 1:
        return record
    box = [record]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _start_distributed(world: int, device: torch.device) -> None:
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _resolved_facts(plan: TrainingPlan, identity: dict) -> dict:
    """What the configuration resolved to (config.json's ``_resolved``, record.json's ``resolved``)."""
    cfg = plan.cfg
    head_reset = bool(cfg.init) and (cfg.reset_head is not False or (
        plan.init_config is not None and plan.init_config["_resolved"]["num_classes"] != plan.num_classes))
    return {"img_size": plan.img_size, "in_chans": plan.in_chans, "num_classes": plan.num_classes,
            "steps": plan.steps, "train_size": len(plan.train) if plan.train is not None else None,
            "arch": _arch_of(cfg, plan.init_config), "head_reset": head_reset,
            **identity, "numerics": code_versions()["numerics"]}


def _open_run_folder(store: RunStore, cfg: TrainConfig, rid: str, facts: dict, force: bool) -> None:
    """Rank 0, holding the lock: start clean where forced or never checkpointed, else check the checkpoint."""
    if force:
        for n in ("record.json", "checkpoint.pt", "metrics.jsonl", "model.pt"):
            store.drop(cfg.experiment, rid, n)
    checkpoint = store.run_dir(cfg.experiment, rid) / "checkpoint.pt"
    if checkpoint.exists():
        check_torch_file(checkpoint, f"{cfg.experiment}/{rid}")  # DamagedRunError names it and the remedy
    else:
        store.drop(cfg.experiment, rid, "metrics.jsonl")  # rows of an attempt that never checkpointed: start clean
    store.drop(cfg.experiment, rid, "record.json")
    store.create(cfg.experiment, rid, {**cfg.to_dict(), "_resolved": facts})


def _record_base(store: RunStore, cfg: TrainConfig, rid: str, facts: dict, status: str) -> dict:
    return {"run_id": rid, "experiment": cfg.experiment, "status": status, "config": cfg.to_dict(), "resolved": facts,
            "run_dir": str(store.run_dir(cfg.experiment, rid)), "versions": _versions(),
            "git_revision": _git_revision(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _train(plan: TrainingPlan, store: RunStore, rid: str, device: torch.device, rank: int, world: int,
           progress: str, facts: dict) -> dict:
    t = _build(plan, store, rid, device, rank, world, facts)
    _resume(t)
    _loop(t, progress)
    if t.best.best_state is not None:  # early stopping: evaluate (and store) the parameters chosen on validation
        t.model.load_state_dict(t.best.best_state)
    record = _record(t, facts) if rank == 0 else {"run_id": rid, "experiment": plan.cfg.experiment, "status": "ok",
                                                  "rank": rank}
    if world > 1:
        torch.distributed.barrier()
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
    amp: Any                        # torch.bfloat16 under bf16 autocast, else None
    best: "_BestOnValidation"
    init_report: Any
    t_start: float
    compiled: bool                  # train_model is torch.compile'd (resolved_identity's "compile")
    step: int = 0
    elapsed_before: float = 0.0     # training seconds before the checkpoint this run resumed from
    loss_sum: Any = None            # sum of the step losses since the last log row (a tensor on the device)
    loss_n: int = 0
    resumed_from: int | None = None
    train_time: float = 0.0         # seconds of training in all (this process and the ones it resumed)
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


def _build(plan: TrainingPlan, store: RunStore, rid: str, device: torch.device, rank: int, world: int,
           facts: dict) -> _Training:
    """The model (from the seed, or from ``init``), its optimiser, the batch stream and the selection."""
    cfg = plan.cfg
    t_start = time.time()
    if device.type == "cpu":
        tune_cpu_allocator()
    model, init_report = _build_model(plan, device, facts)
    optimizer = _make_optimizer(model, cfg)
    if plan.train is not None:
        batches = Batches(plan.train, cfg.batch_size, plan.img_size, plan.in_chans, augment=cfg.augment,
                          seed=cfg.seed, rank=rank, world_size=world, device=device)
    else:
        batches = StreamBatches(cfg.dataset, cfg.train_split, cfg.batch_size, plan.img_size, plan.in_chans,
                                augment=cfg.augment, seed=cfg.seed, rank=rank, world_size=world, device=device,
                                train_examples=cfg.train_examples, num_classes=plan.num_classes,
                                subset_seed=cfg.seed if cfg.data_seed is None else cfg.data_seed)
    amp = torch.bfloat16 if facts["precision"] == "bf16" else None
    epoch = max(1, len(plan.train) // cfg.batch_size) if plan.train is not None else 1
    best = _BestOnValidation(plan.selector, cfg.select_every or epoch, amp)
    return _Training(plan, store, rid, device, rank, world, model, model, optimizer, batches, amp, best, init_report,
                     t_start, bool(facts["compile"]), loss_sum=torch.zeros((), device=device))


def _resume(t: _Training) -> None:
    """Continue from the run's checkpoint where there is one, then wrap the model (DDP, compile)."""
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
        t.loss_sum, t.loss_n = checkpoint["loss_sum"].to(t.device), int(checkpoint["loss_n"])
        torch.set_rng_state(checkpoint["rng_cpu"])
        t.best.load_state_dict(checkpoint.get("selection"))
        if t.rank == 0:  # the rows the checkpoint had written: a final evaluation row after it is written again
            t.rows = t.store.truncate_metrics(t.cfg.experiment, t.rid, t.step, checkpoint.get("metrics_rows"))
    if t.world > 1:
        t.train_model = torch.nn.parallel.DistributedDataParallel(
            t.model, device_ids=[t.device.index] if t.device.type == "cuda" else None)
    if t.compiled:  # the training step only: evaluation, selection and checkpoints use the eager t.model
        # a sweep worker trains many models in one process: without a reset, each new model counts as a recompile
        # of the same frame, and past dynamo's recompile limit later runs train eagerly while recorded as compiled
        torch._dynamo.reset()
        t.train_model = torch.compile(t.train_model)
    t.model.train()


def _save_checkpoint(t: _Training) -> None:
    if t.rank == 0:
        atomic_torch_save(t.run_dir / "checkpoint.pt", {
            "model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(), "data": t.batches.state_dict(),
            "step": t.step, "elapsed": t.elapsed_before + time.time() - t.t_start, "loss_sum": t.loss_sum.cpu(),
            "loss_n": t.loss_n, "rng_cpu": torch.get_rng_state(), "config": t.cfg.to_dict(),
            "selection": t.best.state_dict(), "metrics_rows": t.rows})


def _check_finite(t: _Training, value: float) -> None:
    if not math.isfinite(value):
        raise DivergedError(f"training loss became {value} by step {t.step} "
                            f"(lr={lr_at(t.step - 1, t.cfg, t.plan.steps):.3g}); try a lower learning rate, warmup or "
                            "grad_clip" + ("; if precision=fp32 trains, it is a bf16 numerics problem, not the "
                                           "learning rate" if t.amp is not None else ""))


def _train_step(t: _Training) -> float:
    """One optimiser step over ``accum_steps`` micro-batches, dropout reseeded from (seed, step, rank); its lr."""
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
        from tqdm.auto import tqdm
        self.mode = _progress_mode(progress) if t.rank == 0 else "none"
        self.name, self.t_log, self.step_log = f"{t.cfg.experiment}/{t.rid}", time.time(), t.step
        self.bar = tqdm(total=t.plan.steps, initial=t.step, desc=self.name, dynamic_ncols=True,
                        disable=self.mode != "bar")  # a disabled bar ignores every call

    def show(self, t: _Training, loss: float, lr: float) -> float:
        """Shows the loss, the lr and the images per second since the last call; returns the latter."""
        now = time.time()
        ips = (t.step - self.step_log) * t.cfg.batch_size / max(1e-9, now - self.t_log)
        self.t_log, self.step_log = now, t.step
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
        if self.mode == "log":
            print(f"[{self.name}] step {t.step}/{t.plan.steps} loss {loss:.4f} lr {lr:.3g} {ips:.0f} img/s", flush=True)
        return ips


def _log_loss(t: _Training, lr: float, progress: _Progress) -> None:
    """A metrics row with the mean loss since the last row (averaged over DDP ranks); resets the sums."""
    mean_loss = float(t.loss_sum) / max(1, t.loss_n)
    if t.world > 1:
        total = torch.tensor([mean_loss], device=t.device)
        torch.distributed.all_reduce(total)
        mean_loss = float(total) / t.world
    _check_finite(t, mean_loss)
    ips = progress.show(t, mean_loss, lr)
    t.log_row({"step": t.step, "loss": mean_loss, "lr": lr, "images_per_s": round(ips, 2),
               "epoch": round(t.step * t.cfg.batch_size / t.train_size, 4) if t.train_size else None})
    t.loss_sum, t.loss_n = torch.zeros((), device=t.device), 0


def _loop(t: _Training, progress: str) -> None:
    """Train until ``plan.steps``: log, select on validation, snapshot, evaluate and checkpoint on schedule."""
    cfg = t.cfg
    shown = _Progress(t, progress)
    while t.step < t.plan.steps:
        lr = _train_step(t)
        last = t.step == t.plan.steps
        if t.step % cfg.log_every == 0 or last:
            _log_loss(t, lr, shown)
        shown.bar.update(1)
        if t.best.selector is not None and (t.step % t.best.every == 0 or last):
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
    shown.bar.close()
    t.train_time = t.elapsed_before + time.time() - t.t_start


def _evaluate(t: _Training) -> dict[str, float]:
    """Every evaluator on the final (or chosen) parameters, the last loss, the best validation accuracy."""
    metrics: dict[str, float] = {}
    for ev in t.plan.evaluators:
        metrics.update(ev(t.model, autocast_dtype=t.amp))
    # the last logged training loss (a later row's value replaces an earlier one)
    metrics.update({"train/loss": r["loss"] for r in t.store.metrics(t.cfg.experiment, t.rid) if "loss" in r})
    if t.best.selector is not None:
        metrics[t.best.selector.name] = t.best.best_acc
    t.log_row({"step": t.step, **metrics})
    return metrics


def _record(t: _Training, facts: dict) -> dict:
    """Evaluate, store the model and write record.json: metrics, cost (steps, images, FLOPs, time), versions."""
    from . import models
    t_eval = time.time()
    metrics = _evaluate(t)
    eval_time = time.time() - t_eval
    cfg, device, flops, flops_error = t.cfg, t.device, None, None
    try:
        flops = int(models.flops(t.model, t.plan.img_size))
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        flops_error = f"{type(e).__name__}: {e}"
    atomic_torch_save(t.run_dir / "model.pt", t.model.state_dict())
    images_seen = t.plan.steps * cfg.batch_size
    record = {
        **_record_base(t.store, cfg, t.rid, facts, "ok"),
        "metrics": metrics, "steps": t.plan.steps, "images_seen": images_seen,
        "epochs_seen": images_seen / t.train_size if t.train_size else None, "wall_time_s": t.train_time,
        "eval_time_s": eval_time, "flops_per_image": flops, "flops_error": flops_error,
        "train_flops": (3 * flops * images_seen) if flops else None,
        "params": sum(p.numel() for p in t.model.parameters()),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "precision": facts["precision"], "world_size": t.world, "resumed_from_step": t.resumed_from,
        "init_report": t.init_report, "hostname": platform.node(), "selection": t.best.summary(),
    }
    t.store.write_record(cfg.experiment, t.rid, record)
    return record


class _BestOnValidation:
    """Early stopping on held-out data ([P] §4.3: "we ... use early-stopping, and report the best validation
    accuracy achieved during training"): every ``every`` steps and at the end, accuracy on the validation part
    of the training set; the best parameters are the run's result (without a selector: the final ones)."""
    _STATE = ("best_acc", "best_step", "best_state", "curve")  # what a checkpoint keeps

    def __init__(self, selector, every: int, amp):
        self.selector, self.every, self.amp = selector, every, amp
        self.best_acc, self.best_step, self.best_state, self.curve = -1.0, None, None, []

    def update(self, model, step: int) -> float:
        acc = float(next(iter(self.selector(model, autocast_dtype=self.amp).values())))
        self.curve.append([step, acc])
        if acc > self.best_acc:  # ties keep the earlier (cheaper) parameters
            self.best_acc, self.best_step = acc, step
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return acc

    def summary(self) -> dict | None:
        return None if self.selector is None else {"on": self.selector.name, "best_step": self.best_step,
                                                   "best_val": self.best_acc, "curve": self.curve}

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self._STATE}

    def load_state_dict(self, state: dict | None) -> None:
        for k in self._STATE if state else ():
            setattr(self, k, state[k])


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
            rid, rec = run_id_of(c), None
            with contextlib.suppress(Exception):  # a damaged record: the error below says what happened
                rec = store.record(c.experiment, rid)
            rec = rec or {"run_id": rid, "experiment": c.experiment, "status": "failed",
                          "error": f"{type(e).__name__}: {e}"}
            print(f"[vitrepro] run {c.experiment}/{rid} failed: {rec.get('error')}", file=sys.stderr)
            out.append(rec)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m vitrepro.train", description="Train one configuration: key=value "
                                "pairs (values parsed as JSON when possible) on top of an optional --config JSON file.",
                                epilog="exit status: 0 finished (or reused), 2 configuration error, 3 diverged, 4 "
                                "run-store error (a damaged run file, no space left, a folder that cannot be written), "
                                "each with its remedy")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. model=ViT-Nano/4 steps=300 lr=1e-3")
    p.add_argument("--config", help="JSON file with a configuration dict")
    p.add_argument("--store", help="run store root (default: vitrepro.settings: $VITREPRO_RUNS, vitrepro.toml, "
                                   "<repo>/runs)")
    p.add_argument("--force", action="store_true", help="re-run even if a finished record exists")
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "log", "none"])
    a = p.parse_intermixed_args(argv)  # key=value pairs before and after the options
    d: dict[str, Any] = {}
    if a.config:
        try:
            d.update(json.loads(Path(a.config).read_text()))
        except (OSError, ValueError) as e:
            p.error(f"--config {a.config}: cannot be read as a JSON configuration ({e})")
    for o in a.overrides:
        if "=" not in o:
            p.error(f"expected key=value, got {o!r}")
        k, v = o.split("=", 1)
        try:
            d[k] = json.loads(v)
        except json.JSONDecodeError:
            d[k] = v
    exits = {ConfigError: ("configuration error", 2), DivergedError: ("diverged", 3), DamagedRunError: ("error", 4),
             NoSpaceError: ("error", 4), NotWritableError: ("error", 4)}  # the epilog's exit statuses
    try:
        rec = run(d, RunStore(a.store) if a.store else None, force=a.force, progress=a.progress)
    except tuple(exits) as e:
        what, status = next(v for k, v in exits.items() if isinstance(e, k))
        print(f"{what}: {e}", file=sys.stderr)
        return status
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if _dist_env()[0] == 0:
        print(json.dumps({k: rec.get(k) for k in ("run_id", "status", "metrics", "run_dir")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
