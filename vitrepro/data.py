"""Datasets as uint8 arrays, class-balanced subsets, batch preprocessing and a resumable batch iterator.

A dataset is read from a folder in the Hub parquet layout, ``<data directory>/<name>`` for ``DATASETS``, or the
Hub (after one short reachability check); ``digits`` (scikit-learn's) is embedded. A *reference*
``"<name or folder>[label_column=fine_label,train_examples=1000]"`` (``REF_KEYS``) is a plain string, so it
travels wherever a name does (configs, evaluators, fingerprints, run ids). Pixels map to [-1, 1], the range the
released ViT weights expect. Augmentations: docs/design.md; their draws come for the whole *global* batch from a
generator seeded by (seed, epoch, batch index), so DDP ranks and resumed runs see identical data.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import settings


class DataError(ValueError):
    """Bad dataset name, columns or arguments."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """Neither the local data directory nor the Hub has the dataset."""


@dataclass(frozen=True)
class DatasetSpec:
    hub_id: str | None
    config: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    train_split: str = "train"
    test_split: str = "test"
    num_classes: int = 0
    streaming: bool = False       # too large for arrays: stream through `datasets`
    array_size: int | None = None  # images of mixed sizes are resized to this square size


DATASETS: dict[str, DatasetSpec] = {
    # scikit-learn's 8x8 grey digits, a fixed stratified split 1,437 train / 360 test (random_state=0)
    "digits": DatasetSpec(None, num_classes=10),
    "mnist": DatasetSpec("ylecun/mnist", num_classes=10),
    "fashion_mnist": DatasetSpec("zalando-datasets/fashion_mnist", num_classes=10),
    "cifar10": DatasetSpec("uoft-cs/cifar10", image_column="img", num_classes=10),
    "cifar100": DatasetSpec("uoft-cs/cifar100", image_column="img", label_column="fine_label", num_classes=100),
    # timm's copy of Oxford-IIIT Pet (37 breeds): train = the official trainval (3,680), test 3,669
    "oxford_iiit_pet": DatasetSpec("timm/oxford-iiit-pet", num_classes=37, array_size=160),
    # Flowers-102: the paper (BiT protocol) trains on train+validation (2,040) and tests on test (6,149).
    "oxford_flowers102": DatasetSpec("dpdl-benchmark/oxford_flowers102", num_classes=102,
                                     train_split="train+validation", array_size=160),
    "imagenet-1k": DatasetSpec("ILSVRC/imagenet-1k", test_split="validation", num_classes=1000,
                               streaming=True),  # gated on the Hub
}


@dataclass
class ImageArrays:
    images: torch.Tensor           # uint8 (N, C, H, W)
    labels: torch.Tensor           # int64 (N,)
    classes: list[str]
    name: str = ""
    derived: dict = field(default_factory=dict, repr=False, compare=False)  # what is computed once per array

    num_classes = property(lambda self: len(self.classes))
    in_chans = property(lambda self: int(self.images.shape[1]))
    img_size = property(lambda self: int(self.images.shape[-1]))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx) -> "ImageArrays":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ImageArrays(self.images[idx], self.labels[idx], self.classes, self.name)


# --------------------------------------------------------------------------- sources
REF_KEYS = ("image_column", "label_column", "train_split", "test_split", "train_examples")
_REF = re.compile(r"^(?P<base>.+)\[(?P<opts>[a-z_]+=[^\[\],=/]+(?:,[a-z_]+=[^\[\],=/]+)*)\]$")


def dataset_ref(path: str, **choices: str | None) -> str:
    """``path`` with the chosen columns / splits (``REF_KEYS``) as one string: ``"<path>[k=v,...]"``."""
    bad = [k for k in choices if k not in REF_KEYS]
    if bad:
        raise DataError(f"unknown dataset option(s) {bad}; valid: {list(REF_KEYS)}")
    opts = ",".join(f"{k}={choices[k]}" for k in REF_KEYS if choices.get(k))
    return f"{path}[{opts}]" if opts else str(path)


def ref_train_examples(name_or_path) -> int | None:
    """The ``train_examples=N`` of a dataset reference (a positive integer), None when it has none."""
    base, opts = split_ref(name_or_path)
    value = opts.get("train_examples")
    if value is not None and (not value.isdigit() or int(value) < 1):
        raise DataError(f"{name_or_path!r}: train_examples={value!r} must be a positive integer (e.g. "
                        f"{base}[train_examples=1000])")
    return None if value is None else int(value)


def split_ref(name_or_path) -> tuple[str, dict[str, str]]:
    """``"<path>[label_column=x]"`` -> (``"<path>"``, ``{"label_column": "x"}``); a plain name -> (name, {})."""
    s = str(name_or_path)
    m = _REF.match(s)
    opts = dict(kv.split("=", 1) for kv in m["opts"].split(",")) if m else {}
    return (m["base"], opts) if m and set(opts) <= set(REF_KEYS) else (s, {})


def is_streamed(name_or_path) -> bool:
    """Whether a dataset (a name or reference) is streamed (too large for arrays, e.g. imagenet-1k); a local
    folder, known to no spec, is not."""
    return bool(getattr(DATASETS.get(split_ref(name_or_path)[0]), "streaming", False))


@dataclass(frozen=True)
class Source:
    """Where a dataset will be read from: kind in {"digits", "local", "hub"}."""
    kind: str
    name: str
    location: str | None
    spec: DatasetSpec | None


def _offline() -> bool:
    return settings.get().offline  # VITREPRO_OFFLINE, HF_HUB_OFFLINE/HF_DATASETS_OFFLINE, vitrepro.toml


def _no_local(name: str) -> str:
    """Why the data directory does not hold ``name``."""
    root = settings.get().data_dir
    if not root:
        return ("no data directory (VITREPRO_DATA is not set or empty, vitrepro.toml names none "
                "and ../shared/data does not exist)")
    return f"the data directory {root} has no folder {name!r}" + (
        "" if root.is_dir() else f" (the directory {root} itself does not exist)")


def resolve_source(name_or_path: str, check_hub: bool = True) -> Source:
    """Find where a dataset lives, without reading it. Raises one DataError naming every place looked."""
    s = split_ref(name_or_path)[0]
    p = Path(s).expanduser()
    if s not in DATASETS and (os.sep in s or s.startswith(".") or p.is_dir()):
        if not p.is_dir():
            raise DatasetNotFoundError(f"dataset folder {s!r} does not exist")
        if not any(p.rglob("*.parquet")) and not any(p.rglob("*.arrow")):
            raise DatasetNotFoundError(f"dataset folder {s!r} has no parquet files "
                                       "(expected the Hub layout <split>-00000-of-00001.parquet)")
        return Source("local", p.name, str(p.resolve()), None)
    if s not in DATASETS:
        import difflib
        close = difflib.get_close_matches(s, list(DATASETS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DataError(f"unknown dataset {s!r}.{hint} Known: {', '.join(DATASETS)}; "
                        "or pass a folder in the Hub parquet layout.")
    spec = DATASETS[s]
    if spec.hub_id is None:
        return Source("digits", s, None, spec)
    root = settings.get().data_dir  # $VITREPRO_DATA, vitrepro.toml, ../shared/data
    if root and (root / s).is_dir():
        return Source("local", s, str((root / s).resolve()), spec)
    if check_hub and not Path(spec.hub_id).is_dir():
        fix = (f"Set VITREPRO_DATA to a folder holding {s}/<split>-00000-of-00001.parquet "
               "(or `data = \"...\"` in vitrepro.toml; `python -m vitrepro.settings` shows what is used)")
        if _offline():
            raise DatasetNotFoundError(
                f"dataset {s!r} not found: {_no_local(s)}; and the Hub ({spec.hub_id}) is switched off "
                f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE/VITREPRO_OFFLINE). {fix}, or go online.")
        ok, why = settings.hub_reachable(dataset=spec.hub_id)  # one short try, not minutes of retries
        if not ok:
            raise DatasetNotFoundError(
                f"dataset {s!r} not found: {_no_local(s)}; and the Hugging Face Hub "
                f"({settings.hub_endpoint()}) is unreachable ({why}). {fix}, or connect to the network.")
    return Source("hub", s, spec.hub_id, spec)


def _hub_error(src: Source, err: Exception) -> DatasetNotFoundError:
    return DatasetNotFoundError(f"dataset {src.name!r} not found: {_no_local(src.name)}; and loading "
                                f"{src.location!r} from the Hub failed: {type(err).__name__}: {err}")


# --------------------------------------------------------------------------- decoding
def _say_which(where: str, key: str, example: str) -> str:
    """How to choose a column, in every form a dataset is given: the reference string (command line, train
    configs, notebook parameters), the notebook's dict form and the Python argument."""
    return (f"say which: pass the dataset as '{where}[{key}={example}]' (e.g. `python -m vitrepro.train "
            f"'dataset={where}[{key}={example}]'`, or in a notebook parameter), as a notebook parameter also "
            f"{{\"path\": \"{where}\", \"{key}\": \"{example}\"}}; in Python load_arrays(..., {key}=...)")


