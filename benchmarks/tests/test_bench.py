"""python -m benchmarks.bench --quick: runs in seconds and writes the JSON and Markdown reports; no timing thresholds,
but every derived number (medians, ratios, FLOP/s, % of peak, table cells) is recomputed from the measured fields."""
import json

import pytest

pytest.importorskip("timm")

from benchmarks import bench  # noqa: E402


def test_parse_model_spec():
    c = bench.parse_model_spec("ViT-Nano/7:28:1:128")
    assert (c.model, c.img_size, c.in_chans, c.batch) == ("ViT-Nano/7", 28, 1, 128)
    assert bench.parse_model_spec("ViT-B/16").img_size == 224
    assert bench.parse_model_spec("ViT-Nano/7:28:1:128", batch_override=4).batch == 4
    for bad in ("", "ViT-Nano/7:x", "ViT-Nano/7:28:2", "ViT-Nano/7:28:1:0", "a:1:1:1:1"):
        with pytest.raises(ValueError):
            bench.parse_model_spec(bad)


def test_identical_configuration_to_timm():
    import torch
    ours, theirs, check = bench.build_pair(bench.BenchConfig("ViT-Nano/7", 14, 1, 2), torch.device("cpu"))
    assert check["params"] == check["timm_params"] == sum(p.numel() for p in theirs.parameters())
    assert check["max_logit_diff_fp32"] < 1e-4


def test_same_gradients_as_timm():
    """The speed-ups in vitrepro's ViT (patch embedding as a matmul, final norm on the class token only)
    leave the training step numerically equal to timm's."""
    import torch
    import torch.nn.functional as F
    ours, theirs, _ = bench.build_pair(bench.BenchConfig("ViT-Nano/7", 28, 1, 4), torch.device("cpu"))
    x, y = torch.rand(4, 1, 28, 28) * 2 - 1, torch.tensor([0, 3, 5, 9])
    for m in (ours, theirs):
        F.cross_entropy(m(x), y).backward()
    g_theirs = {k: p.grad for k, p in theirs.named_parameters()}
    for k, p in ours.named_parameters():
        ref = g_theirs[k.replace("pos_embed.table", "pos_embed")]
        assert torch.allclose(p.grad, ref, rtol=1e-4, atol=1e-6), k


