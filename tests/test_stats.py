"""The verdict statistics of issue 27 on synthetic data: each test can fail if the rule it checks is broken."""
import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from vitrepro import report, stats, verdicts


# ------------------------------------------------------------------------- interaction contrasts
def _four(rng, effect, n=3, sd=(0.01, 0.01, 0.02, 0.005)):
    """ViT before/after, ResNet before/after; the ViT gains 10 pp + ``effect``, the ResNet 10 pp."""
    means = (0.80 + 0.10 + effect, 0.80, 0.85 + 0.10, 0.85)
    return [m + s * rng.standard_normal(n) for m, s in zip(means, sd)]


def test_a_true_interaction_is_found():
    rng = np.random.default_rng(0)
    found = sum(stats.interaction(*_four(rng, 0.06)).verdict == "reproduced" for _ in range(200))
    assert found >= 180  # a 6 pp extra gain against ~2.5 pp of contrast noise


def test_pure_noise_gives_the_nominal_false_positive_rate():
    """No interaction (equal gains), unequal variances across the four groups: the one-sided test at 5 %
    fires about 5 % of the time (Welch-Satterthwaite df keep it near its level)."""
    rng = np.random.default_rng(1)
    draws = 4000
    hits = sum(stats.interaction(*_four(rng, 0.0)).p_for < stats.ALPHA for _ in range(draws))
    assert 0.03 < hits / draws < 0.07
    reversed_ = sum(stats.interaction(*_four(rng, 0.0)).verdict == "not reproduced" for _ in range(draws))
    assert 0.03 < reversed_ / draws < 0.07


def test_interaction_does_not_pair_independent_runs():
    """Independent groups: which seed of one group meets which of another is arbitrary, so relabelling the
    seeds must not change the p-value (per-seed gains would: the issue's 36 relabellings gave 0.006-0.13)."""
    rng = np.random.default_rng(2)
    g = _four(rng, 0.01)
    p = stats.interaction(*g).p
    for _ in range(20):
        assert stats.interaction(*[rng.permutation(x) for x in g]).p == pytest.approx(p, rel=1e-12)


def test_interaction_matches_its_definition():
    g = [np.array(x) for x in ([0.90, 0.92, 0.91], [0.80, 0.81, 0.79], [0.95, 0.94, 0.97], [0.90, 0.91, 0.92])]
    v = np.array([x.var(ddof=1) / x.size for x in g])
    contrast = g[0].mean() - g[1].mean() - g[2].mean() + g[3].mean()
    df = v.sum() ** 2 / (v ** 2 / 2).sum()
    c = stats.interaction(*g)
    assert c.diff == pytest.approx(contrast)
    assert c.p_for == pytest.approx(sps.t.sf(contrast / np.sqrt(v.sum()), df))
    assert c.test == "interaction" and c.n == (3, 3, 3, 3)


def test_gains_more_verdict_uses_the_interaction():
    rows = []
    for model, fam, gain in (("ViT-Nano/4", "ViT", 0.15), ("BiT-R14x0.25", "ResNet", 0.05)):
        for n, add in ((1800, 0.0), (55000, gain)):
            for seed, noise in enumerate((-0.01, 0.0, 0.012)):
                rows.append(dict(stage="pretrain", model=model, family=fam, upstream_examples=n, seed=seed,
                                 dataset="fashion_mnist", metric="fewshot5", value=0.7 + add + noise, train_flops=1e12))
    v = next(v for v in verdicts.scaling_verdicts(pd.DataFrame(rows)) if v.claim.startswith("ViT gains more"))
    assert "interaction" in v.evidence and v.verdict == "reproduced"


# ------------------------------------------------------------------------------- paired designs
def test_paired_test_is_scipys_ttest_rel():
    a, b = [0.91, 0.85, 0.95, 0.80], [0.90, 0.83, 0.94, 0.78]
    c = stats.beats(a, b, paired=True)
    assert c.test == "paired" and c.p == pytest.approx(sps.ttest_rel(a, b, alternative="greater").pvalue)
    assert stats.beats(a, b).p == pytest.approx(sps.ttest_ind(a, b, equal_var=False, alternative="greater").pvalue)
    assert c.p < 0.01 < stats.beats(a, b).p  # the pairing removes the between-seed spread


def _attention_frame(per_seed_first, step):
    rows = []
    for seed, first in enumerate(per_seed_first):
        for layer in (1, 2):
            rows.append(dict(stage="analysis", metric="attention_distance", seed=seed, layer=layer, head=0,
                             value=first + step * (layer - 1)))
    rows.append(dict(stage="analysis", metric="uniform_attention_distance", seed=0, value=14.0))
    return pd.DataFrame(rows)


