"""Inspecting the Vision Transformer (Fig. 6, Fig. 7).

[P] §4.5: the first layer's embedding filters have principal components that look like plausible
basis functions for each patch's fine structure (Fig. 7 left); the learned position embeddings
encode distance in the image, with closer patches more similar and row/column structure (Fig. 7
centre); some heads attend globally already in the lowest layers while others stay local, and the
mean attention distance grows with depth (Fig. 7 right); attention rollout highlights the
semantically relevant regions (Fig. 6).

Here: a ViT trained by this notebook's profile (through the run store, so re-running reuses it),
a run of another notebook (`model_run="run:<experiment>/<run_id>"`), or released weights
(`pretrained=` a timm name or a local file with `pretrained_model=`).

    papermill notebooks/attention.ipynb out.ipynb -p profile cpu
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from .. import analysis
from . import common, floors, launch, recipes, skeleton
from .common import Job, ParameterError
from .explorer import pretrain_runs, test_images, uniform_distance
from .results import grid_array, grid_rows
from .transfer import pretrained_model_name

NOTEBOOK = "attention"


@dataclass
class Params(launch.ExperimentParams):
    dataset: str | None = None  # training set and the source of sample images (None = the profile's)
    model_run: str | None = None  # analyse a stored run instead, "run:<experiment>/<run_id>"
    pretrained: str | None = None  # or released weights: a timm name with tag, or a local file
    pretrained_model: str | None = None  # our model name for `pretrained`, e.g. "ViT-B/16"
    num_images: int | None = None  # images averaged for attention distance (None = the profile's)
    model: str | None = None  # the ViT this notebook trains and analyses (None = the profile's)

    def check(self):
        skeleton.check_models("model", self.model, families=("vit",), single=True)
        if sum(map(bool, (self.model, self.model_run, self.pretrained))) > 1:
            raise ParameterError("give model (a ViT this notebook trains), model_run or pretrained, not several")
        skeleton.check_datasets(self.dataset)
        if self.model_run and not self.model_run.startswith("run:"):
            raise ParameterError(f"model_run must look like 'run:<experiment>/<run_id>', got {self.model_run!r}")
        if self.pretrained:
            name = pretrained_model_name(self.pretrained, self.pretrained_model)
            skeleton.check_models("pretrained_model", name, single=True)
        skeleton.check_positive("num_images", self.num_images)


@dataclass
class Profile:
    dataset: str
    model: str
    img_size: int
    seeds: int
    train: dict | None  # None (cpu): the shared upstream runs of recipes.upstream_config
    num_images: int


def smoke() -> Profile:
    """Seconds on scikit-learn digits."""
    return Profile(dataset="digits", model="ViT-Nano/2", img_size=8, seeds=1, num_images=32,
                   train=dict(steps=5, batch_size=32, optimizer="adam", lr=1e-3, weight_decay=0.1, warmup_steps=1))


def cpu() -> Profile:
    """The cpu profile's upstream ViT-Nano/4 (7x7 grid of 4 px patches at 28 px), trained on all 55k
    Fashion-MNIST training images with the validation-selected recipe and early stopping: the very runs
    of the scaling and transfer notebooks (one run, many uses), 3 seeds, with 8 snapshots each so the
    structure can be followed over training. Fig. 6/7 qualitatively.

    Expected (paper): mean attention distance grows with depth and stays below the uniform-attention
    distance (14.4 px on this grid) in the lower layers, where some heads are local and others global;
    position-embedding similarity falls with patch distance (a clearly negative correlation).
    Command: papermill notebooks/attention.ipynb out.ipynb -p profile cpu
    """
    return Profile(dataset="fashion_mnist", model="ViT-Nano/4", img_size=28, seeds=3, num_images=512, train=None)


def gpu() -> Profile:
    """ViT-S/4 on CIFAR-100 at 32 px (8x8 patches)."""
    return Profile(dataset="cifar100", model="ViT-S/4", img_size=32, seeds=2, num_images=1024,
                   train=dict(steps=10000, batch_size=512, optimizer="adam", lr=1e-3, weight_decay=0.1,
                              warmup_steps=500, schedule="linear"))


def paper() -> Profile:
    """[P] Fig. 6/7 use ViT-L/16 (Fig. 7) on JFT; ImageNet-1k stands in, with Table 3's ImageNet recipe
    (`recipes.paper_pretrain`: 93,836 steps at batch 4096; streamed)."""
    return Profile(dataset="imagenet-1k", model="ViT-L/16", img_size=224, seeds=1, num_images=128,
                   train=recipes.paper_pretrain("imagenet-1k"))


PROFILES = skeleton.profiles_by_name(smoke, cpu, gpu, paper)
validate_params = skeleton.parameter_validator(Params)
profile = skeleton.profile_chooser(PROFILES, "dataset", "seeds", "num_images", "model")


def jobs(params: Params) -> list[Job]:
    if params.model_run or params.pretrained:
        return []
    p = profile(params)
    if p.train is None:
        return [Job(recipes.upstream_config(params.profile, p.model, seed, dataset=p.dataset, img_size=p.img_size),
                    stage="pretrain", upstream=p.dataset) for seed in range(p.seeds)]
    return [Job(common.train_config(experiment=f"{NOTEBOOK}-{params.profile}", model=p.model, dataset=p.dataset,
                                    img_size=p.img_size, seed=seed, **p.train), stage="pretrain", upstream=p.dataset)
            for seed in range(p.seeds)]


def models(params: Params, df: pd.DataFrame | None = None) -> list[tuple[str, torch.nn.Module]]:
    """The models to analyse: (label, model) pairs."""
    if params.model_run:
        return [(params.model_run, common.load_run_model(params, params.model_run))]
    if params.pretrained:
        from ..models import create_model, load_pretrained

        model = create_model(pretrained_model_name(params.pretrained, params.pretrained_model))
        load_pretrained(model, params.pretrained)
        return [(params.pretrained, model)]
    return [(f"{r.model} seed {int(r.seed)}", common.load_run_model(params, r.run_id))
            for r in pretrain_runs(df).itertuples()]


SAMPLE_IMAGES = 8  # Fig. 6: test images shown with their attention rollout
# The tables written beside results.csv (what the weight-dependent figures are drawn from): their axes
DIMS = {"filters": ("component", "channel", "y", "x"), "similarity": ("row", "col", "other_row", "other_col"),
        "rollout_images": ("image", "channel", "y", "x"), "rollout_maps": ("image", "row", "col")}


def analyse(params: Params, df: pd.DataFrame) -> tuple[pd.DataFrame, dict, dict]:
    """Attention distances and position-similarity statistics of every analysed model; the small tables the
    weight-dependent figures are drawn from (`DIMS`, of the first model); and the Fig. 6/7 figures,
    drawn from those two (`figures`), so that `source="results"` draws the same ones without the weights."""
    if params.source != "train":  # the committed rows and tables: no weights needed
        analysed = _committed(params, "analysis")
        extra = {name: t for name in DIMS
                 if (t := skeleton.read_results(params, NOTEBOOK, analysis=name)) is not None}
        return analysed, figures(analysed, extra), extra
    rows, extra = [], {}
    p = profile(params)
    stored = pretrain_runs(df) if len(df) else df
    for i, (label, model) in enumerate(models(params, df)):
        raw, x = test_images(p.dataset, model, p.num_images)
        dist = analysis.model_attention_distance(model, x, batch_size=64)
        run_id = stored.run_id.iloc[i] if len(stored) else label
        keys = dict(notebook=NOTEBOOK, profile=params.profile, run_id=run_id, stage="analysis", model=label,
                    family="ViT", dataset=p.dataset, seed=i)
        rows += [dict(keys, metric="attention_distance", value=r.distance, layer=r.layer, head=r.head)
                 for r in dist.itertuples()]
        rows.append(dict(keys, metric="uniform_attention_distance", value=uniform_distance(model)))
        sim = analysis.model_position_similarity(model)
        if sim is not None:
            rows.append(dict(keys, metric="pos_similarity_vs_distance",
                             value=analysis.position_similarity_vs_distance(sim)))
        if i == 0:  # Fig. 7 left (filter PCs) and centre, Fig. 6 (test images, their rollout) as long-form tables
            arrays = {"filters": analysis.model_filter_components(model).components, "similarity": sim,
                      "rollout_images": raw[:SAMPLE_IMAGES],
                      "rollout_maps": analysis.model_rollout(model, x[:SAMPLE_IMAGES])}
            extra = {k: grid_rows(a, DIMS[k], model=label, run_id=run_id) for k, a in arrays.items() if a is not None}
    analysed = pd.DataFrame(rows)
    return analysed, figures(analysed, extra), extra


def figures(analysed: pd.DataFrame, extra: dict) -> dict:
    """Fig. 6, Fig. 7 left/centre/right from the analysis rows and tables (`analyse`, or the committed CSVs);
    a figure whose table is missing (None) is left out."""
    figs, extra = {}, {k: v for k, v in (extra or {}).items() if v is not None and len(v)}
    grid = {k: torch.tensor(grid_array(v, DIMS[k])) for k, v in extra.items()}
    for name, key, plot, title in (
            ("filters", "fig7_left_filters", analysis.plot_filters, "Fig. 7 left: embedding filter PCs"),
            ("similarity", "fig7_centre_position_similarity", analysis.plot_position_similarity,
             "Fig. 7 centre: position-embedding similarity")):
        if name in extra:
            figs[key] = plot(grid[name], title=f"{title} ({extra[name].model.iloc[0]})")
    if "rollout_images" in extra and "rollout_maps" in extra:
        figs["fig6_attention_rollout"] = analysis.plot_rollout(grid["rollout_images"].to(torch.uint8),
                                                               grid["rollout_maps"])
    d = analysed[analysed.metric == "attention_distance"] if len(analysed) else analysed
    if len(d):
        d = d.rename(columns={"value": "distance"}).astype({"layer": int, "head": int})
        fig = analysis.plot_attention_distance(d, title="Fig. 7 right: mean attention distance")
        if (uniform := _uniform(analysed)) is not None:
            fig.axes[0].axhline(uniform, color="grey", ls="--", lw=1, label="uniform attention")
            fig.axes[0].legend(fontsize=7)
        figs["fig7_right_attention_distance"] = fig
    return figs


def baseline_rows(params: Params, log=print) -> pd.DataFrame | None:
    """Pixel logistic regression on the training set of the analysed runs; none for a stored run of
    another notebook or released weights (this notebook trained nothing to set beside it)."""
    if params.model_run or params.pretrained:
        return None
    p = profile(params)
    hold = skeleton.held_out_fraction(p.train is None)  # cpu: the shared upstream runs' hold-out
    return floors.rows(params, NOTEBOOK, trained_on=[(p.dataset, None, hold)], log=log)


_run, collect = skeleton.run_and_collect(NOTEBOOK, jobs, baseline_rows)


def run(params: Params, log=None) -> pd.DataFrame:
    """Train or reuse the analysed runs; their long-form results with the pixel baseline (with `source` other
    than "train": those rows of the committed results.csv, its analysis rows left to `analyse`)."""
    frame = _run(params, log=log)
    return frame if params.source == "train" else frame[~frame.stage.isin(ANALYSED_STAGES)].reset_index(drop=True)


def tables(df: pd.DataFrame, analysed: pd.DataFrame) -> dict[str, pd.DataFrame]:
    out = {}
    d = analysed[analysed.metric == "attention_distance"] if len(analysed) else analysed
    if len(d):
        t = d.groupby(["model", "layer"])["value"].agg(["mean", "min", "max"]).reset_index()
        t.columns = ["model", "layer", "mean distance (px)", "min over heads", "max over heads"]
        if (uniform := _uniform(analysed)) is not None:
            t["uniform attention (px)"] = uniform
        out["Fig. 7 right: mean attention distance by layer"] = t.round(2)
        s = analysed[analysed.metric == "pos_similarity_vs_distance"]
        if len(s):
            out["Fig. 7 centre: correlation of position-embedding similarity with patch distance"] = s[
                ["model", "value"]].rename(columns={"value": "Pearson r"}).round(3)
    tr = analysed[analysed.metric.astype(str).str.endswith("_during_training")] if len(analysed) else analysed
    if len(tr):
        w = tr.assign(what=[f"layer {int(l)} distance (px)" if m.startswith("attention") else "Pearson r (pos. sim.)"
                            for m, l in zip(tr.metric, tr.layer.fillna(0))])
        out["Over training: mean over seeds at each snapshot"] = w.pivot_table(
            index="step", columns="what", values="value", aggfunc="mean").round(3).reset_index()
    t = df[df.metric == "top1"] if len(df) else df
    if len(t):
        t = t[["model", "seed", "value"]].round(4)  # a seed read back from a CSV is a float (NaN for the baseline)
        out["Analysed models and the pixel baseline: top-1 on the test split"] = t.assign(
            seed=["" if pd.isna(v) else str(int(v)) for v in t.seed])
    return out


def over_training(params: Params, df: pd.DataFrame, num_images: int = 128) -> tuple[pd.DataFrame, dict]:
    """Attention distance by layer and the position-similarity correlation at every stored snapshot of
    the analysed runs (cpu profile: 8 per run), so a user sees whether the structure is emerging.
    Returns long-form rows (run_id, seed, step, layer, metric, value) and the figure."""
    from ..store import RunStore

    if params.source != "train":  # the committed rows; the uniform line from the analysis rows
        tracked = _committed(params, "over_training")
        return tracked, over_training_figure(tracked, _uniform(_committed(params, "analysis")))
    store = RunStore(common.runs_dir(params))
    rows = []
    for r in pretrain_runs(df).itertuples():
        model = common.load_run_model(params, r.run_id)
        for snap in sorted((store.find(r.run_id)[2] / "snapshots").glob("step_*.pt")):
            keys = dict(run_id=r.run_id, seed=int(r.seed), step=int(snap.stem.removeprefix("step_")))
            model.load_state_dict(torch.load(snap, map_location="cpu", weights_only=True))
            _, x = test_images(profile(params).dataset, model, num_images)
            dist = analysis.model_attention_distance(model.eval(), x, batch_size=64)
            rows += [dict(keys, layer=int(layer), metric="attention_distance_during_training",
                          value=float(g.distance.mean())) for layer, g in dist.groupby("layer")]
            sim = analysis.model_position_similarity(model)
            if sim is not None:
                rows.append(dict(keys, layer=None, metric="pos_similarity_during_training",
                                 value=analysis.position_similarity_vs_distance(sim)))
    out = pd.DataFrame(rows)
    uniform = uniform_distance(common.load_run_model(params, out.run_id.iloc[0])) if len(out) else None
    return out, over_training_figure(out, uniform)


ANALYSED_STAGES = ("analysis", "over_training")  # rows of results.csv computed from the runs' weights


def _committed(params: Params, stage: str) -> pd.DataFrame:
    """`source="results"`: the rows of one analysed stage of the committed results.csv."""
    frame = skeleton.read_results(params, NOTEBOOK)
    return frame[frame.stage == stage].reset_index(drop=True)


def _uniform(analysed: pd.DataFrame) -> float | None:
    u = analysed[analysed.metric == "uniform_attention_distance"]["value"] if len(analysed) else []
    return float(u.iloc[0]) if len(u) else None


def over_training_figure(tracked: pd.DataFrame, uniform: float | None) -> dict:
    """The over-training figure from `over_training`'s rows (or the committed CSV's `over_training` rows)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if tracked.empty:
        return {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    d = tracked[tracked.metric == "attention_distance_during_training"].astype({"layer": int})
    sns.lineplot(data=d, x="step", y="value", hue="layer", errorbar="sd", palette="viridis", ax=axes[0])
    if uniform is not None:
        axes[0].axhline(uniform, color="grey", ls="--", lw=1, label="uniform")
    axes[0].set(ylabel="mean attention distance (px)",
                title="attention distance over training (mean over heads, ± sd over seeds)")
    axes[0].legend(fontsize=7, title="layer")
    d = tracked[tracked.metric == "pos_similarity_during_training"]
    if len(d):
        sns.lineplot(data=d, x="step", y="value", errorbar="sd", marker="o", ax=axes[1])
        axes[1].axhline(0, color="grey", lw=0.8)
        axes[1].set(ylabel="Pearson r (similarity, distance)", title="position-embedding structure over training")
    fig.tight_layout()
    return {"fig7_over_training": fig}
