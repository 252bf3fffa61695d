"""Tests' helper: a notebook's own code cells (the jupytext twin) executed in the test process, with
papermill's parameter injection, and every notebook of a profile dry-run that way (`run_profile`)."""
from __future__ import annotations

import math
import time
from typing import Sequence

from vitrepro.experiments import NOTEBOOKS, module
from vitrepro.experiments.params import REPO_ROOT


def notebook_cells(notebook: str) -> list[tuple[bool, str]]:
    """(is the parameters cell, source) of each code cell of ``notebooks/<notebook>.py``."""
    cells = []
    for chunk in (REPO_ROOT / "notebooks" / f"{notebook}.py").read_text().split("\n# %%")[1:]:
        head, _, body = chunk.partition("\n")
        if "[markdown]" not in head:
            cells.append(('"parameters"' in head, body))
    return cells


def run_notebook(notebook: str, parameters: dict) -> dict:
    """Execute a notebook's code cells here (the parameters cell, then the given values); its namespace."""
    ns: dict = {"display": lambda *a, **k: None, "__name__": f"dryrun_{notebook}"}
    for is_params, src in notebook_cells(notebook):
        exec(compile(src, f"notebooks/{notebook}.py", "exec"), ns)
        if is_params:
            ns.update(parameters)
    return ns


def summary(jobs) -> dict:
    """Configurations and their total training steps (epochs as steps over the set where its size is known)."""
    from vitrepro.experiments import recipes

    steps = 0
    for c in (job.config for job in jobs):
        if c.get("steps") is not None:
            steps += int(c["steps"])
        elif c.get("epochs") is not None:
            n = c.get("train_examples") or recipes.TRAIN_IMAGES.get(c["dataset"])
            steps += math.ceil(c["epochs"] * n / c["batch_size"]) if n else 0
    return {"configurations": len(jobs), "steps": steps}


def run_profile(profile: str, *, notebooks: Sequence[str] | None = None, tiny: bool = False,
                extra: dict | None = None) -> dict:
    """The dry run of ``profile`` in this process: each notebook's own cells with ``dry_run=True`` (a fresh
    temporary run store and results folder each). Returns {notebook: {"configurations", "steps" (of the
    real profile), "seconds"}}; raises what a notebook would."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitrepro import settings

    saved, out = settings.overrides(), {}
    try:
        for nb in notebooks or NOTEBOOKS:
            t0, mod = time.time(), module(nb)
            real = summary(mod.jobs(mod.validate_params({"profile": profile, **(extra or {})})))
            run_notebook(nb, {"profile": profile, "dry_run": True, "tiny": tiny, **(extra or {})})
            plt.close("all")
            out[nb] = {**real, "seconds": round(time.time() - t0, 1)}
    finally:  # dryrun.activate pointed this process at the stand-ins: undo it
        settings.override(saved)
    return out
