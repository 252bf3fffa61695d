"""Recipes chosen on validation only, verdict statistics that mean something, baselines on the models'
splits, and cpu-profile designs that share their runs (issue 13)."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vitrepro import stats, verdicts
from vitrepro.experiments import recipes, select

EXPERIMENTS = Path(__file__).resolve().parents[1] / "vitrepro" / "experiments"


# ------------------------------------------------------------------------- selection on validation
def test_selection_refuses_test_metrics():
    rows = [{"lr": 1e-3, "acc/fashion_mnist/test": 0.9, "acc/fashion_mnist/val": 0.8},
            {"lr": 2e-3, "acc/fashion_mnist/test": 0.7, "acc/fashion_mnist/val": 0.85}]
    for metric in ("acc/fashion_mnist/test", "top1", "fewshot/mnist/5shot", "train/loss"):
        with pytest.raises(select.SelectionError, match="never on test|not a validation"):
            select.best(rows, metric, ["lr"])
    # the validation metric picks 2e-3 although test would have picked 1e-3
    assert select.best(rows, "acc/fashion_mnist/val", ["lr"]) == {"lr": 2e-3}


def test_selection_averages_seeds_before_choosing():
    rows = [{"lr": 1, "top1_val": v} for v in (0.9, 0.5, 0.5)] + [{"lr": 2, "top1_val": v} for v in (0.7, 0.7, 0.7)]
    assert select.best(rows, "top1_val", ["lr"]) == {"lr": 2}


def test_a_budget_search_takes_the_cheapest_point_within_one_standard_error():
    def rows(vals, n=800):
        return [{"steps": s, "augment": "crop", "acc/mnist/val": v, "val_n": n} for s, v in zip((500, 1000, 2000), vals)]

    keys = ["steps", "augment"]
    # best 0.98 on 800 images: se = sqrt(.98 * .02 / 800) = 0.0049; 0.976 is within it, 0.97 is not
    assert select.cheapest_within_one_se(rows((0.90, 0.976, 0.98)), "acc/mnist/val", keys, "steps")["steps"] == 1000
    assert select.cheapest_within_one_se(rows((0.90, 0.970, 0.98)), "acc/mnist/val", keys, "steps")["steps"] == 2000
    # more validation images, a smaller se: the same 0.4 pp now decides
    assert select.cheapest_within_one_se(rows((0.90, 0.976, 0.98), n=8000), "acc/mnist/val", keys,
                                         "steps")["steps"] == 2000
    with pytest.raises(select.SelectionError, match="not a validation"):
        select.cheapest_within_one_se(rows((0.9, 0.9, 0.9)), "top1", keys, "steps")


def test_a_winner_at_the_edge_of_its_grid_is_flagged(tmp_path):
    grid = {"lr": [1e-3, 3e-3, 1e-2], "augment": ["none", "crop", "crop_flip"], "steps": [500, 1000]}
    assert select.at_grid_edge(grid, {"lr": 1e-2, "augment": "crop_flip", "steps": 1000}) == {"lr": "highest"}
    assert select.at_grid_edge(grid, {"lr": 1e-3, "augment": "none", "steps": 500}) == {"lr": "lowest"}
    assert select.at_grid_edge(grid, {"lr": 3e-3, "augment": "none", "steps": 500}) == {}
    # the written selection says so beside the chosen value
    search = select.Search(base={}, grid={"lr": grid["lr"]})
    rows = [dict(lr=lr, seed=0, metric="acc/mnist/val", val=v) for lr, v in zip(grid["lr"], (0.5, 0.6, 0.7))]
    assert select.write_search("edge", search, rows, tmp_path) == {"lr": 1e-2}
    assert "the highest value of its grid" in (tmp_path / "edge.md").read_text()
    rows[1]["val"] = 0.9
    select.write_search("inside", search, rows, tmp_path)
    assert "of its grid" not in (tmp_path / "inside.md").read_text()


def test_d3_pooling_verdict_chooses_lr_on_validation_not_test():
    """Token at lr 1e-3 is best on test, but 2e-3 is best on validation: the verdict must use 2e-3."""
    rows = []
    for pool in ("token", "gap"):
        for lr, val, test in ((1e-3, 0.80, 0.95), (2e-3, 0.85, 0.70)):
            for seed in range(3):
                base = dict(stage="pretrain", pos_embed="1d", pos_embed_at="stem", pool=pool, lr=lr, seed=seed,
                            dataset="fashion_mnist", upstream_examples=1800)
                rows += [dict(base, metric="top1_val", value=val), dict(base, metric="top1", value=test + 0.001 * seed)]
    v = next(v for v in verdicts._pooling_verdict(pd.DataFrame(rows)) if "top-1" in v.claim)
    assert "lr 0.002, chosen on validation" in v.evidence
    assert "70.1" in v.evidence  # the test accuracy at the validation-chosen rate


def test_table8_and_d3_at_different_sizes_keep_their_own_runs_and_baselines():
    """cpu: Table 8 pre-trains on 5.5k images, D.3 on 1.8k; both have a (1-D, stem, token) run at lr 2e-3.
    Each table and verdict must read its own size's runs and the pixel baseline trained on that size."""
    from vitrepro.experiments import position_embeddings as pe

    rows = [dict(stage="baseline", metric="top1", value=v, upstream_examples=n, dataset="fashion_mnist",
                 model="pixels: logistic regression", pool=None, pos_embed=None, pos_embed_at=None, lr=None,
                 seed=None, run_id=f"b{n}") for n, v in ((1800, 0.81), (5500, 0.84))]
    grid = [(k, a, "token", 2e-3) for k, a in pe.VARIANTS]
    d3 = [("1d", "stem", pool, lr) for pool in ("token", "gap") for lr in (1e-3, 2e-3)]
    for n, cells, acc in ((5500, grid, 0.86), (1800, d3, 0.70)):
        for kind, at, pool, lr in cells:
            for seed in range(3):
                base = dict(stage="pretrain", pos_embed=kind, pos_embed_at=at, pool=pool, lr=lr, seed=seed,
                            dataset="fashion_mnist", upstream_examples=n, model="ViT-Nano/4",
                            run_id=f"{n}-{kind}-{at}-{pool}-{lr}-{seed}")
                rows += [dict(base, metric=m, value=acc + 0.01 * seed) for m in ("top1", "top1_val", "fewshot5")]
    df = pd.DataFrame(rows)
    assert set(pe.table8_runs(df).upstream_examples) == {5500} and len(pe.table8_runs(df).run_id.unique()) == 24
    assert set(pe.pooling_runs(df).upstream_examples) == {1800} and len(pe.pooling_runs(df).run_id.unique()) == 12
    tables = pe.tables(df)
    top1 = tables["Top-1 on the training set's test split (%), pre-trained on 5,500 images"]
    assert top1.iloc[-1]["stem"].startswith("84.00")  # the 5.5k logistic regression, not the mean of both
    assert "App. D.3: class token vs global average pooling (same head), learning rate chosen on validation, " \
           "pre-trained on 1,800 images" in tables
    texts = {v.claim: v for v in verdicts.position_embedding_verdicts(df)}
    assert verdicts.BELOW not in texts["No position embedding is worse than 1-D, 2-D and relative (top-1)"].flag
    pool_top1 = texts["Class token and GAP work alike within ±1 pp, each at its own learning rate (top-1)"]
    assert verdicts.BELOW in pool_top1.flag and "pixels 81.0%" in pool_top1.flag