def _pick_columns(features, image_column, label_column, where: str) -> tuple[str, str]:
    import datasets
    chosen = {"image": image_column, "label": label_column}
    for kind, feature in (("image", datasets.Image), ("label", datasets.ClassLabel)):
        found = [k for k, f in features.items() if isinstance(f, feature)]
        if kind == "label" and not found and "label" in features:  # a plain integer column named "label"
            found = ["label"]
        if chosen[kind] is None:
            if len(found) != 1:
                raise DataError(f"{where}: {'no' if not found else 'several'} {kind} columns "
                                f"(datasets.{feature.__name__} features: {found}; all columns: {list(features)}); "
                                + _say_which(where, f"{kind}_column", (found or list(features) or [kind])[0]))
            chosen[kind] = found[0]
        if chosen[kind] not in features:
            raise DataError(f"{where}: no column {chosen[kind]!r}; columns are {list(features)}")
    return chosen["image"], chosen["label"]


def _to_array(im, mode: str, size: int | None) -> np.ndarray:
    if im.mode != mode:
        im = im.convert(mode)
    if size is not None and im.size != (size, size):
        from PIL import Image
        im = im.resize((size, size), Image.BILINEAR, reducing_gap=None)
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _decode_dataset(ds, image_column: str, label_column: str, size: int | None):
    """Decode a `datasets.Dataset` into (uint8 (N,C,H,W), int64 labels, class names)."""
    import datasets
    from PIL import Image
    feat = ds.features[label_column]
    table = ds.with_format("arrow")[:] if len(ds) else None
    labels = (np.asarray(table.column(label_column).to_numpy(zero_copy_only=False), dtype=np.int64)
              if table is not None else np.zeros(0, np.int64))
    classes = list(feat.names) if isinstance(feat, datasets.ClassLabel) else \
        [str(i) for i in range(int(labels.max(initial=-1)) + 1)]
    opened = []
    if table is not None:
        imcol = table.column(image_column).combine_chunks()
        for b, p in zip(imcol.field("bytes").to_pylist(), imcol.field("path").to_pylist()):
            opened.append(Image.open(io.BytesIO(b)) if b is not None else Image.open(p))
    modes = {im.mode for im in opened}
    mode = "L" if modes <= {"L", "1", "I;16", "I", "F"} and modes else "RGB"
    if size is None and len({im.size for im in opened}) > 1:
        size = 160
    arrs = [_to_array(im, mode, size) for im in opened]
    images = np.stack(arrs) if arrs else np.zeros((0, 1 if mode == "L" else 3, size or 1, size or 1), np.uint8)
    return images, labels, classes


