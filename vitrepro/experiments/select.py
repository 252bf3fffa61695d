"""Choose a recipe's hyper-parameters on held-out training data, never on test ([P] App. B: "we use
a held-out part of the training data").

    python -m vitrepro.experiments.recipes vit_pretrain     # one of recipes.SEARCHES; writes results/recipes/<name>.csv

A search trains one configuration per grid point with ``val_fraction`` > 0 and reads back only the
accuracy on that validation part (``acc/<dataset>/val``). `best` refuses any other metric, so a
test-split number cannot enter a selection. The chosen values are written into the recipes
(`vitrepro/experiments/recipes.py`) by hand, each citing the CSV that chose it.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .params import REPO_ROOT
from .results import atomic_write_text


class SelectionError(ValueError):
    """A selection asked to read something other than a validation metric."""


def validation_metric(name: str) -> str:
    """The metric key a selection may read: accuracy on the held-out part of the training set."""
    # acc/<dataset>/val in a record; top1_val in a notebook's long-form results (common.tidy)
    if not (name.startswith("acc/") and name.endswith("/val")) and name not in ("select/val", "top1_val"):
        raise SelectionError(f"selection metric {name!r} is not a validation accuracy (acc/<dataset>/val): "
                             "hyper-parameters are chosen on held-out training data, never on test")
    return name


def _points(rows: Sequence[dict], metric: str, keys: Sequence[str]) -> tuple[dict, dict]:
    """The rows holding ``metric`` (a validation accuracy, else SelectionError) by grid point (values of ``keys``),
    and each point's mean ``metric`` (over its seeds)."""
    validation_metric(metric)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get(metric) is not None:
            groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    if not groups:
        raise SelectionError(f"no row holds {metric!r}: nothing to select from")
    return groups, {g: sum(float(r[metric]) for r in rs) / len(rs) for g, rs in groups.items()}


def best(rows: Sequence[dict], metric: str, keys: Sequence[str]) -> dict:
    """The grid point (values of ``keys``) with the highest mean ``metric`` over its rows (seeds).

    ``rows`` are dicts holding the grid keys and the metric, e.g. one per finished run. Raises
    SelectionError when ``metric`` is not a validation accuracy."""
    _, mean = _points(rows, metric, keys)
    return dict(zip(keys, max(mean, key=mean.get)))


def cheapest_within_one_se(rows: Sequence[dict], metric: str, keys: Sequence[str], cost: str) -> dict:
    """The grid point with the smallest ``cost`` value (e.g. steps) whose mean ``metric`` lies within one
    standard error of the best point's: the one-standard-error rule (Hastie, Tibshirani & Friedman, ESL
    §7.10), so a difference the validation set cannot resolve does not buy a longer budget.

    The standard error is the best point's binomial one, sqrt(p (1 - p) / n), n = its rows' ``val_n``
    (validation images); among equally cheap points the more accurate wins."""
    groups, mean = _points(rows, metric, keys)
    top = max(mean, key=mean.get)
    n = sum(int(r["val_n"]) for r in groups[top])  # all the validation predictions behind the best mean
    se = math.sqrt(mean[top] * (1 - mean[top]) / n)
    near = [g for g in mean if mean[g] >= mean[top] - se]
    i = list(keys).index(cost)
    return dict(zip(keys, min(near, key=lambda g: (g[i], -mean[g]))))


def at_grid_edge(grid: dict, chosen: dict) -> dict:
    """The chosen values that sit at the low or high end of a numeric grid axis of 3 or more values.

    Such a winner is not a selection: the optimum may lie beyond the grid, which should be extended
    in that direction. (Axes of 1-2 values, or non-numeric ones, are choices between options.)"""
    edges = {}
    for key, values in grid.items():
        numeric = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if 3 <= len(numeric) == len(values) and chosen.get(key) in (min(numeric), max(numeric)):
            edges[key] = "highest" if chosen[key] == max(numeric) else "lowest"
    return edges


@dataclass
class Search:
    """A base configuration, a grid over some of its keys, and the seeds each point trains."""

    base: dict
    grid: dict
    seeds: Sequence[int] = (0,)
    note: str = ""
    parent: dict | None = None  # for fine-tuning searches: the pre-training config
    cost: str | None = None  # a grid key whose smaller values cost less: `cheapest_within_one_se` chooses
    max_cost: float | None = None  # the most of `cost` the profile affords: chosen among the points within it

    def configs(self) -> list[dict]:
        return [{**self.base, **dict(zip(self.grid, values)), "seed": seed}
                for values in itertools.product(*self.grid.values()) for seed in self.seeds]