def test_a_paired_design_uses_the_paired_test():
    """Two layers of the same model: a consistent +0.3 px per model under a 2 px spread between models is
    found by the paired test; the Welch test on the same numbers would not find it."""
    df = _attention_frame([12.0, 14.0, 16.0, 13.0], step=0.3)
    v = next(v for v in verdicts.attention_verdicts(df) if v.claim == "Mean attention distance grows with depth")
    assert "paired" in v.evidence and v.verdict == "reproduced"
    assert stats.beats([12.3, 14.3, 16.3, 13.3], [12.0, 14.0, 16.0, 13.0]).verdict == "inconclusive"


def test_resolution_fine_tunes_of_one_parent_are_paired_by_seed():
    rows = [dict(stage="finetune", model="ViT-Nano/4", family="ViT", upstream="fashion_mnist at 16 px",
                 upstream_examples=55000, img_size=size, seed=seed, dataset="mnist", metric="top1",
                 value=parent + (0.004 if size == 28 else 0.0))
            for seed, parent in enumerate((0.93, 0.96, 0.95, 0.97)) for size in (16, 28)]
    rows.append(dict(stage="baseline", model="pixels", dataset="mnist", metric="top1", value=0.9))
    v = next(v for v in verdicts.transfer_verdicts(pd.DataFrame(rows)) if "real extra pixels" in v.claim)
    assert "paired" in v.evidence and v.verdict == "reproduced"


def test_paired_values_are_aligned_by_seed_not_position():
    a = pd.DataFrame(dict(seed=[2, 0, 1], value=[0.3, 0.1, 0.2]))
    b = pd.DataFrame(dict(seed=[1, 3, 0], value=[0.25, 0.9, 0.15]))
    x, y = verdicts.paired_seeds(a, b)
    assert list(x) == [0.1, 0.2] and list(y) == [0.15, 0.25]
    with pytest.raises(ValueError, match="paired"):
        stats.beats([1, 2, 3], [1, 2], paired=True)


# ------------------------------------------------------------------------- multiple comparisons
def _v(name, p_for, p_against=0.9):
    return verdicts.Verdict(name, "[P]", stats.decide(p_for, p_against), "", p_for=p_for, p_against=p_against)


def test_the_correction_is_applied_across_the_table():
    raw = [_v("a", 0.001), _v("b", 0.032), _v("c", 0.045), _v("e", 0.6),
           verdicts.Verdict("rule", "[P]", "not reproduced", "no test"), _v("f", 0.9, 0.01)]
    got = {v.claim: v for v in verdicts.correct(raw)}
    # Benjamini-Hochberg by hand over the 5 tested p (sorted 0.001, 0.01, 0.032, 0.045, 0.6):
    # p_(i) * 5 / i, then the running minimum from the largest rank down
    expect = {"a": 0.005, "f": 0.025, "b": 0.032 * 5 / 3, "c": 0.045 * 5 / 4, "e": 0.6}
    assert {k: got[k].p_adj for k in expect} == pytest.approx(expect)
    assert [got[k].raw_verdict for k in "abc"] == ["reproduced"] * 3
    assert got["a"].verdict == "reproduced" and got["b"].verdict == got["c"].verdict == "inconclusive"
    assert got["f"].verdict == "not reproduced" and got["e"].verdict == "inconclusive"
    assert got["rule"].verdict == "not reproduced" and got["rule"].p_adj is None  # a rule stays outside


def test_the_adjusted_verdict_keeps_the_side_that_decided():
    got = verdicts.correct([_v("for", 0.001), _v("against", 0.9, 0.001)])
    assert [v.verdict for v in got] == ["reproduced", "not reproduced"]


def test_a_claim_of_several_comparisons_needs_every_part():
    strong, weak = stats.beats([0.9, 0.91, 0.92], [0.5, 0.51, 0.52]), stats.beats([0.52, 0.5, 0.55], [0.5, 0.51, 0.52])
    p_for, p_against = stats.claim_p([strong, weak])
    assert p_for == weak.p_for and stats.decide(p_for, p_against) == "inconclusive"
    reversal = stats.beats([0.5, 0.51, 0.52], [0.6, 0.61, 0.60])
    p_for, p_against = stats.claim_p([strong, reversal])
    assert p_against == pytest.approx(2 * reversal.p_against)


