"""What every reproduction notebook shares, importable from one place (a thin re-export of `params`,
`jobs`, `preflight`, `sweep` and `results`; docs/design.md maps them). `skeleton.py` is not re-exported:
it is for the four experiment modules, not for the notebooks."""
from __future__ import annotations

from .jobs import Job, finetune_from, train_config  # noqa: F401
from .params import (DATASET_PARAMS, NOTEBOOK_VARIABLES, PROFILES, REPO_ROOT, NotebookParams,  # noqa: F401
                     ParameterError, PreflightError, dataset_param, positive_ints, results_dir, runs_dir,
                     validate_params)
from .preflight import preflight  # noqa: F401
from .results import (SCHEMA, atomic_write_text, collect, fmt_pm, load_run_model, mean_spread,  # noqa: F401
                      save_figure, tidy, write_results)
from .sweep import LAST_SWEEP, SweepError, SweepResults, default_workers, run_jobs  # noqa: F401
