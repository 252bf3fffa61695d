"""Dry runs: every configuration of a profile, a couple of steps each, on synthetic stand-in data.

    python -m vitrepro.experiments.run_all --profile paper --dry-run [--tiny]
    papermill notebooks/scaling.ipynb out.ipynb -p profile gpu -p dry_run True

What fails here would fail on the cluster: each configuration of the profile trains for `STEPS` steps with its
real model (with ``tiny``, those above 25 M parameters swapped for a tiny one of the same family), optimizer,
schedule (warm-up shortened to fit), augmentation, resolution and evaluators, at a small batch, on stand-in
datasets with the real ones' schema (parquet columns and features, splits, image sizes and modes), written once
into ``<tmp>/vitrepro-dryrun-data-v<VERSION>/<name>/`` and used as this process's data directory
(``settings.override``; the sweep's workers receive it). Seeds default to 1, subset sizes are capped at what
the stand-in holds, and the run store is a fresh temporary folder: nothing of a real run store, cache or
results/ is touched.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from .. import settings

STEPS = 2
BATCH = 8
VERSION = 4

# name -> (image column, label column, number of classes, {split: examples per class}, size (h, w) or None =
# mixed sizes, mode, extra ClassLabel columns). Schemas of the Hub sets in data.DATASETS.
SCHEMAS = {
    "mnist": ("image", "label", 10, {"train": 6, "test": 2}, (28, 28), "L", {}),
    # 300 per class: the cpu profile holds out 1/12 of the training split (25 per class), and its few-shot
    # probe draws up to 25 shots per class from that hold-out
    "fashion_mnist": ("image", "label", 10, {"train": 300, "test": 2}, (28, 28), "L", {}),
    "cifar10": ("img", "label", 10, {"train": 6, "test": 2}, (32, 32), "RGB", {}),
    "cifar100": ("img", "fine_label", 100, {"train": 6, "test": 1}, (32, 32), "RGB", {"coarse_label": 20}),
    "oxford_iiit_pet": ("image", "label", 37, {"train": 6, "test": 1}, None, "RGB", {}),
    "oxford_flowers102": ("image", "label", 102, {"train": 3, "validation": 3, "test": 1}, None, "RGB", {}),
    # streamed like the real one, validation = its test split; all 1000 classes in the features, examples
    # (5 each: the 5-shot probe's shots) for `PRESENT` of them, so that a probe costs 500 images, not 5,000
    "imagenet-1k": ("image", "label", 1000, {"train": 5, "validation": 0.1}, None, "RGB", {}),
}
PRESENT = {"imagenet-1k": 100}  # classes with training examples (the rest: declared, never drawn)


def write_standin(root: Path, name: str) -> Path:
    """Write the stand-in of ``name`` as ``root/name/<split>-00000-of-00001.parquet`` (Hub layout)."""
    import datasets
    import numpy as np
    from PIL import Image

    icol, lcol, k, splits, size, mode, extra = SCHEMAS[name]
    out = Path(root) / name
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    feats = {icol: datasets.Image(), lcol: datasets.ClassLabel(names=[f"class_{i}" for i in range(k)]),
             **{c: datasets.ClassLabel(names=[f"group_{i}" for i in range(m)]) for c, m in extra.items()}}
    present = np.sort(rng.choice(k, size=PRESENT[name], replace=False)) if name in PRESENT else np.arange(k)
    for split, per in splits.items():
        labels = (np.repeat(present, per) if per >= 1 else
                  np.sort(rng.choice(k, size=max(1, int(k * per)), replace=False)))
        images = []
        for y in labels:
            h, w = size or tuple(int(v) for v in rng.integers(24, 65, size=2))
            # noise plus a class-dependent level
            base = rng.integers(0, 256, size=(h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
            arr = ((base.astype(np.int32) + int(y) * 37) % 256).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr, mode).save(buf, format="PNG", compress_level=1)
            images.append({"bytes": buf.getvalue(), "path": None})
        cols = {icol: images, lcol: labels.tolist(), **{c: (labels % m).tolist() for c, m in extra.items()}}
        datasets.Dataset.from_dict(cols, features=datasets.Features(feats)).to_parquet(
            str(out / f"{split}-00000-of-00001.parquet"))
    return out


def standin_root(names: Sequence[str] | None = None) -> Path:
    """The stand-in data directory (written once per machine and reused; every set of `SCHEMAS`)."""
    root = Path(os.environ.get("VITREPRO_DRY_RUN_DATA")
                or Path(tempfile.gettempdir()) / f"vitrepro-dryrun-data-v{VERSION}")
    for name in names or SCHEMAS:
        if (root / name / ".complete").exists():
            continue
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=root) as tmp:  # written aside, then moved into place
            out = write_standin(tmp, name)
            (out / ".complete").write_text("ok\n")
            shutil.rmtree(root / name, ignore_errors=True)  # an incomplete one
            os.replace(out, root / name)
    return root


def available(dataset: str, val_fraction: float = 0.0) -> int | None:
    """Training examples the stand-in of ``dataset`` holds (after a stratified hold-out), None: not a stand-in."""
    from ..data import DATASETS, split_ref

    dataset = split_ref(dataset)[0]  # "cifar100[label_column=coarse_label]": the stand-in of cifar100
    if dataset not in SCHEMAS:
        return None
    _, _, k, splits, *_ = SCHEMAS[dataset]
    per = sum(splits.get(s, 0) for s in DATASETS[dataset].train_split.split("+"))
    classes = PRESENT.get(dataset, k)
    total = classes * per  # what preflight counts: the whole split less round(total x fraction)
    return int(min(classes * (per - int(round(per * val_fraction))), total - int(round(total * val_fraction))))


TINY_ABOVE = 25_000_000  # with tiny models: models above this many parameters are swapped (ViT-B, BiT-R50x1, ...)


def tiny_model(name: str) -> str:
    """The largest models (> `TINY_ABOVE` parameters) swapped for a tiny one of the same family and patch size
    (stride): ViT-*/p -> ViT-Nano/p, R..+ViT-*/s -> R14x0.25+ViT-Nano/s, BiT-R* -> BiT-R14x0.25."""
    from ..models.registry import parse_name
    from .preflight import param_count

    if param_count(name, sizes=(224, 256, 64), num_classes=1000) <= TINY_ABOVE:
        return name
    spec = parse_name(name)
    if spec.family == "bit":
        return "BiT-R14x0.25"
    return f"{'R14x0.25+' if spec.family == 'hybrid' else ''}ViT-Nano/{spec.vit.patch}"


def shrink(cfg: dict, tiny: bool = False) -> dict:
    """A configuration as the dry run trains it: `STEPS` steps (warm-up 1 unless constant), batch at most
    `BATCH`, subsets capped at the stand-in's size, checks every step; model, optimizer, lr, schedule,
    augmentation, resolution, evaluators and init unchanged (with ``tiny``: a tiny model of the family)."""
    cfg = {k: v for k, v in cfg.items() if k not in ("epochs", "eval_every")}
    # checkpoint_every: the final checkpoint only (a checkpoint of ViT-B is 1 GB)
    cfg.update(steps=STEPS, warmup_steps=min(int(cfg.get("warmup_steps") or 0), 1), accum_steps=1,
               batch_size=min(int(cfg.get("batch_size", 64)), BATCH), checkpoint_every=STEPS, log_every=1,
               **{k: 1 for k in ("select_every", "snapshot_every") if cfg.get(k)})
    if cfg.get("dataset"):
        cfg["dataset"] = cap_ref(cfg["dataset"])
    if cfg.get("train_examples") is not None:
        cfg["train_examples"] = cap(cfg.get("dataset"), int(cfg["train_examples"]), float(cfg.get("val_fraction") or 0))
    if tiny:
        cfg["model"] = tiny_model(cfg["model"])
    return cfg


def shrink_jobs(jobs, tiny: bool = False):
    """The jobs of a sweep with `shrink`ed configurations (parents kept: fine-tunes still start from them)."""
    for job in jobs:
        job.config = shrink(job.config, tiny)
    return jobs


def cap_ref(dataset: str) -> str:
    """A dataset reference as the dry run reads it: its ``train_examples=N`` at most what the stand-in holds."""
    from ..data import dataset_ref, ref_train_examples, split_ref

    n, (base, opts) = ref_train_examples(dataset), split_ref(dataset)
    avail = available(base) if n is not None else None
    if avail is None or n <= avail:
        return dataset
    return dataset_ref(base, **{**opts, "train_examples": avail})


def cap(dataset: str, n: int | None, val_fraction: float = 0.0) -> int | None:
    """A subset size as the dry run uses it (pixel baselines): at most what the stand-in holds."""
    avail = available(dataset, val_fraction)
    return n if n is None or avail is None else min(n, avail)


def activate(params) -> None:
    """Point this process's settings at the stand-in data (no array cache; `settings.override`, undone by
    giving back what it returns) and ``params`` at a fresh run store (a temporary folder, unless ``runs_dir``
    is given); seeds default to 1."""
    settings.override({"data_dir": standin_root(), "cache_dir": None})
    if not params.runs_dir:
        import atexit

        params.runs_dir = tempfile.mkdtemp(prefix=f"vitrepro-dryrun-{params.profile}-")
        if os.environ.get("VITREPRO_DRY_RUN_KEEP", "") in ("", "0"):
            atexit.register(shutil.rmtree, params.runs_dir, True)
    if params.seeds is None:
        params.seeds = 1
