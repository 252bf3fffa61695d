"""Running a sweep (`run_jobs`): every job trained once through the run store, fine-tunes after their
parent, in this process, a pool of workers that die with it, or one torchrun per run (launcher='torchrun',
`torchrun_train`); failures summarised loudly."""
from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import jupyter, settings
from .jobs import Job, finetune_from
from .params import NotebookParams, runs_dir
from .preflight import preflight


class SweepError(RuntimeError):
    """Some runs of a sweep failed or were skipped (and allow_partial is off), or none finished."""


def _worker_init(threads: int, parent_pid: int, overrides: dict) -> None:
    import ctypes

    import torch

    settings.override(overrides)  # the parent's (a dry run's stand-in data): workers are spawned, not forked
    # Linux: the kernel sends this worker SIGTERM when its parent dies (PR_SET_PDEATHSIG = 1), so pool workers
    # never outlive the notebook kernel or script that started them (elsewhere there is no libc.so.6)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    torch.set_num_threads(threads)


def _failed(cfg: dict, error: str, run_id: str | None = None) -> dict:
    return {"status": "failed", "error": error, "run_id": run_id, "experiment": cfg.get("experiment")}


def _train_one(cfg: dict, root: str, force: bool, torchrun: int | None = None) -> dict:
    """Train one configuration (here, in a pool worker, or under torchrun with ``torchrun`` processes);
    failures become records. A damaged file of the run itself is repaired (`RunStore.repair`) and the run
    trained again, once."""
    from .. import train
    from ..store import DamagedRunError, RunStore

    if torchrun:
        return torchrun_train(cfg, root, force, torchrun)
    store, rid = RunStore(root), None
    for attempt in (0, 1):
        try:
            rid = train.run_id_of(cfg)
            return train.run(train.TrainConfig.from_dict(cfg), store=store, force=force, progress="log")
        except Exception as e:  # noqa: BLE001 - diverged, crashed, impossible: recorded, the sweep goes on
            own = isinstance(e, DamagedRunError) and rid is not None and (e.ref or "").endswith("/" + rid)
            if attempt or not own:
                return _failed(cfg, f"{type(e).__name__}: {e}", rid)
            print(f"[vitrepro] {e}\n[vitrepro] repairing {e.ref} and training it again", file=sys.stderr, flush=True)
            for line in store.repair(e.ref):
                print(f"[vitrepro] {line}", file=sys.stderr, flush=True)


def omp_threads(env: dict) -> int:
    """The intra-op threads of a torchrun process ($OMP_NUM_THREADS, of a nested "4,2" the first; 1 where unset)."""
    return max(1, int(str(env.get("OMP_NUM_THREADS") or 1).split(",")[0] or 1))


def torchrun_train(cfg: dict, root: str, force: bool, n: int) -> dict:
    """Train one configuration under torchrun with ``n`` processes: the same run store, run id and record as
    a local run; a failure becomes a failed record. The children read this process's settings (a dry run's
    stand-in data included) from their environment."""
    from .. import train
    from ..store import RunStore

    env = {**os.environ, **settings.as_environment(settings.get())}
    env.setdefault("OMP_NUM_THREADS", "1")
    rid = train.run_id_of(cfg, threads=omp_threads(env))  # the id the torchrun processes compute
    where = shlex.split(os.environ.get("VITREPRO_TORCHRUN_ARGS", "")) or ["--standalone"]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps(cfg))
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={n}", "-m",
                               "vitrepro.train", "--config", str(config), "--store", root, "--progress", "log"]
                              + (["--force"] if force else []),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = (proc.stdout or "").strip().splitlines()
    if lines:
        print("\n".join(lines[-40:]), flush=True)
    rec = RunStore(root).record(cfg["experiment"], rid)
    if rec is not None and (rec.get("status") != "ok" or proc.returncode == 0):
        return rec
    return _failed(cfg, f"torchrun exited with {proc.returncode}: {' | '.join(lines[-3:])}", rid)


POOL_THREADS = 1  # intra-op threads of a pool worker (set by `_worker_init` before it computes any run id)


