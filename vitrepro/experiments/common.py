"""What every reproduction notebook shares: parameters, profiles, sweeps and the files they write.

A notebook is a thin script: its `parameters` cell (papermill) is validated by
`validate_params`, `run_jobs` checks everything it can before compute (`preflight`), then trains or
reuses the runs of a profile through the run store, and `write_results` puts the long-form CSV,
Markdown tables and PNG figures into `results_dir(params, notebook)`: by default a fresh folder
`<runs_dir>/results/<notebook>/<profile>/` (out of git); the committed `results/<notebook>/` is
written only when asked for explicitly (`make reproduce`, i.e. `run_all`). Everything numeric comes
from the run store's files, so re-executing a notebook only re-draws.

A sweep fails loudly: when any run fails or is skipped, `run_jobs` raises `SweepError` with a summary
of which runs failed and why (papermill exits non-zero), unless `allow_partial=True`, in which case
the tables are written from the finished runs and marked partial. SIGINT/SIGTERM stop every pool
worker (they also die with their parent), leaving each run resumable.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

PROFILES = ("smoke", "cpu", "gpu", "paper")
REPO_ROOT = Path(__file__).resolve().parents[2]

# The long-form results frame every notebook writes (results.csv) and vitrepro.report reads.
SCHEMA = ["notebook", "profile", "run_id", "stage", "model", "family", "upstream", "upstream_examples",
          "dataset", "img_size", "pos_embed", "pos_embed_at", "pool", "lr", "seed", "metric", "value",
          "train_flops", "params", "wall_s"]


class ParameterError(ValueError):
    """A notebook parameter that is unknown, of the wrong type or impossible."""


class PreflightError(ParameterError):
    """Found before any compute: a dataset, split, subset size or directory the sweep cannot use."""


class SweepError(RuntimeError):
    """Some runs of a sweep failed or were skipped (and allow_partial is off), or none finished."""


@dataclass
class NotebookParams:
    """Parameters every notebook takes (the `parameters` cell documents each one)."""

    profile: str = "cpu"
    seeds: int | None = None  # number of seeds per point; None = the profile's default
    results_dir: str | None = None  # None = <runs_dir>/results/<notebook>/<profile>/ (a fresh folder, out of git)
    runs_dir: str | None = None  # None = $VITREPRO_RUNS or runs/
    device: str = "auto"
    force: bool = False  # retrain even when the run store has a finished record
    allow_partial: bool = False  # write tables from the finished runs when some failed (marked partial)


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
    """Where a notebook writes: `params.results_dir`, else `<runs_dir>/results/<notebook>/<profile>/`
    (never the committed `results/<notebook>/`, which only `run_all` / `make reproduce` rewrites)."""
    if params.results_dir:
        return Path(params.results_dir).expanduser()
    return runs_dir(params) / "results" / notebook / params.profile


def runs_dir(params: NotebookParams) -> Path:
    """The run store: `params.runs_dir`, else $VITREPRO_RUNS, else `<repo>/runs` (out of git)."""
    return Path(params.runs_dir or os.environ.get("VITREPRO_RUNS") or REPO_ROOT / "runs").expanduser()


def atomic_write_text(path: Path, text: str) -> None:
    from ..store import atomic_write

    atomic_write(Path(path), lambda f: f.write(text.encode()))


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure atomically as PNG."""
    from ..store import atomic_write

    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    return Path(path)


def write_results(out: Path, frame, tables: dict[str, Any], figures: dict[str, Any], notes: str = "",
                  partial: str | None = None) -> list[Path]:
    """Write `<out>/results.csv` (long form), `<out>/tables.md` and one PNG per figure.

    Refuses an empty frame (nothing finished: no header-only files). Partial results (a sweep run
    with `allow_partial=True` where some runs failed; `partial` defaults to what `run_jobs` reported)
    are marked so at the top of tables.md and in every table title."""
    import matplotlib.pyplot as plt

    out = Path(out)
    if frame is None or len(frame) == 0:
        raise SweepError(f"nothing to write to {out}: no run of the sweep finished (the results frame is empty)")
    if partial is None:
        partial = (getattr(frame, "attrs", {}) or {}).get("partial") or LAST_SWEEP.get("partial")
    written = []
    atomic_write_text(out / "results.csv", frame.to_csv(index=False))
    written.append(out / "results.csv")
    md = [notes.strip(), ""] if notes else []
    if partial:
        md = ["> **Partial results** (`allow_partial=True`): these tables leave out the runs below.", ">"] + \
             [f"> {line}" for line in str(partial).splitlines()] + [""] + md
    for title, table in tables.items():
        title = f"{title} (partial)" if partial else title
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


