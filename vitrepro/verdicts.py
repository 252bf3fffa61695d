"""One verdict per claim of the paper, from a notebook's long-form results (report layer).

Every verdict rests on per-seed values (one trained model per seed) and a test fixed before the run
(`vitrepro.stats`, whose docstring gives the rules). A claim resting on a model below the pixel baseline
of the same split keeps its verdict and is flagged beside it; a claim the profile did not run is
"not run", and the evidence says what it would need.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from itertools import combinations
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from . import stats
from .experiments.floors import trained_on
from .experiments.position_embeddings import VARIANTS, pooling_runs, table8_runs, variant_label

BELOW = "below the pixel baseline"


@dataclass
class Verdict:
    claim: str
    source: str
    verdict: str  # reproduced | not reproduced | inconclusive | too few seeds | not run
    evidence: str
    p_for: float | None = None      # the claim's one-sided p in its direction (None: no test, e.g. a rule)
    p_against: float | None = None  # and against it
    flag: str = ""                  # e.g. "below the pixel baseline: 1d 81.1% vs pixels 83.8%"
    p_adj: float | None = None      # set by `correct`: the adjusted p the verdict was decided on
    raw_verdict: str | None = None  # set by `correct`: the verdict on the raw p

    @property
    def p(self) -> float | None:
        """The claim's raw p: the smaller of its two one-sided p (the side that decides)."""
        return None if self.p_for is None or self.p_against is None else min(self.p_for, self.p_against)

    @property
    def tested(self) -> bool:
        return self.p is not None and self.verdict not in ("not run", "too few seeds")


def correct(verdicts: Sequence[Verdict], alpha: float = stats.ALPHA) -> list[Verdict]:
    """The verdicts with p adjusted across all tested claims (`stats.adjust`, Benjamini-Hochberg) and
    each tested claim decided on its adjusted p; untested claims (rules, not run) pass unchanged."""
    out = list(verdicts)
    idx = [i for i, v in enumerate(out) if v.tested]
    for i, q in zip(idx, stats.adjust([out[i].p for i in idx])):
        v = out[i]
        for_side = v.p_for <= v.p_against
        decided = stats.decide(q if for_side else 1.0, 1.0 if for_side else q, alpha)
        out[i] = replace(v, p_adj=float(q), raw_verdict=v.verdict, verdict=decided)
    return out


def select(df: pd.DataFrame, **eq) -> pd.DataFrame:
    """Rows where each column equals the value (or is in the list/tuple/set) given."""
    m = pd.Series(True, index=df.index)
    for k, v in eq.items():
        if k not in df:
            return df.iloc[0:0]
        m &= df[k].isin(v) if isinstance(v, (list, tuple, set)) else (df[k] == v)
    return df[m]


def seeds(df: pd.DataFrame, **eq) -> np.ndarray:
    """Per-seed values (mean over duplicate rows of one seed) of the rows matching ``eq``."""
    return select(df, **eq).groupby("seed", dropna=False)["value"].mean().to_numpy(dtype=float)


