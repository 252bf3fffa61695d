"""Execute every reproduction notebook with one profile, then rebuild results/REPORT.md.

    python -m vitrepro.experiments.run_all --profile cpu        (what `make reproduce` runs)
    python -m vitrepro.experiments.run_all --profile smoke --only scaling
    python -m vitrepro.experiments.run_all --profile paper --dry-run [--tiny]   (stand-in data, experiments/dryrun.py)
    python -m vitrepro.experiments.run_all --profile gpu --launcher torchrun --nproc-per-node 8

Every run the notebooks need is trained first, in one sweep over all of them (`train_all`); each notebook then
finds its runs in the store. Executed notebooks go to `<runs_dir>/executed/`; tables, figures, REPORT.md and
the wall times (`timings_<profile>.json`) to `results/` only for the whole cpu profile, else
`<runs_dir>/results/run_all/<profile>/`, unless `--results` names a folder.

SIGINT / SIGTERM / SIGHUP stop everything this command started (the notebook kernel and its pool
workers) before it exits; the runs stay resumable, so running the same command again carries on.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from . import NOTEBOOKS, module
from .common import PROFILES, REPO_ROOT, NotebookParams, atomic_write_text, runs_dir
from .jobs import unique
from .launch import LAUNCHERS, run_jobs

COMMITTED_PROFILE = "cpu"  # the profile results/ comes from: only its full run writes there by default


def default_results(profile: str, only: Sequence[str] | None) -> Path:
    """`results/` for the whole committed profile, else a folder of the run store (committed results change
    only on purpose)."""
    if profile == COMMITTED_PROFILE and not only:
        return REPO_ROOT / "results"
    return runs_dir(NotebookParams()) / "results" / "run_all" / profile


def stop_descendants(grace_s: float = 5.0) -> None:
    """SIGTERM every process this one started (the notebook kernel, in a session of its own, and its pool
    workers), SIGKILL what is left after `grace_s` (psutil: no /proc walk of our own)."""
    import psutil

    procs = psutil.Process().children(recursive=True)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=1)


class _Stopped(KeyboardInterrupt):
    pass


def _on_signal(signum, frame):
    stop_descendants()
    raise _Stopped(signum)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Run the reproduction notebooks through papermill.")
    ap.add_argument("--profile", default="cpu", choices=PROFILES)
    ap.add_argument("--only", nargs="*", choices=NOTEBOOKS, help="run only these notebooks")
    ap.add_argument("--results", default=None,
                    help=f"folder for tables, figures, REPORT.md and timings (default: results/ for the whole "
                         f"{COMMITTED_PROFILE} profile, the committed results; for another profile or --only: "
                         f"<runs_dir>/results/run_all/<profile>/, now {default_results('<profile>', ['x'])})")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="extra notebook parameter (applied to every notebook)")
    ap.add_argument("--dry-run", action="store_true",
                    help="every configuration a couple of steps on stand-in data (temporary run store and results; "
                         "results/ untouched)")
    ap.add_argument("--tiny", action="store_true", help="with --dry-run: tiny models of the same families")
    ap.add_argument("--launcher", choices=LAUNCHERS, default=None,
                    help="torchrun: each configuration under torchrun --standalone (DDP)")
    ap.add_argument("--nproc-per-node", type=int, default=None, help="processes per configuration under torchrun")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.results = tempfile.mkdtemp(prefix=f"vitrepro-dryrun-results-{args.profile}-")
        args.parameter += [("dry_run", "true")] + ([("tiny", "true")] if args.tiny else [])
    args.results = args.results or str(default_results(args.profile, args.only))
    args.parameter += [(k, str(v)) for k, v in (("launcher", args.launcher), ("nproc_per_node", args.nproc_per_node))
                       if v]
    import papermill as pm

    # papermill forwards each cell's output to its logger: show it, so long runs show progress
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from .. import report

    for sig in filter(None, (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None))):
        signal.signal(sig, _on_signal)
    try:
        _run(args, pm, report)
    except KeyboardInterrupt as e:
        stop_descendants()
        signum = e.args[0] if isinstance(e, _Stopped) and e.args else signal.SIGINT
        print(f"stopped by signal {int(signum)}: the kernel and its workers are stopped; the runs are resumable "
              "(run the same command again to carry on)", file=sys.stderr, flush=True)
        sys.exit(128 + int(signum))


def _value(text: str):
    """A `-p NAME VALUE` value: JSON where it parses (True/False too), else the string."""
    try:
        return json.loads({"True": "true", "False": "false", "None": "null"}.get(text, text))
    except json.JSONDecodeError:
        return text


def _kernel() -> str:
    """The project's kernel ("vitrepro", installed by `make venv`): it prints each worker line once under
    papermill's --log-output (env/kernel/kernel.json.in); python3 where it is not installed."""
    from jupyter_client.kernelspec import KernelSpecManager

    try:
        spec = KernelSpecManager().get_kernel_spec("vitrepro")
    except Exception:  # noqa: BLE001 - not installed (jupyter_client raises NoSuchKernel)
        return "python3"
    # a kernel installed by another clone whose interpreter is gone would fail to start: use python3
    python = spec.argv[0] if spec.argv else ""
    if os.path.isabs(python) and not os.path.exists(python):
        print(f"[run_all] the 'vitrepro' kernel's interpreter {python} does not exist (installed by another "
              "clone?); using the python3 kernel. `make kernel` reinstalls it for this clone.", flush=True)
        return "python3"
    return "vitrepro"


