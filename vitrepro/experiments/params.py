"""Notebook parameters: the dataclass every notebook's `parameters` cell fills, its strict validation
(papermill only warns about an undeclared parameter), and the folders the parameters choose."""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import settings, typed

PROFILES = ("smoke", "cpu", "gpu", "paper")
REPO_ROOT = Path(__file__).resolve().parents[2]


class ParameterError(ValueError):
    """A notebook parameter that is unknown, of the wrong type or impossible."""


class PreflightError(ParameterError):
    """Found before any compute: a dataset, split, subset size or directory the sweep cannot use."""


@dataclass
class NotebookParams:
    """Parameters every notebook takes (the `parameters` cell documents each one)."""

    profile: str = "cpu"
    seeds: int | None = None  # number of seeds per point; None = the profile's default
    results_dir: str | None = None  # None = <runs_dir>/results/<notebook>/<profile>/ (a fresh folder, out of git)
    runs_dir: str | None = None  # None = the run store of vitrepro.settings ($VITREPRO_RUNS, vitrepro.toml, runs/)
    device: str = "auto"
    force: bool = False  # retrain even when the run store has a finished record
    allow_partial: bool = False  # write tables from the finished runs when some failed (marked partial)


# Notebook parameters that name a dataset: each takes a name, a local parquet folder, or a dict choosing the
# columns / splits of one (`dataset_param`); a list parameter (transfer's `downstream`) takes a list of those.
DATASET_PARAMS = ("upstream", "downstream", "dataset", "fewshot_dataset")
DATASET_KEYS = ("path", "image_column", "label_column", "train_split", "test_split", "train_examples")
_EXAMPLE = '{"path": "/data/my_set", "label_column": "fine_label"}'


def _hints(names, valid) -> str:
    """'name' (did you mean 'closest'?), ... for unknown names."""
    return ", ".join(f"{n!r}" + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(str(n), valid, n=1))
                                 else "") for n in names)


def dataset_param(name: str, value: Any) -> Any:
    """A dataset parameter -> what the training configs carry: a name or folder stays as it is; a dict
    ``{"path": ..., "label_column": ..., "image_column": ..., "train_split": ..., "test_split": ...,
    "train_examples": 1000}`` (the last: a fixed class-balanced training subset, e.g. VTAB-1k's size) (or its
    JSON text, for ``papermill -p``) becomes the reference ``"<path>[label_column=...]"`` of `data.dataset_ref`,
    which every config, evaluator, baseline and run id then carries. Checked strictly (whether the columns
    exist: `preflight`)."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ParameterError(f"{name}={value!r} is neither a dataset name nor a JSON dict like {_EXAMPLE}: "
                                 f"{e}") from e
    if isinstance(value, (list, tuple)):
        return [dataset_param(f"{name}[{i}]", v) for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    unknown = [k for k in value if k not in DATASET_KEYS]
    if unknown:
        raise ParameterError(f"{name}: unknown key(s) {_hints(unknown, DATASET_KEYS)} in the dataset dict; valid keys: "
                             f"{', '.join(DATASET_KEYS)} (e.g. {name}={_EXAMPLE})")
    if "path" not in value:
        raise ParameterError(f"{name}: the dataset dict has no 'path' (a dataset name or a parquet folder); "
                             f"e.g. {name}={_EXAMPLE}")
    for k, v in value.items():
        if k == "train_examples":
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ParameterError(f"{name}: 'train_examples' must be a positive integer, got {v!r}")
        elif not isinstance(v, str) or not v.strip():
            raise ParameterError(f"{name}: {k!r} must be a non-empty string, got {v!r}")
        elif k != "path" and any(c in v for c in ",[]=/"):
            raise ParameterError(f"{name}: {k}={v!r} contains one of , [ ] = / (not supported in a column or split "
                                 "name)")
    from ..data import dataset_ref

    return dataset_ref(value["path"], **{k: v for k, v in value.items() if k != "path"})


def check_list(name: str, value: Any, what: str, ok: Callable[[Any], bool], not_ok: str) -> None:
    """A non-empty list parameter (`what`) without repeats, each value `ok` (else the error `not_ok`, formatted
    with `name` and the `bad` values); None = the profile's."""
    if value is None:
        return
    if not isinstance(value, (list, tuple)) or not value:
        raise ParameterError(f"{name} must be {what}, got {value!r}")
    if bad := [v for v in value if not ok(v)]:
        raise ParameterError(not_ok.format(name=name, bad=", ".join(map(repr, bad))))
    if len(set(map(str, value))) != len(value):
        raise ParameterError(f"{name} has repeated values: {list(value)!r}")


