"""The skeleton every experiment module builds its public functions from (`profiles_by_name`,
`parameter_validator`, `profile_chooser`, `run_and_collect`), plus the helpers their parameters, recipes and
tables repeat; each module holds only what is its own (profiles, jobs, baselines, tables, figures)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from . import launch, recipes
from .params import PROFILES as PROFILE_NAMES
from .params import REPO_ROOT, ParameterError, check_list
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
        params = validate_notebook_params(params_class, values)
        check_source(params)
        return params if params.source != "train" else launch.validated(params)

    return validate


def profile_chooser(profiles: dict[str, Callable], *overrides: str) -> Callable:
    """`profile(params)`: the named profile's sweep, where each parameter in `overrides` that was given
    replaces the profile's field of the same name (a list becomes the tuple the profile holds)."""

    def profile(params):
        chosen = profiles[params.profile]()
        for name in overrides:
            value = getattr(params, name)
            if value is not None and value not in ("", [], ()):  # None keeps the profile's (empty: refused by check)
                setattr(chosen, name, tuple(value) if isinstance(value, (list, tuple)) else value)
        return chosen

    return profile


def run_and_collect(notebook: str, jobs: Callable, baseline_rows: Callable) -> tuple[Callable, Callable]:
    """`run(params, log=None)` trains (or reuses) every job; `collect(params)` reads back the finished runs
    only, training nothing. Both return the long-form frame of the runs followed by the pixel baselines
    (`baseline_rows(params)`; None where there are none, e.g. an analysis of released weights).
    With `params.source` other than "train", `run` reads the committed results instead (`read_results`):
    no run store, no training."""

    def with_baselines(frame: pd.DataFrame, params) -> pd.DataFrame:
        baselines = baseline_rows(params)
        return frame if baselines is None else pd.concat([frame, baselines], ignore_index=True)

    def run(params, log=None) -> pd.DataFrame:
        if getattr(params, "source", "train") != "train":
            return read_results(params, notebook)
        return with_baselines(tidy(launch.run_jobs(jobs(params), params, log=log), notebook, params.profile), params)

    def collect(params) -> pd.DataFrame:
        return with_baselines(collect_finished(jobs(params), params, notebook), params)

    return run, collect


def results_csv(params, notebook: str) -> Path:
    """The results a notebook redraws with `source="results"` (results/<notebook>/results.csv) or
    `source=<path>` (a results.csv, or a folder holding one)."""
    source = getattr(params, "source", "train")
    path = REPO_ROOT / "results" / notebook / "results.csv" if source == "results" else Path(source).expanduser()
    return path / "results.csv" if path.is_dir() else path


def read_results(params, notebook: str, *, analysis: str | None = None) -> pd.DataFrame:
    """The long-form frame of `results_csv(params, notebook)` (with `analysis`, the table of that name beside
    it, e.g. "similarity" for similarity.csv; None where it was never written)."""
    path = results_csv(params, notebook)
    if analysis is not None:
        path = path.with_name(f"{analysis}.csv")
        return pd.read_csv(path) if path.exists() else None
    return pd.read_csv(path)


def check_source(params) -> None:
    """`source`: "train", "results" or a results.csv (or its folder) that exists, checked before compute."""
    source = getattr(params, "source", "train")  # a str: its type is checked first (`validate_notebook_params`)
    if source not in ("train", "results") and not results_csv(params, "").exists():
        raise ParameterError(f"source={source!r}: use 'train' (the run store, training what is missing), 'results' "
                             "(results/<notebook>/results.csv) or the path of a results.csv or of its folder")


def check_models(name: str, value, *, families: Sequence[str] = ("vit", "hybrid", "bit"), single: bool = False) -> None:
    """Model names (a list, or one with `single`) that the registry's grammar accepts, of the given families;
    None = the profile's."""
    from ..models.registry import parse_name

    if value is None:
        return
    names = [value] if single else value
    if not value or not isinstance(value, str if single else (list, tuple)):
        what = "a model name" if single else "a non-empty list of model names"
        raise ParameterError(f"{name} must be {what} such as {EXAMPLE_MODELS}, got {value!r}")
    if not single:
        check_choices(name, names)
    for model in names:
        try:
            family = parse_name(model).family
        except (ValueError, TypeError) as e:
            raise ParameterError(f"{name}: {e}") from e
        if family not in families:
            raise ParameterError(f"{name}: {model!r} is a {family} model; this notebook takes {' / '.join(families)} "
                                 f"models, e.g. 'ViT-Nano/4'")


def check_choices(name: str, value, allowed: Sequence | None = None) -> None:
    """A non-empty list without repeats, each value one of `allowed` (when given); None = the profile's."""
    one_of = ", ".join(map(repr, allowed or ()))
    check_list(name, value, f"a non-empty list of {one_of}" if allowed else "a non-empty list",
               lambda v: allowed is None or v in allowed, "{name}: {bad} not one of " + one_of)


def check_positive(name: str, value) -> None:
    """One positive integer; None = the profile's."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ParameterError(f"{name} must be a positive integer, got {value!r}")


EXAMPLE_MODELS = "'ViT-Nano/4', 'R14x0.25+ViT-Nano/4', 'BiT-R14x0.25'"


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


def shot_draws(shared_upstream: bool) -> tuple[int, ...]:
    """The shot draws of the models' few-shot probes, which a pixel baseline repeats: the shared upstream runs'
    `recipes.CPU_FEWSHOT_DRAWS`, else 3."""
    return tuple(range(recipes.CPU_FEWSHOT_DRAWS)) if shared_upstream else (0, 1, 2)


def with_steps(recipe: dict, steps: int | None) -> dict:
    """``recipe`` trained for ``steps`` (None: its own schedule), replacing its epochs; a short budget keeps a
    tenth of itself for warm-up."""
    if steps is None:
        return dict(recipe)
    out = {k: v for k, v in recipe.items() if k != "epochs"} | {"steps": steps}
    if out.get("warmup_steps", 0) >= steps:
        out["warmup_steps"] = steps // 10
    return out


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
