"""The pixel baselines of a sweep as rows of its long-form results (stage ``baseline``).

Every table and verdict shows them beside the models: a logistic regression on raw pixels (top-1)
for each training set a model learns from, and the few-shot probe on raw pixels with the models'
own protocol (same shot draws and seeds, so each seed's row pairs with the models' seed rows).
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd

from .. import baselines
from ..data import is_streamed
from .params import NotebookParams, runs_dir
from .results import SCHEMA

LOGREG = "pixels: logistic regression"
FEWSHOT = "pixels: 5-shot linear"


def trained_on(baselines: pd.DataFrame, n) -> pd.DataFrame:
    """The baseline rows trained on ``n`` examples where the baselines differ by training-set size (logistic
    regression), else all of them (few-shot, or no baseline of that size)."""
    if n is not None and "upstream_examples" in baselines and (baselines.upstream_examples == n).any():
        return baselines[baselines.upstream_examples == n]
    return baselines


def _row(params: NotebookParams, notebook: str, model: str, dataset: str, metric: str, value: float,
         n: int | None = None, seed: int | None = None) -> dict:
    return dict(dict.fromkeys(SCHEMA), notebook=notebook, profile=params.profile, run_id=f"baseline:{model}",
                stage="baseline", model=model, family="baseline", upstream=dataset, upstream_examples=n,
                dataset=dataset, seed=seed, metric=metric, value=value)


def rows(params: NotebookParams, notebook: str, *, trained_on: Sequence[tuple[str, int | None, float]] = (),
         fewshot: Sequence[str] = (), fewshot_val_fraction: float = 0.0, seeds: Sequence[int] = (0, 1, 2),
         log=print) -> pd.DataFrame:
    """Baseline rows (none on a streamed set): a pixel logistic regression per (dataset, training examples or
    None = all, validation hold-out fraction as the models had it) in ``trained_on``, and the pixel few-shot
    probe per dataset in ``fewshot`` (shots from the held-out part when ``fewshot_val_fraction`` > 0)."""
    from .dryrun import cap, cap_ref

    cache = runs_dir(params)
    out = []
    for dataset, n, hold in [t for t in trained_on if not is_streamed(t[0])]:
        if getattr(params, "dry_run", False):  # stand-in data: subsets capped at what it holds
            dataset = cap_ref(dataset)
            n = cap(dataset, n, hold)
        r = baselines.pixel_logistic_regression(dataset, train_examples=n, val_fraction=hold, cache=cache)
        log(f"baseline: pixel logistic regression on {dataset} ({n or 'all'} examples): top-1 {100 * r['top1']:.2f}% "
            f"(C={r['C']} chosen on validation)")
        out.append(_row(params, notebook, LOGREG, dataset, "top1", r["top1"], n=r.get("train_size", n)))
    for dataset in [d for d in fewshot if not is_streamed(d)]:
        r = baselines.pixel_fewshot(dataset, seeds=seeds, val_fraction=fewshot_val_fraction, cache=cache)
        log(f"baseline: pixel 5-shot linear probe on {dataset}: {100 * r['mean']:.2f}%")
        out += [_row(params, notebook, FEWSHOT, dataset, "fewshot5", v, seed=s) for s, v in zip(seeds, r["per_seed"])]
    return pd.DataFrame(out, columns=SCHEMA)