def _die_with_parent(parent_pid: int) -> None:
    """Linux: ask the kernel to send SIGTERM to this process when its parent dies (PR_SET_PDEATHSIG),
    so pool workers never outlive the notebook kernel or script that started them."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _worker_init(threads: int, parent_pid: int | None = None) -> None:
    import signal

    import torch

    if parent_pid is not None:
        _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    torch.set_num_threads(threads)


def _failed(cfg: dict, error: str, run_id: str | None = None) -> dict:
    return {"status": "failed", "error": error, "run_id": run_id, "experiment": cfg.get("experiment")}


def _train_one(cfg: dict, root: str, force: bool) -> dict:
    """Train one configuration (in this process or a pool worker); failures become records.

    A damaged file of the run itself (truncated record, checkpoint or model) is repaired (the damaged
    files are dropped, see `RunStore.repair`) and the run trained again, once."""
    from .. import train
    from ..store import DamagedRunError, RunStore

    store = RunStore(root)
    rid = None
    for attempt in (0, 1):
        try:
            rid = train.run_id_of(cfg)
            return train.run(train.TrainConfig.from_dict(cfg), store=store, force=force, progress="log")
        except DamagedRunError as e:
            if attempt == 0 and e.ref is not None and rid is not None and e.ref.endswith("/" + rid):
                print(f"[vitrepro] {e}\n[vitrepro] repairing {e.ref} and training it again", file=sys.stderr,
                      flush=True)
                for line in store.repair(e.ref):
                    print(f"[vitrepro] {line}", file=sys.stderr, flush=True)
                continue
            return _failed(cfg, f"{type(e).__name__}: {e}", rid)
        except Exception as e:  # noqa: BLE001 - diverged, crashed, impossible: recorded, the sweep goes on
            return _failed(cfg, f"{type(e).__name__}: {e}", rid)
    return _failed(cfg, "unreachable", rid)


def default_workers(params: NotebookParams) -> int:
    """Parallel runs: small CPU models use one core far better than two, so a 2-core machine trains
    two runs at once with one thread each; on a GPU, one run at a time."""
    import torch

    if params.device.startswith("cuda") or (params.device == "auto" and torch.cuda.is_available()):
        return 1
    return max(1, min(int(os.environ.get("VITREPRO_WORKERS", os.cpu_count() or 1)), 8))


# ------------------------------------------------------------------------------ pre-compute checks
def _existing_ancestor(path: Path) -> Path:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable(path: Path, what: str, param: str, need_bytes: int) -> None:
    """`path` (perhaps not yet created) can be created and written, with `need_bytes` free."""
    import shutil
    import tempfile

    path = Path(path)
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise PreflightError(f"{what} {path} cannot be created: {base} is a file, not a folder; "
                             f"pass another with {param}=...")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise PreflightError(f"{what} {path} is not writable ({base}: {e.strerror or e}); "
                             f"pass a writable folder with {param}=...") from e
    if not os.access(base, os.W_OK | os.X_OK):
        raise PreflightError(f"{what} {path} is not writable ({base} is read-only for this user); "
                             f"pass a writable folder with {param}=...")
    free = shutil.disk_usage(base).free
    if free < need_bytes:
        raise PreflightError(f"{what} {path}: only {free / 2**20:.0f} MiB free on its disk, the sweep needs "
                             f"about {need_bytes / 2**20:.0f} MiB; free some space or pass {param}=<a folder "
                             "on a larger disk>")


def _param_hint(params: NotebookParams, dataset: str) -> str:
    """Which notebook parameter chooses this dataset (or the ones that could)."""
    base = {f.name for f in dataclasses.fields(NotebookParams)}
    own = [f.name for f in dataclasses.fields(params) if f.name not in base]
    named = [n for n in own if getattr(params, n) == dataset]
    if named:
        return f"pass another with {named[0]}=..."
    cands = [n for n in own if any(w in n for w in ("dataset", "upstream", "downstream", "data"))]
    if cands:
        return (f"it comes from profile {params.profile!r}; choose the datasets with "
                + " / ".join(f"{n}=..." for n in cands) + ", or another profile=...")
    return f"it comes from profile {params.profile!r}; choose another profile=..."


def _param_count(model: str, opts: dict, img_size: int | None) -> int:
    import torch

    from ..models import create_model

    try:
        with torch.device("meta"):
            m = create_model(model, img_size=img_size or 32, num_classes=10, **opts)
        return sum(p.numel() for p in m.parameters())
    except Exception:  # noqa: BLE001 - an estimate only
        return 0


def preflight(jobs: Sequence[Job], params: NotebookParams) -> dict:
    """Everything a sweep can check before compute, once, before any run folder exists:

    - the run store and the results folder can be created and written, with free space for the
      checkpoints (about 16 bytes per parameter per run) and the results;
    - every (dataset, split) the jobs read opens (`data.load_arrays`), with its label column;
    - every subset size (`train_examples`, after the validation hold-out) fits in its dataset, and
      the batch fits in the subset;
    - every few-shot probe can draw its shots per class from its training split;
    - every `init` weights file exists.

    Errors (`PreflightError`) name the dataset or folder and the parameter that chooses it. Returns
    {"datasets": {(dataset, split): examples}, "need_bytes": estimate}."""
    from .. import train
    from ..data import balanced_subset, load_arrays

    cfgs = []
    for job in jobs:
        try:
            cfgs.append((job, train.TrainConfig.from_dict(job.config)))
        except train.ConfigError as e:
            raise PreflightError(f"{job.stage} job {job.config.get('model')}: {e}") from e
    # 1. data: every split opens
    sizes: dict[tuple[str, str], Any] = {}
    for job, c in cfgs:
        for ds, split in train._data_used(c):
            if (ds, split) in sizes:
                continue
            try:
                from ..data import resolve_source

                src = resolve_source(ds)
                if src.spec is not None and src.spec.streaming:
                    sizes[(ds, split)] = None
                    continue
                sizes[(ds, split)] = load_arrays(ds, split)
            except Exception as e:  # noqa: BLE001 - DataError, a corrupt parquet, ...
                raise PreflightError(f"dataset {ds!r} (split {split!r}, used by the {job.stage} runs) cannot be "
                                     f"read: {type(e).__name__}: {e}; {_param_hint(params, ds)}") from e
    # 2. subset sizes, batches, few-shot draws, init files
    for job, c in cfgs:
        arrays = sizes.get((c.dataset, c.train_split))
        if arrays is not None:
            avail = len(arrays) - (int(round(len(arrays) * c.val_fraction)) if c.val_fraction > 0 else 0)
            if c.train_examples is not None and c.train_examples > avail:
                raise PreflightError(
                    f"the {job.stage} runs of {c.model} use train_examples={c.train_examples} of {c.dataset!r}, "
                    f"which has only {avail} training examples{' after the validation hold-out' if c.val_fraction else ''}; "
                    f"{_param_hint(params, c.dataset)} (a larger dataset, or a profile with smaller subsets)")
            n = min(avail, c.train_examples or avail)
            if c.batch_size > n:
                raise PreflightError(f"the {job.stage} runs of {c.model} on {c.dataset!r} use batch_size={c.batch_size} "
                                     f"but have only {n} training examples; {_param_hint(params, c.dataset)}")
        for e in c.evaluators:
            if e.get("type") != "fewshot":
                continue
            ds = e.get("dataset") or c.dataset
            tr = sizes.get((ds, e.get("train_split", "train")))
            if tr is None:
                continue
            need = max(e.get("shots") or (25,)) * tr.num_classes
            for seed in e.get("seeds") or (0, 1, 2):
                try:
                    balanced_subset(tr.labels, need, seed)
                except Exception as err:  # noqa: BLE001
                    raise PreflightError(f"the few-shot probe on {ds!r} cannot draw {max(e.get('shots') or (25,))} "
                                         f"examples per class from its training split: {err}; "
                                         f"{_param_hint(params, ds)}") from err
        if c.init and not c.init.startswith(("run:", "timm:", "hf-hub:", "hf_hub:")) and not Path(c.init).exists():
            raise PreflightError(f"init weights {c.init!r} (the {job.stage} runs of {c.model}) do not exist; "
                                 "pass an existing file")
        if c.img_size:  # impossible shapes (a patch size that does not divide a fine-tuning resolution, ...)
            try:
                train._check_shapes(c, c.img_size, c.in_chans or 3, 10)
            except train.ConfigError as e:
                raise PreflightError(f"the {job.stage} runs of {c.model}: {e}") from e
        try:  # the device exists, and every run id can be computed (data fingerprints: already loaded)
            train.resolved_identity(c)
        except train.ConfigError as e:
            hint = "pass device=..." if "device" in str(e) else _param_hint(params, c.dataset)
            raise PreflightError(f"the {job.stage} runs of {c.model}: {e}; {hint}") from e
    # 3. folders and space
    counts: dict[tuple, int] = {}
    need = 0
    for job, c in cfgs:
        key = (c.model, tuple(sorted(c.model_options().items())), c.img_size)
        if key not in counts:
            counts[key] = _param_count(c.model, c.model_options(), c.img_size)
        need += 16 * counts[key]  # model.pt + checkpoint (weights + two Adam moments)
    need += 64 * 2**20
    _check_writable(runs_dir(params), "the run store", "runs_dir", need)
    out = Path(params.results_dir).expanduser() if params.results_dir else runs_dir(params) / "results"
    _check_writable(out, "the results folder", "results_dir", 16 * 2**20)
    return {"datasets": {k: (len(v) if v is not None else None) for k, v in sizes.items()}, "need_bytes": need}


# ------------------------------------------------------------------------------ running a sweep
LAST_SWEEP: dict[str, Any] = {}  # what the last run_jobs of this process reported (write_results reads "partial")


class SweepResults(list):
    """`run_jobs`' list of (job, record), with `partial`: None, or the summary of the runs left out."""

    partial: str | None = None