def run_search(name: str, search: Search, store=None) -> list[dict]:
    """Train every grid point; rows of (grid values, seed, validation accuracy, best step)."""
    from .. import train

    init = {}  # fine-tuning searches: every point starts from the trained parent
    if search.parent is not None:
        rec = train.run(search.parent, store=store, progress="log")
        init = {"init": f"run:{rec['experiment']}/{rec['run_id']}"}
    rows = []
    for cfg in search.configs():
        rec = train.run({**cfg, **init}, store=store, progress="log")
        sel = rec.get("selection") or {}
        metric = sel.get("on") or f"acc/{cfg['dataset']}/val"
        row = dict({k: cfg[k] for k in search.grid}, seed=cfg["seed"], metric=metric,
                   val=rec["metrics"][validation_metric(metric)], val_n=validation_size(rec),
                   best_step=sel.get("best_step"), steps=rec["steps"], run_id=rec["run_id"])
        rows.append(row)
        print(f"[select {name}] {row}", flush=True)
    return rows


def validation_size(record: dict) -> int:
    """How many held-out images a run's validation accuracy was measured on: its dataset's examples minus
    those it trained on; with a training subset (``train_examples``) the rest is not all held out, so the
    stratified hold-out's size, ``val_fraction`` of the examples (to a few images of per-class rounding)."""
    res, cfg = record["resolved"], record.get("config") or {}
    total = sum(d["n"] for d in res["data"].values() if d.get("split") == "train")
    if cfg.get("train_examples") is not None:
        return int(round(total * float(cfg["val_fraction"])))
    return total - res["train_size"]


def chosen_point(search: Search, rows: list[dict]) -> dict:
    """The grid point that ``rows`` (from `run_search` or a search's CSV) choose on their validation metric:
    the best one, or with a ``cost`` key the cheapest within one standard error of the best."""
    rows = [{**r, r["metric"]: r["val"]} for r in rows]
    if search.cost and search.max_cost is not None:  # a budget: the points the profile can afford
        rows = [r for r in rows if r[search.cost] <= search.max_cost]
    if search.cost:
        return cheapest_within_one_se(rows, rows[0]["metric"], list(search.grid), search.cost)
    return best(rows, rows[0]["metric"], list(search.grid))


def write_search(name: str, search: Search, rows: list[dict], out: Path) -> dict:
    import pandas as pd

    chosen = chosen_point(search, rows)
    frame = pd.DataFrame(rows)
    edges = at_grid_edge(search.grid, chosen)
    warning = "".join(f"\n\n**{k} = {chosen[k]} is the {side} value of its grid**: the optimum may lie beyond it; "
                      f"extend the grid." for k, side in edges.items())
    atomic_write_text(out / f"{name}.csv", frame.to_csv(index=False))
    rule = (f" (the one-standard-error rule on `{search.cost}`: the cheapest point within one binomial standard "
            f"error of the best)" if search.cost else "")
    budget = ""
    if search.cost and search.max_cost is not None:
        free = chosen_point(dataclasses.replace(search, max_cost=None), rows)
        rule += f", among the points the profile affords ({search.cost} <= {search.max_cost:g})"
        if free != chosen:
            edge = at_grid_edge(search.grid, free)
            budget = (f"\n\nWithout that budget the rule would choose {free}"
                      + (f" ({', '.join(f'{k} the {side} of its grid' for k, side in edge.items())}: the optimum "
                         "may lie beyond it)" if edge else "") + ".")
    atomic_write_text(out / f"{name}.md", f"# Selection `{name}`\n\n{search.note}\n\n"
                      f"Chosen on validation accuracy{rule}: {chosen}{warning}{budget}\n\n"
                      f"{frame.to_markdown(index=False)}\n")
    if edges:
        print(f"[select {name}] WARNING: chosen at the edge of the grid: {edges}; extend the grid", flush=True)
    return chosen


def main(searches: dict, argv=None) -> None:
    """The command line over ``searches`` (name -> function returning a `Search`; `recipes.SEARCHES`)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="+", choices=sorted(searches))
    ap.add_argument("--out", default=str(REPO_ROOT / "results" / "recipes"))
    args = ap.parse_args(argv)
    for name in args.names:
        search = searches[name]()
        rows = run_search(name, search)
        print(f"[select {name}] chosen: {write_search(name, search, rows, Path(args.out))}", flush=True)