def _counted_flops(model, x, train: bool) -> float:
    """FLOPs per image by torch's own counter (matmuls, convolutions): a forward, or a training step."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        if train:
            F.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long)).backward()
        else:
            with torch.no_grad():
                model(x)
    return counter.get_total_flops() / len(x)


def test_quick_run_writes_reports(tmp_path):
    """Every derived number in the report recomputed from the report's own measured fields (a wrong formula,
    unit or field fails), the FLOPs per image against torch's FLOP counter, the table against the JSON."""
    import statistics

    import torch
    out = tmp_path / "bench"
    rc = bench.main(["--quick", "--devices", "cpu", "--threads", "1", "--dataset", "digits",
                     "--models", "ViT-Nano/7:14:1:8", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "cpu.json").read_text())
    m = res["machine"]
    for key in ("cpu", "cpu_count", "torch_threads", "cpu_flags", "cpu_bf16_native", "torch", "timm"):
        assert key in m
    assert m["torch_threads"] == 1
    if m["cpu_flags"]:
        assert m["cpu_bf16_native"] == bool(m["cpu_flags"]["avx512_bf16"] or m["cpu_flags"]["amx_bf16"])
    assert set(res["peak"]) == {"fp32", "bf16"}
    peak = {}
    for prec, p in res["peak"].items():  # the peak used is the best of all the run's measurements
        assert p["flops_per_s"] == max([p["start_flops_per_s"], *p["between_flops_per_s"], p["end_flops_per_s"]])
        peak[prec] = p["flops_per_s"]
    rows = {r["precision"]: r for r in res["rows"]}
    assert set(rows) == {"fp32", "bf16"}

    # FLOPs per image: timm's explicit-attention twin runs every token through every block; ours (executed)
    # runs the last block for the class token only. torch's counter does not see CPU SDPA, hence unfused.
    ours, theirs, _ = bench.build_pair(bench.BenchConfig("ViT-Nano/7", 14, 1, 8), torch.device("cpu"))
    x = torch.rand(8, 1, 14, 14) * 2 - 1
    unfused = bench._timm_unfused(theirs)
    arch_flops, ours_flops = _counted_flops(unfused, x, False), _counted_flops(ours, x, False)
    train_flops = _counted_flops(unfused, x, True)

    close = dict(rel=1e-9)
    md = (out / "cpu.md").read_text()
    header = ("| model | precision | batch | vitrepro img/s | timm img/s | ratio | timm unfused img/s | "
              "ratio to faster timm | GFLOP/s | % of peak | timm % of peak | matmul % of step | "
              "matmul-only % of peak | data-wait % |")
    assert header in md
    columns = [c.strip() for c in header.strip("|").split("|")]
    table = {}
    for line in md.splitlines():
        if line.startswith("| ViT-Nano/7 @14px×1 |"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            table[cells[1]] = dict(zip(columns, cells))
    assert set(table) == {"fp32", "bf16"}
    for prec, r in rows.items():
        assert "error" not in r and "skipped" not in r, r
        assert r["model"] == "ViT-Nano/7" and r["batch"] == 8 and r["in_chans"] == 1
        assert r["flops_per_image"] == arch_flops
        assert r["executed_flops_per_image"] == {"vitrepro": ours_flops, "timm": arch_flops, "timm_unfused": arch_flops}
        assert ours_flops < arch_flops
        # forward + backward of a real step: 3 forwards but for the patch embedding's input gradient (< 1.5%)
        assert r["train_flops_per_image"] == pytest.approx(train_flops, rel=0.015)
        reps = {}
        for impl in ("vitrepro", "timm", "timm_unfused"):
            t = r[impl]
            reps[impl] = t["repeat_images_per_s"]
            assert len(reps[impl]) == r["repeats"] and min(reps[impl]) > 0
            assert t["images_per_s"] == pytest.approx(statistics.median(reps[impl]), **close)
            assert t["step_ms"] == pytest.approx(1e3 * r["batch"] / t["images_per_s"], **close)
            executed = r["executed_flops_per_image"][impl]
            assert t["flops_per_s"] == pytest.approx(3 * executed * t["images_per_s"], **close)
            assert t["fraction_of_peak"] == pytest.approx(t["flops_per_s"] / peak[prec], **close)
        paired = [a / b for a, b in zip(reps["vitrepro"], reps["timm"])]
        assert r["repeat_ratios"] == pytest.approx(paired, **close)
        assert r["ratio"] == pytest.approx(statistics.median(paired), **close)
        medians = r["vitrepro"]["images_per_s"] / r["timm"]["images_per_s"]
        assert r["ratio_of_medians"] == pytest.approx(medians, **close)
        best = [a / max(b, c) for a, b, c in zip(reps["vitrepro"], reps["timm"], reps["timm_unfused"])]
        assert r["ratio_vs_best_timm"] == pytest.approx(statistics.median(best), **close)
        mm = r["matmuls"]
        assert mm["matmul_s"] > 0 and mm["matmul_s"] == pytest.approx(sum(mm["per_op_s"].values()), **close)
        assert {"addmm", "mm"} <= set(mm["per_op_s"])
        assert ("bfloat16" if prec == "bf16" else "float32") in mm["dtypes"]
        step_s = r["batch"] / r["vitrepro"]["images_per_s"]
        assert mm["share_of_step"] == pytest.approx(mm["matmul_s"] / step_s, **close)
        assert mm["ceiling_flops_per_s"] == pytest.approx(3 * ours_flops * r["batch"] / mm["matmul_s"], **close)
        assert mm["ceiling_fraction_of_peak"] == pytest.approx(mm["ceiling_flops_per_s"] / peak[prec], **close)
        d = r["data"]
        assert d["dataset"] == "digits" and d["batch"] == 8
        assert 0 <= d["wait_fraction"] < 1
        assert d["wait_fraction"] == pytest.approx(d["fetch_ms"] / d["step_ms"], rel=1e-6)
        # the Markdown row says what the JSON says
        row = table[prec]
        assert row["batch"] == "8"
        assert float(row["ratio"]) == pytest.approx(r["ratio"], abs=5e-4)
        assert float(row["ratio to faster timm"]) == pytest.approx(r["ratio_vs_best_timm"], abs=5e-4)
        assert float(row["GFLOP/s"]) == pytest.approx(r["vitrepro"]["flops_per_s"] / 1e9, abs=0.05)
        assert float(row["% of peak"]) == pytest.approx(100 * r["vitrepro"]["fraction_of_peak"], abs=0.05)
        assert float(row["timm % of peak"]) == pytest.approx(100 * r["timm"]["fraction_of_peak"], abs=0.05)
        assert float(row["matmul % of step"]) == pytest.approx(100 * mm["share_of_step"], abs=0.05)
        assert float(row["matmul-only % of peak"]) == pytest.approx(100 * mm["ceiling_fraction_of_peak"], abs=0.05)
        assert float(row["data-wait %"]) == pytest.approx(100 * d["wait_fraction"], abs=0.05)
        for col, impl in (("vitrepro img/s", "vitrepro"), ("timm img/s", "timm"),
                          ("timm unfused img/s", "timm_unfused")):
            assert float(row[col]) == pytest.approx(r[impl]["images_per_s"], rel=6e-3)  # 3 significant digits
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_capture_matmuls_records_forward_and_backward_kernels():
    """The recorder sees the kernels after autocast picked their dtype, in the backward pass too, and the
    replay runs each recorded call on tensors of the recorded layout."""
    import torch
    import torch.nn as nn
    lin = nn.Linear(8, 4)
    with torch.no_grad():
        calls = bench.capture_matmuls(lambda: lin(torch.randn(3, 8)))
    assert [(c["op"], c["count"]) for c in calls] == [("addmm", 1)]
    assert [a.size for a in calls[0]["args"]] == [(4,), (3, 8), (8, 4)]
    assert calls[0]["args"][2].stride == (1, 8)  # the transposed weight, as nn.Linear passes it

    cfg = bench.BenchConfig("ViT-Nano/7", 14, 1, 4)
    ours, _, _ = bench.build_pair(cfg, torch.device("cpu"))
    opt = bench.make_optimizer(ours)
    x, y = torch.rand(4, 1, 14, 14) * 2 - 1, torch.tensor([0, 1, 2, 3])
    calls = bench.capture_matmuls(lambda: bench.train_step(ours, opt, x, y, torch.bfloat16, "cpu"))
    ops = {}
    for c in calls:
        ops[c["op"]] = ops.get(c["op"], 0) + c["count"]
    n_linear = sum(isinstance(m, nn.Linear) for m in ours.modules())
    assert ops["addmm"] >= n_linear - 1  # every linear layer's forward (the patch embedding may be a plain mm)
    assert ops["mm"] >= n_linear  # at least the weight gradient of each
    # On the CPU attention is explicit (vit.attend): per block 2 batched matmuls forward, 4 backward.
    assert ops["bmm"] >= 6 * len(ours.blocks)
    assert all(c["args"][1].dtype == torch.bfloat16 for c in calls if c["op"] == "addmm")
    t = bench.time_matmuls(calls, torch.device("cpu"), min_time=0.0, repeats=1)
    assert t["calls"] == sum(ops.values()) and t["matmul_s"] > 0
    assert t["matmul_s"] == pytest.approx(sum(t["per_op_s"].values()))