def paired_seeds(a: pd.DataFrame, b: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per-seed values of ``a`` and ``b`` on the seeds both have, aligned by seed (a paired design:
    seed s of ``a`` and of ``b`` share a model or a parent)."""
    both = pd.concat([d.groupby("seed")["value"].mean() for d in (a, b)], axis=1, join="inner").sort_index()
    return both.iloc[:, 0].to_numpy(dtype=float), both.iloc[:, 1].to_numpy(dtype=float)


def pct(v: Sequence[float]) -> str:
    v = np.asarray(v, dtype=float)
    if v.size == 0:
        return "missing"
    return f"{100 * v.mean():.1f} ± {100 * (v.std(ddof=1) if v.size > 1 else 0.0):.1f}% (n={v.size})"


def floor(df: pd.DataFrame, metric: str, dataset: str, n=None) -> float:
    """The pixel baseline's mean for ``metric`` on ``dataset``: the one trained on ``n`` examples where
    the baselines differ by training-set size (logistic regression), else the only one (few-shot)."""
    return float(trained_on(select(df, stage="baseline", metric=metric, dataset=dataset), n)["value"].mean())


def below_flag(floors: dict[str, tuple[np.ndarray, float]]) -> str:
    """"below the pixel baseline: <model> <mean> vs pixels <base>; ..." for the models under their floor."""
    low = [name for name, (v, base) in floors.items() if np.size(v) and not math.isnan(base) and np.mean(v) < base]
    return f"{BELOW}: " + "; ".join(f"{n} {pct(floors[n][0])} vs pixels {100 * floors[n][1]:.1f}%"
                                    for n in low) if low else ""


def _judge(claim: str, src: str, comparisons: dict[str, stats.Comparison],
           floors: dict[str, tuple[np.ndarray, float]], evidence: str = "") -> Verdict:
    """The raw verdict on a claim made of named comparisons (`stats.claim_p`), its evidence (``evidence``,
    then each comparison), flagged where a model is below its pixel baseline."""
    p_for, p_against = stats.claim_p(comparisons.values())
    verdict = stats.decide(p_for, p_against) if comparisons else "not run"
    ev = evidence + "; ".join(f"{name}: {c.text()}" for name, c in comparisons.items())
    return Verdict(claim, src, verdict, ev, p_for, p_against, below_flag(floors))


def _sweep_floor(df: pd.DataFrame, d: pd.DataFrame, metric: str) -> float:
    """The pixel baseline of ``d``'s split; for top-1, the one trained on ``d``'s pre-training size."""
    n = d.upstream_examples.dropna().iloc[0] if d.upstream_examples.notna().any() else None
    return floor(df, metric, d.dataset.iloc[0], n if metric == "top1" else None)


# --------------------------------------------------------------------------------------- scaling
def _main_model(d: pd.DataFrame, family: str) -> str | None:
    """The family's model of the main sweep: the one at the most pre-training sizes, then the smallest
    (a second ViT size may run at only the smallest and largest sizes)."""
    g = select(d, family=family)
    if g.empty:
        return None
    g = g if "params" in g else g.assign(params=0)
    k = g.groupby("model").agg(sizes=("upstream_examples", "nunique"), params=("params", "mean")).reset_index()
    return k.sort_values(["sizes", "params", "model"], ascending=[False, True, True]).model.iloc[0]


def scaling_verdicts(df: pd.DataFrame) -> list[Verdict]:
    out, src = [], "[P] §4.3, Fig. 3/4"
    if select(df, stage="pretrain").empty:
        return [Verdict("ResNets beat ViT at the smallest pre-training set", src, "not run", "")]
    for metric, stage, label in (("fewshot5", "pretrain", "5-shot linear"), ("top1", "finetune", "fine-tuned top-1")):
        d = select(df, metric=metric, stage=stage)
        if d.empty:
            continue
        sizes = sorted(d.upstream_examples.dropna().unique())
        vit, res = _main_model(d, "ViT"), _main_model(d, "ResNet")
        if not sizes or vit is None or res is None:
            continue
        small, large = sizes[0], sizes[-1]
        base = lambda n: floor(df, metric, d.dataset.iloc[0], n if metric == "fewshot5" else None)  # noqa: E731
        v_s, r_s = seeds(d, model=vit, upstream_examples=small), seeds(d, model=res, upstream_examples=small)
        v_l, r_l = seeds(d, model=vit, upstream_examples=large), seeds(d, model=res, upstream_examples=large)
        out.append(_judge(f"ResNets beat ViT at the smallest pre-training set ({label})", src,
                          {f"{res} - {vit} at {int(small)}": stats.beats(r_s, v_s)},
                          {f"{vit} at {int(small)}": (v_s, base(small)), f"{res} at {int(small)}": (r_s, base(small))},
                          f"{res} {pct(r_s)} vs {vit} {pct(v_s)}; "))
        if min(len(v_s), len(v_l), len(r_s), len(r_l)) == 0:
            continue
        # four independent groups (seed i at 1.8k and at 55k are different runs): the interaction contrast
        out.append(_judge(f"ViT gains more from more pre-training data than ResNets ({label})", src,
                          {"(ViT gain) - (ResNet gain)": stats.interaction(v_l, v_s, r_l, r_s)},
                          {f"{vit} at {int(large)}": (v_l, base(large)), f"{res} at {int(large)}": (r_l, base(large))},
                          f"{int(small)} -> {int(large)} examples: {vit} {100 * (v_l.mean() - v_s.mean()):+.1f} pp, "
                          f"{res} {100 * (r_l.mean() - r_s.mean()):+.1f} pp; "))
    return out + _larger_vit_verdict(df) + _hybrid_verdict(df) + _compute_verdict(df)


def _larger_vit_verdict(df: pd.DataFrame) -> list[Verdict]:
    """[P] §4.3: larger ViTs trail smaller ones on small data and pay off on large data. "Larger" is more
    pre-training compute per image (`train_flops` at a shared size: a smaller patch or a wider, deeper model,
    as Fig. 5's x-axis). Tested as the interaction: the larger ViT's gain from the smallest to the largest
    shared pre-training set minus the smaller ViT's (four independent groups), on the 5-shot probe."""
    claim, src = "Larger ViTs pay off only with more pre-training data (5-shot linear)", "[P] §4.3, Fig. 3/4"
    d = select(df, metric="fewshot5", stage="pretrain", family="ViT")
    d = d if "train_flops" in d else d.assign(train_flops=0.0)
    sizes = d.groupby("model").upstream_examples.apply(lambda s: set(s.dropna()))
    if len(sizes) < 2:
        return [Verdict(claim, src, "not run", "one ViT size in these results: the cpu profile's `model_sizes` "
                                              "adds a second at the smallest and largest pre-training sizes")]
    pairs = [(a, b) for a in sizes.index for b in sizes.index if a < b and len(sizes[a] & sizes[b]) >= 2]
    if not pairs:
        return [Verdict(claim, src, "not run", "no two ViT sizes share two pre-training sizes")]
    a, b = max(pairs, key=lambda ab: len(sizes[ab[0]] & sizes[ab[1]]))
    lo, hi = min(sizes[a] & sizes[b]), max(sizes[a] & sizes[b])
    cost = {m: float(select(d, model=m, upstream_examples=hi).train_flops.mean()) for m in (a, b)}
    smaller, larger = sorted((a, b), key=lambda m: (cost[m], m))
    g = {(m, n): seeds(d, model=m, upstream_examples=n) for m in (smaller, larger) for n in (lo, hi)}
    base = {n: floor(df, "fewshot5", d.dataset.iloc[0], n) for n in (lo, hi)}
    means = ", ".join(f"{m} at {int(n)} {pct(g[m, n])}" for m in (smaller, larger) for n in (lo, hi))
    ratio = f" ({larger} {cost[larger] / cost[smaller]:.1f}x the compute)" if cost[smaller] > 0 else ""
    return [_judge(claim, src, {f"({larger} gain) - ({smaller} gain)": stats.interaction(
        g[larger, hi], g[larger, lo], g[smaller, hi], g[smaller, lo])},
        {f"{m} at {int(n)}": (g[m, n], base[n]) for m in (smaller, larger) for n in (lo, hi)}, f"{means}{ratio}; ")]


def _hybrid_verdict(df: pd.DataFrame) -> list[Verdict]:
    """[P] §4.4, Fig. 5: hybrids beat the ViT they are built on at small compute; tested at the smallest
    pre-training size (the least compute of the sweep) on the 5-shot probe."""
    claim, src = "Hybrids beat ViT at small pre-training compute (5-shot linear)", "[P] §4.4, Fig. 5"
    d = select(df, metric="fewshot5", stage="pretrain")
    hyb, vit = _main_model(d, "Hybrid"), _main_model(d, "ViT")
    if hyb is None or vit is None:
        return [Verdict(claim, src, "not run", "no hybrid in these results: the cpu profile's models list adds "
                                              "R14x0.25+ViT-Nano/4 to the scaling sweep")]
    shared = set(select(d, model=hyb).upstream_examples.dropna()) & set(select(d, model=vit).upstream_examples.dropna())
    if not shared:
        return [Verdict(claim, src, "not run", f"{hyb} and {vit} share no pre-training size")]
    n = min(shared)
    h, v = seeds(d, model=hyb, upstream_examples=n), seeds(d, model=vit, upstream_examples=n)
    base = floor(df, "fewshot5", d.dataset.iloc[0], n)
    return [_judge(claim, src, {f"{hyb} - {vit} at {int(n)}": stats.beats(h, v)},
                   {f"{hyb} at {int(n)}": (h, base), f"{vit} at {int(n)}": (v, base)},
                   f"{hyb} {pct(h)} vs {vit} {pct(v)}; ")]


def gap_table(df: pd.DataFrame, metric: str = "fewshot5", stage: str = "pretrain") -> pd.DataFrame:
    """ViT - ResNet difference per pre-training size, with its 90% Welch interval (Fig. 3/4 trend)."""
    d = select(df, metric=metric, stage=stage)
    vit, res = _main_model(d, "ViT"), _main_model(d, "ResNet")
    if vit is None or res is None:
        return pd.DataFrame()
    rows = []
    for n in sorted(d.upstream_examples.dropna().unique()):
        c = stats.alike(seeds(d, model=vit, upstream_examples=n), seeds(d, model=res, upstream_examples=n))
        lo, hi = c.ci if c.ci else (math.nan, math.nan)
        rows.append({"pre-training examples": int(n), f"{vit} - {res} (pp)": round(100 * c.diff, 2),
                     "90% interval (pp)": f"[{100 * lo:+.2f}, {100 * hi:+.2f}]", "n": f"{c.n[0]}/{c.n[1]}"})
    return pd.DataFrame(rows)


def _compute_verdict(df: pd.DataFrame) -> list[Verdict]:
    """[P] §4.4, Fig. 5: ViT reaches ResNet performance with less compute. At the largest size, the best
    ViT against the best ResNet: where the ViT took less compute the claim holds if it is significantly
    above the ResNet (p_for) and a ResNet above it refutes nothing (it paid more); where the ViT took
    more compute, a ResNet significantly above it refutes the claim (p_against) and nothing can confirm it."""
    d = select(df, metric="fewshot5", stage="pretrain")
    if d.empty or "train_flops" not in d:
        return []
    d = d[d.upstream_examples == d.upstream_examples.max()]
    g = d.groupby(["family", "model"]).agg(acc=("value", "mean"), flops=("train_flops", "mean")).reset_index()
    vit, res = g[g.family == "ViT"], g[g.family == "ResNet"]
    if vit.empty or res.empty:
        return []
    r, v = res.sort_values("acc").iloc[-1], vit.sort_values("acc").iloc[-1]
    c = stats.beats(seeds(d, model=r.model), seeds(d, model=v.model))
    p_for, p_against = (None, None) if c.p_for is None else (c.p_against, 1.0) if v.flops < r.flops else (1.0, c.p_for)
    return [Verdict("ViT reaches ResNet performance with less pre-training compute (5-shot linear)", "[P] §4.4, Fig. 5",
                    stats.decide(p_for, p_against), f"{r.model} {100 * r.acc:.1f}% at {r.flops:.2e} FLOPs; {v.model} {100 * v.acc:.1f}% at "
                             f"{v.flops:.2e} FLOPs (ResNet/ViT compute {r.flops / v.flops:.2f}x); ResNet above ViT: "
                             f"{c.text()}", p_for=p_for, p_against=p_against)]


# ----------------------------------------------------------------------------- position embeddings
def position_embedding_verdicts(df: pd.DataFrame) -> list[Verdict]:
    out, src = [], "[P] App. D.4, Table 8"
    for metric, label in (("fewshot5", "5-shot linear"), ("top1", "top-1")):
        d = select(table8_runs(df), metric=metric)
        if d.empty:
            continue
        base = _sweep_floor(df, d, metric)
        none = seeds(d, pos_embed="none")
        kinds = {k: v for k in ("1d", "2d", "relative") if (v := seeds(d, pos_embed=k, pos_embed_at="stem")).size}
        if not none.size or not kinds:
            continue
        floors = {f"{k}": (v, base) for k, v in kinds.items()}
        out.append(_judge(f"No position embedding is worse than 1-D, 2-D and relative ({label})", src,
                          {f"{k} - none": stats.beats(v, none) for k, v in kinds.items()}, floors,
                          f"none {pct(none)}; " + "; ".join(f"{k} {pct(v)}" for k, v in kinds.items()) + ". "))
        pairs = {f"{a} vs {b}": stats.alike(kinds[a], kinds[b]) for a, b in combinations(kinds, 2)}
        out.append(_judge(f"1-D, 2-D and relative embeddings are alike within ±1 pp ({label})", src, pairs, floors))
        places = {}
        for k in ("1d", "2d"):
            at = {a: v for a in ("stem", "every_layer", "every_layer_shared")
                  if (v := seeds(d, pos_embed=k, pos_embed_at=a)).size}
            places.update({f"{k} {a} vs {b}": stats.alike(at[a], at[b]) for a, b in combinations(at, 2)})
        if places:
            out.append(_judge(f"Stem, every-layer and shared every-layer injection are alike within ±1 pp ({label})",
                              src, places, floors))
    return out + _pooling_verdict(df)


def _pooling_verdict(df: pd.DataFrame) -> list[Verdict]:
    """App. D.3 (Fig. 9, ImageNet 5-shot): each pooling at its own learning rate, chosen on validation
    accuracy, then compared on the 5-shot probe and on test top-1."""
    from .experiments.select import best

    if "pool" not in df or (d := pooling_runs(df)).pool.nunique() < 2:
        return []
    chosen = {}
    for pool, g in d.groupby("pool"):
        val = g[g.metric == "top1_val"]
        if val.empty:
            return [Verdict("Class token and GAP work alike, each at its own learning rate", "[P] App. D.3, Fig. 9",
                            "not run", "no validation accuracy recorded: the learning rate cannot be chosen")]
        chosen[pool] = best([{"lr": r.lr, "top1_val": r.value} for r in val.itertuples()], "top1_val", ["lr"])["lr"]
    edge = "; ".join(f"{pool}'s lr {chosen[pool]:g} at the edge of its grid ({', '.join(f'{x:g}' for x in grid)})"
                     for pool, grid in ((p, sorted(g.lr.unique())) for p, g in d.groupby("pool"))
                     if chosen[pool] in (grid[0], grid[-1]))
    out = []
    for metric, label in (("fewshot5", "5-shot linear"), ("top1", "top-1")):
        values = {pool: seeds(g, metric=metric, lr=chosen[pool]) for pool, g in d.groupby("pool")}
        base = _sweep_floor(df, d, metric)
        v = _judge(f"Class token and GAP work alike within ±1 pp, each at its own learning rate ({label})",
                   "[P] App. D.3, Fig. 9", {"token vs GAP": stats.alike(values["token"], values["gap"])},
                   {p: (v, base) for p, v in values.items()},
                   f"token (lr {chosen['token']:g}, chosen on validation) {pct(values['token'])}; "
                   f"GAP (lr {chosen['gap']:g}) {pct(values['gap'])}; ")
        # a rate at the end of its grid: the optimum may lie beyond it, "its own rate" is not established
        v.flag = "; ".join(x for x in (v.flag, edge) if x)
        out.append(v)
    return out


# ------------------------------------------------------------------------------------- transfer
def transfer_verdicts(df: pd.DataFrame) -> list[Verdict]:
    out, d = [], select(df, metric="top1", stage="finetune")
    native = d[~d.upstream.astype(str).str.contains(" px")]
    native = native.assign(n=native.upstream_examples.fillna(-1))
    img = int(native.img_size.mode().iloc[0]) if len(native) else None
    if native.n.nunique() >= 2:  # one verdict per downstream set, as Table 5 compares the rows per dataset
        small, large = sorted(native.n.unique())[0], -1 if (native.n == -1).any() else sorted(native.n.unique())[-1]
        for ds, h in native[native.img_size == img].groupby("dataset"):
            comps, floors = {}, {}
            for model, g in h.groupby("model"):
                a, b = seeds(g, n=large), seeds(g, n=small)
                if a.size and b.size:
                    comps[f"{model} on {ds}"] = stats.beats(a, b)
                    floors[f"{model} on {ds}"] = (b, floor(df, "top1", ds))
            if comps:
                out.append(_judge(f"Pre-training on the larger upstream set transfers better (ImageNet -> ImageNet-21k "
                                  f"rows; downstream {ds})", "[P] §4.2, Table 5", comps, floors))
    return out + _resolution_verdicts(df, d) + _scratch_verdicts(df, d)


REAL_PIXELS, UPSAMPLED = "real extra pixels", "upsampled images: more tokens, no new information"


def _resolution_verdicts(df: pd.DataFrame, d: pd.DataFrame) -> list[Verdict]:
    out, kinds = [], set()
    src = "[P] §3.2, App. B.1.1 (Touvron et al. 2019)"
    for (upstream, model), g in d.groupby(["upstream", "model"]):
        sizes = sorted(g.img_size.dropna().unique())
        if len(sizes) < 2:
            continue
        lo, hi = sizes[0], sizes[-1]
        low_pre = " px" in str(upstream)
        sub = g if low_pre else g[g.upstream_examples == g.upstream_examples.max()]  # the whole upstream set
        for ds, h in sub.groupby("dataset"):
            # paired: seed s's two fine-tunes start from the same parent (seed s's pre-trained model)
            a, b = paired_seeds(select(h, img_size=hi), select(h, img_size=lo))
            if not (a.size and b.size):
                continue
            kind = REAL_PIXELS if low_pre else UPSAMPLED
            kinds.add(kind)
            out.append(_judge(f"Fine-tuning at a higher resolution than pre-training helps ({kind})", src,
                              {f"{int(hi)} px - {int(lo)} px": stats.beats(a, b, paired=True)},
                              {f"{int(lo)} px": (b, floor(df, "top1", ds))},
                              f"{model} pre-trained on {upstream}"
                              + ("" if low_pre else f" ({int(sub.upstream_examples.max())})")
                              + f", fine-tuned on {ds}: {int(lo)} px {pct(b)} -> {int(hi)} px {pct(a)}; "))
    if kinds == {REAL_PIXELS}:  # the cpu profile: no upsampled control
        out.append(Verdict(f"Fine-tuning at a higher resolution than pre-training helps ({UPSAMPLED})", src, "not run",
                           "the cpu profile fine-tunes at a higher resolution only with real extra pixels; the control "
                           "(the 28 px ViT fine-tuned at 36 px: 3 runs, ~7 min more on 2 cores) is the gpu profile's "
                           "design (32 -> 64 px)"))
    return out


def _scratch_verdicts(df: pd.DataFrame, d: pd.DataFrame) -> list[Verdict]:
    out = []
    for ds, h in select(df, metric="top1", stage="scratch").groupby("dataset"):  # one verdict per downstream set
        comps, floors = {}, {}
        for (model, up), g in h.groupby(["model", "upstream"]):
            pre = select(d, model=model, dataset=ds)
            pre = pre[~pre.upstream.astype(str).str.contains(" px")]
            pre = pre[pre.upstream_examples == pre.upstream_examples.max()]  # pre-trained on the whole upstream set
            img = g.img_size.iloc[0]
            a, b = seeds(pre[pre.img_size == img]), seeds(g)
            if a.size and b.size:
                comps[f"{model} on {ds} vs scratch {up}"] = stats.beats(a, b)
                floors[f"{model} on {ds}"] = (a, floor(df, "top1", ds))
        if comps:
            claim = f"Pre-training (on the larger upstream set) beats training from scratch (downstream {ds})"
            out.append(_judge(claim, "[P] §4.2, Table 2/5", comps, floors))
    return out


# ------------------------------------------------------------------------------------ attention
def attention_verdicts(df: pd.DataFrame) -> list[Verdict]:
    out = []
    d = select(df, metric="attention_distance")
    uniform = select(df, metric="uniform_attention_distance")["value"]
    u = float(uniform.iloc[0]) if len(uniform) else math.nan
    top = select(df, metric="top1", stage="pretrain")
    flag = below_flag({"analysed models' top-1": (seeds(top), floor(df, "top1", top.dataset.iloc[0]) if len(top) else math.nan)})
    if not d.empty and "layer" in d:
        first, last = d.layer.min(), d.layer.max()
        per_seed = d.groupby(["seed", "layer"])["value"].mean().unstack()
        rho = float(pd.Series(per_seed.columns).corr(pd.Series(per_seed.mean().values), method="spearman"))
        # paired: both layers are measured in the same seed's model
        c = stats.beats(per_seed[last].values, per_seed[first].values, paired=True)
        ev = f"layer {int(last)} - layer {int(first)}: {c.text(scale=1, unit='px')}"
        out.append(Verdict("Mean attention distance grows with depth", "[P] §4.5, Fig. 7 right", c.verdict,
                           f"{per_seed[first].mean():.1f} px in layer {int(first)} -> {per_seed[last].mean():.1f} px in "
                           f"layer {int(last)} (uniform attention: {u:.1f} px); Spearman rho(layer, distance) = "
                           f"{rho:.2f}; {ev}", p_for=c.p_for, p_against=c.p_against, flag=flag))
        low = d[d.layer == first].groupby(["seed", "head"])["value"].mean()
        local = low.groupby("seed").min() < 0.75 * u
        wide = low.groupby("seed").max() > 0.9 * u
        # a rule on every seed, not a test: no p, outside the correction
        out.append(Verdict("In the lowest layer some heads attend locally, others globally", "[P] §4.5, Fig. 7 right",
                           "reproduced" if (local & wide).all() else "not reproduced",
                           f"rule, no test: layer {int(first)} heads span {low.min():.1f}-{low.max():.1f} px; local = below "
                           f"75% of uniform ({0.75 * u:.1f} px), global = above 90% ({0.9 * u:.1f} px); "
                           f"both in {int((local & wide).sum())}/{len(local)} seeds", flag=flag))
    r = seeds(df, metric="pos_similarity_vs_distance")
    if r.size:
        c = stats.beats(-r, np.zeros_like(r) + 0.3)  # r below -0.3: a clearly distance-encoding embedding
        out.append(Verdict("Learned position embeddings encode distance (similarity falls with patch distance)",
                           "[P] §4.5, Fig. 7 centre", c.verdict,
                           f"Pearson r(similarity, distance) {r.mean():.2f} (per seed {', '.join(f'{x:.2f}' for x in r)}); "
                           f"test r < -0.3: {c.text(scale=1, unit='')}", p_for=c.p_for, p_against=c.p_against, flag=flag))
    return out


VERDICTS: dict[str, Callable[[pd.DataFrame], list[Verdict]]] = {
    "scaling": scaling_verdicts, "position_embeddings": position_embedding_verdicts,
    "transfer": transfer_verdicts, "attention": attention_verdicts}


# ----------------------------------------------------------------- every pair of what a user trained
def pair_verdict(a: np.ndarray, b: np.ndarray, names: tuple[str, str], base: float = math.nan) -> dict:
    """One row of a pairwise table: A - B with its 90% Welch interval, the one-sided Welch p of the larger
    mean, a verdict under REPORT.md's rules (`stats.beats` at 5%, `stats.alike` within ±1 pp) and, beside it,
    a flag where either model is below the pixel baseline of the same split (`below_flag`)."""
    alike, up, down = stats.alike(a, b), stats.beats(a, b), stats.beats(b, a)
    lo, hi = alike.ci if alike.ci else (math.nan, math.nan)
    p = down.p if up.diff < 0 else up.p  # the side of the larger mean (NaN: A's)
    if alike.verdict == "too few seeds":
        verdict = f"too few seeds (need {stats.MIN_SEEDS} each)"
    elif up.verdict == "reproduced" or down.verdict == "reproduced":
        hi_name, lo_name = names if up.verdict == "reproduced" else names[::-1]
        verdict = f"{hi_name} above {lo_name}" + (f" (within ±{100 * stats.EQUIVALENCE_MARGIN:g} pp)"
                                                    if alike.verdict == "reproduced" else "")
    elif alike.verdict == "reproduced":
        verdict = f"alike within ±{100 * stats.EQUIVALENCE_MARGIN:g} pp"
    else:
        verdict = "inconclusive"
    return {"A": names[0], "B": names[1], "A (%)": pct(a), "B (%)": pct(b),
            "A - B (pp)": round(100 * alike.diff, 2),
            "90% interval (pp)": "-" if math.isnan(lo) else f"[{100 * lo:+.2f}, {100 * hi:+.2f}]",
            "p (Welch, one-sided)": "-" if p is None else f"{p:.3g}", "verdict": verdict,
            "flag": below_flag({names[0]: (a, base), names[1]: (b, base)})}


def pairwise(groups: dict[str, np.ndarray], base: float = math.nan) -> pd.DataFrame:
    names = [k for k, v in groups.items() if np.asarray(v).size]
    return pd.DataFrame([pair_verdict(groups[a], groups[b], (a, b), base) for a, b in combinations(names, 2)])


def position_embedding_pairs(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Every pair of the Table 8 variants the sweep trained (kind and placement), per metric."""
    grid, out = table8_runs(df), {}
    for metric, label in (("fewshot5", "5-shot linear accuracy"), ("top1", "top-1 on the test split")):
        d = select(grid, metric=metric)
        if d.empty:
            continue
        base = _sweep_floor(df, d, metric)
        groups = {variant_label(k, at): seeds(d, pos_embed=k, pos_embed_at=at) for k, at in VARIANTS}
        table = pairwise(groups, base)
        if len(table):
            out[f"Every pair of the variants trained: {label} (A - B, 90% interval, verdict)"] = table
    return out


def scaling_pairs(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Every pair of the models trained, per pre-training size: 5-shot (Fig. 4) and fine-tuned (Fig. 3)."""
    out = {}
    for metric, stage, label in (("fewshot5", "pretrain", "5-shot linear accuracy"),
                                 ("top1", "finetune", "fine-tuned top-1")):
        d = select(df, metric=metric, stage=stage)
        rows = []
        for n in sorted(d.upstream_examples.dropna().unique()):
            at = select(d, upstream_examples=n)
            base = floor(df, metric, at.dataset.iloc[0], n if metric == "fewshot5" else None)
            groups = {m: seeds(at, model=m) for m in sorted(at.model.unique(), key=_model_order)}
            t = pairwise(groups, base)
            if len(t):
                t.insert(0, "pre-training examples", f"{int(n):,}")
                rows.append(t)
        if rows:
            out[f"Every pair of the models trained, per pre-training size: {label} (A - B, 90% interval, verdict)"] = \
                pd.concat(rows, ignore_index=True)
    return out


def _model_order(model: str) -> tuple:
    """ViTs, then hybrids, then ResNets (the paper's figure order), by name within each."""
    return ("+" in model, model.startswith("BiT"), model)
