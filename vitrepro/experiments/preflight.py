"""Everything a sweep can check before compute (`preflight`): data, splits, subset sizes, few-shot
draws, init files, shapes, run ids, and writable folders with free space."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from .jobs import Job
from .params import DATASET_KEYS, DATASET_PARAMS, NotebookParams, PreflightError, runs_dir


def _check_writable(path: Path, what: str, param: str, need_bytes: int) -> None:
    """`path` (perhaps not yet created) can be created and written, with `need_bytes` free."""
    import shutil
    import tempfile

    from ..store import existing_ancestor

    base = existing_ancestor(Path(path))
    if not base.is_dir():
        raise PreflightError(f"{what} {path} cannot be created: {base} is a file, not a folder; "
                             f"pass another with {param}=...")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise PreflightError(f"{what} {path} is not writable ({base}: {e.strerror or e}); "
                             f"pass a writable folder with {param}=...") from e
    free = shutil.disk_usage(base).free
    if free < need_bytes:
        raise PreflightError(f"{what} {path}: only {free / 2**20:.0f} MiB free on its disk, the sweep needs "
                             f"about {need_bytes / 2**20:.0f} MiB; free some space or pass {param}=<a folder "
                             "on a larger disk>")


def _param_hint(params: NotebookParams, dataset: str, columns: bool = False) -> str:
    """Which notebook parameter chooses this dataset (or the ones that could); with `columns`, how to choose
    the columns of it (the dict form of the parameter)."""
    cands = [f.name for f in dataclasses.fields(params) if f.name in DATASET_PARAMS]
    named = [n for n in cands if getattr(params, n) == dataset
             or (isinstance(getattr(params, n), list) and dataset in getattr(params, n))]
    if columns:
        from ..data import split_ref

        name = (named + cands + ["the dataset parameter"])[0]
        return (f"choose the columns with {name}={{\"path\": \"{split_ref(dataset)[0]}\", \"label_column\": ..., "
                "\"image_column\": ...}} (valid keys: " + ", ".join(DATASET_KEYS) + ")")
    if named:
        return f"pass another with {named[0]}=..."
    return (f"it comes from profile {params.profile!r}; choose "
            + (f"the datasets with {' / '.join(f'{n}=...' for n in cands)}, or " if cands else "")
            + "another profile=...")


def param_count(model: str, opts: dict | None = None, sizes=(32,), num_classes: int = 10) -> int:
    """Parameters of ``model`` built on the meta device (no memory) at the first of ``sizes`` it accepts;
    0 where it cannot be built (an estimate only)."""
    import torch

    from ..models import create_model

    for size in sizes:
        try:
            with torch.device("meta"):
                m = create_model(model, img_size=size, num_classes=num_classes, **(opts or {}))
            return sum(p.numel() for p in m.parameters())
        except Exception:  # noqa: BLE001 - not at this size (or not at all)
            continue
    return 0


def preflight(jobs: Sequence[Job], params: NotebookParams, workers: int = 1) -> dict:
    """Everything a sweep can check before any run folder exists: writable folders with free space
    (`_bytes_needed`), every (dataset, split) opens, subset sizes and batches fit, few-shot probes can draw
    their shots, init files exist, shapes, run ids. Errors (`PreflightError`) name the dataset or folder and
    the parameter that chooses it. Returns {"datasets": {(dataset, split): examples}, "need_bytes": estimate}."""
    from .. import train

    cfgs = []
    for job in jobs:
        try:
            cfgs.append((job, train.TrainConfig.from_dict(job.config)))
        except train.ConfigError as e:
            raise PreflightError(f"{job.stage} job {job.config.get('model')}: {e}") from e
    sizes = _open_splits(cfgs, params)
    for job, c in cfgs:
        _check_job(job, c, sizes, params)
    need = _bytes_needed(cfgs, getattr(params, "dry_run", False), workers)
    _check_writable(runs_dir(params), "the run store", "runs_dir", need)
    out = Path(params.results_dir).expanduser() if params.results_dir else runs_dir(params) / "results"
    _check_writable(out, "the results folder", "results_dir", 16 * 2**20)
    return {"datasets": {k: (len(v) if v is not None else None) for k, v in sizes.items()}, "need_bytes": need}


def _open_splits(cfgs: list, params: NotebookParams) -> dict[tuple[str, str], Any]:
    """Every (dataset, split) the jobs read, opened: its arrays (None for a streamed dataset)."""
    from .. import train
    from ..data import load_arrays, resolve_source

    sizes: dict[tuple[str, str], Any] = {}
    for job, c in cfgs:
        for ds, split in train.data_used(c):
            if (ds, split) in sizes:
                continue
            try:
                spec = resolve_source(ds).spec
                sizes[(ds, split)] = None if spec is not None and spec.streaming else load_arrays(ds, split)
            except Exception as e:  # noqa: BLE001 - DataError, a corrupt parquet, ...
                hint = _param_hint(params, ds, columns="column" in str(e))  # a column missing or ambiguous
                raise PreflightError(f"dataset {ds!r} (split {split!r}, used by the {job.stage} runs) cannot be "
                                     f"read: {type(e).__name__}: {e}; {hint}") from e
    return sizes


def _check_job(job: Job, c, sizes: dict, params: NotebookParams) -> None:
    """One job's subset size, batch, few-shot draws, init file, shapes, device and run id."""
    from .. import train
    from ..data import balanced_subset

    what = f"the {job.stage} runs of {c.model}"
    arrays = sizes.get((c.dataset, c.train_split))
    if arrays is not None:
        avail = len(arrays) - (int(round(len(arrays) * c.val_fraction)) if c.val_fraction > 0 else 0)
        if c.train_examples is not None and c.train_examples > avail:
            raise PreflightError(
                f"{what} use train_examples={c.train_examples} of {c.dataset!r}, which has only {avail} training "
                f"examples{' after the validation hold-out' if c.val_fraction else ''}; "
                f"{_param_hint(params, c.dataset)} (a larger dataset, "
                + ("smaller sizes=[...], " if hasattr(params, "sizes") else "") + "or a profile with smaller subsets)")
        n = min(avail, c.train_examples or avail)
        if c.batch_size > n:
            raise PreflightError(f"{what} on {c.dataset!r} use batch_size={c.batch_size} but have only {n} "
                                 f"training examples; {_param_hint(params, c.dataset)}")
    for e in c.evaluators:  # every few-shot probe can draw its shots per class from its training split
        ds = e.get("dataset") or c.dataset
        tr = sizes.get((ds, e.get("train_split", "train"))) if e.get("type") == "fewshot" else None
        shots = max(e.get("shots") or (25,))
        for seed in (e.get("seeds") or (0, 1, 2)) if tr is not None else ():
            try:
                balanced_subset(tr.labels, shots * tr.num_classes, seed)
            except Exception as err:  # noqa: BLE001
                raise PreflightError(f"the few-shot probe on {ds!r} cannot draw {shots} examples per class from its "
                                     f"training split: {err}; {_param_hint(params, ds)}") from err
    if train.init_names_a_file(c.init) and not Path(c.init).exists():
        raise PreflightError(f"init weights {c.init!r} ({what}) do not exist; pass an existing file")
    try:
        if c.img_size:  # impossible shapes (a patch size that does not divide a fine-tuning resolution, ...)
            train.check_shapes(c, c.img_size, c.in_chans or 3, 10)
    except train.ConfigError as e:
        raise PreflightError(f"{what}: {e}") from e
    try:  # the device exists, and every run id can be computed (data fingerprints: already loaded)
        train.resolved_identity(c)
    except train.ConfigError as e:
        hint = "pass device=..." if "device" in str(e) else _param_hint(params, c.dataset)
        raise PreflightError(f"{what}: {e}; {hint}") from e


def _bytes_needed(cfgs: list, dry_run: bool = False, workers: int = 1) -> int:
    """Disk space for the sweep's run folders: model.pt + checkpoint (weights + two Adam moments), ~16 bytes
    per parameter per run, plus 64 MiB. A dry run's store is temporary and never resumed, so the sweep drops
    each run's checkpoint when the run ends (`sweep._Sweep.finish`): 4 bytes per parameter per run (model.pt)
    plus 12 for each of the ``workers`` largest runs training at once."""
    counts: dict[tuple, int] = {}
    need = 0
    for job, c in cfgs:
        key = (c.model, tuple(sorted(c.model_options().items())), c.img_size)
        if key not in counts:
            counts[key] = param_count(c.model, c.model_options(), (c.img_size or 32,))
        need += (4 if dry_run else 16) * counts[key]
    if dry_run and counts:
        need += 12 * sum(sorted(counts.values())[-workers:])
    return need + 64 * 2**20
