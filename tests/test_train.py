import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vitrepro.store import RunStore
from vitrepro.train import ConfigError, DivergedError, TrainConfig, resolve_precision, run, run_many

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

ROOT = Path(__file__).resolve().parents[1]
BASE = {"experiment": "t", "model": "ViT-Nano/4", "dataset": "digits", "batch_size": 32, "lr": 3e-3,
        "warmup_steps": 10, "log_every": 10}




def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    return env


def _cli(cfg: dict, store: Path) -> list[str]:
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in cfg.items()] + ["--store", str(store)]


def _params(store: RunStore, rec) -> dict:
    return torch.load(Path(rec["run_dir"]) / "model.pt")


def test_learns_digits_and_second_call_is_instant(run_store):
    cfg = {**BASE, "steps": 150, "evaluators": [{"type": "accuracy"}, {"type": "fewshot", "shots": [5], "seeds": [0]}]}
    rec = run(cfg, run_store, progress="none")
    assert rec["status"] == "ok"
    assert rec["metrics"]["acc/digits/test"] > 0.6, rec["metrics"]
    assert rec["metrics"]["fewshot/digits/5shot"] > 0.5
    assert rec["params"] > 0 and rec["images_seen"] == 150 * 32 and rec["precision"] in ("fp32", "bf16")
    rows = run_store.metrics("t", rec["run_id"])
    assert [r["step"] for r in rows if "loss" in r] == list(range(10, 151, 10))
    assert rows[-1]["acc/digits/test"] == rec["metrics"]["acc/digits/test"]
    from vitrepro.train import run_id_of
    assert run_id_of(cfg) == rec["run_id"] == run_id_of({**cfg, "lr": 0.003})
    t = time.perf_counter()
    again = run(cfg, run_store)
    assert time.perf_counter() - t < 1.0 and again == json.loads(json.dumps(rec))
    df = run_store.frame("t")
    assert {"model", "dataset", "seed", "train_examples", "metric", "value"} <= set(df.columns)


@pytest.mark.parametrize("bad, match", [
    ({"stpes": 10}, "did you mean 'steps'"),
    ({"steps": 0}, "steps=0"),
    ({"steps": "10"}, "expected int"),
    ({"steps": 20, "dataset": "cifar1O"}, "unknown dataset"),
    ({"steps": 20, "img_size": 10}, "patch"),
    ({"steps": 20, "optimizer": "adamw"}, "not one of"),
    ({"steps": 20, "init": "/no/such/weights.pth"}, "no such file"),
    ({"steps": 20, "model": "ViT-Q/4"}, "ViT-Q"),
    ({"steps": 20, "dataset": "fashion_mnist", "_missing_data_dir": True}, "does not exist"),
])
def test_bad_configs_fail_early(run_store, monkeypatch, tmp_path, bad, match):
    bad = dict(bad)
    if bad.pop("_missing_data_dir", False):
        monkeypatch.setenv("VITREPRO_DATA", str(tmp_path / "no_such_dir"))
    with pytest.raises(ConfigError, match=match):
        run({**BASE, **bad}, run_store)
    assert not run_store.root.exists() or not any(run_store.root.rglob("*"))


