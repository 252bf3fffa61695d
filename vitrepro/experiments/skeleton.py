"""The skeleton every experiment module shares, so that each module holds only what is its own (its
profiles, jobs, baselines, tables, figures and verdict inputs).

An experiment module builds its public functions from here, in the order it reads:

    PROFILES = skeleton.profiles_by_name(smoke, cpu, gpu, paper)
    validate_params = skeleton.parameter_validator(Params)
    profile = skeleton.profile_chooser(PROFILES, "dataset", "seeds")  # the Params fields that override the profile's
    ... def jobs(params), def baseline_rows(params, log=print) ...
    run, collect = skeleton.run_and_collect(NOTEBOOK, jobs, baseline_rows)

plus the few helpers their parameters and tables repeat: `check_datasets`, `held_out_fraction`,
`percent_cell`, `percent_cells` and `percent_table`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import pandas as pd

from . import launch, recipes
from .params import PROFILES as PROFILE_NAMES
from .params import validate_params as validate_notebook_params
from .results import collect as collect_finished
from .results import fmt_pm, mean_spread, tidy


def profiles_by_name(*builders: Callable) -> dict[str, Callable]:
    """`{"smoke": smoke, ...}` from the profile functions themselves; each of `params.PROFILES` must be
    there (a profile missing from one notebook would otherwise only fail when someone asks for it)."""
    table = {f.__name__: f for f in builders}
    if tuple(table) != PROFILE_NAMES:
        raise ValueError(f"profiles {tuple(table)}: give exactly {PROFILE_NAMES}, in that order")
    return table


def parameter_validator(params_class: type) -> Callable[[dict], object]:
    """`validate_params(values)`: the notebook's globals strictly checked into `params_class`, then the
    launch parameters (a dry run switches this process to stand-in data here)."""

    def validate(values: dict):
        return launch.validated(validate_notebook_params(params_class, values))

    validate.__doc__ = f"Notebook globals -> a checked `{params_class.__qualname__}` (unknown names fail)."
    return validate


def profile_chooser(profiles: dict[str, Callable], *overrides: str) -> Callable:
    """`profile(params)`: the named profile's sweep, where each parameter in `overrides` that was given
    replaces the profile's field of the same name (a list becomes the tuple the profile holds)."""

    def profile(params):
        chosen = profiles[params.profile]()
        for name in overrides:
            value = getattr(params, name)
            if value:  # None (and an empty list) keep the profile's own choice
                setattr(chosen, name, tuple(value) if isinstance(getattr(chosen, name), tuple) else value)
        return chosen

    profile.__doc__ = f"The profile's sweep, with {', '.join(overrides)} from the parameters where given."
    return profile


def run_and_collect(notebook: str, jobs: Callable, baseline_rows: Callable) -> tuple[Callable, Callable]:
    """`run(params, log=None)` trains (or reuses) every job; `collect(params)` reads back the finished runs
    only, training nothing. Both return the long-form frame of the runs followed by the pixel baselines
    (`baseline_rows(params)`; None where there are none, e.g. an analysis of released weights)."""

    def with_baselines(frame: pd.DataFrame, params) -> pd.DataFrame:
        baselines = baseline_rows(params)
        return frame if baselines is None else pd.concat([frame, baselines], ignore_index=True)

    def run(params, log=None) -> pd.DataFrame:
        results = launch.run_jobs(jobs(params), params, log=log)
        return with_baselines(tidy(results, notebook, params.profile), params)

    def collect(params) -> pd.DataFrame:
        return with_baselines(collect_finished(jobs(params), params, notebook), params)

    run.__doc__ = f"Train or reuse every run of the {notebook} sweep; its long-form results with the pixel baselines."
    collect.__doc__ = f"The finished runs of the {notebook} sweep, read back from the run store (no training)."
    return run, collect


def check_datasets(*names: str | None) -> None:
    """Every dataset a parameter names (None: the profile's) must exist, checked before any compute."""
    from ..data import resolve_source

    for name in names:
        if name is not None:
            resolve_source(name, check_hub=False)


def held_out_fraction(shared_upstream: bool) -> float:
    """The part of its training set a pre-training run held out for validation, so that a pixel baseline
    learns from the same images: the cpu profile's shared upstream runs (`recipes.upstream_config`) hold
    out `recipes.FASHION_VAL`; a profile's own recipe holds out nothing."""
    return recipes.FASHION_VAL if shared_upstream else 0.0


def percent_cell(values: pd.Series, digits: int = 1) -> str:
    """One table cell from the values of one setting (one per seed): mean ± std in percent."""
    return fmt_pm(values.mean(), values.std(), len(values), 100, digits)


def percent_cells(frame: pd.DataFrame, by: Sequence[str], digits: int = 1) -> pd.DataFrame:
    """`mean_spread` over seeds for each group of `by`, plus its `cell`: mean ± std in percent."""
    table = mean_spread(frame, by)
    table["cell"] = [fmt_pm(m, s, n, 100, digits) for m, s, n in zip(table["mean"], table["std"], table["n"])]
    return table


def percent_table(frame: pd.DataFrame, index: str | list[str], columns: str, digits: int = 1) -> pd.DataFrame:
    """The wide table every notebook shows: one row per `index`, one column per value of `columns`,
    each cell mean ± std over seeds in percent."""
    rows = [index] if isinstance(index, str) else list(index)
    return percent_cells(frame, rows + [columns], digits).pivot(index=index, columns=columns, values="cell")
