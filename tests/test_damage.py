"""Every damaged file of a run folder, a full disk and a read-only store (issue 30): the message a user sees,
what `python -m vitrepro.store check` says and what its remedy leaves. Each test is one row of
docs/damage.md. Tiny runs on digits (seconds each)."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitrepro import store as store_mod
from vitrepro import train
from vitrepro.store import DamagedRunError, NoSpaceError, NotWritableError, RunStore

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

ROOT = Path(__file__).resolve().parents[1]
TINY = {"experiment": "r", "model": "ViT-Nano/4", "dataset": "digits", "batch_size": 32, "steps": 4,
        "warmup_steps": 1, "log_every": 2, "checkpoint_every": 2, "lr": 1e-3, "precision": "fp32",
        "evaluators": [{"type": "accuracy", "max_examples": 64}]}


def _check(st: RunStore, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = store_mod.main(["--store", str(st.root), "check"])
    return rc, capsys.readouterr().out


def _repair(st: RunStore, ref: str, capsys) -> str:
    capsys.readouterr()
    assert store_mod.main(["--store", str(st.root), "repair", ref]) == 0
    return capsys.readouterr().out


def _pairs(st: RunStore, rid: str) -> list[tuple[int, str]]:
    """(step, metric) of every logged value but the timing ones."""
    return [(r["step"], k) for r in st.metrics("r", rid) for k in r if k not in ("step", "images_per_s")]


def _unfinished(rec: dict) -> Path:
    """The run folder of ``rec`` as a kill before its record left it: final checkpoint, no record, no model."""
    rd = Path(rec["run_dir"])
    (rd / "record.json").unlink()
    (rd / "model.pt").unlink()
    return rd


# ---------------------------------------------------------------------------------- re-evaluation, no duplicate
def test_reevaluation_from_the_checkpoint_writes_no_duplicate_row(run_store, capsys):
    rec = train.run(TINY, run_store, progress="none")
    first = _pairs(run_store, rec["run_id"])
    rd = Path(rec["run_dir"])
    (rd / "record.json").write_bytes((rd / "record.json").read_bytes()[:100])
    again = train.run(TINY, run_store, progress="none")
    assert "record.json is damaged" in capsys.readouterr().err and again["resumed_from_step"] == TINY["steps"]
    pairs = _pairs(run_store, rec["run_id"])
    assert len(pairs) == len(set(pairs)), [p for p in pairs if pairs.count(p) > 1]
    assert pairs == first and (TINY["steps"], "acc/digits/test") in pairs
    assert again["metrics"] == rec["metrics"]


# ---------------------------------------------------------------------------------- config.json
def test_damaged_config_of_a_finished_run_is_named_not_reused_and_rebuilt(run_store, capsys):
    rec = train.run(TINY, run_store, progress="none")
    rid, rd = rec["run_id"], Path(rec["run_dir"])
    good = json.loads((rd / "config.json").read_text())
    ft = {**TINY, "experiment": "ft", "init": f"run:r/{rid}", "optimizer": "sgd"}
    (rd / "config.json").write_bytes((rd / "config.json").read_bytes()[:60])
    with pytest.raises(train.ConfigError, match=r"parent run's configuration.*config\.json is damaged: truncated"
                                                r".*Lost: the run's configuration.*repair r/.*rebuilds it from record"):
        train.run(ft, run_store, progress="none")
    rc, out = _check(run_store, capsys)
    assert rc == 1 and "config.json is damaged" in out and "rebuilds it from record.json" in out
    # `repair` rebuilds it from the record, hashed back to the run id: nothing is lost
    out = _repair(run_store, f"r/{rid}", capsys)
    assert "rebuilt" in out and "from record.json (it hashes to the run id)" in out
    assert json.loads((rd / "config.json").read_text()) == good
    assert _check(run_store, capsys)[0] == 0 and rid in set(run_store.frame("r").run_id)
    # a finished run with a damaged config is not reused silently: named, evaluated again, config rewritten
    (rd / "config.json").write_text('"garbage"')
    again = train.run(TINY, run_store, progress="none")
    assert "config.json is damaged: not a run's config.json" in capsys.readouterr().err
    assert again["resumed_from_step"] == TINY["steps"] and again["metrics"] == rec["metrics"]
    assert json.loads((rd / "config.json").read_text()) == good
    assert train.run(ft, run_store, progress="none")["status"] == "ok"


def test_a_missing_config_is_found_and_rebuilt_from_the_record(run_store, capsys):
    rec = train.run(TINY, run_store, progress="none")
    rd = Path(rec["run_dir"])
    (rd / "config.json").unlink()  # what the old `repair` left: the run invisible to the store
    rc, out = _check(run_store, capsys)
    assert rc == 1 and "config.json is missing" in out
    out = _repair(run_store, f"r/{rec['run_id']}", capsys)
    assert "rebuilt" in out and "from record.json (it hashes to the run id)" in out
    assert train.run(TINY, run_store, progress="none") == rec  # reused as it was


def test_damaged_config_of_an_unfinished_run_is_rebuilt_from_its_checkpoint(run_store, capsys):
    rec = train.run(TINY, run_store, progress="none")
    rd = Path(rec["run_dir"])
    (rd / "record.json").unlink()  # killed between model.pt and record.json: the model is there, unrecorded
    (rd / "config.json").write_bytes(b"\x00" * 30)
    out = _repair(run_store, f"r/{rec['run_id']}", capsys)
    assert "rebuilt" in out and "from checkpoint.pt" in out
    assert json.loads((rd / "config.json").read_text())["model"] == TINY["model"]
    with pytest.raises(train.ConfigError, match="has not finished since its config.json was rebuilt"):
        train.run({**TINY, "experiment": "ft", "init": f"run:r/{rec['run_id']}"}, run_store, progress="none")
    again = train.run(TINY, run_store, progress="none")
    assert again["resumed_from_step"] == TINY["steps"] and again["metrics"] == rec["metrics"]
    assert "_resolved" in json.loads((rd / "config.json").read_text())  # written again by the resumed run


def test_damaged_config_with_nothing_to_rebuild_from_forgets_the_run_naming_dependants(run_store, capsys):
    rec = train.run(TINY, run_store, progress="none")
    ft = train.run({**TINY, "experiment": "ft", "init": f"run:r/{rec['run_id']}", "optimizer": "sgd"}, run_store,
                   progress="none")
    rd = Path(rec["run_dir"])
    (rd / "record.json").unlink()
    (rd / "checkpoint.pt").unlink()
    (rd / "config.json").write_text("{")
    out = _repair(run_store, f"r/{rec['run_id']}", capsys)
    assert f"deleted {rd}" in out and f"ft/{ft['run_id']}" in out and not rd.exists()
    assert _check(run_store, capsys)[0] == 0


# ---------------------------------------------------------------------------------- metrics.jsonl
@pytest.mark.parametrize("garbage, what", [(b"\xff\xfe\x00binary\x81", "binary bytes"),
                                           (b'"garbage"', "a JSON str, not a row"),
                                           (b'{"step": "abc"}', "step 'abc' is not a step number"),
                                           (b"{not json", "not JSON")])
def test_garbage_in_metrics_is_named_checked_and_repaired(run_store, capsys, garbage, what):
    rec = train.run(TINY, run_store, progress="none")
    rd = _unfinished(rec)
    lines = (rd / "metrics.jsonl").read_bytes().split(b"\n")
    (rd / "metrics.jsonl").write_bytes(b"\n".join(lines[:1] + [garbage] + lines[1:]))
    with pytest.raises(DamagedRunError, match=rf"metrics\.jsonl is damaged: 1 unreadable line.*line 2: {what}"
                                              r".*Lost: the damaged log lines.*repair r/.*keeps its readable rows"):
        train.run(TINY, run_store, progress="none")
    rc, out = _check(run_store, capsys)
    assert rc == 1 and "metrics.jsonl is damaged" in out
    assert "dropping 1 damaged line(s)" in _repair(run_store, rec["run_id"], capsys)
    again = train.run(TINY, run_store, progress="none")
    assert again["status"] == "ok" and again["resumed_from_step"] == TINY["steps"]
    assert again["metrics"] == rec["metrics"] and _check(run_store, capsys)[0] == 0


def test_a_row_cut_by_a_kill_is_not_damage(run_store, capsys):
    rec = train.run(TINY, run_store, progress="none")
    rd = _unfinished(rec)
    with open(rd / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 4, "lo')
    assert _check(run_store, capsys)[0] == 0
    assert train.run(TINY, run_store, progress="none")["metrics"] == rec["metrics"]


# ---------------------------------------------------------------------------------- checkpoint.pt, model.pt
def test_a_torch_archive_with_the_wrong_content_is_named(run_store, capsys):
    rec = train.run(TINY, run_store, progress="none")
    rd = Path(rec["run_dir"])
    store_mod.atomic_torch_save(rd / "model.pt", {"weights": [1, 2, 3]})
    assert train.finished_record(run_store, "r", rec["run_id"]) is None
    assert "model.pt is damaged: not a model's state dict" in capsys.readouterr().err
    rd = _unfinished(rec)
    store_mod.atomic_torch_save(rd / "checkpoint.pt", {"step": 4, "weights": torch.ones(3)})
    with pytest.raises(DamagedRunError, match=r"checkpoint\.pt is damaged: not a training checkpoint \(no model, "
                                              r"optimizer.*Lost: the training state.*repair r/"):
        train.run(TINY, run_store, progress="none")
    rc, out = _check(run_store, capsys)
    assert rc == 1 and "checkpoint.pt is damaged: not a training checkpoint" in out
    assert "dropped" in _repair(run_store, rec["run_id"], capsys)
    again = train.run(TINY, run_store, progress="none")
    assert again["resumed_from_step"] is None and again["metrics"] == rec["metrics"]  # retrained, same numbers


# ---------------------------------------------------------------------------------- .lock
def test_lock_file_garbage_is_harmless_and_a_lock_folder_is_named(run_store, capsys):
    rid = train.run_id_of(TINY)
    lock = run_store.run_dir("r", rid) / ".lock"
    lock.parent.mkdir(parents=True)
    lock.write_bytes(b"\xff\x00 garbage")
    assert run_store.lock("r", rid).owner() == "unknown"
    rec = train.run(TINY, run_store, progress="none")
    lock.unlink()
    lock.mkdir()
    with pytest.raises(DamagedRunError, match=r"\.lock is damaged: not a regular file.*repair r/.*deletes it"):
        train.run(TINY, run_store, progress="none", force=True)
    rc, out = _check(run_store, capsys)
    assert rc == 1 and ".lock is damaged" in out
    assert "deleted" in _repair(run_store, f"r/{rid}", capsys) and lock.is_file()  # a new, empty one
    assert train.run(TINY, run_store, progress="none", force=True)["metrics"] == rec["metrics"]


# ---------------------------------------------------------------------------------- full disk, read-only store
class _Full:
    """An append-mode file whose writes fail as on a full disk."""

    def __init__(self, *a, **k):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, s):
        raise OSError(errno.ENOSPC, "No space left on device")


def _fail(real, err, only):
    def f(path, *a, **k):
        if only(str(path)):
            raise OSError(err, os.strerror(err), str(path))
        return real(path, *a, **k)
    return f


@pytest.mark.parametrize("where", ["lock pwrite", "lock open", "config.json", "metrics.jsonl", "checkpoint.pt"])
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_full_disk_and_read_only_store_name_the_folder_and_exit_4(tmp_path, monkeypatch, capsys, where, err):
    import tempfile

    st = RunStore(tmp_path / "runs")
    rid = train.run_id_of(TINY)
    run_dir = st.run_dir("r", rid)
    if where == "lock pwrite":
        monkeypatch.setattr(os, "pwrite", lambda *a: (_ for _ in ()).throw(OSError(err, os.strerror(err))))
    elif where == "lock open":
        monkeypatch.setattr(os, "open", _fail(os.open, err, lambda p: p.endswith(".lock")))
    elif where == "metrics.jsonl":  # appends: a full disk fails the write, a read-only folder the open
        def fake_open(path, *a, **k):
            if str(path).endswith("metrics.jsonl"):
                if err == errno.ENOSPC:
                    return _Full()
                raise OSError(err, os.strerror(err), str(path))
            return open(path, *a, **k)
        monkeypatch.setattr(store_mod, "open", fake_open, raising=False)
    else:  # an atomic write of that file
        real = tempfile.mkstemp

        def mkstemp(*a, prefix="", **k):
            if prefix.startswith("." + where):
                raise OSError(err, os.strerror(err))
            return real(*a, prefix=prefix, **k)
        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(TINY))
    rc = train.main(["--config", str(cfg), "--store", str(st.root), "--progress", "none"])
    msg = capsys.readouterr().err
    assert rc == 4, msg
    if err == errno.ENOSPC:
        assert f"no space left on {run_dir} (while writing {'.lock' if 'lock' in where else where}" in msg
    else:
        assert f"cannot write to {run_dir} (" in msg and ("read-only file system" if err == errno.EROFS else
                                                           "ermission denied") in msg
    assert "--store DIR" in msg and "VITREPRO_RUNS" in msg and "Traceback" not in msg



# ---------------------------------------------------------------------------------- data: the split and file
def _parquet_folder(folder: Path, n: int = 40, classes: int = 4, extra_label: bool = False) -> Path:
    import datasets
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(classes)]
    feats = {"image": datasets.Image(), "label": datasets.ClassLabel(names=names)}
    if extra_label:
        feats["coarse"] = datasets.ClassLabel(names=["a", "b"])
    for split in ("train", "test"):
        cols = {"image": [Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)) for _ in range(n)],
                "label": [i % classes for i in range(n)]}
        if extra_label:
            cols["coarse"] = [i % 2 for i in range(n)]
        datasets.Dataset.from_dict(cols, features=datasets.Features(feats)) \
            .to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return folder


def test_a_corrupt_test_split_is_named_with_its_file(tmp_path, monkeypatch):
    from vitrepro import data

    monkeypatch.setenv("VITREPRO_CACHE", "off")
    folder = _parquet_folder(tmp_path / "corrupt")
    bad = folder / "test-00000-of-00001.parquet"
    bad.write_bytes(b"PAR1 not really parquet")
    for split in ("train", "test"):
        with pytest.raises(data.DataError, match=rf"the 'test' split's file {bad}.*split '{split}' cannot be loaded"):
            data.load_arrays(str(folder), split)
    with pytest.raises(train.ConfigError, match=r"the 'test' split's file .*test-00000-of-00001\.parquet"):
        train.run_id_of({**TINY, "dataset": str(folder)})


# ---------------------------------------------------------------------------------- CLI
def test_cli_key_value_after_an_option(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(TINY))
    rc = train.main(["steps=2", "--config", str(cfg), "--store", str(tmp_path / "runs"), "--progress", "none",
                     "seed=1", "--force", "log_every=1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rec = json.loads(out[out.index("{"):])
    conf = json.loads((Path(rec["run_dir"]) / "config.json").read_text())
    assert (conf["steps"], conf["seed"], conf["log_every"]) == (2, 1, 1)


def test_two_label_columns_message_suggests_a_form_the_cli_accepts(tmp_path, capsys):
    folder = _parquet_folder(tmp_path / "two", extra_label=True)
    base = ["--store", str(tmp_path / "runs"), "--progress", "none", "model=ViT-Nano/4", "steps=2",
            "batch_size=8", "warmup_steps=1", "precision=fp32"]
    assert train.main(base + [f"dataset={folder}"]) == 2
    err = capsys.readouterr().err
    assert "several label columns" in err
    suggested = err[err.index(f"'{folder}["):].split("'")[1]  # '<dir>[label_column=label]'
    assert suggested == f"{folder}[label_column=label]"
    assert train.main(base + [f"dataset={suggested}"]) == 0, capsys.readouterr().err


def test_a_waiting_process_says_it_takes_over_a_run_whose_owner_died(run_store, capsys):
    rid = train.run_id_of(TINY)
    code = ("import sys, time, os; from vitrepro.store import RunStore; "
            "l = RunStore(sys.argv[1]).lock('r', sys.argv[2]); l.acquire(); print('held', flush=True); "
            "time.sleep(3); os._exit(1)")  # dies holding the lock, having finished nothing
    p = subprocess.Popen([sys.executable, "-c", code, str(run_store.root), rid], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    try:
        assert p.stdout.readline().strip() == "held"
        rec = train.run(TINY, run_store, progress="none")
    finally:
        p.kill()
        p.wait()
    err = capsys.readouterr().err
    assert "is being trained by pid" in err and "let go of it without finishing it" in err, err
    assert "this process takes it over, from step 0" in err and rec["status"] == "ok"


def test_a_sweep_with_a_damaged_parent_config_evaluates_the_parent_again(tmp_path, capsys):
    """The issue's first case through a sweep: a pre-training's config.json truncated to 60 bytes; the rerun
    names it, re-evaluates the parent (rewriting its config) and reuses the fine-tune."""
    from vitrepro.experiments.common import Job, NotebookParams, run_jobs

    params = NotebookParams(profile="smoke", runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "res"))

    def jobs():
        pre = Job(dict(TINY), "pretrain")
        return [pre, Job(dict(TINY, experiment="ft", optimizer="sgd"), "finetune", parent=pre)]

    first = run_jobs(jobs(), params, log=lambda m: None, workers=1)
    conf = Path(first[0][1]["run_dir"]) / "config.json"
    good = conf.read_bytes()
    conf.write_bytes(good[:60])
    capsys.readouterr()
    again = run_jobs(jobs(), params, log=lambda m: None, workers=1)
    assert "config.json is damaged: truncated" in capsys.readouterr().err
    assert [r["status"] for _, r in again] == ["ok", "ok"] and conf.read_bytes() == good
    assert again[0][1]["resumed_from_step"] == TINY["steps"] and again[1][1] == first[1][1]


@pytest.mark.parametrize("content", [b"[]", b'{"run_id": "x"}'])
def test_a_record_of_the_wrong_shape_is_named_and_the_run_evaluated_again(run_store, capsys, content):
    rec = train.run(TINY, run_store, progress="none")
    (Path(rec["run_dir"]) / "record.json").write_bytes(content)
    rc, out = _check(run_store, capsys)
    assert rc == 1 and "record.json is damaged: not a run's record.json" in out and "evaluated again" in out
    again = train.run(TINY, run_store, progress="none")
    assert "record.json is damaged" in capsys.readouterr().err and again["metrics"] == rec["metrics"]


def test_a_sweep_stops_when_the_store_fills_up(tmp_path, monkeypatch):
    from vitrepro.experiments import common

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)  # the first write of every run: its lock file
    lines = []
    jobs = [common.Job(dict(TINY, seed=s), "pretrain") for s in range(3)]
    params = common.NotebookParams(profile="smoke", runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "r"))
    with pytest.raises(common.SweepError, match=r"(?s)no run of the sweep finished.*NoSpaceError: no space left on "
                                                r".*runs/r/.*not started: NoSpaceError"):
        common.run_jobs(jobs, params, log=lines.append, workers=1)
    assert sum(" failed " in m for m in lines) == 1 and any("stopping the sweep" in m for m in lines), lines


def test_weights_of_another_model_are_named(run_store, capsys):
    from vitrepro.experiments.common import NotebookParams, load_run_model

    rec = train.run(TINY, run_store, progress="none")
    rd = Path(rec["run_dir"])
    store_mod.atomic_torch_save(rd / "model.pt", {"w": torch.ones(3)})
    with pytest.raises(DamagedRunError, match=r"model\.pt is damaged: its weights do not fit the run's model"
                                              r".*Lost: the final weights.*repair r/"):
        load_run_model(NotebookParams(runs_dir=str(run_store.root)), rec["run_id"])
    rd = _unfinished(rec)
    ck = torch.load(rd / "checkpoint.pt", weights_only=False)
    store_mod.atomic_torch_save(rd / "checkpoint.pt", {**ck, "model": {"w": torch.ones(3)}})
    with pytest.raises(DamagedRunError, match=r"checkpoint\.pt is damaged: its weights do not fit the run's model"):
        train.run(TINY, run_store, progress="none")
    assert "dropped" in _repair(run_store, rec["run_id"], capsys)
    assert train.run(TINY, run_store, progress="none")["metrics"] == rec["metrics"]


def test_weights_of_another_model_in_model_pt_are_found_by_check(run_store, capsys):
    rec = train.run(TINY, run_store, progress="none")
    rd = Path(rec["run_dir"])
    state = torch.load(rd / "model.pt")
    state.pop(next(iter(state)))
    store_mod.atomic_torch_save(rd / "model.pt", state)
    rc, out = _check(run_store, capsys)
    assert rc == 1 and "model.pt is damaged: its weights do not fit the run's model (they differ from checkpoint" in out
    assert "dropped" in _repair(run_store, rec["run_id"], capsys)
    again = train.run(TINY, run_store, progress="none")
    assert again["resumed_from_step"] == TINY["steps"] and again["metrics"] == rec["metrics"]


def test_a_parent_whose_model_pt_does_not_fit_is_named_by_the_fine_tune(run_store):
    rec = train.run(TINY, run_store, progress="none")
    rd = Path(rec["run_dir"])
    state = torch.load(rd / "model.pt")
    state.pop(next(iter(state)))
    store_mod.atomic_torch_save(rd / "model.pt", state)
    ft = {**TINY, "experiment": "ft", "init": f"run:r/{rec['run_id']}", "optimizer": "sgd"}
    with pytest.raises(train.ConfigError, match=r"parent run's weights cannot be loaded.*model\.pt is damaged: its "
                                                r"weights do not fit"):
        train.run(ft, run_store, progress="none")


def test_a_missing_model_of_a_finished_run_is_found_by_check(run_store, capsys):
    rec = train.run(TINY, run_store, progress="none")
    (Path(rec["run_dir"]) / "model.pt").unlink()
    rc, out = _check(run_store, capsys)
    assert rc == 1 and "model.pt is missing although record.json says the run finished" in out
    assert "dropped" in _repair(run_store, rec["run_id"], capsys)
    again = train.run(TINY, run_store, progress="none")
    assert again["resumed_from_step"] == TINY["steps"] and (Path(rec["run_dir"]) / "model.pt").exists()
