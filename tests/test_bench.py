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
        for impl in ("vitrepro", "timm"):
            assert r[impl]["images_per_s"] > 0
            assert 0 < r[impl]["fraction_of_peak"]
        assert r["ratio_of_medians"] == pytest.approx(r["vitrepro"]["images_per_s"] / r["timm"]["images_per_s"])
        assert r["ratio"] > 0 and len(r["repeat_ratios"]) == r["repeats"]
        assert r["flops_per_image"] > 0 and r["train_flops_per_image"] == 3 * r["flops_per_image"]
        # timm runs the whole architecture; ours runs the last block for the class token only
        assert r["executed_flops_per_image"]["timm"] == r["flops_per_image"]
        assert 0 < r["executed_flops_per_image"]["vitrepro"] < r["flops_per_image"]
        assert 0 <= r["data"]["wait_fraction"] < 1 and r["data"]["dataset"] == "digits"
    md = (out / "cpu.md").read_text()
    assert ("| model | precision | batch | vitrepro img/s | timm img/s | ratio | GFLOP/s | % of peak | "
            "timm % of peak | data-wait % |") in md
    assert md.count("| ViT-Nano/7 @14px×1 |") == 2
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries
