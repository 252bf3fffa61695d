"""Evaluators (``evaluator(model, autocast_dtype=None) -> dict[str, float]``): test accuracy
(``acc/<dataset>/<split>``) and the paper's few-shot linear probe (``fewshot/<dataset>/<k>shot``, and per seed
``.../seed<s>``).

``fewshot_lsr`` is the paper's closed-form regularised least squares to {-1, 1}^K targets (§4.1) in big_vision's
form: features whitened by the train mean and (std + 1e-5), a constant bias feature (100: almost unregularised),
ridge solved through the eigendecomposition of the smaller of XᵀX and XXᵀ, prediction = argmax. Float64.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Sequence

import numpy as np
import torch

from .data import (DATASETS, ImageArrays, _balanced_stream, _to_array, balanced_subset, is_streamed, load_arrays,
                   open_stream, preprocess, stream_batches)

__all__ = ["features", "accuracy", "fewshot_lsr", "fewshot_lsr_fit", "Accuracy", "FewShot", "make_evaluator"]

BIAS_CONSTANT = 100.0


@contextlib.contextmanager
def _evaluating(model):
    """Eval mode without gradients (the model's mode restored after); yields the model's device."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters(), torch.empty(0)).device
    finally:
        model.train(was)


def _autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _map_batches(model, images, fn, batch_size: int, autocast_dtype) -> torch.Tensor:
    images = images.images if isinstance(images, ImageArrays) else torch.as_tensor(images)
    out = []
    with _evaluating(model) as dev:
        for i in range(0, images.shape[0], batch_size):
            x = preprocess(images[i:i + batch_size].to(dev), int(model.img_size), int(model.in_chans))
            with _autocast(dev, autocast_dtype):
                out.append(fn(x).float())
    return torch.cat(out) if out else torch.zeros(0)


def features(model, images, batch_size: int = 256, autocast_dtype=None) -> torch.Tensor:
    """Pre-logits representation (``model.forward_features``) of uint8 images or an ImageArrays."""
    return _map_batches(model, images, model.forward_features, batch_size, autocast_dtype)


def accuracy(model, arrays: ImageArrays, batch_size: int = 256, autocast_dtype=None) -> float:
    if not len(arrays):
        return float("nan")
    pred = _map_batches(model, arrays.images, model, batch_size, autocast_dtype).argmax(1)
    return int((pred.cpu() == arrays.labels.cpu()).sum()) / len(arrays)


def _whitened(x, mean, std) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.concatenate([(x - mean) / std, np.full((len(x), 1), BIAS_CONSTANT)], axis=1)


def fewshot_lsr_fit(x_train, y_train, num_classes: int, l2_reg: float = 2.0 ** 10):
    """Closed-form ridge to {-1, 1}^K targets. Returns (w (D+1, K), mean (D,), std (D,))."""
    x = np.asarray(x_train, dtype=np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-5
    x = _whitened(x, mean, std)
    t = 2.0 * np.eye(num_classes)[np.asarray(y_train, dtype=np.int64)] - 1.0
    if x.shape[0] >= x.shape[1]:   # N >= D: (XᵀX + λI)⁻¹ Xᵀ T
        eigs, q = np.linalg.eigh(x.T @ x)
        rhs, lhs = q.T @ (x.T @ t), q
    else:                          # N < D: Xᵀ (XXᵀ + λI)⁻¹ T
        eigs, q = np.linalg.eigh(x @ x.T)
        rhs, lhs = q.T @ t, x.T @ q
    w = (lhs / (eigs + l2_reg)[None, :]) @ rhs
    return w, mean, std


def fewshot_lsr(x_train, y_train, x_test, y_test, num_classes: int, l2_reg: float = 2.0 ** 10,
                return_predictions: bool = False):
    """Few-shot linear accuracy (fraction in [0, 1])."""
    w, mean, std = fewshot_lsr_fit(x_train, y_train, num_classes, l2_reg)
    pred = (_whitened(x_test, mean, std) @ w).argmax(1)
    acc = float((pred == np.asarray(y_test)).mean())
    return (acc, pred) if return_predictions else acc


def _short(dataset) -> str:
    return str(dataset).rstrip("/").split("/")[-1]


class Accuracy:
    """Top-1 accuracy on ``dataset``/``split`` (``max_examples``: first N, for quick checks; ``arrays``: these
    images instead of the named split)."""

    def __init__(self, dataset: str, split: str = "test", batch_size: int = 256,
                 max_examples: int | None = None, arrays: ImageArrays | None = None):
        self.dataset, self.split, self.batch_size, self.max_examples = dataset, split, batch_size, max_examples
        self._arrays = arrays  # None: the named split
        self.name = f"acc/{_short(dataset)}/{split}"

    def __call__(self, model, autocast_dtype=None) -> dict[str, float]:
        if self._arrays is None and is_streamed(self.dataset):
            return {self.name: _stream_accuracy(model, self.dataset, self.split, self.batch_size,
                                                self.max_examples, autocast_dtype)}
        a = self._arrays if self._arrays is not None else load_arrays(self.dataset, self.split)
        if self.max_examples is not None and len(a) > self.max_examples:
            a = a.subset(torch.arange(self.max_examples))
        return {self.name: accuracy(model, a, self.batch_size, autocast_dtype)}


def _stream_accuracy(model, dataset, split, batch_size, max_examples, autocast_dtype=None) -> float:
    """Accuracy over a streamed split (e.g. imagenet-1k validation), exactly its first ``max_examples`` images."""
    correct = seen = 0
    with _evaluating(model) as dev:
        for x, y in stream_batches(dataset, split, batch_size, int(model.img_size), int(model.in_chans),
                                   drop_last=False):
            with _autocast(dev, autocast_dtype):
                pred = model(x.to(dev)).argmax(1).cpu()
            if max_examples is not None:
                pred, y = pred[:max_examples - seen], y[:max_examples - seen]
            correct += int((pred == y).sum())
            seen += len(y)
            if max_examples is not None and seen >= max_examples:
                break
    return correct / max(1, seen)


class FewShot:
    """Few-shot linear probe: for each seed, draw ``shots`` examples per class from ``train_split``
    (class-balanced, nested across shot counts; ``train_arrays``: from these images instead), fit
    ``fewshot_lsr`` on frozen features and score on ``test_split`` (``max_test``: first N test images)."""

    def __init__(self, dataset: str, shots: Sequence[int] = (1, 5, 10, 25), seeds: Sequence[int] = (0, 1, 2),
                 train_split: str = "train", test_split: str = "test", l2_reg: float = 2.0 ** 10,
                 batch_size: int = 256, max_test: int | None = None, train_arrays: ImageArrays | None = None):
        self.dataset, self.shots, self.seeds = dataset, tuple(int(s) for s in shots), tuple(int(s) for s in seeds)
        self.train_split, self.test_split, self.l2_reg = train_split, test_split, l2_reg
        self.batch_size, self.max_test, self._train_arrays = batch_size, max_test, train_arrays
        self.name = f"fewshot/{_short(dataset)}"

    def _scores(self, drawn, f_test, y_test, k: int) -> dict[str, float]:
        """Each seed's accuracy and their mean per shot count; ``drawn(n, seed)``: the (features, labels) drawn."""
        out: dict[str, float] = {}
        for n in self.shots:
            for s in self.seeds:
                out[f"{self.name}/{n}shot/seed{s}"] = fewshot_lsr(*drawn(n, s), f_test, y_test, k, self.l2_reg)
            out[f"{self.name}/{n}shot"] = float(np.mean([out[f"{self.name}/{n}shot/seed{s}"] for s in self.seeds]))
        return out

    def __call__(self, model, autocast_dtype=None) -> dict[str, float]:
        if is_streamed(self.dataset) and self._train_arrays is None:
            return self._streamed(model, autocast_dtype)
        tr = self._train_arrays if self._train_arrays is not None else load_arrays(self.dataset, self.train_split)
        te = load_arrays(self.dataset, self.test_split)
        if self.max_test is not None and len(te) > self.max_test:
            te = te.subset(torch.arange(self.max_test))
        draws = {(s, n): balanced_subset(tr.labels, n * tr.num_classes, seed=s) for s in self.seeds for n in self.shots}
        needed = torch.unique(torch.cat(list(draws.values())))
        f_needed = features(model, tr.images[needed], self.batch_size, autocast_dtype).cpu().double().numpy()
        pos = {int(i): j for j, i in enumerate(needed.tolist())}
        f_test = features(model, te.images, self.batch_size, autocast_dtype).cpu().double().numpy()

        def drawn(n, s):
            idx = draws[(s, n)]
            return f_needed[[pos[int(i)] for i in idx]], tr.labels[idx].numpy()
        return self._scores(drawn, f_test, te.labels.numpy(), tr.num_classes)

    def _streamed(self, model, autocast_dtype=None) -> dict[str, float]:
        """The probe on a streamed set (imagenet-1k): one pass over the training split collects the first
        max(shots) x len(seeds) examples of every class as features (nothing of image size is kept), each seed
        draws its class-balanced shots from that pool; the test split is streamed (its first ``max_test``)."""
        mode = "L" if int(model.in_chans) == 1 else "RGB"

        def feats(stream, limit=None):
            fs, ys, xb = [], [], []
            for ex in stream:
                if limit is not None and len(ys) >= limit:  # ys already holds the pending batch xb
                    break
                xb.append(torch.from_numpy(np.ascontiguousarray(_to_array(ex[icol], mode, int(model.img_size)))))
                ys.append(int(ex[lcol]))
                if len(xb) == self.batch_size:
                    fs.append(features(model, torch.stack(xb), self.batch_size, autocast_dtype).cpu())
                    xb = []
            if xb:
                fs.append(features(model, torch.stack(xb), self.batch_size, autocast_dtype).cpu())
            return (torch.cat(fs).double().numpy() if fs else np.zeros((0, 1))), np.asarray(ys, dtype=np.int64)

        ds, icol, lcol, _ = open_stream(self.dataset, self.train_split)
        k = len(getattr(ds.features[lcol], "names", None) or ()) or DATASETS[self.dataset].num_classes
        f_pool, y_pool = feats(_balanced_stream(ds, lcol, [max(self.shots) * len(self.seeds)] * k))
        counts = np.bincount(y_pool, minlength=k)
        present, few = int((counts > 0).sum()), int(((counts > 0) & (counts < max(self.shots))).sum())
        if present == 0 or few:
            raise ValueError(f"few-shot on {self.dataset!r}: {few} of {k} classes have fewer than {max(self.shots)} "
                             f"examples in its {self.train_split!r} split")
        if present < k:  # never on the real set; a stand-in (dry run) may hold a part of the classes
            print(f"[vitrepro] few-shot on {self.dataset!r}: {k - present} of {k} classes have no example in the "
                  f"{self.train_split!r} stream; probing the {present} present", file=sys.stderr, flush=True)
        ds_te, icol, lcol, _ = open_stream(self.dataset, self.test_split)
        f_test, y_test = feats(ds_te, self.max_test)

        def drawn(n, seed):
            idx = balanced_subset(torch.from_numpy(y_pool), n * present, seed=seed).numpy()
            return f_pool[idx], y_pool[idx]
        return self._scores(drawn, f_test, y_test, k)


def make_evaluator(spec):
    """An evaluator from a config entry: a dict {"type": "accuracy"|"fewshot", ...keyword args}."""
    kinds = {"accuracy": Accuracy, "fewshot": FewShot}
    if not isinstance(spec, dict) or spec.get("type") not in kinds:
        raise ValueError(f"evaluator spec must be a dict with 'type' one of {list(kinds)}, got {spec!r}")
    try:
        return kinds[spec["type"]](**{k: v for k, v in spec.items() if k != "type"})
    except TypeError as e:
        raise ValueError(f"bad evaluator spec {spec!r}: {e}") from e
