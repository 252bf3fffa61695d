"""What every reproduction notebook shares: parameters, profiles, sweeps and the files they write.

A notebook is a thin script: its `parameters` cell (papermill) is validated by
`validate_params`, `run_sweep` trains or reuses the runs of a profile through the run store,
and `write_results` puts the long-form CSV, Markdown tables and PNG figures into
`results/<notebook>/`. Everything numeric comes from the run store's files, so re-executing a
notebook only re-draws.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

PROFILES = ("smoke", "cpu", "gpu", "paper")
REPO_ROOT = Path(__file__).resolve().parents[2]


class ParameterError(ValueError):
    """A notebook parameter that is unknown, of the wrong type or impossible."""


@dataclass
class NotebookParams:
    """Parameters every notebook takes (the `parameters` cell documents each one)."""

    profile: str = "cpu"
    seeds: int | None = None  # number of seeds per point; None = the profile's default
    results_dir: str | None = None  # None = results/<notebook>/
    runs_dir: str | None = None  # None = $VITREPRO_RUNS or runs/
    device: str = "auto"
    force: bool = False  # retrain even when the run store has a finished record


# Variables the notebooks themselves define after validation (so re-running that cell still works).
NOTEBOOK_VARIABLES = {"params", "df", "tables", "figures", "written", "analysed", "sim_figures"}


def _is_parameter_like(name: str, value: Any) -> bool:
    """True for the notebook globals that can only have come from the parameters cell."""
    if name.startswith("_") or name in {"In", "Out", "get_ipython", "exit", "quit", "display"} | NOTEBOOK_VARIABLES:
        return False
    if isinstance(value, (types.ModuleType, types.FunctionType, type, types.BuiltinFunctionType)):
        return False
    return isinstance(value, (str, int, float, bool, list, tuple, dict, type(None)))


def validate_params(cls: type, values: dict[str, Any], *, strict_globals: bool = True):
    """Build the experiment's parameter dataclass from notebook globals, strictly.

    papermill only *warns* about a parameter the notebook does not declare and injects it anyway,
    so a misspelled `-p profil cpu` would silently run the default. Here every parameter-like
    global must be a declared field; unknown names fail with the closest valid spelling.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs, unknown = {}, []
    for name, value in values.items():
        if name in fields:
            kwargs[name] = value
        elif strict_globals and _is_parameter_like(name, value):
            unknown.append(name)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, fields, n=1)
            hints.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ParameterError(
            f"unknown notebook parameter(s) {', '.join(hints)}; valid parameters: {', '.join(fields)}")
    params = cls(**kwargs)
    for f in dataclasses.fields(cls):
        value = getattr(params, f.name)
        _check_type(f, value)
    if params.profile not in PROFILES:
        raise ParameterError(f"profile={params.profile!r} is not one of {PROFILES}")
    if params.seeds is not None and (not isinstance(params.seeds, int) or params.seeds < 1):
        raise ParameterError(f"seeds must be a positive integer (number of seeds), got {params.seeds!r}")
    if params.device not in ("auto", "cpu") and not str(params.device).startswith(("cuda", "mps")):
        raise ParameterError(f"device={params.device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    check = getattr(params, "check", None)
    if check is not None:
        check()
    return params


def _check_type(f: dataclasses.Field, value: Any) -> None:
    expected = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    allowed = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
               "str | None": (str, type(None)), "int | None": (int, type(None)),
               "float | None": (int, float, type(None)), "list": (list, tuple),
               "list | None": (list, tuple, type(None))}.get(expected)
    if allowed is None:
        return
    if isinstance(value, bool) and bool not in allowed:
        raise ParameterError(f"parameter {f.name} must be {expected}, got {value!r}")
    if not isinstance(value, allowed):
        raise ParameterError(f"parameter {f.name} must be {expected}, got {type(value).__name__} {value!r}")


def results_dir(params: NotebookParams, notebook: str) -> Path:
    return Path(params.results_dir) if params.results_dir else REPO_ROOT / "results" / notebook


