"""Notebooks as instruments (issue 26): every axis of the paper's experiments is a parameter that reaches the run
ids through the configuration, bad values fail before any run folder exists, the notebooks compare every pair
of what they trained, everything committed redraws from results/ alone, and the explorer runs headless."""
import filecmp
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_ids(mod, params) -> list[str]:
    """The run id of every pre-training job (fine-tunes take theirs from their parent's record)."""
    from vitrepro.experiments.sweep import run_threads
    from vitrepro.train import run_id_of

    return [run_id_of(dict(j.config), threads=run_threads(params)) for j in mod.jobs(params) if j.parent is None]


def _params(mod, tmp_path, **values):
    return mod.validate_params(dict(profile="smoke", runs_dir=str(tmp_path / "runs"), **values))


def test_scaling_models_and_steps_reach_the_run_ids(tmp_path):
    from vitrepro.experiments import scaling

    default = _run_ids(scaling, _params(scaling, tmp_path))
    vit_only = _run_ids(scaling, _params(scaling, tmp_path, models=["ViT-Nano/4"]))
    assert vit_only and set(vit_only) < set(default)  # the same computation: the same stored runs
    hybrid = _params(scaling, tmp_path, models=["R14x0.25+ViT-Nano/4"])
    assert {j.config["model"] for j in scaling.jobs(hybrid)} == {"R14x0.25+ViT-Nano/4"}
    budget = _params(scaling, tmp_path, steps=3)
    assert {j.config["steps"] for j in scaling.jobs(budget) if j.stage == "pretrain"} == {3}
    assert not set(_run_ids(scaling, budget)) & set(default)  # another budget: other runs
    sizes = _run_ids(scaling, _params(scaling, tmp_path, sizes=[40]))
    assert set(sizes) < set(default)


def test_position_embedding_axes_reach_the_run_ids(tmp_path):
    from vitrepro.experiments import position_embeddings as pe

    default = pe.jobs(_params(pe, tmp_path))
    chosen = _params(pe, tmp_path, pos_embeds=["1d", "2d"], placements=["stem"], poolings=["token"], seeds=1)
    jobs = pe.jobs(chosen)
    assert [(j.config["pos_embed"], j.config["pos_embed_at"]) for j in jobs] == [("1d", "stem"), ("2d", "stem")]
    assert set(_run_ids(pe, chosen)) < set(_run_ids(pe, _params(pe, tmp_path)))
    assert len(default) > len(jobs)
    gap = pe.jobs(_params(pe, tmp_path, pos_embeds=["none"], poolings=["token", "gap"]))
    assert {j.config.get("pool", "token") for j in gap} == {"token", "gap"}  # D.3 runs with two poolings
    other = _params(pe, tmp_path, model="ViT-Nano/4", train_examples=300, steps=2, pos_embeds=["2d"],
                    placements=["every_layer"], poolings=["gap"])
    cfgs = [j.config for j in pe.jobs(other)]
    assert [(c["model"], c["train_examples"], c["steps"], c["pos_embed_at"]) for c in cfgs] == \
        [("ViT-Nano/4", 300, 2, "every_layer")]
    assert not set(_run_ids(pe, other)) & set(_run_ids(pe, _params(pe, tmp_path)))


def test_transfer_and_attention_axes(tmp_path):
    from vitrepro.experiments import attention, transfer

    base = transfer.jobs(_params(transfer, tmp_path))
    no_scratch = transfer.jobs(_params(transfer, tmp_path, scratch=False))
    assert {j.stage for j in base} - {j.stage for j in no_scratch} == {"scratch"}
    jobs = transfer.jobs(_params(transfer, tmp_path, models=["ViT-Nano/2"], upstream_sizes=[100, 300],
                                 finetune_sizes=[8, 16]))
    assert {j.config["model"] for j in jobs} == {"ViT-Nano/2"}
    assert {j.config.get("train_examples") for j in jobs if j.stage == "pretrain"} == {100, 300}
    assert {j.config["img_size"] for j in jobs if j.stage == "finetune"} == {8, 16}
    a = attention.jobs(_params(attention, tmp_path, model="ViT-Nano/4"))
    assert [j.config["model"] for j in a] == ["ViT-Nano/4"]
    assert set(_run_ids(attention, _params(attention, tmp_path, model="ViT-Nano/4"))).isdisjoint(
        _run_ids(attention, _params(attention, tmp_path)))


