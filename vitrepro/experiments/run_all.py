"""Execute every reproduction notebook with one profile, then rebuild results/REPORT.md.

    python -m vitrepro.experiments.run_all --profile cpu        (what `make reproduce` runs)
    python -m vitrepro.experiments.run_all --profile smoke --only scaling

Executed notebooks (with outputs) go to `runs/executed/` (kept out of git); the committed notebooks
stay clean. Each notebook's wall time is written to `results/timings_<profile>.json`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import NOTEBOOKS
from .common import REPO_ROOT, atomic_write_text, runs_dir, NotebookParams


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Run the reproduction notebooks through papermill.")
    ap.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "gpu", "paper"])
    ap.add_argument("--only", nargs="*", choices=NOTEBOOKS, help="run only these notebooks")
    ap.add_argument("--results", default=str(REPO_ROOT / "results"))
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="extra notebook parameter (applied to every notebook)")
    args = ap.parse_args(argv)
    import logging

    import papermill as pm

    # papermill forwards each cell's output to its logger: show it, so long runs show progress
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from .. import report

    out_dir = runs_dir(NotebookParams()) / "executed"
    out_dir.mkdir(parents=True, exist_ok=True)
    timings_file = Path(args.results) / f"timings_{args.profile}.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    for nb in args.only or NOTEBOOKS:
        t0 = time.time()
        print(f"=== {nb} (profile {args.profile})", flush=True)
        params = {"profile": args.profile, "results_dir": str(Path(args.results) / nb)}
        params.update({k: v for k, v in args.parameter})
        pm.execute_notebook(str(REPO_ROOT / "notebooks" / f"{nb}.ipynb"), str(out_dir / f"{nb}.{args.profile}.ipynb"),
                            parameters=params, kernel_name="python3", log_output=True, progress_bar=False,
                            cwd=str(REPO_ROOT))
        timings[nb] = round(time.time() - t0, 1)
        print(f"=== {nb} done in {timings[nb]:.0f}s", flush=True)
        atomic_write_text(timings_file, json.dumps(timings, indent=1))
    text = report.build_report(Path(args.results))
    atomic_write_text(Path(args.results) / "REPORT.md", text)
    print(f"wrote {Path(args.results) / 'REPORT.md'}; notebook wall times (s): {timings}")


if __name__ == "__main__":
    main()