def runs_dir(params: NotebookParams) -> Path:
    return Path(params.runs_dir or os.environ.get("VITREPRO_RUNS") or REPO_ROOT / "runs")


def atomic_write_text(path: Path, text: str) -> None:
    from ..store import atomic_write

    atomic_write(Path(path), lambda f: f.write(text.encode()))


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure atomically as PNG."""
    from ..store import atomic_write

    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    return Path(path)


def write_results(out: Path, frame, tables: dict[str, Any], figures: dict[str, Any], notes: str = "") -> list[Path]:
    """Write `<out>/results.csv` (long form), `<out>/tables.md` and one PNG per figure."""
    import matplotlib.pyplot as plt

    out = Path(out)
    written = []
    atomic_write_text(out / "results.csv", frame.to_csv(index=False))
    written.append(out / "results.csv")
    md = [notes.strip(), ""] if notes else []
    for title, table in tables.items():
        md += [f"## {title}", "", table.to_markdown(index=False) if hasattr(table, "to_markdown") else str(table), ""]
    atomic_write_text(out / "tables.md", "\n".join(md))
    written.append(out / "tables.md")
    for name, fig in figures.items():
        written.append(save_figure(fig, out / f"{name}.png"))
        plt.close(fig)
    return written


def mean_spread(frame, by: Sequence[str], value: str = "value"):
    """Mean, standard deviation and count over seeds for each group (what every table shows)."""
    g = frame.groupby(list(by), dropna=False)[value]
    table = g.agg(mean="mean", std="std", n="count").reset_index()
    table["std"] = table["std"].fillna(0.0)
    return table


def fmt_pm(mean: float, std: float, n: int, scale: float = 1.0, digits: int = 1) -> str:
    if n <= 1:
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


# ------------------------------------------------------------------------------ sweeps
@dataclass
class Job:
    """One training run of a sweep, plus what the tables need to know about it."""

    config: dict
    stage: str  # "pretrain" | "finetune" | "scratch"
    upstream: str | None = None
    upstream_examples: int | None = None
    parent: "Job | None" = None  # the pre-training job a fine-tune starts from


def finetune_from(parent: Job, record: dict) -> str:
    """The `init` of a fine-tuning config: the stored final weights of the parent run."""
    return f"run:{record['experiment']}/{record['run_id']}"


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _train_one(cfg: dict, root: str, force: bool) -> dict:
    """Train one configuration (in this process or a pool worker); failures become records."""
    from .. import train
    from ..store import RunStore

    try:
        return train.run(train.TrainConfig.from_dict(cfg), store=RunStore(root), force=force, progress="log")
    except train.ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - diverged or crashed: the trainer recorded it; the sweep goes on
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"}


def default_workers(params: NotebookParams) -> int:
    """Parallel runs: small CPU models use one core far better than two, so a 2-core machine trains
    two runs at once with one thread each; on a GPU, one run at a time."""
    import torch

    if params.device.startswith("cuda") or (params.device == "auto" and torch.cuda.is_available()):
        return 1
    return max(1, min(int(os.environ.get("VITREPRO_WORKERS", os.cpu_count() or 1)), 8))


def run_jobs(jobs: Sequence[Job], params: NotebookParams, log: Callable[[str], None] | None = None,
             workers: int | None = None) -> list[tuple[Job, dict]]:
    """Train (or reuse from the run store) every job; fine-tunes start once their parent finished.

    Configurations are validated before anything trains. A job whose parent failed is skipped; a
    failed run (e.g. diverged) is recorded by the trainer and the sweep carries on. With several
    workers (CPU), runs go to a process pool, one torch thread each.
    """
    import time
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    import multiprocessing as mp

    from .. import train
    from ..store import RunStore

    log = log or (lambda msg: print(msg, flush=True))
    root = str(runs_dir(params))
    for job in jobs:  # fail fast on a bad configuration, before any compute
        cfg = dict(job.config)
        if params.device != "auto":
            cfg["device"] = params.device
        job.config = cfg
        if job.parent is None:
            train.TrainConfig.from_dict(cfg)
    store = RunStore(root)
    workers = workers or default_workers(params)
    done: dict[int, dict] = {}
    out: list[tuple[Job, dict]] = []
    pending = [j for j in jobs if j.parent is None]
    waiting = [j for j in jobs if j.parent is not None]
    t0 = time.time()
    total = len(jobs)

    def describe(job, cfg):
        return (f"{job.stage} {cfg.get('model')} on {cfg.get('dataset')} "
                f"(n={cfg.get('train_examples') or 'all'}, img {cfg.get('img_size')}, seed {cfg.get('seed')})")

    def ready_config(job):
        cfg = dict(job.config)
        if job.parent is not None:
            cfg["init"] = finetune_from(job.parent, done[id(job.parent)])
        return cfg

    def finish(job, cfg, record):
        done[id(job)] = record
        out.append((job, record))
        status = record.get("status")
        extra = "" if status == "ok" else f": {record.get('error')}"
        log(f"[{len(out)}/{total}] {status} {describe(job, cfg)} after {time.time() - t0:.0f}s{extra}")

    def release():
        nonlocal waiting
        ready, still = [], []
        for j in waiting:
            if id(j.parent) in done:
                if done[id(j.parent)].get("status") == "ok":
                    ready.append(j)
                else:
                    out.append((j, {"status": "skipped"}))
                    log(f"[{len(out)}/{total}] skip {describe(j, j.config)}: its pre-training run failed")
            else:
                still.append(j)
        waiting = still
        return ready

    # finished runs come straight from the store (no pool needed)
    def cached(job, cfg):
        if params.force:
            return None
        rec = store.record(cfg["experiment"], train.run_id_of(cfg))
        return rec if rec is not None and rec.get("status") == "ok" else None

    if workers <= 1:
        while pending:
            job = pending.pop(0)
            cfg = ready_config(job)
            rec = cached(job, cfg) or _train_one(cfg, root, params.force)
            finish(job, cfg, rec)
            pending += release()
        return out

    log(f"training with {workers} parallel workers, 1 thread each")
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(1,)) as pool:
        running = {}
        while pending or running:
            while pending:
                job = pending.pop(0)
                cfg = ready_config(job)
                rec = cached(job, cfg)
                if rec is not None:
                    finish(job, cfg, rec)
                    pending += release()
                    continue
                running[pool.submit(_train_one, cfg, root, params.force)] = (job, cfg)
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                job, cfg = running.pop(fut)
                finish(job, cfg, fut.result())
                pending += release()
    return out


# ------------------------------------------------------------------ configs and long-form results
def train_config(*, fewshot_dataset: str | None = None, fewshot_shots: Sequence[int] = (5,),
                 fewshot_seeds: Sequence[int] = (0, 1, 2), augment: bool | str = False,
                 eval_examples: int | None = None, **fields) -> dict:
    """A `vitrepro.train.TrainConfig` dict: test accuracy (on the first `eval_examples` test images
    where given), plus the 5-shot probe where asked."""
    evaluators = [{"type": "accuracy"} if eval_examples is None else {"type": "accuracy", "max_examples": eval_examples}]
    if fewshot_dataset:
        evaluators.append({"type": "fewshot", "dataset": fewshot_dataset, "shots": list(fewshot_shots),
                           "seeds": list(fewshot_seeds)})
    cfg = dict(fields, evaluators=evaluators)
    cfg["augment"] = {True: "crop_flip", False: "none"}.get(augment, augment)
    cfg.setdefault("log_every", 50)
    return cfg


def _metric_rows(record: dict) -> list[tuple[str, str, float]]:
    """(dataset, metric, value) from a run record: `top1` on the test split, `fewshot<k>` per probe."""
    rows = []
    for key, value in (record.get("metrics") or {}).items():
        parts = key.split("/")
        if parts[0] == "acc" and len(parts) == 3:
            rows.append((parts[1], "top1" if parts[2] == "test" else f"top1_{parts[2]}", value))
        elif parts[0] == "fewshot" and len(parts) == 3:
            rows.append((parts[1], f"fewshot{parts[2].removesuffix('shot')}", value))
    return rows


def _family(model: str) -> str:
    return "Hybrid" if "+" in model else ("ResNet" if model.startswith("BiT") else "ViT")


def tidy(results: Sequence[tuple[Job, dict]], notebook: str, profile: str):
    """Long-form frame (report.SCHEMA): one row per run, seed and metric, from the stored records."""
    import pandas as pd

    rows = []
    by_job = {id(job): rec for job, rec in results}

    def upstream_size(job):
        """Upstream examples: the configured subset, else the size the pre-training run resolved."""
        if job.upstream_examples is not None:
            return job.upstream_examples
        pre = job if job.parent is None else job.parent
        if job.stage == "scratch":
            return None
        return ((by_job.get(id(pre)) or {}).get("resolved") or {}).get("train_size")

    for job, rec in results:
        if rec.get("status") != "ok":
            continue
        cfg = rec.get("config") or job.config
        for dataset, metric, value in _metric_rows(rec):
            rows.append(dict(
                notebook=notebook, profile=profile, run_id=rec["run_id"], stage=job.stage, model=cfg["model"],
                family=_family(cfg["model"]), upstream=job.upstream, upstream_examples=upstream_size(job),
                dataset=dataset, img_size=(rec.get("resolved") or {}).get("img_size", cfg.get("img_size")),
                pos_embed=cfg.get("pos_embed") or "1d", pos_embed_at=cfg.get("pos_embed_at") or "stem",
                pool=cfg.get("pool") or "token", lr=cfg.get("lr"), seed=cfg.get("seed"), metric=metric,
                value=value, train_flops=rec.get("train_flops"), params=rec.get("params"),
                wall_s=rec.get("wall_time_s")))
    return pd.DataFrame(rows, columns=None if rows else __import__("vitrepro.report", fromlist=["SCHEMA"]).SCHEMA)


def collect(jobs: Sequence[Job], params: NotebookParams, notebook: str):
    """Finished runs of a sweep, read back from the run store without training anything."""
    from ..store import RunStore
    from ..train import run_id_of

    store = RunStore(runs_dir(params))
    records: dict[int, dict] = {}
    results = []
    for job in [j for j in jobs if j.parent is None] + [j for j in jobs if j.parent is not None]:
        cfg = dict(job.config)
        if job.parent is not None:
            parent = records.get(id(job.parent))
            if parent is None:
                continue
            cfg["init"] = finetune_from(job.parent, parent)
        if params.device != "auto":
            cfg["device"] = params.device
        rec = store.record(cfg["experiment"], run_id_of(cfg))
        if rec is not None and rec.get("status") == "ok":
            records[id(job)] = rec
            results.append((job, rec))
    return tidy(results, notebook, params.profile)


def load_run_model(params: NotebookParams, run_ref: str):
    """The final model of a stored run (`run:<experiment>/<run_id>` or a bare run id of this store)."""
    import json

    import torch

    from ..models import create_model
    from ..store import RunStore

    store = RunStore(runs_dir(params))
    if run_ref.startswith("run:") or "/" in run_ref:
        d = store.resolve(run_ref)
    else:
        d = next(p for _, rid, p in store.runs() if rid == run_ref)
    conf = json.loads((d / "config.json").read_text())
    res = conf.get("_resolved", {})
    opts = {k: conf[k] for k in ("pool", "pos_embed", "pos_embed_at", "head", "representation_size")
            if conf.get(k) is not None}
    model = create_model(conf["model"], img_size=res["img_size"], in_chans=res["in_chans"],
                         num_classes=res["num_classes"], **opts)
    if conf.get("init") and conf.get("reset_head") is not False:
        model.reset_head(res["num_classes"])  # fine-tuned runs carry the zero-initialised linear head
    state = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