def test_report_shows_raw_and_adjusted_p_and_decides_on_adjusted(tmp_path):
    res = tmp_path / "results" / "scaling"
    res.mkdir(parents=True)
    rows = []
    for model, fam, base in (("ViT-Nano/4", "ViT", 0.70), ("BiT-R14x0.25", "ResNet", 0.72)):
        for seed, noise in enumerate((-0.006, 0.0, 0.007)):
            rows.append(dict(notebook="scaling", stage="pretrain", model=model, family=fam, upstream_examples=1800,
                             seed=seed, dataset="fashion_mnist", metric="fewshot5", value=base + noise))
    pd.DataFrame(rows).to_csv(res / "results.csv", index=False)
    text = report.build_report(tmp_path / "results")
    summary = text.split("## Summary", 1)[1].split("\n## ", 1)[0]
    assert "| p raw | p adj. |" in summary and "Benjamini-Hochberg" in summary
    line = next(x for x in summary.splitlines() if "ResNets beat ViT at the smallest" in x)
    cells = [c.strip() for c in line.split("|")]
    assert float(cells[4]) < 0.05 and cells[3] == "**reproduced**"


# ----------------------------------------------------------------------------------- "alike"
def test_a_ci_outside_the_margin_gives_not_alike():
    c = stats.alike([0.930, 0.925, 0.935], [0.900, 0.905, 0.895])
    assert c.ci[0] > stats.EQUIVALENCE_MARGIN and c.verdict == "not reproduced" and c.p_against < stats.ALPHA
    c = stats.alike([0.900, 0.905, 0.895], [0.930, 0.925, 0.935], paired=True)
    assert c.ci[1] < -stats.EQUIVALENCE_MARGIN and c.verdict == "not reproduced"
    # a difference that is real but may be inside the margin: neither alike nor not alike
    c = stats.alike([0.915, 0.905, 0.91], [0.90, 0.897, 0.903])
    assert c.ci[0] > 0 and c.ci[0] < stats.EQUIVALENCE_MARGIN and c.verdict == "inconclusive"


def test_alike_claim_with_one_kind_outside_the_margin_is_not_alike():
    rows = []
    for kind, mean in (("none", 0.70), ("1d", 0.83), ("2d", 0.80), ("relative", 0.80)):
        for seed, noise in enumerate((-0.002, 0.0, 0.002)):
            rows.append(dict(stage="pretrain", pos_embed=kind, pos_embed_at="stem", pool="token", lr=2e-3, seed=seed,
                             dataset="fashion_mnist", upstream_examples=18000, metric="top1", value=mean + noise,
                             run_id=f"{kind}{seed}"))
    got = {v.claim: v for v in verdicts.position_embedding_verdicts(pd.DataFrame(rows))}
    v = got["1-D, 2-D and relative embeddings are alike within ±1 pp (top-1)"]
    assert v.verdict == "not reproduced" and "90% CI" in v.evidence


def test_tost_p_matches_two_shifted_scipy_tests():
    a, b = np.array([0.90, 0.905, 0.898, 0.902]), np.array([0.899, 0.901, 0.903])
    m = stats.EQUIVALENCE_MARGIN
    lower = sps.ttest_ind(a + m, b, equal_var=False, alternative="greater").pvalue
    upper = sps.ttest_ind(a - m, b, equal_var=False, alternative="less").pvalue
    c = stats.alike(a, b)
    assert c.p_for == pytest.approx(max(lower, upper)) and c.verdict == "reproduced"
    ci = sps.ttest_ind(a, b, equal_var=False).confidence_interval(0.90)
    assert c.ci == pytest.approx((ci.low, ci.high))


# ------------------------------------------------------------------------------------ wall time
def test_report_wall_time_is_the_timings_file_total(tmp_path):
    (tmp_path / "timings_cpu.json").write_text(json.dumps({"training": 3000.0, "scaling": 60.0, "attention": 30.0}))
    text = report.build_report(tmp_path)
    assert "training 3,000 s, scaling 60 s, attention 30 s; 51.5 min in all" in text


def test_committed_report_agrees_with_committed_timings():
    root = report.REPO_ROOT / "results"
    t = json.loads((root / "timings_cpu.json").read_text())
    m = re.search(r"([\d.]+) min in all", (root / "REPORT.md").read_text())
    assert m and float(m.group(1)) == pytest.approx(sum(t.values()) / 60, abs=0.05)


# ------------------------------------------------------------------------- data draws and probes
def test_report_says_whether_the_subset_varies_with_the_seed():
    rows = [dict(stage="pretrain", seed=s, data_seed=ds, metric="fewshot5", shot_draws=10, value=0.8)
            for s, ds in ((0, 0), (1, 0), (2, 0))]
    assert "same subset (data_seed 0)" in report._data_note(pd.DataFrame(rows))
    assert "10 shot draws" in report._data_note(pd.DataFrame(rows))
    for r in rows:
        r["data_seed"] = r["seed"]
    assert "each seed draws its own subset" in report._data_note(pd.DataFrame(rows))
    assert "not recorded" in report._data_note(pd.DataFrame(rows).drop(columns=["data_seed"]))


