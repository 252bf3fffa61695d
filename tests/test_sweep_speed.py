"""Sweep throughput (issue 12): the trainer's torch.compile setting, the sweep's scheduling and ETA
(the sweep benchmark's own tests: benchmarks/tests/test_bench_sweep.py).

* a compiled run trains the same model as an eager one (fp32, a few steps, tolerance 1e-4) and has its own
  run id (compiled kernels round differently);
* ``compile='auto'`` compiles exactly the runs the measured rule names (CPU, bf16, ViT, long enough);
"""
from __future__ import annotations

import copy

import pytest
import torch

from vitrepro import machine, train
from vitrepro.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

BASE = {"experiment": "compile", "model": "ViT-Nano/7", "dataset": "digits", "img_size": 14, "batch_size": 32,
        "steps": 4, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.05, "precision": "fp32",
        "checkpoint_every": None, "log_every": 2, "evaluators": [{"type": "accuracy"}]}


def _params(store, rec):
    state = torch.load(store.run_dir(rec["experiment"], rec["run_id"]) / "model.pt", weights_only=True)
    return state


def test_sweep_starts_the_longest_chain_of_work_first(tmp_path):
    """List scheduling by critical path: a free worker takes the pending job heading the most work (its own
    plus the longest chain waiting on it), so a pre-training run whose fine-tunes wait starts before a longer
    run nothing waits for, and a released fine-tune competes by its own work."""
    from vitrepro.experiments import scaling, sweep
    from vitrepro.experiments.jobs import Job

    params = scaling.validate_params({"profile": "smoke", "runs_dir": str(tmp_path)})
    cfg = dict(model="ViT-Nano/4", dataset="digits", img_size=8, batch_size=32)
    lone = Job(dict(cfg, steps=300), "pretrain")
    parent = Job(dict(cfg, steps=200, seed=1), "pretrain")
    tune = Job(dict(cfg, steps=150, seed=2), "finetune", parent=parent)
    short = Job(dict(cfg, steps=100, seed=3), "pretrain")
    sw = sweep._Sweep([lone, short, parent, tune], params, log=lambda *_: None)
    assert sw.priority[id(parent)] == sw.work[id(parent)] + sw.work[id(tune)]
    assert [sw.next_job() for _ in range(2)] == [parent, lone]  # 350 steps of chain before 300
    sw.finish(parent, parent.config, {"status": "ok", "run_id": "p", "experiment": "e"}, was_trained=False)
    assert sw.next_job() is tune and sw.next_job() is short and not sw.pending


@pytest.mark.slow  # torch.compile: ~100 s on 2 cores
@pytest.mark.skipif(machine._cxx_compiler() is None, reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_training_equals_eager(run_store):
    eager = train.run({**BASE, "compile": "off"}, store=run_store, progress="none")
    compiled = train.run({**BASE, "compile": "on"}, store=run_store, progress="none")
    assert eager["run_id"] != compiled["run_id"]
    assert compiled["resolved"]["compile"] is True and eager["resolved"]["compile"] is False
    a, b = _params(run_store, eager), _params(run_store, compiled)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4, msg=k)
    assert abs(eager["metrics"]["train/loss"] - compiled["metrics"]["train/loss"]) < 1e-4


