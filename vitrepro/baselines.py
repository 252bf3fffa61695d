"""Trivial baselines on raw pixels, on exactly the splits the models use: a model below them proves nothing.
`pixel_logistic_regression` (scikit-learn, C chosen on validation, refitted on all training images) and
`pixel_fewshot` (the models' few-shot probe, `evaluate.fewshot_lsr`, on pixels). Results are cached in the run
store (``<runs>/baselines/<key>.json``): the logistic regression on 55k Fashion-MNIST images takes a minute.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data import balanced_subset, load_arrays, training_split
from .evaluate import fewshot_lsr
from .store import atomic_write_json, canonical_json

LOGREG_CS = (0.01, 0.1, 1.0)  # searched on validation
SELECT_ON = 10000  # training images the C search fits on (the final fit uses all)


def pixels(images: torch.Tensor) -> np.ndarray:
    """uint8 images -> (N, pixels) floats in [-1, 1] (the models' input scaling)."""
    return (images.reshape(len(images), -1).to(torch.float32) / 127.5 - 1.0).numpy()


def _cached(root: Path | None, kind: str, key: dict, compute) -> dict:
    if root is None:
        return compute()
    name = hashlib.sha256(canonical_json({"kind": kind, **key}).encode()).hexdigest()[:12]
    path = Path(root) / "baselines" / f"{kind}-{name}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())["result"]
        except (json.JSONDecodeError, KeyError):
            path.unlink()  # damaged cache entry: recompute it
    result = compute()
    atomic_write_json(path, {"key": {"kind": kind, **key}, "result": result})
    return result


def pixel_logistic_regression(dataset: str, *, train_examples: int | None = None, val_fraction: float = 0.0,
                              data_seed: int = 0, cache: Path | None = None) -> dict:
    """Top-1 on the test split of a logistic regression on raw pixels: {"top1", "C", "val"}."""
    key = dict(dataset=dataset, train_examples=train_examples, val_fraction=val_fraction, data_seed=data_seed,
               cs=list(LOGREG_CS))
    return _cached(cache, "logreg", key, lambda: _logreg(dataset, train_examples, val_fraction, data_seed))


def _logreg(dataset, train_examples, val_fraction, data_seed) -> dict:
    from sklearn.linear_model import LogisticRegression

    train, val = training_split(load_arrays(dataset, "train"), val_fraction, train_examples, data_seed)
    # no validation part: choose C on 10% of the training images, then refit on all of them
    fit, val = (train, val) if val is not None else training_split(train, 0.1, None, data_seed)
    scores = {1.0: float("nan")}  # too few images to hold any out (smoke subsets): sklearn's default C
    if len(fit) > SELECT_ON:  # choose C on a class-balanced 10k of the training images, then refit on all
        fit = fit.subset(balanced_subset(fit.labels, SELECT_ON, data_seed))
    if len(val) >= 20 and len(np.unique(fit.labels.numpy())) > 1:
        x_fit, y_fit = pixels(fit.images), fit.labels.numpy()
        x_val, y_val = pixels(val.images), val.labels.numpy()
        scores = {c: float(LogisticRegression(C=c, max_iter=300, tol=1e-3).fit(x_fit, y_fit).score(x_val, y_val))
                  for c in LOGREG_CS}
    best_c = max(scores, key=lambda c: -1 if np.isnan(scores[c]) else scores[c])
    clf = LogisticRegression(C=best_c, max_iter=300, tol=1e-3).fit(pixels(train.images), train.labels.numpy())
    test = load_arrays(dataset, "test")
    return {"top1": float(clf.score(pixels(test.images), test.labels.numpy())), "C": best_c, "val": scores[best_c],
            "train_size": len(train)}


def pixel_fewshot(dataset: str, *, shots: int = 5, seeds: Sequence[int] = (0, 1, 2), val_fraction: float = 0.0,
                  data_seed: int = 0, cache: Path | None = None) -> dict:
    """The few-shot linear probe on raw pixels, with the models' protocol: shots drawn per seed
    (class-balanced) from the held-out validation part when ``val_fraction`` > 0 (as
    `recipes.fewshot_on_heldout`), else from the training split; scored on test. {"mean", "per_seed"}."""
    key = dict(dataset=dataset, shots=shots, seeds=list(seeds), val_fraction=val_fraction, data_seed=data_seed)

    def compute():
        train = load_arrays(dataset, "train")
        pool = training_split(train, val_fraction, None, data_seed)[1] if val_fraction > 0 else train
        test = load_arrays(dataset, "test")
        x_test, y_test = pixels(test.images), test.labels.numpy()
        per_seed = []
        for s in seeds:
            idx = balanced_subset(pool.labels, shots * pool.num_classes, seed=s)
            per_seed.append(fewshot_lsr(pixels(pool.images[idx]), pool.labels[idx].numpy(), x_test, y_test,
                                        pool.num_classes))
        return {"mean": float(np.mean(per_seed)), "per_seed": per_seed}

    return _cached(cache, "fewshot", key, compute)
