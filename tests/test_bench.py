"""python -m vitrepro.bench --quick: runs in seconds and writes the JSON and Markdown reports (no timing checks)."""
import json

import pytest

pytest.importorskip("timm")

from vitrepro import bench  # noqa: E402


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


def test_quick_run_writes_reports(tmp_path):
    out = tmp_path / "bench"
    rc = bench.main(["--quick", "--devices", "cpu", "--threads", "1", "--dataset", "digits",
                     "--models", "ViT-Nano/7:14:1:8", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "cpu.json").read_text())
    m = res["machine"]
    for key in ("cpu", "cpu_count", "torch_threads", "cpu_flags", "cpu_bf16_native", "torch", "timm"):
        assert key in m
    assert m["torch_threads"] == 1
    assert set(res["peak"]) == {"fp32", "bf16"}
    assert all(p["flops_per_s"] > 0 for p in res["peak"].values())
    rows = {r["precision"]: r for r in res["rows"]}
    assert set(rows) == {"fp32", "bf16"}
    for r in rows.values():
        assert "error" not in r and "skipped" not in r, r
        assert r["model"] == "ViT-Nano/7" and r["batch"] == 8 and r["in_chans"] == 1
        for impl in ("vitrepro", "timm", "timm_unfused"):
            assert r[impl]["images_per_s"] > 0
            assert 0 < r[impl]["fraction_of_peak"]
        faster = [max(a, b) for a, b in zip(r["timm"]["repeat_images_per_s"], r["timm_unfused"]["repeat_images_per_s"])]
        assert r["ratio_vs_best_timm"] <= r["ratio"] + 1e-9
        assert min(r["vitrepro"]["repeat_images_per_s"][i] / faster[i] for i in range(r["repeats"])) \
            <= r["ratio_vs_best_timm"] <= max(r["vitrepro"]["repeat_images_per_s"][i] / faster[i] for i in range(r["repeats"]))
        assert r["ratio_of_medians"] == pytest.approx(r["vitrepro"]["images_per_s"] / r["timm"]["images_per_s"])
        assert r["ratio"] > 0 and len(r["repeat_ratios"]) == r["repeats"]
        assert r["flops_per_image"] > 0 and r["train_flops_per_image"] == 3 * r["flops_per_image"]
        # timm runs the whole architecture; ours runs the last block for the class token only
        assert r["executed_flops_per_image"]["timm"] == r["flops_per_image"]
        assert 0 < r["executed_flops_per_image"]["vitrepro"] < r["flops_per_image"]
        assert 0 <= r["data"]["wait_fraction"] < 1 and r["data"]["dataset"] == "digits"
        mm = r["matmuls"]
        assert mm["matmul_s"] > 0 and mm["share_of_step"] > 0 and mm["ceiling_fraction_of_peak"] > 0
        assert {"addmm", "mm"} <= set(mm["per_op_s"])
        assert ("bfloat16" if r["precision"] == "bf16" else "float32") in mm["dtypes"]
    md = (out / "cpu.md").read_text()
    assert ("| model | precision | batch | vitrepro img/s | timm img/s | ratio | timm unfused img/s | "
            "ratio to faster timm | GFLOP/s | % of peak | timm % of peak | matmul % of step | "
            "matmul-only % of peak | data-wait % |") in md
    assert md.count("| ViT-Nano/7 @14px×1 |") == 2
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
