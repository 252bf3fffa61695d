"""Sweep throughput (issue 12): the trainer's torch.compile setting and the sweep benchmark's layouts.

* a compiled run trains the same model as an eager one (fp32, a few steps, tolerance 1e-4) and has its own
  run id (compiled kernels round differently);
* ``compile='auto'`` compiles exactly the runs the measured rule names (CPU, bf16, ViT, long enough);
* the benchmark's stacked layout computes S separate trainings (fp32, against each model trained alone
  with torch's own clip_grad_norm_ and AdamW), so its throughput is that of a correct computation;
* the sweep benchmark's aggregate numbers follow from its own fields.
"""
from __future__ import annotations

import copy

import pytest
import torch

from vitrepro import bench_sweep, machine, train
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


@pytest.mark.parametrize("compiled", [False, True])
def test_stacked_step_equals_separate_training(compiled):
    """The benchmark's stacked layouts (vmapped, and vmapped through torch.compile): S models in one step ==
    each trained alone (fp32)."""
    spec = bench_sweep.SweepSpec("ViT-Nano/7", img_size=14, batch=16, precision="fp32", dataset="digits",
                                 augment="none")
    from vitrepro.data import load_arrays
    arrays = load_arrays("digits", "train")
    parts = [bench_sweep._job(spec, seed, arrays) for seed in (0, 1)]
    alone = [(copy.deepcopy(m), copy.deepcopy(b)) for m, _, b in parts]
    stacked = bench_sweep._Stacked([m for m, _, _ in parts], spec, [b for _, _, b in parts], compile=compiled)
    for _ in range(3):
        stacked.step(None)
    for i, (model, batches) in enumerate(alone):
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n and "cls" not in n]
        rest = [p for p in model.parameters() if all(p is not q for q in decay)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                                lr=spec.lr)
        for _ in range(3):
            bench_sweep._single_step(model, model, opt, batches, None)
        for name, p in model.named_parameters():
            got, want = stacked.params[name][i].detach(), p.detach()
            if name.endswith("attn.qkv.bias"):
                # the key bias has a zero gradient in exact arithmetic (softmax ignores a constant added to
                # every score), so Adam turns rounding noise into lr-sized steps: compare it to 3 steps of lr
                d = want.shape[0] // 3
                torch.testing.assert_close(got[d:2 * d], want[d:2 * d], rtol=0, atol=3 * spec.lr, msg=name)
                got, want = torch.cat([got[:d], got[2 * d:]]), torch.cat([want[:d], want[2 * d:]])
            # Adam turns the rounding of a near-zero gradient into a step of up to ~lr: 5% of lr for single
            # elements. Compiled, inductor reorders the sums; eager, the vmapped (batched) matmul kernels round
            # differently from one model's on some CPUs (AVX2: 1 element of 12,288 off by 3.6e-5, lr 2e-3)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=0.05 * spec.lr, msg=lambda m: f"{name}: {m}")
            if not compiled:  # and only single elements: all but 1% as close as fp32 rounding allows
                assert ((got - want).abs() > 1e-5).float().mean() < 0.01, name


def test_sweep_benchmark_numbers_follow_from_its_fields():
    spec = bench_sweep.SweepSpec("ViT-Nano/7", jobs=2, img_size=14, batch=16, precision="fp32", dataset="digits",
                                 augment="crop_flip", steps=2, warmup=1)
    chosen = [bench_sweep.Layout("pool", 2, 1, False, 1), bench_sweep.Layout("pool+stack", 1, 1, False, 2)]
    result = bench_sweep.run_sweep([spec], chosen, log=lambda *_: None, peak_sizes=(64, 128))
    rows = result["rows"]
    assert [r["layout"]["name"] for r in rows] == ["pool", "pool+stack"]
    for r in rows:
        assert r["images"] == spec.jobs * spec.steps * spec.batch
        assert r["images_per_s"] == pytest.approx(r["images"] / r["timed_s"], rel=1e-9)
        assert r["ratio"] == pytest.approx(r["images_per_s"] / rows[0]["images_per_s"])
        flops = bench_sweep._executed_flops(spec)
        assert r["fraction_of_peak"] == pytest.approx(
            3 * flops * r["images_per_s"] / result["peaks"]["fp32"]["flops_per_s"])
    md = bench_sweep.sweep_markdown(result, "test")
    assert "| ViT-Nano/7 | pool+stack | 1 x 1 | 2 |" in md


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


@pytest.mark.skipif(machine._cxx_compiler() is None, reason="torch.compile on a CPU needs a C++ compiler")
def test_each_run_in_a_worker_is_compiled(run_store, monkeypatch):
    """A sweep worker trains many models in one process. Without a dynamo reset per run, every new model is a
    recompile of the same frame, and past dynamo's recompile limit (8; 1 here) a run silently trains eagerly
    while its record says compile=on: the cpu profile's position-embedding sweep did, from its 9th run on."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    train.run({**BASE, "compile": "on"}, store=run_store, progress="none")
    counters.clear()
    other = train.run({**BASE, "compile": "on", "pos_embed": "2d", "pool": "gap"}, store=run_store, progress="none")
    assert other["resolved"]["compile"] is True
    assert counters["frames"]["ok"] > 0, dict(counters["frames"])  # its frames were compiled, not run eagerly


def test_sweep_benchmark_measures_the_precision_the_trainer_would_pick(monkeypatch):
    """No --precisions: what ``precision="auto"`` resolves to on this CPU (fp32 where bf16 is emulated);
    one named precision: that one; two: refused before any measurement (a sweep has one precision)."""
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(machine, "_cpu_flags", lambda native=native: {"avx512_bf16"} if native else {"avx2"})
        assert bench_sweep._sweep_precision(None) == want == machine.resolve_precision("auto", torch.device("cpu"))
    assert bench_sweep._sweep_precision(["bf16"]) == "bf16"
    with pytest.raises(SystemExit, match="one precision"):
        bench_sweep._sweep_precision(["fp32", "bf16"])


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