_VARIANT_KEYS = ("model", "dataset", "pos_embed", "pos_embed_at", "pool", "lr", "train_examples", "img_size",
                 "optimizer", "steps", "epochs", "seed")


def _variant_keys(jobs: Sequence[Job]) -> list[str]:
    """The configuration keys whose values differ between the jobs of a sweep (what a progress line shows)."""
    keys = []
    for k in _VARIANT_KEYS:
        vals = {repr(j.config.get(k)) for j in jobs}
        if len(vals) > 1 or k == "model":
            keys.append(k)
    return keys


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def _describe(job: Job, cfg: dict, keys: dict[str, list[str]]) -> str:
    """`<stage> <model> k=v ...`: the values that differ between the runs of this stage, and for a
    fine-tune, what differs in its pre-training run (e.g. `from train_examples=40`)."""
    ks = keys.get(job.stage, ["model"])
    parts = [job.stage, str(cfg.get("model"))] + [f"{k}={cfg.get(k)}" for k in ks
                                                  if k != "model" and cfg.get(k) is not None]
    if job.parent is not None:
        pk = keys.get(job.parent.stage, [])
        up = [f"{k}={job.parent.config.get(k)}" for k in pk if k not in ("model", "optimizer", "lr", "steps", "epochs")
              and job.parent.config.get(k) is not None and job.parent.config.get(k) != cfg.get(k)]
        if up:
            parts.append("from " + " ".join(up))
    return " ".join(parts)