BAD = [
    ("scaling", dict(models=["ViT-Huge/4"]), "models: unknown model name 'ViT-Huge/4'"),
    ("scaling", dict(models=[]), "models must be a non-empty list"),
    ("scaling", dict(models='["ViT-Nano/4", '), "not a JSON list"),
    ("scaling", dict(sizes=[-40]), "sizes must be a list of positive integers"),
    ("scaling", dict(steps=-1), "steps must be a positive integer"),
    ("position_embeddings", dict(pos_embeds=["3d"]), "pos_embeds: '3d' not one of 'none', '1d', '2d', 'relative'"),
    ("position_embeddings", dict(placements=[]), "placements must be a non-empty list"),
    ("position_embeddings", dict(poolings=["max"]), "poolings: 'max' not one of"),
    ("position_embeddings", dict(pos_embeds=["relative"], placements=["every_layer"]), "leave no defined variant"),
    ("position_embeddings", dict(model="BiT-R14x0.25"), "this notebook takes vit models"),
    ("position_embeddings", dict(train_examples=0), "train_examples must be a positive integer"),
    ("transfer", dict(models=["R14x0.25+ViT-Foo/4"]), "models: unknown model name"),
    ("transfer", dict(upstream_sizes=[0, 10]), "upstream_sizes must be a list of positive integers"),
    ("transfer", dict(downstream=[]), "downstream must be a non-empty list"),
    ("attention", dict(model="ViT-Nano/3x"), "model: unknown model name"),
    ("attention", dict(source="/no/such/results.csv"), "source='/no/such/results.csv'"),
]


@pytest.mark.parametrize("nb,values,message", BAD, ids=[f"{n}-{list(v)[0]}" for n, v, _ in BAD])
def test_bad_values_fail_before_any_run_folder(nb, values, message, tmp_path):
    from vitrepro.experiments import module
    from vitrepro.experiments.common import ParameterError

    with pytest.raises(ParameterError, match=re.escape(message)):
        _params(module(nb), tmp_path, **values)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("nb,values", [("scaling", dict(sizes=[40, 100000])),
                                       ("position_embeddings", dict(train_examples=100000))])
def test_a_size_larger_than_the_dataset_fails_before_any_run_folder(nb, values, tmp_path):
    from vitrepro.experiments import module
    from vitrepro.experiments.common import PreflightError

    mod = module(nb)
    with pytest.raises(PreflightError, match="100000 of 'digits', which has only"):
        mod.run(_params(mod, tmp_path, **values))
    assert not (tmp_path / "runs").exists()


def test_pair_verdicts_follow_the_report_rules():
    import numpy as np

    from vitrepro.verdicts import BELOW, pair_verdict, pairwise

    a, b = np.array([0.80, 0.81, 0.82]), np.array([0.70, 0.71, 0.72])
    assert pair_verdict(a, b, ("1-D", "2-D"))["verdict"] == "1-D above 2-D"
    assert pair_verdict(b, a, ("1-D", "2-D"))["verdict"] == "2-D above 1-D"
    tight = np.array([0.800, 0.801, 0.802])
    same = pair_verdict(tight, tight + np.array([0.0005, -0.0005, 0.0]), ("1-D", "2-D"))
    assert same["verdict"] == "alike within ±1 pp" and same["90% interval (pp)"].startswith("[")
    flagged = pair_verdict(a, b, ("1-D", "2-D"), base=0.9)
    assert flagged["verdict"] == "1-D above 2-D" and flagged["flag"].startswith(BELOW)  # flagged beside it
    assert pair_verdict(a, b, ("1-D", "2-D"), base=0.5)["flag"] == ""
    assert pair_verdict(a[:2], b[:2], ("1-D", "2-D"))["verdict"].startswith("too few seeds")
    noisy = pair_verdict(np.array([0.7, 0.8, 0.9]), np.array([0.72, 0.85, 0.8]), ("x", "y"))
    assert noisy["verdict"] == "inconclusive"
    assert len(pairwise({"a": a, "b": b, "c": a, "d": np.zeros(0)})) == 3  # every pair of what was trained