def test_train_flops_match_a_counted_training_step(run_store):
    """The record's FLOPs against torch's own counter (torch.utils.flop_counter: matmuls and convolutions) on
    the trained network: flops_per_image = one forward, train_flops / images = one real training step
    (forward + backward). GAP pooling, so that every token runs through every layer, as the paper counts.
    The backward is 2 forwards except the patch embedding's input gradient (the image needs none): < 0.5%."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from vitrepro.models import create_model
    rec = run({**BASE, "steps": 2, "warmup_steps": 1, "pool": "gap", "precision": "fp32", "evaluators": []},
              run_store, progress="none")
    r = rec["resolved"]
    model = create_model("ViT-Nano/4", img_size=r["img_size"], in_chans=r["in_chans"], num_classes=r["num_classes"],
                         pool="gap")
    model.load_state_dict(torch.load(Path(rec["run_dir"]) / "model.pt"))
    model.train()
    b = 16
    x = torch.rand(b, r["in_chans"], r["img_size"], r["img_size"]) * 2 - 1
    y = torch.arange(b) % r["num_classes"]
    with FlopCounterMode(display=False) as forward:
        model(x)
    with FlopCounterMode(display=False) as step:
        F.cross_entropy(model(x), y).backward()
    assert rec["flops_per_image"] == forward.get_total_flops() / b
    assert rec["images_seen"] == 2 * BASE["batch_size"]
    assert rec["train_flops"] / rec["images_seen"] == pytest.approx(step.get_total_flops() / b, rel=5e-3)


# Documented choice (resolve_precision): 'auto' is bf16 only where bf16 is fast: a CPU with AVX512-BF16 or
# AMX-BF16, CUDA with bf16 support; else fp32. The machine's flags are faked through the flags reader.
@pytest.mark.parametrize("flags, want", [
    (set(), "fp32"),                                        # flags unreadable
    ({"sse4_2", "avx2", "fma"}, "fp32"),                    # AVX2 only: bf16 autocast ~40x slower
    ({"avx2", "avx512f", "avx512_vnni", "avx512_fp16"}, "fp32"),  # AVX-512 without its bf16 extension
    ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),
    ({"avx2", "amx_tile", "amx_bf16"}, "bf16"),
])
def test_precision_auto_on_cpu_follows_the_bf16_flags(monkeypatch, flags, want):
    reader = resolve_precision.__globals__
    assert "_cpu_flags" in reader, "resolve_precision no longer reads the flags through _cpu_flags"
    monkeypatch.setitem(reader, "_cpu_flags", lambda: set(flags))
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == want
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"


def test_precision_auto_on_cuda_and_other_devices(monkeypatch):
    for supported, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, supported=supported, **k: supported)
        assert resolve_precision("auto", torch.device("cuda", 0)) == want
        assert resolve_precision("fp32", torch.device("cuda", 0)) == "fp32"
    assert resolve_precision("auto", torch.device("mps")) == "fp32"


def test_cpu_flags_reader_parses_proc_cpuinfo(monkeypatch):
    """The reader takes the first `flags` line of /proc/cpuinfo (faked here) and 'auto' follows it."""
    import builtins
    import io
    fake = ("processor\t: 0\nmodel name\t: Fake CPU\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n\n"
            "processor\t: 1\nflags\t\t: fpu\n")
    real_open = builtins.open

    def fake_open(path, *a, **k):
        return io.StringIO(fake) if str(path) == "/proc/cpuinfo" else real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert resolve_precision.__globals__["_cpu_flags"]() == {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16"}
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
    fake = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_diverged_is_recorded_and_sweep_goes_on(run_store, monkeypatch):
    import vitrepro.train as tr

    class _NaNF:
        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

        @staticmethod
        def cross_entropy(logits, y, **kw):
            return torch.nn.functional.cross_entropy(logits, y, **kw) * float("nan")

    monkeypatch.setattr(tr, "F", _NaNF())
    with pytest.raises(DivergedError):
        run({**BASE, "steps": 20, "evaluators": []}, run_store)
    recs = run_many([{**BASE, "steps": 20, "seed": 1, "evaluators": []}], run_store)
    assert recs[0]["status"] == "failed" and "DivergedError" in recs[0]["error"]
    monkeypatch.undo()
    recs = run_many([{**BASE, "steps": 20, "seed": 1, "evaluators": []},
                     {**BASE, "steps": 20, "seed": 2, "evaluators": []}], run_store)
    assert [r["status"] for r in recs] == ["ok", "ok"]  # a failed run is retried


@pytest.mark.slow
def test_sigkill_resume_is_exact(tmp_path):
    cfg = {**BASE, "steps": 40, "checkpoint_every": 5, "batch_size": 16, "drop_rate": 0.1, "augment": "crop_flip",
           "img_size": 12}
    killed = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "vitrepro.train", *_cli(cfg, killed), "--progress", "none"],
                         env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    ckpts = None
    while time.time() < deadline and p.poll() is None:
        ckpts = list(killed.rglob("checkpoint.pt"))
        if ckpts:
            break
        time.sleep(0.05)
    assert ckpts, p.stderr.read().decode() if p.poll() is not None else "no checkpoint in time"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not list(killed.rglob("record.json")), "the run finished before it was killed"
    # started again (in this process to save an interpreter start; the same code path as the CLI,
    # and one intra-op thread as in the killed subprocess)
    resumed = run(cfg, RunStore(killed), progress="none")
    assert resumed["resumed_from_step"] is not None and 0 < resumed["resumed_from_step"] < 40
    # uninterrupted, in this process (same code path, same thread count: 1)
    whole = run(cfg, RunStore(tmp_path / "whole"), progress="none")
    assert resumed["run_id"] == whole["run_id"]
    assert resumed["metrics"] == whole["metrics"]
    a, b = _params(None, resumed), _params(None, whole)
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [r for r in RunStore(killed).metrics("t", whole["run_id"]) if "loss" in r]
    lb = [r for r in RunStore(tmp_path / "whole").metrics("t", whole["run_id"]) if "loss" in r]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    # SGD: the update is linear in the gradient, so the only difference is the reduction order
    # (Adam's normalisation would amplify 1e-9 differences of near-zero gradients to lr-sized ones).
    # fp32: under bf16 autocast (what "auto" picks on a CPU with AVX512-BF16) such differences flip
    # bf16 roundings of the activations, and the two runs drift apart by ~4e-4 in 12 steps.
    cfg = {**BASE, "steps": 12, "optimizer": "sgd", "lr": 0.05, "checkpoint_every": None, "precision": "fp32",
           "evaluators": [{"type": "accuracy"}]}
    torchrun = Path(sys.executable).with_name("torchrun")
    out = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "vitrepro.train",
                          *_cli(cfg, tmp_path / "ddp"), "--progress", "none"],
                         env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ddp = RunStore(tmp_path / "ddp").records("t")
    assert len(ddp) == 1 and ddp[0]["world_size"] == 2
    one = run(cfg, RunStore(tmp_path / "one"), progress="none")
    a, b = _params(None, ddp[0]), _params(None, one)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert ddp[0]["metrics"]["acc/digits/test"] == pytest.approx(one["metrics"]["acc/digits/test"], abs=0.01)


def test_finetune_from_stored_run_with_new_head_and_resolution(run_store):
    pre = run({**BASE, "steps": 10, "warmup_steps": 2, "evaluators": []}, run_store, progress="none")
    ft = {**BASE, "experiment": "ft", "steps": 10, "warmup_steps": 2, "optimizer": "sgd", "lr": 0.01, "weight_decay": 0.0,
          "init": f"run:t/{pre['run_id']}", "img_size": 12, "val_fraction": 0.1, "eval_split": "val",
          "checkpoint_every": None, "eval_every": 5, "log_every": 5}
    rec = run(ft, run_store, progress="none")
    assert rec["status"] == "ok" and rec["resolved"]["img_size"] == 12
    assert 0.0 <= rec["metrics"]["acc/digits/val"] <= 1.0
    assert 1437 - 150 < rec["resolved"]["train_size"] < 1437 - 140
    rows = run_store.metrics("ft", rec["run_id"])
    assert any("acc/digits/val" in r and r["step"] == 5 for r in rows)
    with pytest.raises(ConfigError, match="no stored run"):
        run({**ft, "init": "run:t/000000000000"}, run_store)


def test_streamed_dataset_path(run_store, tmp_path, monkeypatch):
    """The imagenet-1k path (streaming through `datasets`) on a tiny local parquet folder."""
    import datasets
    import numpy as np
    from PIL import Image

    from vitrepro import data
    folder = tmp_path / "toy"
    folder.mkdir()
    rng = np.random.default_rng(0)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    for split in ("train", "test"):
        imgs = [Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)) for _ in range(18)]
        datasets.Dataset.from_dict({"image": imgs, "label": [i % 3 for i in range(18)]}, features=feats) \
            .to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    monkeypatch.setitem(data.DATASETS, "toystream", data.DatasetSpec(str(folder), num_classes=3, streaming=True))
    with pytest.raises(ConfigError, match="steps, not epochs"):
        run({**BASE, "dataset": "toystream", "epochs": 1.0, "img_size": 8}, run_store)
    rec = run({**BASE, "dataset": "toystream", "steps": 4, "batch_size": 4, "warmup_steps": 1, "img_size": 8,
               "checkpoint_every": 2, "log_every": 2}, run_store, progress="none")
    assert rec["status"] == "ok" and rec["resolved"]["in_chans"] == 3
    assert 0.0 <= rec["metrics"]["acc/toystream/test"] <= 1.0