def _summary(failed: list[tuple[Job, dict]], total: int, keys: dict[str, list[str]]) -> str:
    lines = [f"{len(failed)} of {total} runs did not finish:"]
    for job, rec in failed:
        ref = f" ({rec.get('experiment')}/{rec.get('run_id')})" if rec.get("run_id") else ""
        lines.append(f"- {_describe(job, job.config, keys)}{ref}: {rec.get('status')}: {rec.get('error') or ''}".rstrip(": "))
    return "\n".join(lines)


def _stop_pool(pool) -> None:
    """Terminate every worker of a ProcessPoolExecutor now (their runs stay resumable)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        try:
            p.terminate()
        except Exception:  # noqa: BLE001
            pass
    try:
        pool.shutdown(wait=False, cancel_futures=True)
    except Exception:  # noqa: BLE001
        pass
    for p in procs:
        try:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(1)
        except Exception:  # noqa: BLE001
            pass


class _StopOnSignals:
    """While active (main thread only), SIGTERM/SIGHUP raise KeyboardInterrupt, so that the sweep
    stops its workers first; the previous handlers come back afterwards and `run_jobs` then re-sends
    the signal to itself, so that it has its usual effect (a SIGTERM'd kernel still exits)."""

    def __enter__(self):
        import signal
        import threading

        self.old, self.received = {}, None
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                self.received = signum
                raise KeyboardInterrupt(f"signal {signum}")

            for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
                if sig is not None:
                    try:
                        self.old[sig] = signal.signal(sig, handler)
                    except (ValueError, OSError):
                        pass
        return self

    def __exit__(self, *exc):
        import signal

        for sig, h in self.old.items():
            signal.signal(sig, h)
        return False


def run_jobs(jobs: Sequence[Job], params: NotebookParams, log: Callable[[str], None] | None = None,
             workers: int | None = None) -> SweepResults:
    """Train (or reuse from the run store) every job; fine-tunes start once their parent finished.

    Configurations are validated and `preflight` checks data, subset sizes, few-shot sets and
    folders before anything trains. A job whose parent failed is skipped; a failed run (e.g.
    diverged) is recorded by the trainer and the sweep carries on; at the end, any failed or skipped
    run raises `SweepError` with a summary, unless `params.allow_partial` (then the results are
    marked partial; a sweep where nothing finished always raises). With several workers (CPU), runs
    go to a process pool, one torch thread each; the workers die with this process, and SIGINT /
    SIGTERM stop them (runs stay resumable). One progress line per finished run names what differs
    between the runs, with an estimate of the time left.
    """
    import time
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    import multiprocessing as mp

    from .. import train
    from ..store import RunStore

    log = log or (lambda msg: print(msg, flush=True))
    LAST_SWEEP.clear()
    root = str(runs_dir(params))
    for job in jobs:  # fail fast on a bad configuration, before any compute
        cfg = dict(job.config)
        if params.device != "auto":
            cfg["device"] = params.device
        job.config = cfg
    preflight(jobs, params)
    store = RunStore(root)
    workers = workers or default_workers(params)
    done: dict[int, dict] = {}
    out = SweepResults()
    pending = [j for j in jobs if j.parent is None]
    waiting = [j for j in jobs if j.parent is not None]
    t0 = time.time()
    total = len(jobs)
    keys = {st: _variant_keys([j for j in jobs if j.stage == st]) for st in {j.stage for j in jobs}}
    trained = {"n": 0, "t_first": None}

    def describe(job, cfg):
        return _describe(job, cfg, keys)

    def ready_config(job):
        cfg = dict(job.config)
        if job.parent is not None:
            cfg["init"] = finetune_from(job.parent, done[id(job.parent)])
        return cfg

    def eta() -> str:
        left = total - len(out)
        if not left:
            return "done"
        if not trained["n"] or trained["t_first"] is None:
            return "ETA ?"
        per = (time.time() - trained["t_first"]) / trained["n"]
        return f"ETA {_fmt_s(per * left)}"

    def finish(job, cfg, record, was_trained):
        done[id(job)] = record
        out.append((job, record))
        if was_trained:
            trained["n"] += 1
        status = record.get("status")
        extra = "" if status == "ok" else f": {record.get('error')}"
        how = "" if was_trained else " (stored)"
        ref = f" [{record.get('experiment')}/{record.get('run_id')}]" if record.get("run_id") else ""
        log(f"[{len(out)}/{total} {_fmt_s(time.time() - t0)}, {eta()}] {status}{how} {describe(job, cfg)}{ref}{extra}")

    def release():
        nonlocal waiting
        ready, still = [], []
        for j in waiting:
            if id(j.parent) in done:
                if done[id(j.parent)].get("status") == "ok":
                    ready.append(j)
                else:
                    out.append((j, {"status": "skipped", "error": "its pre-training run failed"}))
                    log(f"[{len(out)}/{total}] skip {describe(j, j.config)}: its pre-training run failed")
            else:
                still.append(j)
        waiting = still
        return ready

    # finished runs come straight from the store (no pool needed)
    def cached(job, cfg):
        if params.force:
            return None
        try:
            rid = train.run_id_of(cfg)
        except train.ConfigError:
            return None  # _train_one records the error
        return train._finished(store, cfg["experiment"], rid)  # a damaged record / model is named, then redone

    def started():
        if trained["t_first"] is None:
            trained["t_first"] = time.time()

    if workers <= 1:
        while pending:
            job = pending.pop(0)
            cfg = ready_config(job)
            rec = cached(job, cfg)
            if rec is None:
                started()
            finish(job, cfg, rec or _train_one(cfg, root, params.force), rec is None)
            pending += release()
    else:
        log(f"training with {workers} parallel workers, 1 thread each")
        ctx = mp.get_context("spawn")
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(1, os.getpid()))
        stopper = _StopOnSignals()
        try:
            with stopper:
                running = {}
                while pending or running:
                    while pending:
                        job = pending.pop(0)
                        cfg = ready_config(job)
                        rec = cached(job, cfg)
                        if rec is not None:
                            finish(job, cfg, rec, False)
                            pending += release()
                            continue
                        started()
                        running[pool.submit(_train_one, cfg, root, params.force)] = (job, cfg)
                    if not running:
                        break
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        job, cfg = running.pop(fut)
                        try:
                            rec = fut.result()
                        except Exception as e:  # noqa: BLE001 - a worker died (killed, out of memory)
                            rec = _failed(cfg, f"{type(e).__name__}: {e}")
                        finish(job, cfg, rec, True)
                        pending += release()
        except BaseException:
            _stop_pool(pool)
            if stopper.received is not None:  # the workers are stopped: now the signal's own effect
                os.kill(os.getpid(), stopper.received)
            raise
        else:
            pool.shutdown(wait=True)
    missing = [j for j in jobs if id(j) not in {id(jb) for jb, _ in out}]
    for j in missing:  # cannot happen unless a parent never ran; say so rather than drop it
        out.append((j, {"status": "skipped", "error": "never ran"}))
    failed = [(j, r) for j, r in out if r.get("status") != "ok"]
    if failed:
        summary = _summary(failed, total, keys)
        n_ok = total - len(failed)
        if n_ok == 0:
            raise SweepError(f"no run of the sweep finished. {summary}")
        if not params.allow_partial:
            raise SweepError(f"{summary}\nFix the cause and run again (finished runs are reused), or pass "
                             "allow_partial=True to write tables from the runs that finished (marked partial).")
        out.partial = summary
        LAST_SWEEP["partial"] = summary
        log(f"partial results (allow_partial=True): {summary}")
    log(f"sweep done: {total - len(failed)}/{total} runs ok, {trained['n']} trained, in {_fmt_s(time.time() - t0)}")
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


