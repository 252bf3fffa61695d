"""What every reproduction notebook shares, importable from one place (a thin re-export).

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

The code lives in focused modules, each importable on its own:

    params     NotebookParams, validate_params, results_dir, runs_dir (and the parameter errors);
               dataset_param (a dataset name, folder or {"path": ..., "label_column": ...}), positive_ints
    jobs       Job, finetune_from, train_config
    preflight  preflight: every check before compute
    sweep      run_jobs and its scheduler (process pool, signals, progress lines, SweepError)
    results    SCHEMA, tidy, collect, write_results, mean_spread, fmt_pm, load_run_model

The four experiment modules build their own `validate_params`, `profile`, `run` and `collect` from one
skeleton (`skeleton.py`), which is not re-exported here: it is for those modules, not for the notebooks.
"""
from __future__ import annotations

from .jobs import Job, finetune_from, train_config
from .params import (DATASET_PARAMS, NOTEBOOK_VARIABLES, PROFILES, REPO_ROOT, NotebookParams, ParameterError,
                     PreflightError, dataset_param, positive_ints, results_dir, runs_dir, validate_params)
from .preflight import preflight
from .results import (SCHEMA, atomic_write_text, collect, fmt_pm, load_run_model, mean_spread, save_figure, tidy,
                      write_results)
from .sweep import LAST_SWEEP, SweepError, SweepResults, default_workers, run_jobs

__all__ = ["Job", "finetune_from", "train_config", "DATASET_PARAMS", "dataset_param", "positive_ints", "NOTEBOOK_VARIABLES", "PROFILES", "REPO_ROOT", "NotebookParams",
           "ParameterError", "PreflightError", "results_dir", "runs_dir", "validate_params", "preflight", "SCHEMA",
           "atomic_write_text", "collect", "fmt_pm", "load_run_model", "mean_spread", "save_figure", "tidy",
           "write_results", "LAST_SWEEP", "SweepError", "SweepResults", "default_workers", "run_jobs"]