def test_compile_auto_follows_the_measured_rule(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(machine, "_cxx_compiler", lambda: "g++")
    monkeypatch.delenv("VITREPRO_COMPILE", raising=False)
    rule = machine.resolve_compile
    long = machine.COMPILE_MIN_STEPS
    assert rule("auto", cpu, "bf16", "vit", long)
    assert not rule("auto", cpu, "bf16", "vit", long - 1)        # too short to pay back the compile
    assert not rule("auto", cpu, "fp32", "vit", long)            # measured slower compiled in fp32
    assert not rule("auto", cpu, "bf16", "hybrid", long)         # measured no faster
    assert not rule("auto", torch.device("cuda"), "bf16", "vit", long)
    assert rule("on", cpu, "fp32", "hybrid", 1) and not rule("off", cpu, "bf16", "vit", long)
    monkeypatch.setenv("VITREPRO_COMPILE", "0")
    assert not rule("auto", cpu, "bf16", "vit", long)
    monkeypatch.setattr(machine, "_cxx_compiler", lambda: None)
    monkeypatch.delenv("VITREPRO_COMPILE")
    assert not rule("auto", cpu, "bf16", "vit", long)


def test_identity_counts_epochs_into_steps_for_the_compile_rule(monkeypatch):
    """'auto' decides from the steps the run will take: epochs x whole batches of the training part."""
    seen = {}
    monkeypatch.setattr(train, "resolve_compile", lambda s, d, p, f, steps: seen.setdefault("steps", steps) > 0)
    cfg = TrainConfig.from_dict({**BASE, "steps": None, "epochs": 3.0, "val_fraction": 0.2})
    ident = train.resolved_identity(cfg)
    n = ident["data"]["digits:train"]["n"]
    assert seen["steps"] == 3 * (round(n * 0.8) // 32)


def test_sweep_eta_weighs_runs_by_their_work(tmp_path, monkeypatch):
    """The ETA scales the time so far by work left / work done (steps x batch x pixels), not by runs: after a
    422-step run took 10 s, two 3,438-step runs of the same shape are 163 s away (not 20 s), plus an average
    run's share for a run of unknown length."""
    import time

    from vitrepro.experiments import scaling, sweep
    from vitrepro.experiments.jobs import Job

    params = scaling.validate_params({"profile": "smoke", "runs_dir": str(tmp_path)})
    cfg = dict(model="ViT-Nano/4", dataset="digits", img_size=8, batch_size=32)
    short, longs = Job(dict(cfg, steps=422), "pretrain"), [Job(dict(cfg, steps=3438, seed=s), "pretrain") for s in (0, 1)]
    unknown = Job(dict(cfg, epochs=2), "pretrain")  # no steps: counted as the average known run
    sw = sweep._Sweep([short, *longs, unknown], params, log=lambda *_: None)
    assert sw.eta() == "ETA ?"
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now)
    sw.t_first_trained = now - 10.0
    sw.finish(short, short.config, {"status": "ok", "run_id": "a", "experiment": "e"}, was_trained=True)
    mean = (422 + 2 * 3438) / 3
    assert sw.eta() == f"ETA {sweep._fmt_s(10.0 * (2 * 3438 + mean) / 422)}"
    for job in (*longs, unknown):
        sw.finish(job, job.config, {"status": "ok", "run_id": "b", "experiment": "e"}, was_trained=False)
    assert sw.eta() == "done"


@pytest.mark.slow  # torch.compile in a spawned worker: ~80 s
@pytest.mark.skipif(machine._cxx_compiler() is None, reason="torch.compile on a CPU needs a C++ compiler")
def test_each_run_in_a_worker_is_compiled(run_store, monkeypatch):
    """A sweep worker trains many models in one process. Without a dynamo reset per run, every new model is a
    recompile of the same frame, and past dynamo's recompile limit (8; 1 here) a run silently trains eagerly
    while its record says compile=on: the cpu profile's position-embedding sweep did, from its 9th run on."""
    from torch._dynamo.utils import counters

    # dynamo's own patch, not monkeypatch: undoing a monkeypatched dynamo setting left it "does not exist"
    # for the compiled tests that ran after this one (benchmarks/tests/test_bench_sweep.py)
    with torch._dynamo.config.patch(recompile_limit=1):
        train.run({**BASE, "compile": "on"}, store=run_store, progress="none")
        counters.clear()
        other = train.run({**BASE, "compile": "on", "pos_embed": "2d", "pool": "gap"}, store=run_store, progress="none")
    assert other["resolved"]["compile"] is True
    assert counters["frames"]["ok"] > 0, dict(counters["frames"])  # its frames were compiled, not run eagerly


def test_sweep_eta_waits_for_the_longest_chain_left(tmp_path, monkeypatch):
    """Once fewer runs than workers are left, the end is the longest chain still to go at one worker's speed:
    three equal runs on 2 workers, the first two done in 100 s each: the third, just started, is 100 s away
    (the spread of work over 2 workers alone said 50 s); a fine-tune of 2 units waiting on it adds its 200 s.
    50 s later the chain is 50 s shorter, unless the spread (time so far x work left / work done: 75 s and
    225 s) is longer."""
    import time

    from vitrepro.experiments import scaling, sweep
    from vitrepro.experiments.jobs import Job

    params = scaling.validate_params({"profile": "smoke", "runs_dir": str(tmp_path)})
    cfg = dict(model="ViT-Nano/4", dataset="digits", img_size=8, batch_size=32, steps=100)
    runs = [Job(dict(cfg, seed=s), "pretrain") for s in range(3)]
    tune = Job(dict(cfg, steps=200, lr=0.1), "finetune", parent=runs[2])
    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    for jobs, first_eta, later_eta in ((runs, 100, 75), ([*runs, tune], 300, 250)):
        sw = sweep._Sweep(jobs, params, log=lambda *_: None)
        clock[0] = 1000.0
        sw.started(runs[0]), sw.started(runs[1])
        clock[0] = 1100.0
        for job in runs[:2]:
            sw.finish(job, job.config, {"status": "ok", "run_id": "a", "experiment": "e"}, was_trained=True)
        sw.started(runs[2])
        assert sw.eta() == f"ETA {sweep._fmt_s(first_eta)}", jobs
        clock[0] = 1150.0
        assert sw.eta() == f"ETA {sweep._fmt_s(later_eta)}"
