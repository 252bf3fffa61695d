"""Evaluators: test accuracy and the paper's few-shot linear probe (regularised least squares).

Every evaluator is a callable object with a ``name`` and ``__call__(model) -> dict[str, float]``.
Metric names: ``acc/<dataset>/<split>`` for ``Accuracy``; ``fewshot/<dataset>/<k>shot`` (mean over
seeds) and ``fewshot/<dataset>/<k>shot/seed<s>`` for ``FewShot``.

``fewshot_lsr`` follows the paper (§4.1: "a regularized least-squares regression problem that
maps the (frozen) representation ... to {-1, 1}^K target vectors ... exact solution in closed
form") in big_vision's form: features whitened by the train mean and (std + 1e-5), a constant bias
feature (100, so the bias is almost unregularised) appended, ridge solved through the
eigendecomposition of the smaller of XᵀX (D×D) and XXᵀ (N×N), prediction = argmax. Float64.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .data import ImageArrays, balanced_subset, load_arrays, preprocess

__all__ = ["features", "predict", "accuracy", "fewshot_lsr", "fewshot_lsr_fit", "Evaluator",
           "Accuracy", "FewShot", "make_evaluator", "BIAS_CONSTANT"]

BIAS_CONSTANT = 100.0


def _model_io(model, img_size=None, in_chans=None):
    return int(img_size or getattr(model, "img_size")), int(in_chans or getattr(model, "in_chans"))


def _device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _as_images(images):
    return images.images if isinstance(images, ImageArrays) else torch.as_tensor(images)


@torch.no_grad()
def _map_batches(model, images, fn, batch_size, img_size, in_chans, autocast_dtype=None):
    images = _as_images(images)
    s, c = _model_io(model, img_size, in_chans)
    dev = _device(model)
    was = model.training
    model.eval()
    out = []
    try:
        for i in range(0, images.shape[0], batch_size):
            x = preprocess(images[i:i + batch_size].to(dev), s, c)
            if autocast_dtype is not None:
                with torch.autocast(dev.type, dtype=autocast_dtype):
                    y = fn(x)
            else:
                y = fn(x)
            out.append(y.float())
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.zeros(0)


def features(model, images, batch_size: int = 256, img_size=None, in_chans=None,
             autocast_dtype=None) -> torch.Tensor:
    """Pre-logits representation (``model.forward_features``) of uint8 images or an ImageArrays."""
    return _map_batches(model, images, model.forward_features, batch_size, img_size, in_chans,
                        autocast_dtype)


def predict(model, images, batch_size: int = 256, img_size=None, in_chans=None,
            autocast_dtype=None) -> torch.Tensor:
    return _map_batches(model, images, model, batch_size, img_size, in_chans, autocast_dtype).argmax(1)


def accuracy(model, arrays: ImageArrays, batch_size: int = 256, **kw) -> float:
    pred = predict(model, arrays.images, batch_size, **kw)
    return int((pred.cpu() == arrays.labels.cpu()).sum()) / len(arrays) if len(arrays) else float("nan")


def fewshot_lsr_fit(x_train, y_train, num_classes: int, l2_reg: float = 2.0 ** 10):
    """Closed-form ridge to {-1, 1}^K targets. Returns (w (D+1, K), mean (D,), std (D,))."""
    x = np.asarray(x_train, dtype=np.float64)
    y = np.asarray(y_train, dtype=np.int64)
    mean = x.mean(0)
    std = x.std(0) + 1e-5
    x = np.concatenate([(x - mean) / std, np.full((len(x), 1), BIAS_CONSTANT)], axis=1)
    t = 2.0 * np.eye(num_classes)[y] - 1.0
    n, d = x.shape
    if n >= d:   # (XᵀX + λI)⁻¹ Xᵀ T
        eigs, q = np.linalg.eigh(x.T @ x)
        rhs, lhs = q.T @ (x.T @ t), q
    else:        # Xᵀ (XXᵀ + λI)⁻¹ T
        eigs, q = np.linalg.eigh(x @ x.T)
        rhs, lhs = q.T @ t, x.T @ q
    w = (lhs / (eigs + l2_reg)[None, :]) @ rhs
    return w, mean, std


def fewshot_lsr(x_train, y_train, x_test, y_test, num_classes: int, l2_reg: float = 2.0 ** 10,
                return_predictions: bool = False):
    """Few-shot linear accuracy (fraction in [0, 1])."""
    w, mean, std = fewshot_lsr_fit(x_train, y_train, num_classes, l2_reg)
    xt = np.asarray(x_test, dtype=np.float64)
    xt = np.concatenate([(xt - mean) / std, np.full((len(xt), 1), BIAS_CONSTANT)], axis=1)
    pred = (xt @ w).argmax(1)
    acc = float((pred == np.asarray(y_test)).mean())
    return (acc, pred) if return_predictions else acc


class Evaluator:
    name: str = "evaluator"

    def __call__(self, model) -> dict[str, float]:  # pragma: no cover - interface
        raise NotImplementedError

    def spec(self) -> dict:
        return {"name": self.name}


class Accuracy(Evaluator):
    """Top-1 accuracy on ``dataset``/``split`` (``max_examples``: first N, for quick checks)."""

    def __init__(self, dataset: str, split: str = "test", batch_size: int = 256,
                 max_examples: int | None = None, arrays: ImageArrays | None = None):
        self.dataset, self.split, self.batch_size, self.max_examples = dataset, split, batch_size, max_examples
        self._arrays = arrays
        self.name = f"acc/{self._short(dataset)}/{split}"

    @staticmethod
    def _short(d: str) -> str:
        return str(d).rstrip("/").split("/")[-1]

    def arrays(self) -> ImageArrays:
        a = self._arrays if self._arrays is not None else load_arrays(self.dataset, self.split)
        if self.max_examples is not None and len(a) > self.max_examples:
            a = a.subset(torch.arange(self.max_examples))
        return a

    def __call__(self, model, **kw) -> dict[str, float]:
        if self._arrays is None and _is_streamed(self.dataset):
            return {self.name: _stream_accuracy(model, self.dataset, self.split, self.batch_size,
                                                self.max_examples, kw.get("autocast_dtype"))}
        return {self.name: accuracy(model, self.arrays(), self.batch_size, **kw)}


def _is_streamed(dataset: str) -> bool:
    from .data import DATASETS, split_ref
    spec = DATASETS.get(split_ref(dataset)[0])
    return bool(spec is not None and spec.streaming)


@torch.no_grad()
def _stream_accuracy(model, dataset, split, batch_size, max_examples, autocast_dtype=None) -> float:
    """Accuracy over a streamed split (e.g. imagenet-1k validation), first ``max_examples`` images."""
    from .data import stream_batches
    s, c = _model_io(model)
    dev = _device(model)
    was = model.training
    model.eval()
    correct = seen = 0
    try:
        for x, y in stream_batches(dataset, split, batch_size, s, c, drop_last=False):
            x = x.to(dev)
            with torch.autocast(dev.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                pred = model(x).argmax(1).cpu()
            if max_examples is not None and seen + len(y) > max_examples:  # exactly the first max_examples
                pred, y = pred[:max_examples - seen], y[:max_examples - seen]
            correct += int((pred == y).sum())
            seen += len(y)
            if max_examples is not None and seen >= max_examples:
                break
    finally:
        model.train(was)
    return correct / max(1, seen)


class FewShot(Evaluator):
    """Few-shot linear probe: for each seed, draw ``shots`` examples per class from ``train_split``
    (class-balanced, nested across shot counts), fit ``fewshot_lsr`` on frozen features and score
    on ``test_split`` (``max_test``: first N test images)."""

    def __init__(self, dataset: str, shots: Sequence[int] = (1, 5, 10, 25), seeds: Sequence[int] = (0, 1, 2),
                 train_split: str = "train", test_split: str = "test", l2_reg: float = 2.0 ** 10,
                 batch_size: int = 256, max_test: int | None = None, train_arrays: ImageArrays | None = None):
        self.dataset, self.shots, self.seeds = dataset, tuple(int(s) for s in shots), tuple(int(s) for s in seeds)
        self._train_arrays = train_arrays  # the pool the shots are drawn from, when not a named split
        self.train_split, self.test_split, self.l2_reg = train_split, test_split, l2_reg
        self.batch_size, self.max_test = batch_size, max_test
        self.name = f"fewshot/{Accuracy._short(dataset)}"

    def __call__(self, model, **kw) -> dict[str, float]:
        if _is_streamed(self.dataset) and self._train_arrays is None:
            return self._streamed(model, **kw)
        tr = self._train_arrays if self._train_arrays is not None else load_arrays(self.dataset, self.train_split)
        te = load_arrays(self.dataset, self.test_split)
        if self.max_test is not None and len(te) > self.max_test:
            te = te.subset(torch.arange(self.max_test))
        k = tr.num_classes
        draws = {(s, n): balanced_subset(tr.labels, n * k, seed=s) for s in self.seeds for n in self.shots}
        needed = torch.unique(torch.cat(list(draws.values())))
        f_needed = features(model, tr.images[needed], self.batch_size, **kw).cpu().double().numpy()
        pos = {int(i): j for j, i in enumerate(needed.tolist())}
        f_test = features(model, te.images, self.batch_size, **kw).cpu().double().numpy()
        y_test = te.labels.numpy()
        out: dict[str, float] = {}
        for n in self.shots:
            accs = []
            for s in self.seeds:
                idx = draws[(s, n)]
                rows = [pos[int(i)] for i in idx]
                a = fewshot_lsr(f_needed[rows], tr.labels[idx].numpy(), f_test, y_test, k, self.l2_reg)
                out[f"{self.name}/{n}shot/seed{s}"] = a
                accs.append(a)
            out[f"{self.name}/{n}shot"] = float(np.mean(accs))
        return out


    @torch.no_grad()
    def _streamed(self, model, autocast_dtype=None) -> dict[str, float]:
        """The probe on a streamed set (imagenet-1k): the shots are collected by streaming the training split
        once (the first max(shots) x len(seeds) examples of every class, turned into features as they arrive,
        so nothing of image size is kept), each seed draws its class-balanced shots from that pool, and the
        test split is streamed (its first ``max_test`` images)."""
        from .data import DATASETS, _balanced_stream, _to_array, open_stream
        s, c = _model_io(model)
        mode = "L" if c == 1 else "RGB"

        def feats(stream, limit=None):
            fs, ys, xb = [], [], []
            for ex in stream:
                if limit is not None and len(ys) + len(xb) >= limit:
                    break
                xb.append(torch.from_numpy(np.ascontiguousarray(_to_array(ex[icol], mode, s))))
                ys.append(int(ex[lcol]))
                if len(xb) == self.batch_size:
                    fs.append(features(model, torch.stack(xb), self.batch_size, autocast_dtype=autocast_dtype).cpu())
                    xb = []
            if xb:
                fs.append(features(model, torch.stack(xb), self.batch_size, autocast_dtype=autocast_dtype).cpu())
            return (torch.cat(fs).double().numpy() if fs else np.zeros((0, 1))), np.asarray(ys, dtype=np.int64)

        ds, icol, lcol, _ = open_stream(self.dataset, self.train_split)
        k = len(getattr(ds.features[lcol], "names", None) or ()) or DATASETS[self.dataset].num_classes
        per_class = max(self.shots) * len(self.seeds)
        f_pool, y_pool = feats(_balanced_stream(ds, lcol, [per_class] * k))
        counts = np.bincount(y_pool, minlength=k)
        present = int((counts > 0).sum())
        if present == 0 or counts[counts > 0].min() < max(self.shots):
            raise ValueError(f"few-shot on {self.dataset!r}: {int(((counts > 0) & (counts < max(self.shots))).sum())} "
                             f"of {k} classes have fewer than {max(self.shots)} examples in its {self.train_split!r} split")
        if present < k:  # never on the real set; a stand-in (dry run) may hold a part of the classes
            import sys
            print(f"[vitrepro] few-shot on {self.dataset!r}: {k - present} of {k} classes have no example in the "
                  f"{self.train_split!r} stream; probing the {present} present", file=sys.stderr, flush=True)
        ds_te, icol, lcol, _ = open_stream(self.dataset, self.test_split)
        f_test, y_test = feats(ds_te, self.max_test)
        out: dict[str, float] = {}
        for n in self.shots:
            accs = []
            for seed in self.seeds:
                idx = balanced_subset(torch.from_numpy(y_pool), n * present, seed=seed).numpy()
                a = fewshot_lsr(f_pool[idx], y_pool[idx], f_test, y_test, k, self.l2_reg)
                out[f"{self.name}/{n}shot/seed{seed}"] = a
                accs.append(a)
            out[f"{self.name}/{n}shot"] = float(np.mean(accs))
        return out


def make_evaluator(spec) -> Evaluator:
    """From a config entry: an Evaluator, or a dict {"type": "accuracy"|"fewshot", ...keyword args}."""
    if isinstance(spec, Evaluator):
        return spec
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"evaluator spec must be a dict with 'type' ('accuracy' or 'fewshot'), got {spec!r}")
    kw = {k: v for k, v in spec.items() if k != "type"}
    kinds = {"accuracy": Accuracy, "fewshot": FewShot}
    if spec["type"] not in kinds:
        raise ValueError(f"unknown evaluator type {spec['type']!r}; one of {list(kinds)}")
    try:
        return kinds[spec["type"]](**kw)
    except TypeError as e:
        raise ValueError(f"bad evaluator spec {spec!r}: {e}") from e
