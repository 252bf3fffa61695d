"""The sweep benchmark (benchmarks/bench_sweep.py, moved from tests/test_sweep_speed.py with it):

* its stacked layout computes S separate trainings (fp32, against each model trained alone with torch's
  own clip_grad_norm_ and AdamW), so its throughput is that of a correct computation;
* its aggregate numbers follow from its own fields; it measures the precision the trainer would pick.
"""
from __future__ import annotations

import copy

import pytest
import torch

from benchmarks import bench_sweep
from vitrepro import machine

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py (benchmarks/tests/conftest.py)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])  # compiled: ~50 s
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


@pytest.mark.slow  # a spawned pool and the peak measurement: ~45 s
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


def test_sweep_benchmark_measures_the_precision_the_trainer_would_pick(monkeypatch):
    """No --precisions: what ``precision="auto"`` resolves to on this CPU (fp32 where bf16 is emulated);
    one named precision: that one; two: refused before any measurement (a sweep has one precision)."""
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(machine, "_cpu_flags", lambda native=native: {"avx512_bf16"} if native else {"avx2"})
        assert bench_sweep._sweep_precision(None) == want == machine.resolve_precision("auto", torch.device("cpu"))
    assert bench_sweep._sweep_precision(["bf16"]) == "bf16"
    with pytest.raises(SystemExit, match="one precision"):
        bench_sweep._sweep_precision(["fp32", "bf16"])
