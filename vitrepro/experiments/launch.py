"""How a notebook's sweep runs (`ExperimentParams`, on top of `NotebookParams`): locally (in the notebook's
process or its pool workers), each configuration under torchrun (``launcher``, ``nproc_per_node``; several
nodes: docs/usage.md), or as a dry run on stand-in data (``dry_run``, ``tiny``: dryrun.py); with ``source``
other than "train", no sweep: the committed results are redrawn (`skeleton.read_results`)."""
from __future__ import annotations

from dataclasses import dataclass

from . import dryrun, sweep
from .params import NotebookParams, ParameterError

LAUNCHERS = ("local", "torchrun")


@dataclass
class ExperimentParams(NotebookParams):
    dry_run: bool = False  # every configuration a couple of steps on stand-in data, in a temporary run store
    launcher: str = "local"  # local | torchrun (each configuration under torchrun --standalone, DDP)
    nproc_per_node: int | None = None  # torchrun processes per configuration; None: all visible GPUs (CPU: 1)
    tiny: bool = False  # with dry_run: models above 25 M parameters swapped for tiny ones of the same family
    source: str = "train"  # train (the run store, training what is missing) | results | <a results.csv or its folder>


def validated(params: ExperimentParams) -> ExperimentParams:
    """Check the launch parameters (their types: `validate_params`); a dry run switches this process's
    settings to the stand-in data and ``params`` to a fresh store (`dryrun.activate`)."""
    n = params.nproc_per_node
    if params.launcher not in LAUNCHERS:
        raise ParameterError(f"launcher={params.launcher!r} is not one of {LAUNCHERS}")
    if n is not None and n < 1:
        raise ParameterError(f"nproc_per_node must be a positive integer or None, got {n!r}")
    if n is not None and params.launcher != "torchrun":
        raise ParameterError("nproc_per_node is only used with launcher='torchrun'")
    if params.tiny and not params.dry_run:
        raise ParameterError("tiny=True is only used with dry_run=True")
    if params.dry_run:
        dryrun.activate(params)
    return params


def run_jobs(jobs, params: ExperimentParams, log=None):
    """`sweep.run_jobs`, shrunk to a dry run when asked, and under torchrun when asked (one configuration
    at a time: each torchrun uses the processes it is given; None: every visible GPU, else 1)."""
    import torch

    if params.dry_run:
        jobs = dryrun.shrink_jobs(list(jobs), tiny=params.tiny)
    if params.launcher != "torchrun":
        return sweep.run_jobs(jobs, params, log=log)
    n = params.nproc_per_node or (max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1)
    return sweep.run_jobs(jobs, params, log=log, workers=1, torchrun=n)
