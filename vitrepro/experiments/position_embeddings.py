"""Position embeddings (App. D.4, Table 8; Fig. 7 centre) and class token vs GAP (App. D.3).

The paper trains ViT-B/16 with no position embedding, learned 1-D, 2-D and relative embeddings,
injected once after the stem, separately at every layer, or shared across layers, and reports
ImageNet 5-shot linear accuracy ([P] Table 8): none 61.4%, all others 64.0-64.3%. Claim: having
*a* position embedding matters (~3 points); which kind and where matters little (<0.3 points),
because a 14x14 grid of patches is easy to learn. App. D.3: class token and global average
pooling work alike once each has its own learning rate.

Here: a small ViT on a 7x7 patch grid, every defined (kind, placement) pair, several seeds; the
5-shot linear probe on the downstream set and top-1 on the upstream test set; the cosine
similarity of the learned 1-D embeddings; token vs GAP at two learning rates each.

    papermill notebooks/position_embeddings.ipynb out.ipynb -p profile cpu
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from .. import analysis
from . import common, floors, launch, recipes, skeleton
from .common import Job
from .results import grid_array, grid_rows

NOTEBOOK = "position_embeddings"

# Table 8's grid: (kind, placement) pairs that are defined (no embedding and relative ones: at the stem only).
VARIANTS = (("none", "stem"), ("1d", "stem"), ("1d", "every_layer"), ("1d", "every_layer_shared"),
            ("2d", "stem"), ("2d", "every_layer"), ("2d", "every_layer_shared"), ("relative", "stem"))
POS_EMBEDS = ("none", "1d", "2d", "relative")
PLACEMENTS = ("stem", "every_layer", "every_layer_shared")
POOLINGS = ("token", "gap")


@dataclass
class Params(launch.ExperimentParams):
    dataset: str | None = None  # training set (None = the profile's)
    fewshot_dataset: str | None = None  # 5-shot linear probe set (None = the profile's)
    model: str | None = None  # the ViT of every run (None = the profile's)
    pos_embeds: list | None = None  # subset of POS_EMBEDS (None = the profile's: all)
    placements: list | None = None  # subset of PLACEMENTS (None = the profile's: all)
    poolings: list | None = None  # App. D.3's poolings; fewer than two: no D.3 sweep (None = the profile's)
    train_examples: int | None = None  # Table 8's pre-training examples (None = the profile's)
    steps: int | None = None  # pre-training steps per run, the budget (None = the profile's recipe)

    def check(self):
        skeleton.check_models("model", self.model, families=("vit",), single=True)
        skeleton.check_choices("pos_embeds", self.pos_embeds, POS_EMBEDS)
        skeleton.check_choices("placements", self.placements, PLACEMENTS)
        skeleton.check_choices("poolings", self.poolings, POOLINGS)
        skeleton.check_positive("train_examples", self.train_examples)  # against the dataset's size: in preflight
        skeleton.check_positive("steps", self.steps)
        skeleton.check_datasets(self.dataset, self.fewshot_dataset)
        if not variants(profile(self)):
            raise common.ParameterError(
                f"pos_embeds={self.pos_embeds} with placements={self.placements} leave no defined variant: 'none' "
                "and 'relative' are at the stem only; defined pairs: " + ", ".join(f"{k}/{a}" for k, a in VARIANTS))


@dataclass
class Profile:
    dataset: str
    fewshot_dataset: str
    model: str
    img_size: int
    seeds: int
    train: dict | None  # None (cpu): the shared validation-selected upstream runs of recipes.upstream_config
    gap_lrs: tuple[float, ...]  # D.3: learning rates tried for both poolings
    train_examples: int | None = None  # Table 8's pre-training examples (None: the whole set)
    pooling_train_examples: int | None = None  # D.3's (None: Table 8's)
    variants: tuple = VARIANTS  # Table 8's (kind, placement) cells trained (default: all eight)
    pos_embeds: tuple[str, ...] = POS_EMBEDS  # of `variants`, the cells with these kinds and placements
    placements: tuple[str, ...] = PLACEMENTS
    poolings: tuple[str, ...] = POOLINGS  # App. D.3's (fewer than two: no D.3 sweep)
    steps: int | None = None  # pre-training steps per run (None: the recipe's own schedule)

    @property
    def pooling_examples(self) -> int | None:
        return self.pooling_train_examples if self.pooling_train_examples is not None else self.train_examples


def smoke() -> Profile:
    """Seconds on scikit-learn digits."""
    return Profile(dataset="digits", fewshot_dataset="digits", model="ViT-Nano/2", img_size=8, seeds=1,
                   train=dict(steps=5, batch_size=32, optimizer="adam", lr=1e-3, weight_decay=0.1, warmup_steps=1),
                   gap_lrs=(1e-3, 3e-3))


def cpu() -> Profile:
    """ViT-Nano/4 at 28 px (a 7x7 patch grid), the shared upstream runs of `recipes.upstream_config`
    (validation-selected recipe, early-stopped on 5k held-out images, each seed its own subset), 3 seeds per
    cell; few-shot probes (5/10/25 shots, 10 draws) with shots from held-out training images.

    Table 8 at 18k images, where the models beat a pixel logistic regression on the same images (at 5.5k they
    did not): the four kinds at the stem (the (1-D, stem) row is the scaling sweep's 18k ViT) and 1-D at every
    layer, the one placement comparison the last run suggested (the full 3x3 grid costs ~45 process-min more).
    App. D.3: token and GAP with the same head, each at lr {1e-3, 2e-3, 4e-3} (a loser on each side of each
    pooling's rate), on the 1.8k subset; each pooling's rate chosen on validation, then compared on test.
    Design and budget (issue 27): docs/cpu-profile-budget.md.

    Expected (paper): `none` below the others (Table 8: 61.4 vs 64.0-64.2); 1-D/2-D/relative and the
    placements within 1 point of each other (equivalence margin 1 pp); token ~ GAP.
    Command: papermill notebooks/position_embeddings.ipynb out.ipynb -p profile cpu
    """
    return Profile(dataset="fashion_mnist", fewshot_dataset="fashion_mnist", model="ViT-Nano/4", img_size=28,
                   seeds=3, train=None, gap_lrs=(1e-3, 2e-3, 4e-3), train_examples=18000,
                   pooling_train_examples=1800,
                   variants=(("none", "stem"), ("1d", "stem"), ("2d", "stem"), ("relative", "stem"),
                             ("1d", "every_layer")))


def gpu() -> Profile:
    """CIFAR-100 at 32 px, ViT-S/4 (8x8 grid); 5-shot probe on CIFAR-10."""
    return Profile(dataset="cifar100", fewshot_dataset="cifar10", model="ViT-S/4", img_size=32, seeds=3,
                   train=dict(steps=10000, batch_size=512, optimizer="adam", lr=1e-3, weight_decay=0.1,
                              warmup_steps=500, schedule="linear"),
                   gap_lrs=(3e-4, 1e-3, 3e-3))


def paper() -> Profile:
    """[P] App. D.4: ViT-B/16, every Table 8 cell, ImageNet 5-shot. The paper pre-trains on JFT-300M (7 epochs,
    lr 8e-4); JFT is not public, so ImageNet-1k stands in with its own Table 3 recipe (`recipes.paper_pretrain`:
    93,836 steps at batch 4096, lr 3e-3 cosine, wd 0.3, dropout 0.1; streamed), the 5-shot probe collecting its
    shots by streaming. D.3 token vs GAP at lr 3e-3 and JFT's 8e-4. Expected Table 8 values
    (none 61.38, 1-D 64.21, 2-D 64.00, relative 64.03)."""
    return Profile(dataset="imagenet-1k", fewshot_dataset="imagenet-1k", model="ViT-B/16", img_size=224, seeds=1,
                   train=recipes.paper_pretrain("imagenet-1k"), gap_lrs=(8e-4, 3e-3))


PROFILES = skeleton.profiles_by_name(smoke, cpu, gpu, paper)
validate_params = skeleton.parameter_validator(Params)
profile = skeleton.profile_chooser(PROFILES, "dataset", "fewshot_dataset", "seeds", "model", "pos_embeds",
                                   "placements", "poolings", "train_examples", "steps")


def variants(p: Profile) -> list[tuple[str, str]]:
    """Table 8's (kind, placement) pairs this sweep trains: the defined ones among the chosen kinds and placements."""
    return [(k, at) for k, at in p.variants if k in p.pos_embeds and at in p.placements]


def _config(params: Params, p: Profile, seed: int, n: int | None, **overrides) -> dict:
    if p.train is None:  # cpu: the shared upstream runs (validation-selected recipe, early stopping)
        options = {k: v for k, v in overrides.items() if v not in (None, "1d", "stem", "token") or k == "lr"}
        return recipes.upstream_config(params.profile, p.model, seed, n=n, dataset=p.dataset, img_size=p.img_size,
                                       lr=options.pop("lr", None), steps=p.steps, **options)
    return common.train_config(
        experiment=f"{NOTEBOOK}-{params.profile}", model=p.model, dataset=p.dataset, img_size=p.img_size,
        train_examples=n, seed=seed, fewshot_dataset=p.fewshot_dataset,
        **skeleton.with_steps({**p.train, **overrides}, p.steps))


def jobs(params: Params) -> list[Job]:
    p = profile(params)
    grid_lr = p.train["lr"] if p.train is not None else recipes.CPU_LR["vit"]  # Table 8's learning rate
    out = []
    for seed in range(p.seeds):
        for kind, at in variants(p):
            out.append(Job(_config(params, p, seed, p.train_examples, pos_embed=kind, pos_embed_at=at),
                           stage="pretrain", upstream=p.dataset))
        n = p.pooling_examples
        for pool in p.poolings if len(p.poolings) > 1 else ():  # D.3 compares poolings: one alone is no sweep
            for lr in p.gap_lrs:
                if pool == "token" and lr == grid_lr and n == p.train_examples and ("1d", "stem") in variants(p):
                    continue  # the (1d, stem) run above
                # cpu: everything else equal, the same head for both poolings
                head = {} if p.train is None else {"head": "linear" if pool == "gap" else p.train.get("head", "mlp")}
                cfg = _config(params, p, seed, n, pos_embed="1d", pos_embed_at="stem", pool=pool, lr=lr, **head)
                out.append(Job(cfg, stage="pretrain", upstream=p.dataset))
    return out


def baseline_rows(params: Params, log=print) -> pd.DataFrame:
    """Pixel logistic regression on the training set and the pixel 5-shot probe on the probe set."""
    p = profile(params)
    hold = skeleton.held_out_fraction(p.train is None)  # cpu: the shared upstream runs' hold-out
    sizes = dict.fromkeys((p.train_examples, p.pooling_examples))  # Table 8's, then D.3's (once if the same)
    return floors.rows(params, NOTEBOOK, trained_on=[(p.dataset, n, hold) for n in sizes], fewshot=[p.fewshot_dataset],
                       fewshot_val_fraction=hold, seeds=skeleton.shot_draws(p.train is None), log=log)


run, collect = skeleton.run_and_collect(NOTEBOOK, jobs, baseline_rows)

LABELS = {"none": "None", "1d": "1-D", "2d": "2-D", "relative": "Relative"}  # the paper's words


def variant_label(kind: str, at: str) -> str:
    """A Table 8 cell's name in the paper's words, e.g. "2-D, every layer"."""
    return f"{LABELS[kind]}, {at.replace('_', ' ')}"


def run_label(row) -> str:
    """A stored run of Table 8's grid for the explorer: its variant and seed."""
    return f"{variant_label(row.pos_embed, row.pos_embed_at)}, seed {int(row.seed)}"


def _at_size_of(df: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``df`` pre-trained on as many examples as ``runs`` (NaN = the whole set)."""
    if runs.empty:
        return df.iloc[:0]
    return df[df.upstream_examples.fillna(-1) == runs.upstream_examples.fillna(-1).iloc[0]]


def table8_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of Table 8's grid: class-token runs at the grid's shared learning rate and size.

    Every (kind, placement) pair trains at the profile's learning rate; the extra (1-D, stem) runs at
    other rates or with GAP belong to the D.3 sweep. The grid's rate is the one most token runs share,
    its size that of its runs other than (1-D, stem) (D.3 trains only those, perhaps on fewer examples)."""
    d = df[(df.pool == "token") & (df.stage == "pretrain")]
    if d.empty:
        return d
    others = d[(d.pos_embed != "1d") | (d.pos_embed_at != "stem")]
    d = _at_size_of(d, others) if len(others) else d
    return d[d.lr == d.drop_duplicates("run_id")["lr"].mode().iloc[0]]


def pooling_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the D.3 sweep: (1-D, stem) runs of both poolings at every rate, at the GAP runs' size."""
    d = df[(df.pos_embed == "1d") & (df.pos_embed_at == "stem") & (df.stage == "pretrain")]
    return _at_size_of(d, d[d.pool == "gap"])


def _pretrained_on(d: pd.DataFrame) -> str:
    sizes = d.upstream_examples.dropna().unique()
    return f", pre-trained on {int(sizes[0]):,} images" if len(sizes) == 1 else ""


def tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    out = {}
    base = table8_runs(df)
    for metric, title in (("fewshot5", "Table 8: 5-shot linear accuracy (%)"),
                          ("top1", "Top-1 on the training set's test split (%)")):
        d = base[(base.metric == metric)]
        if d.empty:
            continue
        w = skeleton.percent_table(d, "pos_embed", "pos_embed_at", digits=2)
        w = w.reindex(columns=[at for at in PLACEMENTS if at in w.columns]).astype(object).fillna("N/A").reset_index()
        w["pos_embed"] = w["pos_embed"].map(LABELS)
        b = df[(df.stage == "baseline") & (df.metric == metric)]
        n = d.upstream_examples.dropna()
        if metric == "top1" and len(n):  # pixel logistic regression on as many images as the grid
            b = floors.trained_on(b, n.iloc[0])
        if len(b):  # the pixel baseline of the same split, as the last row
            w.loc[len(w)] = [b.model.iloc[0], skeleton.percent_cell(b.value, 2)] + ["" for _ in w.columns[2:]]
        out[title + _pretrained_on(d)] = w
    d = pooling_runs(df)
    if d.pool.nunique() > 1:
        rows = []
        for (pool, lr), g in d.groupby(["pool", "lr"]):
            val, test = g[g.metric == "top1_val"].value, g[g.metric == "top1"].value
            rows.append({"pool": pool, "lr": lr, "validation top-1 (%)": skeleton.percent_cell(val, 2),
                         "test top-1 (%)": skeleton.percent_cell(test, 2), "_val": val.mean()})
        t = pd.DataFrame(rows)
        best = t.groupby("pool")["_val"].transform("max").eq(t["_val"])
        t["chosen on validation"] = best.map({True: "yes", False: ""})
        out["App. D.3: class token vs global average pooling (same head), learning rate chosen on validation"
            + _pretrained_on(d)] = t.drop(columns="_val")
    return out


def figures(df: pd.DataFrame) -> dict:
    import matplotlib.pyplot as plt
    import seaborn as sns

    figs = {}
    d = table8_runs(df)
    d = d[d.metric == "fewshot5"]
    if not d.empty:
        fig, ax = plt.subplots(figsize=(7.5, 3.8))
        sns.barplot(data=d.assign(kind=d.pos_embed.map(LABELS)), x="kind", y="value", hue="pos_embed_at",
                    errorbar="sd", ax=ax, order=list(LABELS.values()))
        lo = d["value"].min()
        pixels = df[(df.stage == "baseline") & (df.metric == "fewshot5")].value
        if len(pixels):  # the floor a representation has to beat
            ax.axhline(pixels.mean(), color="grey", ls="--", lw=1, label="pixels: 5-shot linear")
            lo = min(lo, pixels.mean())
        ax.set_ylim(max(0, lo - 0.1), min(1, d["value"].max() + 0.05))
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
        ax.set(ylabel="5-shot linear accuracy", xlabel="position embedding", title="Table 8: position embeddings")
        figs["table8_position_embeddings"] = fig
    d = pooling_runs(df)
    d = d[d.metric == "top1"]
    if d.pool.nunique() > 1:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        sns.lineplot(data=d, x="lr", y="value", hue="pool", marker="o", errorbar="sd", ax=ax)
        ax.set(xscale="log", ylabel="top-1", title="App. D.3: token vs GAP")
        figs["d3_token_vs_gap"] = fig
    return figs


def similarity_tables(params: Params, df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Fig. 7 centre's data: the cosine similarity of the learned position embeddings of the (1-D, stem) and
    (2-D, stem) runs of seed 0, as one long-form table `similarity` (kind, run_id, row, col, other_row,
    other_col, value; written beside results.csv so that `source="results"` redraws the figure)."""
    if params.source != "train":  # the committed table beside results.csv (absent: no figure)
        table = skeleton.read_results(params, NOTEBOOK, analysis="similarity")
        return {} if table is None else {"similarity": table}
    frames, d = [], table8_runs(df)
    for kind in ("1d", "2d"):
        run_ids = d[(d.pos_embed == kind) & (d.pos_embed_at == "stem") & (d.seed == 0)].run_id
        pos = common.load_run_model(params, run_ids.iloc[0]).position_embeddings() if len(run_ids) else None
        if pos is not None:
            sim = analysis.position_similarity(pos.detach())
            frames.append(grid_rows(sim, ("row", "col", "other_row", "other_col"), kind=kind, run_id=run_ids.iloc[0]))
    return {"similarity": pd.concat(frames, ignore_index=True)} if frames else {}


def similarity_figures(tables: dict) -> dict:
    """Fig. 7 centre: one figure per kind of the `similarity` table (`similarity_tables`, or the committed CSV)."""
    figs, sim = {}, (tables or {}).get("similarity")
    for kind, g in ([] if sim is None else sim.groupby("kind", sort=True)):
        fig = analysis.plot_position_similarity(grid_array(g, ("row", "col", "other_row", "other_col")))
        fig.suptitle(f"Fig. 7 centre: {LABELS[kind]} position-embedding similarity")
        figs[f"fig7_position_similarity_{kind}"] = fig
    return figs