def run_threads(params: NotebookParams, workers: int | None = None) -> int | None:
    """The intra-op thread count the runs of a sweep train with, part of a CPU run's id: a torchrun process's,
    a pool worker's or, None, this process's own. The scheduler and `results.collect` compute run ids with
    it, so they find the runs the workers wrote."""
    if getattr(params, "launcher", "local") == "torchrun":
        return omp_threads(os.environ)
    return POOL_THREADS if (workers or default_workers(params)) > 1 else None


def default_workers(params: NotebookParams) -> int:
    """Parallel runs: one per core on CPU, one thread each ($VITREPRO_WORKERS, at most 8; small CPU models use
    one core far better than two: benchmarks/README.md, `python -m benchmarks.bench --sweep`); on a GPU one."""
    import torch

    if params.device.startswith("cuda") or (params.device == "auto" and torch.cuda.is_available()):
        return 1
    return max(1, min(int(os.environ.get("VITREPRO_WORKERS", os.cpu_count() or 1)), 8))


LAST_SWEEP: dict[str, Any] = {}  # what the last run_jobs of this process reported (write_results reads "partial")


class SweepResults(list):
    """`run_jobs`' list of (job, record), with `partial`: None, or the summary of the runs left out."""

    partial: str | None = None


_VARIANT_KEYS = ("dataset", "pos_embed", "pos_embed_at", "pool", "lr", "train_examples", "img_size", "optimizer",
                 "steps", "epochs", "seed")


def _variant_keys(jobs: Sequence[Job]) -> list[str]:
    """The configuration keys whose values differ between the jobs of a sweep (what a progress line shows
    after the model)."""
    return [k for k in _VARIANT_KEYS if len({repr(j.config.get(k)) for j in jobs}) > 1]


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def _describe(job: Job, cfg: dict, keys: dict[str, list[str]]) -> str:
    """`<stage> <model> k=v ...`: the values that differ between the runs of this stage, and for a
    fine-tune, what differs in its pre-training run (e.g. `from train_examples=40`)."""
    parts = [job.stage, str(cfg.get("model"))] + [f"{k}={cfg[k]}" for k in keys[job.stage] if cfg.get(k) is not None]
    if job.parent is not None:
        pc = job.parent.config
        up = [f"{k}={pc[k]}" for k in keys.get(job.parent.stage, [])
              if k not in ("optimizer", "lr", "steps", "epochs") and pc.get(k) is not None
              and pc[k] != cfg.get(k)]
        if up:
            parts.append("from " + " ".join(up))
    return " ".join(parts)


def _stop_pool(pool) -> None:
    """Terminate every worker of a ProcessPoolExecutor now (their runs stay resumable): this process's
    multiprocessing children, which multiprocessing joins itself (none is reaped behind its back)."""
    procs = mp.active_children()
    with contextlib.suppress(Exception):
        for p in procs:
            p.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        with contextlib.suppress(Exception):
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(1)


