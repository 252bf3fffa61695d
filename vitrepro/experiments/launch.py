"""How a notebook's sweep runs (`ExperimentParams`, on top of `NotebookParams`): locally (in the notebook's
process or its pool workers), each configuration under torchrun (``launcher``, ``nproc_per_node``; several
nodes: README, "Several GPUs and nodes"), or as a dry run on stand-in data (``dry_run``, ``tiny``: dryrun.py); with
``source`` other than "train", no sweep: the committed results are redrawn (`skeleton.read_results`)."""
from __future__ import annotations

from dataclasses import dataclass

from .params import NotebookParams, ParameterError

LAUNCHERS = ("local", "torchrun")


@dataclass
class ExperimentParams(NotebookParams):
    """`NotebookParams` plus how the sweep runs (dry run, launcher)."""

    dry_run: bool = False  # every configuration a couple of steps on stand-in data, in a temporary run store
    launcher: str = "local"  # local | torchrun (each configuration under torchrun --standalone, DDP)
    nproc_per_node: int | None = None  # torchrun processes per configuration; None: all visible GPUs (CPU: 1)
    tiny: bool = False  # with dry_run: models above 25 M parameters swapped for tiny ones of the same family
    source: str = "train"  # train (the run store, training what is missing) | results | <a results.csv or its folder>


def check(params) -> None:
    if getattr(params, "launcher", "local") not in LAUNCHERS:
        raise ParameterError(f"launcher={params.launcher!r} is not one of {LAUNCHERS}")
    n = getattr(params, "nproc_per_node", None)
    if n is not None and n < 1:  # its type: validate_params (vitrepro.typed)
        raise ParameterError(f"nproc_per_node must be a positive integer or None, got {n!r}")
    if n is not None and params.launcher != "torchrun":
        raise ParameterError("nproc_per_node is only used with launcher='torchrun'")
    if getattr(params, "tiny", False) and not getattr(params, "dry_run", False):
        raise ParameterError("tiny=True is only used with dry_run=True")


def validated(params):
    """Check the launch parameters; a dry run switches this process's settings to the stand-in data and
    ``params`` to a fresh store (`dryrun.activate`)."""
    check(params)
    if getattr(params, "dry_run", False):
        from . import dryrun

        dryrun.activate(params)
    return params


def nproc(params) -> int:
    if params.nproc_per_node is not None:
        return params.nproc_per_node
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def run_jobs(jobs, params, log=None):
    """`common.run_jobs`, shrunk to a dry run when asked, and under torchrun when asked (one configuration
    at a time: each torchrun uses the processes it is given)."""
    from . import sweep  # the scheduler

    if getattr(params, "dry_run", False):
        from . import dryrun

        jobs = dryrun.shrink_jobs(list(jobs), tiny=getattr(params, "tiny", False))
    if getattr(params, "launcher", "local") != "torchrun":
        return sweep.run_jobs(jobs, params, log=log)
    return sweep.run_jobs(jobs, params, log=log, workers=1, torchrun=nproc(params))