def _arch(rec: dict, cfg: dict) -> dict:
    """The architecture a run built: the record's resolved one (complete, inherited by fine-tunes),
    else the configuration's options."""
    arch = dict(((rec.get("resolved") or {}).get("arch")) or {})
    for k in ("pool", "pos_embed", "pos_embed_at"):
        if arch.get(k) is None and cfg.get(k) is not None:
            arch[k] = cfg[k]
    return arch


def tidy(results: Sequence[tuple[Job, dict]], notebook: str, profile: str):
    """Long-form frame (`SCHEMA`): one row per run, seed and metric, from the stored records. A
    partial sweep (`run_jobs` with allow_partial) marks the frame: `frame.attrs["partial"]`."""
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
        arch = _arch(rec, cfg)
        for dataset, metric, value in _metric_rows(rec):
            rows.append(dict(
                notebook=notebook, profile=profile, run_id=rec["run_id"], stage=job.stage, model=cfg["model"],
                family=_family(cfg["model"]), upstream=job.upstream, upstream_examples=upstream_size(job),
                dataset=dataset, img_size=(rec.get("resolved") or {}).get("img_size", cfg.get("img_size")),
                pos_embed=arch.get("pos_embed") or "1d", pos_embed_at=arch.get("pos_embed_at") or "stem",
                pool=arch.get("pool") or "token", lr=cfg.get("lr"), seed=cfg.get("seed"), metric=metric,
                value=value, train_flops=rec.get("train_flops"), params=rec.get("params"),
                wall_s=rec.get("wall_time_s")))
    frame = pd.DataFrame(rows, columns=SCHEMA)
    partial = getattr(results, "partial", None)
    if partial:
        frame.attrs["partial"] = partial
    return frame


