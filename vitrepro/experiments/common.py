"""What every reproduction notebook shares, importable from one place (a thin re-export of `params`,
`jobs`, `preflight`, `sweep` and `results`; docs/design.md maps them). `skeleton.py` is not re-exported:
it is for the four experiment modules, not for the notebooks."""
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