def _digits(split: str):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    if split not in ("train", "test"):
        raise DataError(f"digits has splits 'train' and 'test', not {split!r}")
    d = load_digits()
    x = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    parts = train_test_split(np.arange(len(y)), test_size=360, stratify=y, random_state=0)  # (train, test)
    idx = np.sort(parts[("train", "test").index(split)])
    return x[idx], y[idx], [str(i) for i in range(10)]


def _cache_dir() -> Path | None:
    return settings.get().cache_dir  # $VITREPRO_CACHE (off: None), vitrepro.toml, ~/.cache/vitrepro/arrays


def _fingerprint(src: Source, split: str, image_column, label_column, size) -> str:
    import datasets
    parts: dict = {"kind": src.kind, "loc": src.location, "name": src.name, "split": split,
                   "cols": [image_column, label_column], "size": size, "v": 2}
    if src.kind == "local":
        parts["files"] = [(str(f.relative_to(src.location)), f.stat().st_size, int(f.stat().st_mtime))
                          for f in sorted(Path(src.location).rglob("*")) if f.is_file()]
    elif src.kind == "hub":
        parts["datasets"] = datasets.__version__
        parts["config"] = src.spec.config
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


_MEM: dict[str, ImageArrays] = {}


def load_arrays(name_or_path: str, split: str = "train", *, image_column: str | None = None,
                label_column: str | None = None, size: int | None = None) -> ImageArrays:
    """A whole split (or a `datasets` split expression, "train[:90%]") as uint8 (N, C, H, W) and int64 labels;
    images of mixed sizes are resized (bilinear, square: the ViT code's test pipeline) to ``size`` (default:
    the spec's ``array_size`` or 160)."""
    base, opts = split_ref(name_or_path)  # "<folder>[label_column=...]": the columns / splits chosen
    n = ref_train_examples(name_or_path)
    if n is not None:  # "<name>[train_examples=N]": a fixed class-balanced subset of the training split
        rest = dataset_ref(base, **{k: v for k, v in opts.items() if k != "train_examples"})
        full = load_arrays(rest, split, image_column=image_column, label_column=label_column, size=size)
        return full if split != "train" else _fixed_subset(name_or_path, full, n)
    image_column = image_column or opts.get("image_column")
    label_column = label_column or opts.get("label_column")
    split = opts.get(f"{split}_split", split) if split in ("train", "test") else split
    src = resolve_source(base)
    if src.spec is not None and src.spec.streaming:
        raise DataError(f"{src.name} is streamed (too large for arrays): use stream_batches()")
    if src.spec is not None:
        image_column = image_column or src.spec.image_column
        label_column = label_column or src.spec.label_column
        split = {"train": src.spec.train_split, "test": src.spec.test_split}.get(split, split)
        size = size or src.spec.array_size
    key = _fingerprint(src, split, image_column, label_column, size) if src.kind != "digits" else f"digits-{split}"
    if (hit := _MEM.get(key)) is not None:
        return hit
    cdir = _cache_dir() if src.kind != "digits" else None
    cfile = cdir / f"{src.name}-{split.replace('/', '_')}-{key}.npz" if cdir else None
    if src.kind == "digits":
        x, y, classes = _digits(split)
    elif cfile is not None and cfile.exists():
        with np.load(cfile) as z:
            x, y, classes = z["images"], z["labels"], json.loads(str(z["classes"]))
    else:
        x, y, classes = _read(src, split, image_column, label_column, size)
        if cfile is not None:
            from .store import atomic_write
            try:
                atomic_write(cfile, lambda f: np.savez(f, images=x, labels=y, classes=np.array(json.dumps(classes))))
            except OSError:
                pass
    arr = ImageArrays(torch.from_numpy(np.require(x, np.uint8, ["C", "W"])),
                      torch.from_numpy(np.require(y, np.int64, ["C", "W"])),
                      list(classes), src.name)
    _MEM[key] = arr
    return arr