def test_no_experiment_selects_on_a_test_metric():
    """Every call of select.best / verdicts' selection in the library names a validation metric."""
    root = EXPERIMENTS.parent
    for path in list(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "best":
                metric = node.args[1]
                if isinstance(metric, ast.Constant):
                    select.validation_metric(metric.value)  # raises on a test metric


def test_searches_read_only_validation_metrics():
    for name, make in recipes.SEARCHES.items():
        search = make()
        for cfg in search.configs():
            assert cfg["val_fraction"] > 0, name
            assert cfg.get("select_on") == "val", name
    src = inspect.getsource(select.run_search)
    assert "validation_metric(metric)" in src


# --------------------------------------------------------------------------- verdict statistics
def test_a_true_difference_is_found():
    rng = np.random.default_rng(0)
    found = sum(stats.beats(0.90 + 0.005 * rng.standard_normal(5), 0.85 + 0.005 * rng.standard_normal(5)).verdict
                == "reproduced" for _ in range(50))
    assert found >= 48


def test_a_reversed_difference_is_not_reproduced():
    assert stats.beats([0.80, 0.81, 0.79], [0.90, 0.91, 0.89]).verdict == "not reproduced"


def test_pure_noise_never_yields_alike():
    """Two groups of pure noise (sd 5 pp, same mean): the equivalence test must not call them alike
    within 1 pp, however often we draw; tight, equal groups are alike."""
    rng = np.random.default_rng(1)
    for _ in range(500):
        c = stats.alike(0.5 + 0.05 * rng.standard_normal(3), 0.5 + 0.05 * rng.standard_normal(3))
        assert c.verdict != "reproduced"
    assert stats.alike([0.900, 0.901, 0.899], [0.900, 0.902, 0.898]).verdict == "reproduced"


def test_noise_alone_rarely_beats():
    rng = np.random.default_rng(2)
    hits = sum(stats.beats(rng.standard_normal(3), rng.standard_normal(3)).verdict == "reproduced" for _ in range(2000))
    assert hits / 2000 < 0.08  # the test's level is 5%


def test_a_real_difference_beyond_the_margin_is_not_alike():
    assert stats.alike([0.90, 0.91, 0.905], [0.85, 0.855, 0.86]).verdict == "not reproduced"


def test_welch_p_value_matches_scipy():
    from scipy.stats import ttest_ind

    a, b = [0.91, 0.93, 0.90, 0.92], [0.89, 0.90, 0.88]
    ref = ttest_ind(a, b, equal_var=False, alternative="greater").pvalue
    assert stats.beats(a, b).p == pytest.approx(ref, rel=1e-9)


def test_fewer_than_three_seeds_give_no_verdict():
    assert stats.beats([0.9, 0.91], [0.1, 0.2]).verdict == "too few seeds"
    assert stats.claim_p([stats.beats([0.9, 0.91], [0.1, 0.2]), stats.beats([.9, .91, .92], [.1, .2, .3])]) == (None, None)


def _scaling_frame(vit_small, res_small, base=0.5):
    rows = []
    for model, fam, vals in (("ViT-Nano/4", "ViT", vit_small), ("BiT-R14x0.25", "ResNet", res_small)):
        for n in (1800, 55000):
            for seed, v in enumerate(vals):
                rows.append(dict(stage="pretrain", model=model, family=fam, upstream_examples=n, seed=seed,
                                 dataset="fashion_mnist", metric="fewshot5", value=v + (0.05 if n > 1800 else 0),
                                 train_flops=1e12))
    rows += [dict(stage="baseline", model="pixels", family="baseline", dataset="fashion_mnist", metric="fewshot5",
                  value=base, seed=s, upstream_examples=None) for s in range(3)]
    return pd.DataFrame(rows)


def _resolution_frame(upsampled: bool) -> pd.DataFrame:
    """Fine-tunes of a 16 px parent at 16 and 28 px (real extra pixels), and where asked the 28 px model's
    28 and 36 px fine-tunes (upsampled); 3 seeds, the larger size 2 pp better; a pixel baseline far below."""
    designs = [("fashion_mnist at 16 px", 55000, (16, 28))] + ([("fashion_mnist", 55000, (28, 36))] if upsampled else [])
    rows = [dict(stage="finetune", model="ViT-Nano/4", family="ViT", upstream=up, upstream_examples=n, img_size=size,
                 seed=seed, dataset="mnist", metric="top1", value=0.95 + 0.02 * (size == hi) + 0.001 * seed)
            for up, n, (lo, hi) in designs for size in (lo, hi) for seed in range(3)]
    rows.append(dict(stage="baseline", model="pixels", family="baseline", dataset="mnist", metric="top1", value=0.9))
    return pd.DataFrame(rows)


def test_a_resolution_design_the_profile_does_not_run_is_named_not_run():
    """The cpu profile runs the real-extra-pixels design only: the report says the upsampled control was
    not run and what it would cost, rather than dropping the claim; with both designs, both are judged."""
    only_real = {v.claim: v.verdict for v in verdicts.transfer_verdicts(_resolution_frame(upsampled=False))}
    assert only_real == {"Fine-tuning at a higher resolution than pre-training helps (real extra pixels)": "reproduced",
                         f"Fine-tuning at a higher resolution than pre-training helps ({verdicts.UPSAMPLED})": "not run"}
    both = {v.claim: v.verdict for v in verdicts.transfer_verdicts(_resolution_frame(upsampled=True))}
    assert set(both.values()) == {"reproduced"} and len(both) == 2


def test_verdict_is_flagged_not_voided_when_a_model_is_below_the_pixel_baseline():
    """Issue 27: the verdict stands and the flag beside it names the model under its floor, for every metric."""
    df = _scaling_frame([0.60, 0.61, 0.62], [0.70, 0.71, 0.72], base=0.65)
    v = verdicts.scaling_verdicts(df)[0]
    assert v.verdict == "reproduced" and v.flag.startswith(verdicts.BELOW) and "ViT-Nano/4 at 1800" in v.flag
    assert "BiT-R14x0.25" not in v.flag  # 71 % is above the 65 % floor
    df = _scaling_frame([0.60, 0.61, 0.62], [0.70, 0.71, 0.72], base=0.5)
    assert verdicts.scaling_verdicts(df)[0].verdict == "reproduced" and verdicts.scaling_verdicts(df)[0].flag == ""


# ------------------------------------------------------------------------------ designs and budgets
def test_pretrain_budget_is_one_schedule_capped_per_subset():
    full = recipes.pretrain_steps(recipes.FASHION_TRAIN)
    assert full == int(np.ceil(recipes.CPU_EPOCHS * recipes.FASHION_TRAIN / recipes.CPU_BATCH))
    small = recipes.pretrain_steps(1800)
    assert small == int(np.ceil(recipes.CPU_MAX_SUBSET_EPOCHS * 1800 / recipes.CPU_BATCH))
    assert recipes.pretrain_steps(10 ** 6) == full


def test_cpu_notebooks_share_their_pretraining_runs():
    """One run, many uses: the upstream ViT of scaling is transfer's and attention's; Table 8's
    (1-D, stem, token) cell is scaling's 18k ViT run, D.3's token run at the grid's rate its 1.8k one."""
    from vitrepro.experiments import attention, position_embeddings, scaling, transfer

    def configs(mod):
        return [j.config for j in mod.jobs(mod.validate_params({"profile": "cpu"})) if j.parent is None]

    key = lambda c: (c["experiment"], c["model"], c.get("train_examples"), c["img_size"], c["seed"],  # noqa: E731
                     c.get("pos_embed"), c.get("pos_embed_at"), c.get("pool"), c["lr"], c["steps"])
    sc = {key(c) for c in configs(scaling)}
    assert {key(c) for c in configs(attention)} <= sc
    assert len({key(c) for c in configs(transfer)} & sc) == 12
    shared = [c for c in configs(position_embeddings) if key(c) in sc]
    assert sorted(c["train_examples"] for c in shared) == [1800] * 3 + [18000] * 3


def test_cpu_profile_trains_its_shared_runs_once_in_one_sweep():
    """run_all trains the union of the four notebooks' sweeps (jobs.unique): every shared run once, each
    fine-tune pointing at the kept parent (no data read: the run ids follow from the configurations); the
    scaling sweep fine-tunes 1.8k and 55k models only
    (the sizes its claims compare), all of them when sizes are given."""
    from vitrepro.experiments import NOTEBOOKS, module, scaling
    from vitrepro.experiments.jobs import unique

    every = [j for nb in NOTEBOOKS for j in module(nb).jobs(module(nb).validate_params({"profile": "cpu"}))]
    union = unique(every)
    key = lambda j: (repr(sorted(j.config.items())), key(j.parent) if j.parent else None)  # noqa: E731
    assert len({key(j) for j in every}) == len(union) < len(every)
    kept = {id(j) for j in union}
    assert all(j.parent is None or id(j.parent) in kept for j in union)
    tuned = {j.upstream_examples for j in scaling.jobs(scaling.validate_params({"profile": "cpu"}))
             if j.stage == "finetune"}
    assert tuned == {1800, None}
    given = scaling.validate_params({"profile": "cpu", "sizes": [1800, 18000]})
    assert {j.upstream_examples for j in scaling.jobs(given) if j.stage == "finetune"} == {1800, 18000}


def test_cpu_profiles_use_three_seeds_and_validation_selection():
    from vitrepro.experiments import attention, position_embeddings, scaling, transfer

    for mod in (scaling, position_embeddings, transfer, attention):
        params = mod.validate_params({"profile": "cpu"})
        assert mod.profile(params).seeds >= 3
        for job in mod.jobs(params):
            if job.stage == "pretrain":
                assert job.config["select_on"] == "val" and job.config["val_fraction"] > 0


def test_preflight_checks_finetune_shapes_before_any_run(tmp_path):
    """A fine-tuning resolution the patch size does not divide fails before anything trains
    (found by a cpu-profile dry run: 28 -> 42 px with 4 px patches)."""
    from vitrepro.experiments import common, transfer

    params = transfer.validate_params({"profile": "smoke", "runs_dir": str(tmp_path / "runs")})
    jobs = transfer.jobs(params)
    fine = next(j for j in jobs if j.parent is not None)
    fine.config["img_size"] = 10  # ViT-Nano/4: 10 px is not a multiple of 4
    with pytest.raises(common.PreflightError, match="not divisible by the patch size"):
        common.preflight(jobs, params)
    assert not (tmp_path / "runs").exists()


def test_recipes_use_what_their_committed_searches_chose():
    """Each search's table in results/recipes/ was made with the search's current grid, its winner has a
    loser on each side of every numeric axis, and the recipe holds the value that won on validation."""
    used = {"vit_pretrain": {"lr": recipes.CPU_LR["vit"]}, "bit_pretrain": {"lr": recipes.CPU_LR["bit"]},
            "finetune": {"lr": recipes.CPU_FINETUNE["lr"]},
            "finetune_budget": {"steps": recipes.CPU_FINETUNE["steps"], "augment": recipes.CPU_FINETUNE_AUGMENT},
            "finetune_1k": {"steps": recipes.cpu_finetune_steps(recipes.MNIST_1K), "augment": recipes.CPU_FINETUNE_AUGMENT},
            "finetune_bit": {"lr": recipes.CPU_FINETUNE_LR["bit"]}}
    assert set(used) | set(recipes.PENDING_SEARCHES) == set(recipes.SEARCHES)
    for name in recipes.PENDING_SEARCHES:  # once run, it must join `used` with the value the recipe took from it
        assert not (EXPERIMENTS.parents[1] / "results" / "recipes" / f"{name}.csv").exists(), name
    tables = EXPERIMENTS.parents[1] / "results" / "recipes"
    for name, values in used.items():
        search = recipes.SEARCHES[name]()
        rows = pd.read_csv(tables / f"{name}.csv").to_dict("records")
        for key, grid in search.grid.items():
            assert sorted({r[key] for r in rows}, key=str) == sorted(set(grid), key=str), (name, key)
        chosen = select.chosen_point(search, rows)
        assert chosen == values, name
        assert select.at_grid_edge(search.grid, chosen) == {}, name


def test_transfer_is_judged_per_downstream_set_against_its_own_pixel_baseline():
    """Two downstream sets, one at its ceiling (no difference) and a low-data one where the larger upstream set
    and pre-training help: one verdict per set, each against the logistic regression trained on that set."""
    low = "mnist[train_examples=1000]"
    rows = []
    for ds, gain, base in (("mnist", 0.0, 0.90), (low, 0.03, 0.85)):
        for model in ("ViT-Nano/4", "BiT-R14x0.25"):
            for seed in range(3):
                noise = 0.002 * (seed - 1)
                for n, value in ((5500, 0.95), (55000, 0.95 + gain)):
                    rows.append(dict(stage="finetune", model=model, upstream="fashion_mnist", upstream_examples=n,
                                     img_size=28, seed=seed, dataset=ds, metric="top1", value=value + noise))
                rows.append(dict(stage="scratch", model=model, upstream="none (500 steps)", upstream_examples=None,
                                 img_size=28, seed=seed, dataset=ds, metric="top1", value=0.95 - gain + noise))
        rows.append(dict(stage="baseline", model="pixels", dataset=ds, metric="top1", value=base))
    got = {v.claim: v.verdict for v in verdicts.transfer_verdicts(pd.DataFrame(rows))}
    larger = "Pre-training on the larger upstream set transfers better (ImageNet -> ImageNet-21k rows; downstream {})"
    scratch = "Pre-training (on the larger upstream set) beats training from scratch (downstream {})"
    assert got == {larger.format("mnist"): "inconclusive", larger.format(low): "reproduced",
                   scratch.format("mnist"): "inconclusive", scratch.format(low): "reproduced"}
    rows[-1]["value"] = 0.97  # the low-data set's own baseline above its 5.5k fine-tunes
    got = {v.claim: v.verdict for v in verdicts.transfer_verdicts(pd.DataFrame(rows))}
    flags = {v.claim: v.flag for v in verdicts.transfer_verdicts(pd.DataFrame(rows))}
    assert got[larger.format(low)] == "reproduced" and verdicts.BELOW in flags[larger.format(low)]
    assert got[larger.format("mnist")] == "inconclusive" and flags[larger.format("mnist")] == ""


def test_validation_size_counts_the_held_out_images_not_the_unused_ones():
    """A search run on a training subset (MNIST-1k: 1,000 of the 7,200 images left after an 800-image hold-out)
    is validated on the hold-out, not on the 6,200 images it left unused (which would shrink the standard error
    the one-standard-error rule uses by 3x)."""
    data = {"mnist:train": {"n": 8000, "split": "train"}}
    whole = {"resolved": {"data": data, "train_size": 7201}, "config": {"val_fraction": 0.1}}
    subset = {"resolved": {"data": data, "train_size": 1000}, "config": {"val_fraction": 0.1, "train_examples": 1000}}
    assert select.validation_size(whole) == 799 and select.validation_size(subset) == 800


def test_a_search_with_a_budget_chooses_among_the_affordable_points_and_says_what_it_gave_up(tmp_path):
    """`max_cost`: the one-standard-error rule runs over the points the profile affords; the written table
    names that budget and the point the rule would have chosen without it."""
    search = select.Search(base={}, grid={"steps": [250, 500, 1000, 2000]}, cost="steps", max_cost=1000)
    rows = [dict(steps=s, seed=0, metric="acc/x/val", val=v, val_n=800)
            for s, v in ((250, 0.75), (500, 0.89), (1000, 0.949), (2000, 0.959))]
    assert select.chosen_point(search, rows) == {"steps": 1000}
    import dataclasses
    assert select.chosen_point(dataclasses.replace(search, max_cost=None), rows) == {"steps": 2000}
    select.write_search("budget", search, rows, tmp_path)
    text = (tmp_path / "budget.md").read_text()
    assert "steps <= 1000" in text and "Without that budget the rule would choose {'steps': 2000} (steps the highest" in text
