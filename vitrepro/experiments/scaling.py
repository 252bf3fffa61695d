"""Scaling: accuracy against pre-training data size and compute (Fig. 3, Fig. 4, Fig. 5).

The paper pre-trains ViTs, BiT ResNets and hybrids on growing datasets (ImageNet, ImageNet-21k,
JFT-300M and JFT subsets of 9M/30M/90M/300M) and measures transfer by fine-tuning (Fig. 3) and
by the 5-shot linear probe (Fig. 4); Fig. 5 plots transfer accuracy against pre-training compute.
Claims ([P] §4.3-4.4): ResNets win on the smallest pre-training sets, ViTs overtake them as the
data grows and larger ViTs need more data to pay off; at equal compute ViT beats ResNets and
hybrids help at small budgets.

Here: class-balanced subsets of an upstream set (4+ sizes spanning 30x), a fixed step budget per
run (so small subsets are seen for many epochs, as in the paper's small-data regime), then each
pre-trained model is (a) probed with the 5-shot linear regression on the downstream set and
(b) fine-tuned on it with SGD momentum and a zero-initialised head.

    papermill notebooks/scaling.ipynb out.ipynb -p profile cpu
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from . import common, floors, launch, recipes, skeleton
from .common import Job

NOTEBOOK = "scaling"


@dataclass
class Params(launch.ExperimentParams):
    upstream: str | None = None  # pre-training dataset (None = the profile's)
    downstream: str | None = None  # transfer dataset for few-shot and fine-tuning (None = the profile's)
    sizes: list | None = None  # pre-training subset sizes, positive ints (None = the profile's)
    models: list | None = None  # model names of the registry's grammar (None = the profile's)
    steps: int | None = None  # pre-training steps per run, the budget (None = the profile's recipe)

    def check(self):
        common.positive_ints("sizes", self.sizes)  # against the dataset's size: in preflight
        skeleton.check_models("models", self.models)
        skeleton.check_positive("steps", self.steps)
        skeleton.check_datasets(self.upstream, self.downstream)


@dataclass
class Profile:
    """A sweep: models x upstream sizes x seeds, one pre-training recipe and one fine-tuning recipe."""

    upstream: str
    downstream: str
    sizes: tuple[int, ...]
    models: tuple[str, ...]
    img_size: int
    seeds: int
    pretrain: dict | None  # None: the shared validation-selected upstream runs of recipes.upstream_config
    finetune: dict
    finetune_examples: int | None = None
    finetune_augment: bool | str = True  # random crop + flip; off for digits, which a flip does not preserve
    finetuned_sizes: tuple | None = None  # the sizes whose models are also fine-tuned (None: every size)
    model_sizes: dict = field(default_factory=dict)  # a model's own pre-training sizes (default: `sizes`)
    finetuned_models: tuple | None = None  # the models that are also fine-tuned (None: every model)
    steps: int | None = None  # pre-training steps per run (None: the recipe's own schedule)


def smoke() -> Profile:
    """Seconds on scikit-learn digits (ships inside a dependency): exercises every code path."""
    return Profile(
        upstream="digits", downstream="digits", sizes=(40, 1200), img_size=8, seeds=1,
        models=("ViT-Nano/4", "BiT-R14x0.25", "R14x0.25+ViT-Nano/4"),
        pretrain=dict(steps=6, batch_size=32, optimizer="adam", lr=1e-3, weight_decay=0.1, warmup_steps=2),
        finetune=dict(steps=4, batch_size=32, optimizer="sgd", lr=0.01, warmup_steps=1),
        finetune_examples=200, finetune_augment=False)


def cpu() -> Profile:
    """Fashion-MNIST subsets of 1.8k, 5.5k, 18k and 55k images (30x), 3 seeds; Fig. 3/4/5 at CPU scale.

    Models: ViT-Nano/4 (0.21 M parameters, 7x7 patches) and BiT-R14x0.25 (0.51 M) at every size, each
    pre-trained with the cpu recipe of `recipes.py` (AdamW at batch 128, lr 2e-3 for the ViT and 1e-2 for the
    ResNet, both chosen on validation; no augmentation, also chosen on validation) for one long schedule
    (8 epochs of the 55k set, a subset capped at 30 passes) and early-stopped on 5k held-out training images
    ([P] §4.3); each seed draws its own subset and hold-out (`recipes.CPU_DATA_SEED`). Measured by the
    few-shot linear probe on held-out Fashion-MNIST images (Fig. 4; 5, 10 and 25 shots, 10 draws each) and
    by fine-tuning on MNIST-1k (Fig. 3; MNIST with 1,000 training images, `recipes.MNIST_1K`: off the ceiling
    of the whole MNIST split). Fine-tuned are the 1.8k and 55k models of the two main families (the sizes the
    claims compare).

    For the model-family axes, ViT-Nano/7 (0.32x the FLOPs) at 1.8k and 55k and the hybrid R14x0.25+ViT-Nano/4 at
    1.8k; design and wall time: docs/cpu-profile-budget.md (`python benchmarks/cpu_profile_estimate.py`).

    Expected (paper, qualitatively): the ResNet ahead on the smallest subsets; the ViT - ResNet gap
    shrinking as data grows; the larger ViT gaining more from data; the hybrid above its ViT at 1.8k.
    Command: papermill notebooks/scaling.ipynb out.ipynb -p profile cpu
    """
    return Profile(
        upstream="fashion_mnist", downstream=recipes.MNIST_1K, sizes=(1800, 5500, 18000, None), img_size=28, seeds=3,
        models=("ViT-Nano/4", "BiT-R14x0.25", "ViT-Nano/7", "R14x0.25+ViT-Nano/4"), pretrain=None,
        finetune=dict(recipes.CPU_FINETUNE), finetune_augment=False, finetuned_sizes=(1800, None),
        model_sizes={"ViT-Nano/7": (1800, None), "R14x0.25+ViT-Nano/4": (1800,)},
        finetuned_models=("ViT-Nano/4", "BiT-R14x0.25"))


def gpu() -> Profile:
    """One GPU: CIFAR-100 subsets (1.6k..50k) pre-training -> CIFAR-10 transfer, 32 px.

    Expected: as for the cpu profile, with larger gaps. Command:
    papermill notebooks/scaling.ipynb out.ipynb -p profile gpu
    """
    return Profile(
        upstream="cifar100", downstream="cifar10", sizes=(1600, 5000, 16000, 50000), img_size=32, seeds=3,
        models=("ViT-S/4", "ViT-B/4", "BiT-R26x1", "R26x0.25+ViT-S/8"),
        pretrain=dict(steps=10000, batch_size=512, optimizer="adam", lr=1e-3, weight_decay=0.1, warmup_steps=500,
                      schedule="linear"),
        finetune=dict(steps=2000, batch_size=512, optimizer="sgd", lr=0.01, warmup_steps=100, schedule="cosine"))


def paper() -> Profile:
    """The paper's Fig. 3 ImageNet point and models: [P] Table 3's ImageNet recipe (`recipes.paper_pretrain`:
    Adam, batch 4096, 10k warm-up, lr 3e-3 cosine, wd 0.3, dropout 0.1; 300 epochs of ImageNet-1k = 93,836
    steps, the same step budget for every class-balanced subset, drawn by streaming), 5-shot probe on
    ImageNet, fine-tuned at 384 px on ImageNet with [P] Table 4's recipe (`recipes.paper_finetune`: SGD
    momentum, batch 512, 20k steps). Needs a cluster under torchrun (`launcher="torchrun"`).
    Expected ImageNet top-1 ([P] Table 5): B/16 77.91, B/32 73.38, L/16 76.53, L/32 71.16.
    """
    return Profile(
        upstream="imagenet-1k", downstream="imagenet-1k", sizes=(40000, 128000, 400000, 1281167), img_size=224,
        seeds=1, models=("ViT-B/32", "ViT-B/16", "ViT-L/32", "ViT-L/16", "BiT-R50x1", "BiT-R152x2", "R50+ViT-B/16"),
        pretrain=recipes.paper_pretrain("imagenet-1k"), finetune=recipes.paper_finetune("imagenet-1k"),
        finetune_augment=recipes.finetune_augment("imagenet-1k"))


PROFILES = skeleton.profiles_by_name(smoke, cpu, gpu, paper)
validate_params = skeleton.parameter_validator(Params)
profile = skeleton.profile_chooser(PROFILES, "upstream", "downstream", "seeds", "sizes", "models", "steps")


def _pretrain_config(params: Params, p: Profile, model: str, n: int | None, seed: int) -> dict:
    if p.pretrain is None:  # cpu: the shared upstream runs of recipes.py (validation-selected, early-stopped)
        return recipes.upstream_config(params.profile, model, seed, n=n, dataset=p.upstream, img_size=p.img_size,
                                       steps=p.steps)
    if n is not None and n == recipes.TRAIN_IMAGES.get(p.upstream):
        n = None  # the whole set (streamed: no subset to draw)
    return common.train_config(
        experiment=f"{NOTEBOOK}-{params.profile}", model=model, dataset=p.upstream, train_examples=n,
        img_size=p.img_size, seed=seed, fewshot_dataset=p.downstream, **skeleton.with_steps(p.pretrain, p.steps))


def jobs(params: Params) -> list[Job]:
    p = profile(params)
    finetuned = p.sizes if params.sizes or p.finetuned_sizes is None else p.finetuned_sizes  # given sizes: all
    out = []
    for n in sorted(p.sizes, key=lambda n: -(n or float("inf"))):  # long runs first: the pool ends together
        for model in p.models:
            if n not in p.model_sizes.get(model, p.sizes):
                continue
            for seed in range(p.seeds):
                pre = Job(_pretrain_config(params, p, model, n, seed), stage="pretrain", upstream=p.upstream,
                          upstream_examples=n)
                out.append(pre)
                if n not in finetuned or (p.finetuned_models is not None and model not in p.finetuned_models):
                    continue
                if p.pretrain is None:  # cpu: the fine-tune that transfer shares
                    cfg = recipes.finetune_config(params.profile, model, p.downstream, seed,
                                                  p.finetune.get("img_size", p.img_size))
                else:
                    cfg = common.train_config(
                        experiment=f"{NOTEBOOK}-{params.profile}", model=model, dataset=p.downstream,
                        train_examples=p.finetune_examples, seed=seed, augment=p.finetune_augment,
                        **{"img_size": p.img_size, **p.finetune})
                out.append(Job(cfg, stage="finetune", upstream=p.upstream, upstream_examples=n, parent=pre))
    return out


def baseline_rows(params: Params, log=print) -> pd.DataFrame:
    """Pixel baselines on the same splits: logistic regression per pre-training subset and on the
    downstream set; the pixel 5-shot probe with the models' protocol."""
    p = profile(params)
    shared = p.pretrain is None  # cpu: the shared upstream runs, probed with shots from their held-out part
    hold = skeleton.held_out_fraction(shared)
    trained_on = [(p.upstream, n, hold) for n in p.sizes] + [(p.downstream, None, 0.0)]
    return floors.rows(params, NOTEBOOK, trained_on=trained_on,
                       fewshot=[p.upstream if shared else p.downstream], fewshot_val_fraction=hold,
                       seeds=skeleton.shot_draws(shared), log=log)