SWEEP_KEY = "training"  # timings_<profile>.json: the one sweep that trains every notebook's runs (train_all)


def train_all(profile: str, notebooks: Sequence[str], parameters: dict) -> None:
    """Train every run the ``notebooks`` need, as one sweep, before they execute (they then find their runs
    in the store). One pool for the whole profile: no notebook waits for another's last run while a core
    idles, the longest chains of work start first (`sweep.chain_work`), a run two notebooks share is
    trained once (`jobs.unique`), and the progress lines give one ETA for the whole profile."""
    jobs, params = [], None
    for nb in notebooks:
        mod = module(nb)
        nb_params = mod.validate_params({"profile": profile, **parameters})
        params = params or nb_params
        jobs += mod.jobs(nb_params)
    print(f"=== training the runs of {', '.join(notebooks)} (profile {profile}) in one sweep", flush=True)
    run_jobs(unique(jobs), params)


def _run(args, pm, report) -> None:
    out_dir = runs_dir(NotebookParams()) / "executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    timings_file = Path(args.results) / f"timings_{args.profile}.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    parameters = {k: _value(v) for k, v in args.parameter}

    def timed(key: str, step) -> None:
        t0 = time.time()
        step()
        timings[key] = round(time.time() - t0, 1)
        atomic_write_text(timings_file, json.dumps(timings, indent=1))

    if not args.dry_run:  # a dry run's notebooks each switch to stand-in data: they train their own
        timed(SWEEP_KEY, lambda: train_all(args.profile, args.only or NOTEBOOKS, parameters))
    for nb in args.only or NOTEBOOKS:
        print(f"=== {nb} (profile {args.profile})", flush=True)
        timed(nb, lambda: pm.execute_notebook(
            str(REPO_ROOT / "notebooks" / f"{nb}.ipynb"), str(out_dir / f"{nb}.{args.profile}.ipynb"),
            parameters={"profile": args.profile, "results_dir": str(Path(args.results) / nb), **parameters},
            kernel_name=_kernel(), log_output=True, progress_bar=False, cwd=str(REPO_ROOT)))
        print(f"=== {nb} done in {timings[nb]:.0f}s", flush=True)
    if args.dry_run:
        print(f"dry run of profile {args.profile} passed; tables and figures in {args.results}; "
              f"notebook wall times (s): {timings}")
        return
    text = report.build_report(Path(args.results))
    atomic_write_text(Path(args.results) / "REPORT.md", text)
    print(f"wrote {Path(args.results) / 'REPORT.md'}; notebook wall times (s): {timings}")


if __name__ == "__main__":
    main()
