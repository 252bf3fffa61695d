import os

import numpy as np
import pytest
import torch

from vitrepro import data
from vitrepro.data import Batches, DataError, DatasetNotFoundError, ImageArrays, balanced_subset, load_arrays, \
    preprocess, train_val_split


def _write_parquet(folder, n=12, mode="L", sizes=((9, 9),), two_image_columns=False):
    import datasets
    from PIL import Image
    rng = np.random.default_rng(0)
    imgs = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        shape = (h, w) if mode == "L" else (h, w, 3)
        imgs.append(Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode))
    cols = {"image": imgs, "label": [i % 3 for i in range(n)]}
    feats = {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])}
    if two_image_columns:
        cols["mask"] = imgs
        feats["mask"] = datasets.Image()
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        ds = datasets.Dataset.from_dict(cols, features=datasets.Features(feats))
        ds.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return imgs


@pytest.fixture(autouse=True)
def _no_disk_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("VITREPRO_CACHE", str(tmp_path / "cache"))


def test_digits_split():
    tr, te = load_arrays("digits", "train"), load_arrays("digits", "test")
    assert tr.images.shape == (1437, 1, 8, 8) and te.images.shape == (360, 1, 8, 8)
    assert tr.images.dtype == torch.uint8 and int(tr.images.max()) == 255
    assert tr.labels.dtype == torch.int64 and tr.classes == [str(i) for i in range(10)]
    assert torch.bincount(te.labels).min() >= 35  # stratified
    assert load_arrays("digits", "train") is tr  # cached in memory


def test_local_parquet_grey_and_rgb(tmp_path):
    imgs = _write_parquet(tmp_path / "grey", mode="L")
    a = load_arrays(str(tmp_path / "grey"), "train")
    assert a.images.shape == (12, 1, 9, 9) and a.classes == ["a", "b", "c"]
    assert torch.equal(a.images[3, 0], torch.from_numpy(np.array(imgs[3])))
    assert a.labels.tolist() == [i % 3 for i in range(12)]
    # mixed sizes, RGB -> resized to one square size
    _write_parquet(tmp_path / "rgb", mode="RGB", sizes=((10, 7), (5, 12)))
    b = load_arrays(str(tmp_path / "rgb"), "test", size=16)
    assert b.images.shape == (12, 3, 16, 16)
    # disk cache: a fresh process-level cache still returns the same arrays
    data._MEM.clear()
    c = load_arrays(str(tmp_path / "rgb"), "test", size=16)
    assert torch.equal(b.images, c.images)
    assert any(f.suffix == ".npz" for f in (tmp_path / "cache").iterdir())


def test_column_ambiguity(tmp_path):
    _write_parquet(tmp_path / "two", two_image_columns=True)
    with pytest.raises(DataError, match="image_column="):
        load_arrays(str(tmp_path / "two"), "train")
    a = load_arrays(str(tmp_path / "two"), "train", image_column="mask")
    assert a.images.shape == (12, 1, 9, 9)


def test_not_found_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("VITREPRO_DATA", "")  # empty: no data directory, not even ../shared/data
    with pytest.raises(DatasetNotFoundError, match="VITREPRO_DATA is not set.*zalando"):
        load_arrays("fashion_mnist", "train")
    monkeypatch.setenv("VITREPRO_DATA", str(tmp_path / "nope"))
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_arrays("fashion_mnist", "train")
    with pytest.raises(DataError, match="did you mean 'cifar10'|Did you mean 'cifar10'"):
        load_arrays("cifar1", "train")
    with pytest.raises(DatasetNotFoundError):
        load_arrays(str(tmp_path / "missing_folder"), "train")


@pytest.mark.skipif(not os.environ.get("VITREPRO_DATA") or
                    not os.path.isdir(os.path.join(os.environ.get("VITREPRO_DATA", ""), "mnist")),
                    reason="no local mnist")
def test_shared_mnist():
    a = load_arrays("mnist", "test")
    assert a.images.shape == (2000, 1, 28, 28) and a.num_classes == 10


def test_balanced_subset_and_split():
    labels = torch.arange(100) % 10
    s = balanced_subset(labels, 25, seed=1)
    assert len(s) == 25 and torch.bincount(labels[s], minlength=10).tolist().count(3) == 5
    assert torch.equal(s, balanced_subset(labels, 25, seed=1))
    assert not torch.equal(s, balanced_subset(labels, 25, seed=2))
    assert set(balanced_subset(labels, 10, 1).tolist()) <= set(balanced_subset(labels, 50, 1).tolist())  # nested
    tr, va = train_val_split(labels, 0.2, seed=0)
    assert len(va) == 20 and torch.bincount(labels[va]).tolist() == [2] * 10
    assert not set(tr.tolist()) & set(va.tolist()) and len(tr) + len(va) == 100
    with pytest.raises(DataError):
        balanced_subset(labels, 1000, 0)


def test_preprocess():
    x = torch.tensor([[[[0, 255], [255, 0]]]], dtype=torch.uint8)
    y = preprocess(x, 2, 1)
    assert y.min() == -1 and y.max() == 1
    assert preprocess(x, 4, 3).shape == (1, 3, 4, 4)
    rgb = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    g = preprocess(rgb, 8, 1)
    assert torch.allclose(g, (rgb.float().mean(1, keepdim=True) - 127.5) / 127.5)


def _arrays(n=40):
    g = torch.Generator().manual_seed(0)
    return ImageArrays(torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8),
                       torch.arange(n) % 4, list("abcd"), "toy")