def test_upstream_runs_take_the_data_seed_and_probe_options():
    from vitrepro.experiments import recipes

    cfg = recipes.upstream_config("cpu", "ViT-Nano/4", 2, n=1800, data_seed=None, fewshot_shots=(5, 10, 25),
                                  fewshot_draws=10)
    probe = next(e for e in cfg["evaluators"] if e["type"] == "fewshot")
    assert cfg["data_seed"] == 2 and probe["shots"] == [5, 10, 25] and probe["seeds"] == list(range(10))
    fixed = recipes.upstream_config("cpu", "ViT-Nano/4", 2, n=1800, **recipes.SEARCH_DATA)
    assert fixed["data_seed"] == 0 and next(e for e in fixed["evaluators"] if e["type"] == "fewshot")["seeds"] == [0, 1, 2]


# ------------------------------------------------------------------------ new claims of build 1
def _sweep(models, gains, base=0.6):
    rows = []
    for model, (fam, flops, small, gain) in zip(models, gains):
        for n, add in ((1800, 0.0), (55000, gain)):
            for seed, noise in enumerate((-0.004, 0.0, 0.005)):
                rows.append(dict(stage="pretrain", model=model, family=fam, upstream_examples=n, seed=seed,
                                 dataset="fashion_mnist", metric="fewshot5", value=small + add + noise,
                                 train_flops=flops * (1 if n == 1800 else 30), params=2e5))
    rows += [dict(stage="baseline", model="pixels", family="baseline", dataset="fashion_mnist", metric="fewshot5",
                  value=base, seed=s, upstream_examples=None) for s in range(3)]
    return pd.DataFrame(rows)


def test_larger_vit_is_the_one_with_more_compute_and_the_claim_an_interaction():
    """ViT-Nano/7 has more parameters than ViT-Nano/4 but a third of its compute: the larger is Nano/4.
    It trails at 1.8k and gains 10 pp more by 55k: reproduced; with equal gains it is not reproduced."""
    models = ("ViT-Nano/4", "ViT-Nano/7", "BiT-R14x0.25")
    df = _sweep(models, [("ViT", 3e12, 0.66, 0.25), ("ViT", 1e12, 0.70, 0.15), ("ResNet", 5e11, 0.8, 0.07)])
    v = next(v for v in verdicts.scaling_verdicts(df) if v.claim.startswith("Larger ViTs"))
    assert v.verdict == "reproduced" and "(ViT-Nano/4 gain) - (ViT-Nano/7 gain)" in v.evidence
    df = _sweep(models, [("ViT", 3e12, 0.66, 0.15), ("ViT", 1e12, 0.70, 0.15), ("ResNet", 5e11, 0.8, 0.07)])
    v = next(v for v in verdicts.scaling_verdicts(df) if v.claim.startswith("Larger ViTs"))
    assert v.verdict != "reproduced"


def test_hybrid_is_judged_against_its_vit_at_the_smallest_size():
    models = ("ViT-Nano/4", "BiT-R14x0.25", "R14x0.25+ViT-Nano/4")
    df = _sweep(models, [("ViT", 3e12, 0.66, 0.2), ("ResNet", 5e11, 0.8, 0.07), ("Hybrid", 3.3e12, 0.75, 0.1)])
    v = next(v for v in verdicts.scaling_verdicts(df) if v.claim.startswith("Hybrids beat ViT"))
    assert v.verdict == "reproduced" and "R14x0.25+ViT-Nano/4 - ViT-Nano/4 at 1800" in v.evidence
    # the main ViT of the sweep stays ViT-Nano/4 (the one at most sizes), not the alphabetically first
    assert verdicts._main_model(df[df.metric == "fewshot5"], "ViT") == "ViT-Nano/4"


def test_hybrid_sharing_no_pretraining_size_with_its_vit_is_not_run():
    models = ("ViT-Nano/4", "BiT-R14x0.25", "R14x0.25+ViT-Nano/4")
    df = _sweep(models, [("ViT", 3e12, 0.66, 0.2), ("ResNet", 5e11, 0.8, 0.07), ("Hybrid", 3.3e12, 0.75, 0.1)])
    hybrid = df.model == "R14x0.25+ViT-Nano/4"
    df.loc[hybrid, "upstream_examples"] = df.loc[hybrid, "upstream_examples"] + 1  # no size in common
    v = next(v for v in verdicts.scaling_verdicts(df) if v.claim.startswith("Hybrids beat ViT"))
    assert v.verdict == "not run" and "share no pre-training size" in v.evidence