def test_one_table_for_two_variants():
    """A user who trains only 1-D and 2-D gets one row per metric: their difference, interval and verdict."""
    from vitrepro.verdicts import position_embedding_pairs

    df = pd.read_csv(ROOT / "results" / "position_embeddings" / "results.csv")
    two = df[(df.stage == "baseline") | (df.pos_embed.isin(["1d", "2d"]) & (df.pos_embed_at == "stem"))]
    tables = position_embedding_pairs(two)
    assert len(tables) == 2 and all(len(t) == 1 for t in tables.values())
    row = next(iter(tables.values())).iloc[0]
    assert (row.A, row.B) == ("1-D, stem", "2-D, stem") and row.verdict


@pytest.mark.slow
def test_redraw_from_results_alone_is_reproducible(tmp_path):
    """`make figures` (report --redraw) rebuilds every committed table, figure and REPORT.md from results/ with
    no run store: byte-identical to what is committed (a redraw of unchanged results leaves git clean)."""
    from vitrepro import report

    copy = tmp_path / "results"
    shutil.copytree(ROOT / "results", copy)
    report.main(["--results", str(copy), "--redraw"])
    cmp = filecmp.dircmp(ROOT / "results", copy)
    changed = cmp.diff_files + [f"{d}/{f}" for d, sub in cmp.subdirs.items() for f in sub.diff_files]
    assert not changed, f"redraw changed {changed}: commit the redraw (`make figures`)"
    assert not (tmp_path / "runs").exists()


def _papermill(nb, out, tmp_path, **params):
    import papermill as pm

    values = dict(profile="smoke", results_dir=str(tmp_path / "results" / nb), runs_dir=str(tmp_path / "runs"))
    return pm.execute_notebook(str(ROOT / "notebooks" / f"{nb}.ipynb"), str(out), parameters={**values, **params},
                               kernel_name="python3", progress_bar=False, cwd=str(ROOT))


@pytest.mark.slow
def test_scaling_models_through_papermill(tmp_path):
    """`-p models '["ViT-Nano/4", "R14x0.25+ViT-Nano/4", "BiT-R14x0.25"]'` (papermill passes the JSON text):
    exactly those models are trained, and every pair of them is compared per pre-training size."""
    _papermill("scaling", tmp_path / "out.ipynb", tmp_path, models='["ViT-Nano/4", "R14x0.25+ViT-Nano/4", "BiT-R14x0.25"]',
               sizes=[1200])
    df = pd.read_csv(tmp_path / "results" / "scaling" / "results.csv")
    assert set(df[df.stage == "pretrain"].model) == {"ViT-Nano/4", "R14x0.25+ViT-Nano/4", "BiT-R14x0.25"}
    md = (tmp_path / "results" / "scaling" / "tables.md").read_text()
    assert "Every pair of the models trained" in md and "R14x0.25+ViT-Nano/4" in md


@pytest.mark.slow
def test_unknown_model_rejected_through_papermill(tmp_path):
    import papermill as pm

    with pytest.raises(pm.PapermillExecutionError, match=r"models: unknown model name 'ViT-Nano/4x'.*Expected ViT-"):
        _papermill("scaling", tmp_path / "bad.ipynb", tmp_path, models='["ViT-Nano/4x", "BiT-R14x0.25"]')
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_explorer_cell_headless_and_redraw_without_run_store(tmp_path):
    """The position-embedding notebook with only 1-D and 2-D: the explorer cell leaves a static figure under
    papermill; then `source=<its results>` redraws every table and figure (similarity grids from similarity.csv)
    with no run store."""
    import nbformat

    out = tmp_path / "pe.ipynb"
    _papermill("position_embeddings", out, tmp_path, pos_embeds='["1d", "2d"]', placements='["stem"]',
               poolings='["token"]', seeds=3)
    nb = nbformat.read(out, as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and "explorer.explore(" in c.source)
    assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.outputs
    first = tmp_path / "results" / "position_embeddings"
    assert (first / "similarity.csv").exists()
    md = (first / "tables.md").read_text()
    assert "Every pair of the variants trained" in md and "1-D, stem" in md
    redrawn = tmp_path / "redrawn"
    _papermill("position_embeddings", tmp_path / "redraw.ipynb", tmp_path, source=str(first),
               results_dir=str(redrawn), runs_dir=str(tmp_path / "no_runs"))
    assert not (tmp_path / "no_runs").exists()
    assert (redrawn / "tables.md").read_text() == md
    assert {p.name for p in first.glob("*.png")} == {p.name for p in redrawn.glob("*.png")}
    assert "fig7_position_similarity_2d.png" in {p.name for p in redrawn.glob("*.png")}