def _fixed_subset(ref: str, full: ImageArrays, n: int) -> ImageArrays:
    """The training split of ``ref`` = ``"<name>[train_examples=n]"``: n images of ``full``, class-balanced,
    seed 0 (kept with ``full``: one subset per reference)."""
    if ("subset", n) not in full.derived:
        if n > len(full):
            raise DataError(f"{ref!r}: train_examples={n} but its training split holds only {len(full)} images; "
                            f"pass a smaller train_examples")
        full.derived["subset", n] = full.subset(balanced_subset(full.labels, n, seed=0))
    return full.derived["subset", n]


def data_fingerprint(name_or_path: str, split: str = "train") -> dict:
    """What a run reads from one split, for its run id: the source, the number of examples and a sha256 of the
    decoded arrays (computed once per process per loaded array). A streamed split: the source only."""
    src = resolve_source(name_or_path)
    source = {"digits": "digits", "local": f"local:{src.name}", "hub": f"hub:{src.location}"}[src.kind]
    opts = split_ref(name_or_path)[1]
    if opts:  # the columns / splits a reference chose
        source += "[" + ",".join(f"{k}={v}" for k, v in sorted(opts.items())) + "]"
    if src.spec is not None and src.spec.streaming:
        return {"source": source, "split": split, "streamed": _fingerprint(src, split, None, None, None)}
    arr = load_arrays(name_or_path, split)
    # Kept with the arrays: what depends on them alone. Two references can share one array object (the test
    # split of "mnist" and of "mnist[train_examples=1000]"); each keeps its own source.
    if "fingerprint" not in arr.derived:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(arr.images.numpy()).data)
        h.update(np.ascontiguousarray(arr.labels.numpy()).data)
        h.update(json.dumps(arr.classes).encode())
        arr.derived["fingerprint"] = {"n": len(arr), "shape": list(arr.images.shape[1:]), "sha256": h.hexdigest()[:16]}
    return {"source": source, "split": split, **arr.derived["fingerprint"]}