@pytest.mark.parametrize("augment", ["none", "crop", "crop_flip", "rrc_flip"])
def test_batches_deterministic_sharded_resumable(augment):
    a = _arrays()
    one = Batches(a, 8, 8, 1, augment=augment, seed=3)
    seq = [one.next() for _ in range(12)]  # crosses an epoch boundary (5 batches per epoch)
    assert one.state_dict() == {"epoch": 2, "index": 2}
    # same seed -> same batches; DDP ranks' slices concatenate to the global batch
    r0 = Batches(a, 8, 8, 1, augment=augment, seed=3, rank=0, world_size=2)
    r1 = Batches(a, 8, 8, 1, augment=augment, seed=3, rank=1, world_size=2)
    for x, y in seq:
        (x0, y0), (x1, y1) = r0.next(), r1.next()
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    # resume from state
    re = Batches(a, 8, 8, 1, augment=augment, seed=3)
    re.load_state_dict({"epoch": 1, "index": 3})
    x, y = re.next()
    assert torch.equal(x, seq[8][0]) and torch.equal(y, seq[8][1])
    # an epoch is a permutation of the data
    e0 = torch.cat([s[1] for s in seq[:5]])
    assert torch.bincount(e0).tolist() == [10] * 4
    if augment != "none":
        assert seq[0][0].shape == (8, 1, 8, 8)
        assert not torch.equal(seq[0][0], preprocess(a.images[:8], 8, 1))


def test_crop_translates_without_mirroring():
    """``crop`` (for digits) is ``crop_flip``'s translation without its flip: with the same draws each image
    of crop_flip is the crop's image or its mirror, and some are mirrors; a crop keeps the digit's pixels."""
    from vitrepro.data import augment_batch

    x = torch.randn(64, 1, 16, 16)
    crop = augment_batch(x, "crop", torch.Generator().manual_seed(5))
    both = augment_batch(x, "crop_flip", torch.Generator().manual_seed(5))
    same = [torch.equal(c, b) for c, b in zip(crop, both)]
    mirrored = [torch.equal(c.flip(-1), b) for c, b in zip(crop, both)]
    assert all(s or m for s, m in zip(same, mirrored)) and 0 < sum(mirrored) < 64
    # a translation by at most 16/8 = 2 px: the centre 12x12 of the input appears unmirrored in the crop
    centre = x[:, :, 2:14, 2:14]
    found = [any(torch.equal(centre[i], crop[i, :, dy:dy + 12, dx:dx + 12]) for dy in range(5) for dx in range(5))
             for i in range(64)]
    assert all(found)


def test_batches_errors():
    with pytest.raises(DataError):
        Batches(_arrays(), 6, 8, 1, world_size=4)
    with pytest.raises(DataError):
        Batches(_arrays(), 8, 8, 1, augment="bogus")


def test_train_examples_reference_is_one_fixed_balanced_training_subset(tmp_path):
    """``digits[train_examples=100]``: the training split is 100 class-balanced images of digits' own (10 per
    class), the same for every call and every run seed (a fixed low-data task, as VTAB-1k), the test split
    untouched; the pixel baseline reads those images; a bad or too large N is named."""
    from vitrepro import baselines

    full, sub = load_arrays("digits", "train"), load_arrays("digits[train_examples=100]", "train")
    assert len(sub) == 100 and torch.bincount(sub.labels, minlength=10).tolist() == [10] * 10
    rows = {tuple(r) for r in full.images.flatten(1).tolist()}
    assert all(tuple(r) in rows for r in sub.images.flatten(1).tolist())  # images of digits' own training split
    assert load_arrays("digits[train_examples=100]", "train") is sub
    # a cached subset is bound to its full split's object, not its id (which a freed array hands on):
    # an entry left under this id by another array (simulated) is not returned
    other = full.subset(torch.arange(len(full) - 1, -1, -1))  # the same images in reverse order
    data._MEM[f"subset-100-{id(other)}"] = (full, sub)
    fresh = data._fixed_subset("digits[train_examples=100]", other, 100)
    expected = other.subset(balanced_subset(other.labels, 100, seed=0)).images
    assert torch.equal(fresh.images, expected) and not torch.equal(fresh.images, sub.images)
    assert torch.equal(load_arrays("digits[train_examples=100]", "test").labels, load_arrays("digits", "test").labels)
    # the test split is the one array of both references; each keeps its own source in its fingerprint,
    # whichever was fingerprinted first in this process (a run id must not depend on that order)
    fp_sub, fp_full = data.data_fingerprint("digits[train_examples=100]", "test"), data.data_fingerprint("digits", "test")
    assert fp_sub["source"] == "digits[train_examples=100]" and fp_full["source"] == "digits"
    assert fp_sub["sha256"] == fp_full["sha256"] and fp_sub["n"] == fp_full["n"] == 360
    assert data.ref_train_examples("digits[train_examples=100]") == 100 and data.ref_train_examples("digits") is None
    assert data.dataset_ref("digits", train_examples=100) == "digits[train_examples=100]"
    with pytest.raises(DataError, match="must be a positive integer"):
        load_arrays("digits[train_examples=ten]", "train")
    with pytest.raises(DataError, match=r"train_examples=5000 but its training split holds only 1437"):
        load_arrays("digits[train_examples=5000]", "train")
    base = baselines.pixel_logistic_regression("digits[train_examples=100]", cache=tmp_path)
    assert base["train_size"] == 100
    from vitrepro.data import training_split
    assert len(training_split(sub, 0.2, None, seed=3)[0]) == 80  # a run's hold-out comes out of the 100
