"""Every reproduction notebook runs end to end with profile=smoke through papermill."""
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["scaling", "position_embeddings", "transfer", "attention"]
CANARY = "scaling"  # the one notebook smoke run of the default tier (`make test`); the others: `make test-slow`
EXPECTED_FIGURES = {
    "scaling": {"fig3_finetune_vs_data.png", "fig4_fewshot_vs_data.png", "fig5_accuracy_vs_compute.png"},
    "position_embeddings": {"table8_position_embeddings.png", "d3_token_vs_gap.png",
                            "fig7_position_similarity_1d.png"},
    "transfer": {"table5_transfer.png"},
    "attention": {"fig7_left_filters.png", "fig7_centre_position_similarity.png", "fig6_attention_rollout.png",
                  "fig7_right_attention_distance.png"},
}


def _papermill(nb, out, params, tmp_path):
    import papermill as pm

    env_runs = str(tmp_path / "runs")
    return pm.execute_notebook(str(ROOT / "notebooks" / f"{nb}.ipynb"), str(out),
                               parameters=dict(profile="smoke", results_dir=str(tmp_path / "results" / nb),
                                               runs_dir=env_runs, **params),
                               kernel_name="python3", progress_bar=False, cwd=str(ROOT))


@pytest.mark.parametrize("nb", [nb if nb == CANARY else pytest.param(nb, marks=pytest.mark.slow) for nb in NOTEBOOKS])
def test_notebook_smoke(nb, tmp_path):
    out = tmp_path / f"{nb}.out.ipynb"
    _papermill(nb, out, {}, tmp_path)
    res = tmp_path / "results" / nb
    assert (res / "results.csv").exists() and (res / "tables.md").exists()
    import pandas as pd

    df = pd.read_csv(res / "results.csv")
    assert len(df) > 0 and {"run_id", "metric", "value"} <= set(df.columns)
    assert df["value"].notna().all()
    pngs = {p.name for p in res.glob("*.png")}
    assert EXPECTED_FIGURES[nb] <= pngs, pngs
    # the report builds from these files
    from vitrepro import report

    (tmp_path / "results" / "timings_smoke.json").write_text('{"%s": 12.5}' % nb)
    text = report.build_report(tmp_path / "results")
    assert "### Claims" in text
    summary = text.split("## Summary", 1)[1].split("\n## ", 1)[0]
    assert f"| `{nb}` |" in summary and f"{nb} 12 s" in summary  # every claim's verdict, and the wall time


def test_misspelled_parameter_fails_before_compute(tmp_path):
    import papermill as pm

    with pytest.raises(pm.PapermillExecutionError, match="did you mean 'profile'"):
        _papermill("scaling", tmp_path / "bad.ipynb", {"profil": "cpu"}, tmp_path)
    assert not (tmp_path / "runs").exists()  # nothing was trained


def test_bad_parameter_values():
    from vitrepro.experiments import position_embeddings, scaling, transfer
    from vitrepro.experiments.common import ParameterError

    with pytest.raises(ParameterError, match="profile"):
        scaling.validate_params({"profile": "laptop"})
    with pytest.raises(ParameterError, match="seeds"):
        scaling.validate_params({"profile": "smoke", "seeds": 0})
    with pytest.raises(Exception, match="no_such_dataset"):
        position_embeddings.validate_params({"profile": "smoke", "dataset": "no_such_dataset"})
    with pytest.raises(ParameterError, match="pretrained_model"):
        transfer.validate_params({"profile": "smoke", "pretrained": "/tmp/weights.pth"})


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_notebooks_paired_and_clean(nb):
    """Committed notebooks carry no outputs and match their jupytext py:percent twin."""
    import jupytext

    ipynb = nbformat.read(ROOT / "notebooks" / f"{nb}.ipynb", as_version=4)
    for cell in ipynb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None
    assert ipynb.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent"
    py = jupytext.read(ROOT / "notebooks" / f"{nb}.py")
    assert [c.source for c in py.cells] == [c.source for c in ipynb.cells]
    params = [c for c in ipynb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    for line in params[0].source.splitlines():
        assert "#" in line, f"undocumented parameter line: {line}"
    # papermill --help-notebook shows each one, and they are exactly the experiment's parameters
    import dataclasses

    from papermill.translators import PythonTranslator

    from vitrepro.experiments import module

    inspected = PythonTranslator.inspect(params[0])
    assert all(p.help for p in inspected)
    assert [p.name for p in inspected] == [f.name for f in dataclasses.fields(module(nb).Params)] or \
        {p.name for p in inspected} == {f.name for f in dataclasses.fields(module(nb).Params)}


def test_transfer_finetunes_released_weights_file(tmp_path):
    """`pretrained=` a timm state-dict file: the paper's recipe fine-tunes it (smoke: digits, 32 px)."""
    import timm
    import torch

    from vitrepro.experiments import transfer

    torch.manual_seed(0)
    path = tmp_path / "vit_tiny.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), path)
    params = transfer.validate_params(dict(profile="smoke", pretrained=str(path), pretrained_model="ViT-Ti/16",
                                           runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "res")))
    df = transfer.run(params)
    models = df[df.stage != "baseline"]  # the pixel baseline of the downstream set comes along (stage baseline)
    assert set(models.stage) == {"finetune"} and set(models.metric) == {"top1"}
    assert set(df[df.stage == "baseline"].model) == {"pixels: logistic regression"}
    assert (models.img_size == 32).all() and df.value.between(0, 1).all()