def positive_ints(name: str, value: Any) -> None:
    """A list parameter of positive integers (e.g. scaling's `sizes`), or None."""
    check_list(name, value, "a non-empty list of positive integers",
               lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
               "{name} must be a list of positive integers; not one: {bad}")


# Variables the notebooks themselves define after validation (so re-running that cell still works).
NOTEBOOK_VARIABLES = {"params", "df", "tables", "figures", "written", "analysed", "sim_figures", "comparisons",
                      "similarity", "extra", "tracked", "tracked_figures", "explored"}


_NOT_PARAMETERS = {"In", "Out", "get_ipython", "exit", "quit", "display"} | NOTEBOOK_VARIABLES


def validate_params(cls: type, values: dict[str, Any]):
    """Build the experiment's parameter dataclass from notebook globals, strictly: papermill only *warns*
    about a parameter the notebook does not declare, so a misspelled `-p profil cpu` would silently run the
    default. Here every parameter-like global must be a declared field (else the closest valid spelling)."""
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = [n for n, v in values.items()  # the globals that can only have come from the parameters cell
               if n not in fields and not n.startswith("_") and n not in _NOT_PARAMETERS
               and isinstance(v, (str, int, float, bool, list, tuple, dict, type(None)))]
    if unknown:
        raise ParameterError(f"unknown notebook parameter(s) {_hints(unknown, fields)}; valid parameters: "
                             f"{', '.join(fields)}")
    kwargs = {k: v for k, v in values.items() if k in fields}
    for f in dataclasses.fields(cls):  # papermill -p passes a list as its JSON text (it parses numbers, bools, None)
        text = kwargs.get(f.name)
        if str(f.type).startswith("list") and isinstance(text, str) and text.lstrip().startswith("["):
            try:
                kwargs[f.name] = json.loads(text)
            except json.JSONDecodeError as e:
                raise ParameterError(f"{f.name}={text!r} is not a JSON list such as '[\"a\", \"b\"]': {e}") from e
    params = cls(**{k: dataset_param(k, v) if k in DATASET_PARAMS else v for k, v in kwargs.items()})
    for name in fields:  # by the fields' type hints (vitrepro.typed): none is left unchecked
        typed.check(cls, name, getattr(params, name), ParameterError)
    if params.profile not in PROFILES:
        raise ParameterError(f"profile={params.profile!r} is not one of {PROFILES}")
    if params.seeds is not None and params.seeds < 1:  # its type: checked above
        raise ParameterError(f"seeds must be a positive integer (number of seeds), got {params.seeds!r}")
    if params.device not in ("auto", "cpu") and not str(params.device).startswith(("cuda", "mps")):
        raise ParameterError(f"device={params.device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if hasattr(params, "check"):
        params.check()
    return params


def results_dir(params: NotebookParams, notebook: str) -> Path:
    """Where a notebook writes: `params.results_dir`, else `<runs_dir>/results/<notebook>/<profile>/`
    (never the committed `results/<notebook>/`, which only `run_all` / `make reproduce` rewrites)."""
    if params.results_dir:
        return Path(params.results_dir).expanduser()
    return runs_dir(params) / "results" / notebook / params.profile


def runs_dir(params: NotebookParams) -> Path:
    """The run store: `params.runs_dir`, else the settings' (`$VITREPRO_RUNS`, ``runs`` in vitrepro.toml,
    `<repo>/runs`): the one source every entry point, the run store's CLI and the sweeps share."""
    return Path(params.runs_dir).expanduser() if params.runs_dir else settings.get().runs_dir