def collect(jobs: Sequence[Job], params: NotebookParams, notebook: str):
    """Finished runs of a sweep, read back from the run store without training anything."""
    from ..store import RunStore
    from ..train import ConfigError, _finished, run_id_of

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
        try:
            rid = run_id_of(cfg)
        except ConfigError as e:
            print(f"[vitrepro] {job.stage} {cfg.get('model')}: {e}", file=sys.stderr)
            continue
        rec = _finished(store, cfg["experiment"], rid)  # a damaged record or model is named, then skipped
        if rec is not None:
            records[id(job)] = rec
            results.append((job, rec))
    return tidy(results, notebook, params.profile)


def _arch_chain(store, conf: dict, depth: int = 0) -> dict:
    """Architecture of a stored run from its config: `_resolved.arch` (complete), else (runs stored
    before it was recorded) the options inherited along its `init=run:...` chain plus its own."""
    arch = dict((conf.get("_resolved") or {}).get("arch") or {})
    if arch:
        return arch
    init = conf.get("init") or ""
    if init.startswith("run:") and depth < 16:
        from ..store import check_json_file

        try:
            arch = _arch_chain(store, check_json_file(store.resolve(init) / "config.json"), depth + 1)
        except FileNotFoundError:
            arch = {}
    arch.update({k: conf[k] for k in ("pool", "pos_embed", "pos_embed_at", "head", "representation_size")
                 if conf.get(k) is not None})
    return arch


