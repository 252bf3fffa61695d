"""A user's own data as notebook parameters (issue 10): a parquet folder with two label columns passed as
`upstream={"path": ..., "label_column": ...}`, with the scaling notebook's own `sizes=[...]`; strict checks
of both before any compute. Tiny runs on scikit-learn's digits written as a parquet folder."""
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _two_label_folder(folder: Path, n_train: int = 400, n_test: int = 120) -> Path:
    """digits as a Hub-layout parquet folder with two ClassLabel columns: `fine_label` (the digit, 10
    classes) and `coarse_label` (odd/even, 2 classes) -- the layout that needs a column choice."""
    import datasets
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    d = load_digits()
    x = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    y = d.target.astype(int)
    feats = datasets.Features({"img": datasets.Image(),
                               "fine_label": datasets.ClassLabel(names=[str(i) for i in range(10)]),
                               "coarse_label": datasets.ClassLabel(names=["even", "odd"])})
    for split, sl in (("train", slice(0, n_train)), ("test", slice(n_train, n_train + n_test))):
        datasets.Dataset.from_dict({"img": [Image.fromarray(a) for a in x[sl]], "fine_label": y[sl].tolist(),
                                    "coarse_label": (y[sl] % 2).tolist()}, features=feats) \
            .to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return folder


@pytest.fixture(scope="module")
def two_labels(tmp_path_factory):
    return _two_label_folder(tmp_path_factory.mktemp("userdata") / "two_labels")


def _params(tmp_path, **kw):
    from vitrepro.experiments import scaling

    return scaling.validate_params({"profile": "smoke", "runs_dir": str(tmp_path / "runs"),
                                    "results_dir": str(tmp_path / "res"), **kw})


def test_dataset_dict_is_checked_strictly(tmp_path, two_labels):
    """Unknown keys, a missing path, bad values and bad sizes fail at parameter validation, naming the valid
    keys; a dict (or its JSON text, as `papermill -p` passes it) becomes the reference the configs carry."""
    from vitrepro.experiments.common import ParameterError

    with pytest.raises(ParameterError, match=r"unknown key\(s\) 'label_col' \(did you mean 'label_column'\?\).*"
                                             r"valid keys: path, image_column, label_column, train_split, test_split"):
        _params(tmp_path, upstream={"path": str(two_labels), "label_col": "fine_label"})
    with pytest.raises(ParameterError, match="has no 'path'"):
        _params(tmp_path, upstream={"label_column": "fine_label"})
    with pytest.raises(ParameterError, match="must be a non-empty string"):
        _params(tmp_path, upstream={"path": str(two_labels), "label_column": 3})
    for bad in ([0, 40], [40, 40], [40.5], "40", [True]):
        with pytest.raises(ParameterError, match="sizes"):
            _params(tmp_path, sizes=bad)
    ref = f"{two_labels}[label_column=fine_label]"
    assert _params(tmp_path, upstream={"path": str(two_labels), "label_column": "fine_label"}).upstream == ref
    assert _params(tmp_path, upstream=f'{{"path": "{two_labels}", "label_column": "fine_label"}}').upstream == ref
    assert _params(tmp_path, upstream="digits").upstream == "digits"  # a name stays a name


def test_two_label_columns_error_names_the_dict_form(two_labels):
    from vitrepro.data import DataError, load_arrays

    with pytest.raises(DataError, match=r'several label columns.*"path": ".*two_labels", "label_column": "fine_label"'):
        load_arrays(str(two_labels), "train")
    fine = load_arrays(f"{two_labels}[label_column=fine_label]", "train")
    coarse = load_arrays(str(two_labels), "train", label_column="coarse_label")
    assert fine.num_classes == 10 and coarse.num_classes == 2 and len(fine) == 400
    assert int(fine.labels.max()) == 9 and int(coarse.labels.max()) == 1


@pytest.mark.parametrize("case", ["column", "size", "ambiguous"])
def test_wrong_column_or_size_fails_in_preflight_before_any_run_folder(tmp_path, two_labels, case):
    from vitrepro.experiments import scaling
    from vitrepro.experiments.common import PreflightError

    up = {"path": str(two_labels), "label_column": "fine_label"}
    sizes = [40]
    if case == "column":
        up["label_column"], match = "nosuch", r"no column 'nosuch'; columns are \['img', 'fine_label', 'coarse_label'\]"
    elif case == "size":
        sizes, match = [40, 5000], r"train_examples=5000 of .*two_labels\[label_column=fine_label\].*only 400.*sizes="
    else:
        up, match = str(two_labels), r'several label columns.*upstream=\{"path": ".*two_labels", "label_column"'
    params = _params(tmp_path, upstream=up, sizes=sizes)
    with pytest.raises(PreflightError, match=match):
        scaling.run(params, log=lambda m: None)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("config.json"))


@pytest.mark.slow
def test_smoke_scaling_on_a_users_folder_with_chosen_column_and_sizes(tmp_path, two_labels):
    """End to end: the smoke scaling sweep on a two-label folder with upstream={"path", "label_column"} and
    sizes=[...]: every pre-training config trains on the chosen column (10 classes, not the 2 of the other),
    at the given subset sizes; the run ids cover the column (another column -> other ids)."""
    from vitrepro import train
    from vitrepro.experiments import common, launch, scaling

    params = _params(tmp_path, upstream={"path": str(two_labels), "label_column": "fine_label"}, sizes=[40, 80])
    ref = f"{two_labels}[label_column=fine_label]"
    jobs = scaling.jobs(params)
    for j in jobs:
        j.config = dict(j.config, precision="fp32")  # the smoke BiT may diverge under bf16 autocast
    pre = [j for j in jobs if j.stage == "pretrain"]
    assert {j.config["dataset"] for j in pre} == {ref}
    assert sorted({j.config["train_examples"] for j in pre}) == [40, 80]
    res = launch.run_jobs(jobs, params, log=lambda m: None)
    assert all(r["status"] == "ok" for _, r in res)
    for job, rec in res:
        if job.stage != "pretrain":
            continue
        assert rec["config"]["dataset"] == ref
        assert rec["resolved"]["num_classes"] == 10  # fine_label; coarse_label has 2
        assert rec["resolved"]["train_size"] == job.config["train_examples"]
        fp = rec["resolved"]["data"][f"{ref}:train"]
        assert fp["source"] == "local:two_labels[label_column=fine_label]" and fp["n"] == 400
        assert f"acc/two_labels[label_column=fine_label]/test" in rec["metrics"]
    other = dict(pre[0].config, dataset=f"{two_labels}[label_column=coarse_label]")
    assert train.run_id_of(other) != train.run_id_of(pre[0].config)
    df = common.collect(jobs, params, "scaling")  # read back from the store: the same run ids, nothing trained
    assert len(df[df.stage == "pretrain"].run_id.unique()) == len(pre)
    assert set(df[df.stage == "pretrain"].upstream_examples) == {40, 80}


def test_dataset_dict_takes_a_training_subset_size(tmp_path):
    """``{"path": ..., "train_examples": 1000}`` (a low-data task such as VTAB-1k) becomes the reference
    ``<path>[train_examples=1000]``; a size that is not a positive integer fails at parameter validation."""
    from vitrepro.experiments.common import ParameterError

    assert _params(tmp_path, upstream={"path": "digits", "train_examples": 300}).upstream == "digits[train_examples=300]"
    for bad in (0, -5, "300", 2.5, True):
        with pytest.raises(ParameterError, match="'train_examples' must be a positive integer"):
            _params(tmp_path, upstream={"path": "digits", "train_examples": bad})