def _corrupt_file_error(src: Source, split: str, err: Exception) -> DataError | None:
    """For a local folder that `datasets` cannot build: a DataError naming each parquet file that does not
    read (its footer) and the split it belongs to (`datasets` builds every split of a folder, so a corrupt
    test file also stops the train split); None when every file reads (the original error stands)."""
    if src.kind != "local":
        return None
    import pyarrow.parquet as pq
    bad = []
    for f in sorted(Path(src.location).rglob("*.parquet")):
        try:
            pq.ParquetFile(f)
        except Exception as e:  # noqa: BLE001 - any failure to read the footer is a corrupt file
            own = re.split(r"[-_.]", f.name, maxsplit=1)[0]
            bad.append(f"the {own!r} split's file {f} ({type(e).__name__}: {e})")
    return DataError(f"dataset {src.name!r}: cannot read {'; '.join(bad)}, so split {split!r} cannot be loaded "
                     f"({type(err).__name__}); replace or remove the corrupt file(s)") if bad else None


def _read(src: Source, split: str, image_column, label_column, size):
    import datasets
    try:
        ds = datasets.load_dataset(src.location, src.spec.config if src.kind == "hub" else None, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise DataError(f"{src.name}: no split {split!r} ({e})") from e
        if src.kind == "hub":
            raise _hub_error(src, e) from e
        raise
    except Exception as e:  # noqa: BLE001 - e.g. DatasetGenerationError: name the split and file that failed
        if src.kind == "hub" and isinstance(e, OSError):  # ConnectionError, FileNotFoundError too
            raise _hub_error(src, e) from e
        raise _corrupt_file_error(src, split, e) or e
    image_column, label_column = _pick_columns(ds.features, image_column, label_column, src.location)
    return _decode_dataset(ds, image_column, label_column, size)


# --------------------------------------------------------------------------- subsets
def _gen(*seeds: int) -> torch.Generator:
    s = 0
    for v in seeds:
        s = (s * 1_000_003 + int(v) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(s)


def balanced_subset(labels, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` indices, as class-balanced as possible (``class_quota`` over the classes present). Nested: for one
    seed, a smaller subset is contained in a larger one."""
    labels = torch.as_tensor(labels).long()
    classes = torch.unique(labels)
    if n <= 0 or n > len(labels):
        raise DataError(f"balanced_subset: n={n} must be in 1..{len(labels)}")
    out = []
    for c, take in zip(classes.tolist(), class_quota(n, len(classes), seed)):
        idx = torch.nonzero(labels == c).flatten()
        if take > len(idx):
            raise DataError(f"balanced_subset: class {c} has {len(idx)} examples, need {take}")
        out.append(idx[torch.randperm(len(idx), generator=_gen(seed, c))[:take]])
    return torch.sort(torch.cat(out)).values


def train_val_split(labels, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified hold-out: round(val_fraction * n_c) examples of each class go to validation."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = torch.as_tensor(labels).long()
    tr, va = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        perm = idx[torch.randperm(len(idx), generator=_gen(seed, 7919, int(c)))]
        nv = int(round(val_fraction * len(idx)))
        va.append(perm[:nv])
        tr.append(perm[nv:])
    return torch.sort(torch.cat(tr)).values, torch.sort(torch.cat(va)).values


# --------------------------------------------------------------------------- preprocessing
AUGMENTATIONS = ("none", "flip", "crop", "crop_flip", "rrc_flip", "auto")


def training_split(arrays: ImageArrays, val_fraction: float, train_examples: int | None,
                   seed: int) -> tuple[ImageArrays, ImageArrays | None]:
    """(what a run trains on, its held-out validation part or None): first ``val_fraction`` of the
    training split is held out (stratified), then a class-balanced subset of ``train_examples`` is
    drawn from the rest. The trainer and the pixel baselines both call this, so they see the same images."""
    val = None
    if val_fraction > 0:
        tr_idx, va_idx = train_val_split(arrays.labels, val_fraction, seed)
        arrays, val = arrays.subset(tr_idx), arrays.subset(va_idx)
    if train_examples is not None:
        if train_examples > len(arrays):
            raise DataError(f"train_examples={train_examples} but only {len(arrays)} training examples "
                            f"{'remain after the validation hold-out' if val is not None else 'exist'}")
        arrays = arrays.subset(balanced_subset(arrays.labels, train_examples, seed))
    return arrays, val


def preprocess(x: torch.Tensor, img_size: int, in_chans: int) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float (B, in_chans, img_size, img_size) in [-1, 1]."""
    x = x.float()
    c = x.shape[1]
    if c != in_chans:
        if c == 1:
            x = x.expand(-1, in_chans, -1, -1)
        elif in_chans == 1:
            x = x.mean(1, keepdim=True)
        else:
            raise DataError(f"cannot convert {c} channels to {in_chans}")
    if x.shape[-2:] != (img_size, img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
    return (x - 127.5) / 127.5


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor (random draws) to `device`. On CUDA through pinned memory, non-blocking: a plain
    ``.to("cuda")`` from pageable memory synchronises the host with the GPU, which would stall the
    training loop once per draw (three times per augmented batch)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def augment_batch(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    """Augment a preprocessed float batch; all random draws come from ``g`` (on CPU)."""
    if kind == "none":
        return x
    b, c, h, w = x.shape
    if kind == "auto":
        kind = "crop_flip" if max(h, w) <= 64 else "rrc_flip"
    if kind not in AUGMENTATIONS:
        raise DataError(f"unknown augmentation {kind!r}; one of {AUGMENTATIONS}")
    if kind in ("crop", "crop_flip"):
        p = max(1, h // 8)
        oy = _to_device(torch.randint(0, 2 * p + 1, (b,), generator=g), x.device)
        ox = _to_device(torch.randint(0, 2 * p + 1, (b,), generator=g), x.device)
        xp = F.pad(x, (p, p, p, p), mode="replicate")
        rows = (oy[:, None] + torch.arange(h, device=x.device))  # (b, h)
        cols = (ox[:, None] + torch.arange(w, device=x.device))  # (b, w)
        bi = torch.arange(b, device=x.device)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    elif kind == "rrc_flip":
        area = torch.empty(b).uniform_(0.05, 1.0, generator=g)
        ratio = torch.exp(torch.empty(b).uniform_(np.log(3 / 4), np.log(4 / 3), generator=g))
        sw = torch.sqrt(area * ratio).clamp(max=1.0)  # fraction of width
        sh = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (torch.rand(b, generator=g) * 2 - 1) * (1 - sw)
        cy = (torch.rand(b, generator=g) * 2 - 1) * (1 - sh)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sw, cx, sh, cy
        grid = F.affine_grid(_to_device(theta, x.device).to(x.dtype), (b, c, h, w), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if kind == "crop":
        return x
    flip = _to_device(torch.rand(b, generator=g) < 0.5, x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class Batches:
    """Shuffled, preprocessed (optionally augmented) batches of an ``ImageArrays``, epoch after epoch.

    ``batch_size`` is the GLOBAL batch; with ``world_size`` > 1 each rank gets its contiguous slice of every
    global batch, so the union over ranks equals the 1-process batch. The order of epoch e is ``randperm(N)``
    seeded by (seed, e); augmentation of global batch i is seeded by (seed, e, i). State: (epoch, index)."""

    def __init__(self, arrays: ImageArrays, batch_size: int, img_size: int, in_chans: int, *,
                 augment: str = "none", seed: int = 0, rank: int = 0, world_size: int = 1, device="cpu"):
        if augment not in AUGMENTATIONS:
            raise DataError(f"unknown augmentation {augment!r}; one of {AUGMENTATIONS}")
        if batch_size % world_size:
            raise DataError(f"global batch {batch_size} is not divisible by world size {world_size}")
        if len(arrays) < batch_size:
            raise DataError(f"{arrays.name}: {len(arrays)} examples is fewer than one batch of {batch_size}")
        self.arrays, self.batch_size, self.img_size, self.in_chans = arrays, batch_size, img_size, in_chans
        self.augment, self.seed, self.rank, self.world_size = augment, seed, rank, world_size
        self.device = torch.device(device)
        self._images, self._labels = arrays.images.to(self.device), arrays.labels.to(self.device)
        self.epoch, self.index, self._perm_epoch, self._perm = 0, 0, None, None

    def __len__(self) -> int:
        return len(self.arrays) // self.batch_size

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index >= len(self):
            self.epoch, self.index = self.epoch + 1, 0
        if self._perm_epoch != self.epoch:
            self._perm = torch.randperm(len(self.arrays), generator=_gen(self.seed, self.epoch)).to(self.device)
            self._perm_epoch = self.epoch
        i = self.index
        idx = self._perm[i * self.batch_size:(i + 1) * self.batch_size]
        self.index += 1
        x = preprocess(self._images[idx], self.img_size, self.in_chans)
        if self.augment != "none":
            x = augment_batch(x, self.augment, _gen(self.seed, self.epoch, i, 31))
        per_rank = -(-len(idx) // self.world_size)  # this rank's share of the global batch (DDP)
        mine = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        return x[mine], self._labels[idx][mine]


def open_stream(name: str, split: str):
    """(an unshuffled `datasets` IterableDataset of a streamed split, image column, label column, split name)."""
    import datasets
    src = resolve_source(name)
    spec = src.spec or DatasetSpec(None)
    opts = split_ref(name)[1]
    split = opts.get(f"{split}_split") or {"train": spec.train_split, "test": spec.test_split}.get(split, split)
    try:
        ds = datasets.load_dataset(src.location, spec.config if src.kind == "hub" else None, split=split,
                                   streaming=True)
    except Exception as e:  # noqa: BLE001 - from the Hub: turned into one clear error
        if src.kind != "hub":
            raise
        raise _hub_error(src, e) from e
    icol, lcol = _pick_columns(ds.features, opts.get("image_column") or (spec.image_column if src.spec else None),
                               opts.get("label_column") or (spec.label_column if src.spec else None),
                               src.location or name)
    return ds, icol, lcol, split


def class_quota(n: int, num_classes: int, seed: int = 0) -> list[int]:
    """Examples per class of a class-balanced subset of ``n``: n // K each, the remainder to the first classes
    of a seeded order."""
    per = [n // num_classes] * num_classes
    order = torch.randperm(num_classes, generator=_gen(seed, 17))
    for c in order[: n % num_classes].tolist():
        per[c] += 1
    return per


def _balanced_stream(ds, lcol: str, quota: list[int]):
    """The examples of an (unshuffled) stream that fill each class's quota, first come first kept: a
    class-balanced subset drawn by streaming, the same on every pass and nested across sizes."""
    left, todo = list(quota), sum(quota)
    for ex in ds:
        y = int(ex[lcol])
        if 0 <= y < len(left) and left[y] > 0:
            left[y] -= 1
            todo -= 1
            yield ex
            if todo == 0:
                return


def _buffer_shuffle(it, buffer: int, g: torch.Generator):
    buf = []
    for ex in it:
        if len(buf) < buffer:
            buf.append(ex)
            continue
        j = int(torch.randint(0, buffer, (1,), generator=g))
        buf[j], ex = ex, buf[j]
        yield ex
    while buf:
        yield buf.pop(int(torch.randint(0, len(buf), (1,), generator=g)))


def stream_batches(name: str, split: str, batch_size: int, img_size: int, in_chans: int = 3, *,
                   augment: str = "none", seed: int = 0, rank: int = 0, world_size: int = 1,
                   shuffle_buffer: int = 10_000, epoch: int = 0, skip_batches: int = 0,
                   drop_last: bool = True, train_examples: int | None = None, num_classes: int | None = None,
                   subset_seed: int = 0):
    """Stream a large dataset (e.g. imagenet-1k) in batches of ``batch_size // world_size`` per rank, decoded
    per image with PIL and shuffled in a buffer; resuming skips ``skip_batches`` (not bit-exact across epochs).
    ``train_examples``: a class-balanced subset (the first examples of each class in stream order), shuffled
    in a buffer seeded by (seed, epoch); every rank reads the whole stream, keeping every world_size-th."""
    from datasets.distributed import split_dataset_by_node
    ds, icol, lcol, split = open_stream(name, split)
    spec = resolve_source(name).spec or DatasetSpec(None)
    if train_examples is not None:
        if not num_classes:
            raise DataError(f"{name}: a streamed subset (train_examples={train_examples}) needs num_classes")
        it = _balanced_stream(ds, lcol, class_quota(train_examples, num_classes, subset_seed))
        it = _buffer_shuffle(it, shuffle_buffer, _gen(seed, epoch, 53))
        ds = (ex for i, ex in enumerate(it) if i % world_size == rank)
    else:
        if split == spec.train_split:
            ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)
            ds.set_epoch(epoch)
        if world_size > 1:
            ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    mode = "L" if in_chans == 1 else "RGB"
    buf_x, buf_y, nb = [], [], 0
    for ex in ds:
        buf_x.append(torch.from_numpy(np.array(_to_array(ex[icol], mode, max(img_size, 1)))))
        buf_y.append(int(ex[lcol]))
        if len(buf_x) == batch_size // world_size:  # this rank's share of a global batch
            if nb >= skip_batches:
                x = preprocess(torch.stack(buf_x), img_size, in_chans)
                if augment != "none":
                    x = augment_batch(x, augment, _gen(seed, epoch, nb, rank, 31))
                yield x, torch.tensor(buf_y, dtype=torch.long)
            nb += 1
            buf_x, buf_y = [], []
    if buf_x and not drop_last and nb >= skip_batches:
        yield preprocess(torch.stack(buf_x), img_size, in_chans), torch.tensor(buf_y, dtype=torch.long)


class StreamBatches:
    """``Batches``-like wrapper around ``stream_batches`` for the trainer: ``next()``, and a state
    (epoch, index) restored by skipping ``index`` batches (exact only if the stream order is). ``kw``: the
    other arguments of ``stream_batches`` (augment, seed, rank, world_size, train_examples, num_classes, ...)."""

    def __init__(self, name: str, split: str, batch_size: int, img_size: int, in_chans: int, *, device="cpu", **kw):
        self.kw = dict(name=name, split=split, batch_size=batch_size, img_size=img_size, in_chans=in_chans, **kw)
        self.device = torch.device(device)
        self.epoch, self.index, self._it = 0, 0, None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._it = int(state["epoch"]), int(state["index"]), None

    def next(self):
        for _ in range(2):
            if self._it is None:
                self._it = stream_batches(**self.kw, epoch=self.epoch, skip_batches=self.index)
            try:
                x, y = next(self._it)
                self.index += 1
                return x.to(self.device), y.to(self.device)
            except StopIteration:
                self.epoch, self.index, self._it = self.epoch + 1, 0, None
        raise DataError(f"{self.kw['name']}: the stream yielded no full batch")


def stream_arrays(name: str, split: str, n: int | None = None, size: int | None = None) -> ImageArrays:
    """The first ``n`` examples of a streamed split as uint8 arrays (sample images), every image resized to
    ``size`` (default: the spec's ``array_size`` or 224)."""
    ds, icol, lcol, _ = open_stream(name, split)
    src = resolve_source(name)
    size = size or (src.spec.array_size if src.spec and src.spec.array_size else 224)
    names = getattr(ds.features[lcol], "names", None)
    xs, ys = [], []
    for ex in itertools.islice(ds, n):
        xs.append(_to_array(ex[icol], "L" if ex[icol].mode in ("L", "1") else "RGB", size))
        ys.append(int(ex[lcol]))
    c = 3 if any(x.shape[0] == 3 for x in xs) else 1
    xs = [np.repeat(x, 3, 0) if x.shape[0] != c else x for x in xs]
    images = torch.from_numpy(np.stack(xs)) if xs else torch.zeros((0, c, size, size), dtype=torch.uint8)
    classes = list(names) if names else [str(i) for i in range(max(ys, default=-1) + 1)]
    return ImageArrays(images, torch.tensor(ys, dtype=torch.long), classes, src.name)