def load_run_model(params: NotebookParams, run_ref: str):
    """The final model of any stored run (`run:<experiment>/<run_id>`, `<experiment>/<run_id>` or a
    bare run id of this store), pre-trained or fine-tuned, with the architecture it was trained with."""
    import torch

    from ..models import create_model
    from ..store import RunStore, check_json_file, check_torch_file

    store = RunStore(runs_dir(params))
    exp, rid, d = store.find(run_ref)
    conf = check_json_file(d / "config.json", f"{exp}/{rid}")
    res = conf.get("_resolved", {})
    arch = _arch_chain(store, conf)
    opts = {k: arch[k] for k in ("pool", "pos_embed", "pos_embed_at", "head", "representation_size")
            if arch.get(k) is not None}
    model = create_model(conf["model"], img_size=res["img_size"], in_chans=res["in_chans"],
                         num_classes=res["num_classes"], **opts)
    head_reset = res.get("head_reset", bool(conf.get("init")) and conf.get("reset_head") is not False)
    if head_reset:
        model.reset_head(res["num_classes"])  # fine-tuned runs carry the zero-initialised linear head
    if not (d / "model.pt").exists():
        raise FileNotFoundError(f"{d / 'model.pt'} does not exist: run {exp}/{rid} has not finished")
    check_torch_file(d / "model.pt", f"{exp}/{rid}")
    state = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