run, collect = skeleton.run_and_collect(NOTEBOOK, jobs, baseline_rows)


def tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Fig. 3/4 tables (mean ± std over seeds, %) with the pixel baseline of the same split as the last row
    (per training-set size for upstream top-1)."""
    out = {}
    for metric, stage, title in (("fewshot5", "pretrain", "5-shot linear accuracy on held-out images (%), Fig. 4"),
                                 ("top1", "finetune", "Fine-tuned accuracy on the downstream set (%), Fig. 3"),
                                 ("top1", "pretrain", "Upstream test accuracy after pre-training (%)")):
        d = df[(df.metric == metric) & (df.stage == stage)]
        if d.empty:
            continue
        ds = d.dataset.iloc[0]
        w = skeleton.percent_table(d, ["family", "model"], "upstream_examples")
        b = df[(df.stage == "baseline") & (df.metric == metric) & (df.dataset == ds)]
        cells = [b[b.upstream_examples == n] if stage == "pretrain" and metric == "top1" else b for n in w.columns]
        w.loc[("baseline", f"{floors.FEWSHOT if metric == 'fewshot5' else floors.LOGREG} ({ds})"), :] = [
            skeleton.percent_cell(c.value) if len(c) else "-" for c in cells]
        out[title] = w.reset_index()
        out[title].columns = [f"{int(c):,}" if isinstance(c, float) else str(c) for c in out[title].columns]
    d = df[(df.metric == "fewshot5") & (df.stage == "pretrain")]
    if not d.empty:
        t = d.groupby(["family", "model"]).agg(params=("params", "max"), train_flops_at_largest=("train_flops", "max"))
        # results.csv stores FLOPs as floats (other rows leave the column empty): whole numbers either way.
        out["Models: parameters and pre-training compute (FLOPs), Fig. 5 x-axis"] = t.astype("int64").reset_index()
    return out


def figures(df: pd.DataFrame) -> dict:
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.ticker import FixedLocator, NullLocator

    figs = {}
    for metric, stage, name, ylabel in (
            ("top1", "finetune", "fig3_finetune_vs_data", "fine-tuned top-1 on downstream"),
            ("fewshot5", "pretrain", "fig4_fewshot_vs_data", "5-shot linear (held-out images)")):
        d = df[(df.metric == metric) & (df.stage == stage)]
        if d.empty:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 4))
        sns.lineplot(data=d, x="upstream_examples", y="value", hue="model", style="family", markers=True,
                     errorbar="sd", err_style="bars", ax=ax)
        sizes = sorted(d.upstream_examples.unique())  # a log x-axis labelled at the sizes used, no minor labels
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{int(v):,}" for v in sizes])
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
        ax.set(xlabel="pre-training examples", ylabel=ylabel,
               title=f"{name.split('_')[0].replace('fig', 'Fig. ')}: accuracy vs pre-training data")
        figs[name] = fig
    d = df[(df.metric == "fewshot5") & (df.stage == "pretrain")]
    if not d.empty:
        top = d[d.upstream_examples == d.upstream_examples.max()]
        fig, ax = plt.subplots(figsize=(5.5, 4))
        means = top.groupby(["family", "model"]).agg(train_flops=("train_flops", "mean"), value=("value", "mean"),
                                                     sd=("value", "std")).reset_index()
        sns.scatterplot(data=means, x="train_flops", y="value", hue="family", style="model", s=70, ax=ax)
        ax.errorbar(means.train_flops, means.value, yerr=means.sd.fillna(0), fmt="none", ecolor="grey", capsize=3)
        ax.set_xscale("log")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
        ax.set(xlabel="pre-training compute (FLOPs)", ylabel="5-shot linear (held-out images)",
               title="Fig. 5: accuracy vs pre-training compute")
        figs["fig5_accuracy_vs_compute"] = fig
    return figs