@contextlib.contextmanager
def _signals_interrupt():
    """While active (main thread only), SIGTERM/SIGHUP raise KeyboardInterrupt, so that the sweep stops its
    workers first; yields the list of signals received (the caller re-sends the first to itself once the
    previous handlers are back, so that it has its usual effect: a SIGTERM'd kernel still exits)."""
    received, old = [], {}

    def handler(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            with contextlib.suppress(ValueError, OSError, TypeError):  # TypeError: no SIGHUP here
                old[sig] = signal.signal(sig, handler)
    try:
        yield received
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def run_jobs(jobs: Sequence[Job], params: NotebookParams, log: Callable[[str], None] | None = None,
             workers: int | None = None, torchrun: int | None = None) -> SweepResults:
    """Train (or reuse from the run store) every job after `preflight`; fine-tunes start once their parent
    finished, and are skipped where it failed. A failed run is recorded and the sweep carries on; at the end,
    failed or skipped runs raise `SweepError` unless `params.allow_partial` (results marked partial; nothing
    finished always raises). Several workers (CPU): a process pool that dies with this process and stops on
    SIGINT / SIGTERM. ``torchrun``: each run under torchrun with that many processes, one after another."""
    log = log or (lambda msg: print(msg, flush=True))
    LAST_SWEEP.clear()
    if params.device != "auto":
        for job in jobs:
            job.config = dict(job.config, device=params.device)
    workers = workers or default_workers(params)
    preflight(jobs, params, workers)
    sweep = _Sweep(jobs, params, log, threads=run_threads(params, workers), torchrun=torchrun)
    try:
        if workers <= 1:
            sweep.run_here()
        else:
            sweep.run_in_pool(workers)
        return sweep.conclude()
    finally:
        if sweep.bar is not None:
            sweep.bar.close()


def progress_bar(total: int):
    """A tqdm widget bar over the runs of a sweep where the kernel has a widget front end (JupyterLab:
    `jupyter.widget_frontend`); None elsewhere (papermill, a terminal), where the progress lines show."""
    if not jupyter.widget_frontend():
        return None
    from tqdm.notebook import tqdm  # ipywidgets draws it (a dependency)

    return tqdm(total=total, desc="sweep", unit="run",
                bar_format="{desc}: {n_fmt}/{total_fmt} runs |{bar}| {elapsed}{postfix}")


def chain_work(jobs: Sequence[Job], work: dict[int, float]) -> dict[int, float]:
    """For each job (by id), its own work plus the longest chain of work that waits on it (its fine-tunes,
    theirs, ...): the critical-path priority of list scheduling, longest chain first (Graham 1969; Hu 1961)."""
    children: dict[int, list[Job]] = {}
    for j in jobs:
        if j.parent is not None:
            children.setdefault(id(j.parent), []).append(j)
    memo: dict[int, float] = {}

    def chain(j: Job) -> float:
        if id(j) not in memo:
            memo[id(j)] = work[id(j)] + max((chain(c) for c in children.get(id(j), [])), default=0.0)
        return memo[id(j)]

    return {id(j): chain(j) for j in jobs}


def job_work(job: Job) -> float | None:
    """The training work of ``job`` for the ETA: steps x batch x image pixels (None when it has no steps)."""
    c = job.config
    return (float(c["steps"]) * float(c.get("batch_size") or 64) * float(c.get("img_size") or 224) ** 2
            if c.get("steps") else None)


class _Sweep:
    """One `run_jobs` call: the jobs still to start or waiting for their parent, the records so far, and the
    progress lines. ``threads``: intra-op threads of the processes that train (None: this one's)."""

    def __init__(self, jobs: Sequence[Job], params: NotebookParams, log: Callable[[str], None],
                 threads: int | None = None, torchrun: int | None = None):
        from ..store import RunStore

        self.jobs, self.params, self.log, self.threads, self.torchrun = jobs, params, log, threads, torchrun
        self.root = str(runs_dir(params))
        self.store = RunStore(self.root)
        self.done: dict[int, dict] = {}  # id(job) -> its record
        self.out = SweepResults()
        self.pending = [j for j in jobs if j.parent is None]
        self.waiting = [j for j in jobs if j.parent is not None]
        self.t0, self.total = time.time(), len(jobs)
        self.keys = {st: _variant_keys([j for j in jobs if j.stage == st]) for st in {j.stage for j in jobs}}
        self.n_trained, self.t_first_trained, self.work_trained = 0, None, 0.0
        self.start: dict[int, float] = {}  # id(job) -> when a worker started training it (running jobs)
        self.busy_s = 0.0                   # worker-seconds the trained jobs took, summed
        known = [w for w in map(job_work, jobs) if w]
        mean = sum(known) / len(known) if known else 1.0
        self.work = {id(j): job_work(j) or mean for j in jobs}  # for the ETA; unknown length: the average known
        self.priority = chain_work(jobs, self.work)
        self.bar = progress_bar(len(jobs))  # JupyterLab; else None

    def next_job(self) -> Job:
        """The pending job that heads the longest chain of work (`chain_work`): a long pre-training run with
        fine-tunes waiting on it starts before a short run nothing waits for, so the workers end together."""
        job = max(self.pending, key=lambda j: self.priority[id(j)])
        self.pending.remove(job)
        return job

    def next_to_train(self) -> tuple[Job, dict] | None:
        """The most urgent pending job the store does not hold yet, with its config, marked started (the
        stored ones on the way are finished); None when nothing is pending."""
        while self.pending:
            job = self.next_job()
            cfg = dict(job.config)
            if job.parent is not None:
                cfg["init"] = finetune_from(self.done[id(job.parent)])
            rec = self.stored(cfg)
            if rec is None:
                self.started(job)
                return job, cfg
            self.finish(job, cfg, rec, False)
        return None

    def eta(self) -> str:
        """Time left = time so far x (work left / work trained), work = `job_work` (pixels a run pushes
        through its model), so the estimate does not swing with the order of short and long runs; at least
        the longest chain still to go (`_tail_s`), which decides the end once fewer jobs than workers remain."""
        left = [j for j in self.jobs if id(j) not in self.done]
        if not left:
            return "done"
        if self.t_first_trained is None or not self.work_trained:
            return "ETA ?"
        spread = (time.time() - self.t_first_trained) * sum(self.work[id(j)] for j in left) / self.work_trained
        return f"ETA {_fmt_s(max(spread, self._tail_s(left)))}"

    def _tail_s(self, left: list[Job]) -> float:
        """The longest chain of work still to go (a running job's unfinished part, then the fine-tunes waiting
        on it) at one worker's speed, measured on the finished jobs: the sweep cannot end sooner, however many
        workers idle."""
        if not self.busy_s:
            return 0.0
        rate, now = self.work_trained / self.busy_s, time.time()  # work per second of one worker
        own = {id(j): max(0.0, self.work[id(j)] - rate * (now - self.start[id(j)])) if id(j) in self.start
               else self.work[id(j)] for j in left}
        return max(chain_work(left, own).values()) / rate

    def finish(self, job: Job, cfg: dict, record: dict, was_trained: bool) -> None:
        self.done[id(job)] = record
        self.out.append((job, record))
        if getattr(self.params, "dry_run", False) and record.get("run_dir"):  # never resumed: `preflight._bytes_needed`
            (Path(record["run_dir"]) / "checkpoint.pt").unlink(missing_ok=True)
        if was_trained:
            self.n_trained += 1
            self.work_trained += self.work[id(job)]
            if id(job) in self.start:
                self.busy_s += time.time() - self.start.pop(id(job))
        status, eta = record.get("status"), self.eta()
        ref = f" [{record.get('experiment')}/{record.get('run_id')}]" if record.get("run_id") else ""
        self.log(f"[{len(self.out)}/{self.total} {_fmt_s(time.time() - self.t0)}, {eta}] {status}"
                 f"{'' if was_trained else ' (stored)'} {_describe(job, cfg, self.keys)}{ref}"
                 + ("" if status == "ok" else f": {record.get('error')}"))
        if self.bar is not None:
            self.bar.set_postfix_str(eta, refresh=False)  # which run: the log line below the bar
            self.bar.update(1)
            self.bar.refresh()  # tqdm skips the redraw of updates that come faster than its average
        self.pending += self.release()
        if str(record.get("error", "")).startswith(("NoSpaceError:", "NotWritableError:")):
            self.halt(record["error"])

    def halt(self, error: str) -> None:
        """The run store filled up or became read-only: every later run would fail the same way, so none is
        started; they are reported as skipped with the cause (running ones finish or fail on their own)."""
        for j in self.pending + self.waiting:
            self.done[id(j)] = rec = {"status": "skipped", "error": f"not started: {error.split('. ')[0]}"}
            self.out.append((j, rec))
        if self.pending or self.waiting:
            self.log(f"stopping the sweep: {error}")
        self.pending, self.waiting = [], []

    def release(self) -> list[Job]:
        """The fine-tunes whose parent finished; those whose parent failed are skipped."""
        ready, still = [], []
        for j in self.waiting:
            if id(j.parent) not in self.done:
                still.append(j)
            elif self.done[id(j.parent)].get("status") == "ok":
                ready.append(j)
            else:
                self.out.append((j, {"status": "skipped", "error": "its pre-training run failed"}))
                self.log(f"[{len(self.out)}/{self.total}] skip {_describe(j, j.config, self.keys)}: "
                         "its pre-training run failed")
                if self.bar is not None:
                    self.bar.update(1)
        self.waiting = still
        return ready

    def stored(self, cfg: dict) -> dict | None:
        """The record of a finished run, straight from the store (no pool needed); None when forced."""
        from .. import train

        if self.params.force:
            return None
        try:
            rid = train.run_id_of(cfg, threads=self.threads)  # the id the worker will compute
        except train.ConfigError:
            return None  # _train_one records the error
        return train.finished_record(self.store, cfg["experiment"], rid)  # damaged record / model: named, redone

    def started(self, job: Job) -> None:
        self.start[id(job)] = now = time.time()
        if self.t_first_trained is None:
            self.t_first_trained = now

    def run_here(self) -> None:
        """One run at a time in this process (or one torchrun at a time)."""
        torchrun = (self.torchrun,) if self.torchrun else ()
        while ready := self.next_to_train():
            job, cfg = ready
            self.finish(job, cfg, _train_one(cfg, self.root, self.params.force, *torchrun), True)

    def run_in_pool(self, workers: int) -> None:
        """Runs in a spawned process pool, one torch thread per worker; stopped workers leave runs resumable."""
        self.log(f"training with {workers} parallel workers, 1 thread each")
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                   initargs=(POOL_THREADS, os.getpid(), settings.overrides()))
        received: list = []
        try:
            with _signals_interrupt() as received:
                self._schedule(pool, workers)
        except BaseException:
            _stop_pool(pool)
            if received:  # the workers are stopped: now the signal's own effect
                os.kill(os.getpid(), received[0])
            raise
        pool.shutdown(wait=True)

    def _schedule(self, pool, workers: int) -> None:
        """At most ``workers`` runs in the pool at once, so that each free worker takes the job that is
        most urgent *then* (`next_job`), fine-tunes released meanwhile included."""
        running = {}
        while self.pending or running:
            while len(running) < workers and (ready := self.next_to_train()):
                running[pool.submit(_train_one, ready[1], self.root, self.params.force)] = ready
            if not running:
                break
            finished, _ = wait(running, timeout=None if self.bar is None else 2.0, return_when=FIRST_COMPLETED)
            if self.bar is not None:
                self.bar.refresh()  # the time so far moves while the runs train
            for fut in finished:
                job, cfg = running.pop(fut)
                try:
                    rec = fut.result()
                except Exception as e:  # noqa: BLE001 - a worker died (killed, out of memory)
                    rec = _failed(cfg, f"{type(e).__name__}: {e}")
                self.finish(job, cfg, rec, True)

    def conclude(self) -> SweepResults:
        """The results; `SweepError` where a run failed or was skipped (unless allow_partial) or none finished."""
        out, total = self.out, self.total
        seen = {id(j) for j, _ in out}
        out += [(j, {"status": "skipped", "error": "never ran"}) for j in self.jobs if id(j) not in seen]  # say so
        failed = [(j, r) for j, r in out if r.get("status") != "ok"]
        if failed:
            lines = [f"{len(failed)} of {total} runs did not finish:"]
            for j, r in failed:
                ref = f" ({r.get('experiment')}/{r.get('run_id')})" if r.get("run_id") else ""
                line = f"- {_describe(j, j.config, self.keys)}{ref}: {r.get('status')}: {r.get('error') or ''}"
                lines.append(line.rstrip(": "))
            summary = "\n".join(lines)
            if total == len(failed):
                raise SweepError(f"no run of the sweep finished. {summary}")
            if not self.params.allow_partial:
                raise SweepError(f"{summary}\nFix the cause and run again (finished runs are reused), or pass "
                                 "allow_partial=True to write tables from the runs that finished (marked partial).")
            out.partial = LAST_SWEEP["partial"] = summary
            self.log(f"partial results (allow_partial=True): {summary}")
        self.log(f"sweep done: {total - len(failed)}/{total} runs ok, {self.n_trained} trained, "
                 f"in {_fmt_s(time.time() - self.t0)}")
        return out
