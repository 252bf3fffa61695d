"""Transfer: pre-train upstream, fine-tune downstream (Table 2, App. Table 5).

The paper pre-trains on ImageNet, ImageNet-21k and JFT-300M and fine-tunes on ImageNet, CIFAR-10/100,
Oxford-IIIT Pets and Flowers-102 at 384 px, higher than the 224 px of pre-training, interpolating the
position embeddings in 2-D ([P] §3.2, App. B.1.1: SGD momentum 0.9, batch 512, cosine decay, no
weight decay, grad clip 1, zero-initialised head). Claims: the larger upstream set transfers
better (Table 5: every ImageNet-21k row above its ImageNet row for B/16); fine-tuning at a higher
resolution helps; pre-training beats training from scratch.

Here: a small and a large upstream set (a class-balanced subset vs the whole set), each model
fine-tuned on every downstream set at the pre-training resolution and at a higher one, plus a
from-scratch row. With `pretrained=` (a timm name such as `vit_base_patch16_224.orig_in21k`, or a
local weight file with `pretrained_model=`), the released weights are fine-tuned instead, with the
recipe of the profile (`pretrained_recipe`: the paper's Table 4 only in gpu/paper, the cpu recipe at a
4x4 patch grid in cpu), augmented as the dataset allows (no flips on digits).

    papermill notebooks/transfer.ipynb out.ipynb -p profile cpu
    papermill notebooks/transfer.ipynb out.ipynb -p profile gpu -p pretrained vit_base_patch16_224.orig_in21k
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from . import common, floors, launch, recipes, skeleton
from .common import Job, ParameterError

NOTEBOOK = "transfer"

# timm names of the paper's released weights -> our model names.
TIMM_TO_PAPER = {
    "vit_base_patch16_224": "ViT-B/16", "vit_base_patch32_224": "ViT-B/32", "vit_large_patch16_224": "ViT-L/16",
    "vit_large_patch32_224": "ViT-L/32", "vit_huge_patch14_224": "ViT-H/14", "vit_base_r50_s16_224": "R50+ViT-B/16",
    "vit_base_patch16_384": "ViT-B/16", "vit_large_patch32_384": "ViT-L/32", "vit_base_r50_s16_384": "R50+ViT-B/16",
    "vit_tiny_patch16_224": "ViT-Ti/16", "vit_small_patch16_224": "ViT-S/16",
}


@dataclass
class Params(launch.ExperimentParams):
    upstream: str | None = None  # pre-training dataset (None = the profile's)
    downstream: list | None = None  # list of downstream datasets (None = the profile's)
    pretrained: str | None = None  # timm name with tag, or a local .pth/.safetensors/.npz: fine-tune released weights
    pretrained_model: str | None = None  # our model name for a local `pretrained` file, e.g. "ViT-B/16"
    models: list | None = None  # model names of the registry's grammar (None = the profile's)
    upstream_sizes: list | None = None  # [small, large] upstream subset sizes, positive ints (None = the profile's)
    finetune_sizes: list | None = None  # fine-tuning resolutions in px (None = the profile's)
    scratch: bool | None = None  # train the from-scratch rows (None = the profile's: yes)

    def check(self):
        skeleton.check_models("models", self.models)
        common.positive_ints("upstream_sizes", self.upstream_sizes)  # against the dataset's size: in preflight
        common.positive_ints("finetune_sizes", self.finetune_sizes)  # against the patch size: in preflight
        skeleton.check_choices("downstream", self.downstream)
        skeleton.check_datasets(self.upstream, *(self.downstream or []))
        if self.pretrained:
            name = pretrained_model_name(self.pretrained, self.pretrained_model)
            skeleton.check_models("pretrained_model", name, single=True)
        elif self.pretrained_model:
            raise ParameterError("pretrained_model is only used together with pretrained=")


def pretrained_model_name(source: str, explicit: str | None) -> str:
    if explicit:
        return explicit
    is_file = "/" in source or source.endswith((".pth", ".npz", ".safetensors", ".bin"))
    if source.startswith("timm:") or not is_file:
        arch = source.removeprefix("timm:").split(".")[0]
        if arch in TIMM_TO_PAPER:
            return TIMM_TO_PAPER[arch]
        raise ParameterError(f"pretrained={source!r}: unknown timm architecture {arch!r}; known: "
                             f"{sorted(TIMM_TO_PAPER)}")
    raise ParameterError(f"pretrained={source!r} is a file: also pass pretrained_model (e.g. 'ViT-B/16')")


@dataclass
class Profile:
    upstream: str
    upstream_sizes: tuple  # (small, large); None = the whole set
    downstream: tuple[str, ...]
    models: tuple[str, ...]
    img_size: int  # pre-training resolution
    finetune_sizes: tuple[int, ...]  # same resolution and a higher one
    seeds: int
    pretrain: dict | None  # None (cpu): the shared validation-selected upstream runs of recipes.py
    finetune: dict
    finetune_examples: int | None = None
    finetune_augment: bool = True  # random crop + flip; off for digit sets, which a flip does not preserve
    pretrained_finetune: dict | None = None  # smoke: its own recipe for released weights (see pretrained_recipe)
    paper_recipe: bool = False  # fine-tune each downstream set with [P] Table 4's recipe (recipes.paper_finetune)
    resolution_pretrain: int | None = None  # cpu: a ViT pre-trained at this lower resolution ...
    resolution_finetune: tuple[int, ...] = ()  # ... fine-tuned at these (real extra pixels)
    upsampled_finetune: tuple[int, ...] = ()  # cpu: the whole-set model also fine-tuned at these (upsampled)
    scratch: bool = True  # the from-scratch rows


def smoke() -> Profile:
    """Seconds on scikit-learn digits (upstream and downstream)."""
    return Profile(upstream="digits", upstream_sizes=(200, None), downstream=("digits",), models=("ViT-Nano/4",),
                   img_size=8, finetune_sizes=(8, 12), seeds=1, finetune_augment=False,
                   pretrain=dict(steps=5, batch_size=32, optimizer="adam", lr=1e-3, weight_decay=0.1, warmup_steps=1),
                   finetune=dict(steps=4, batch_size=32, optimizer="sgd", lr=0.01, warmup_steps=1),
                   pretrained_finetune=dict(steps=3, batch_size=16, optimizer="sgd", lr=0.01, warmup_steps=1,
                                            img_size=32))


def cpu() -> Profile:
    """Fashion-MNIST 1.8k subset ("ImageNet") vs all 55k ("ImageNet-21k") -> MNIST with 1,000 training images
    (`recipes.MNIST_1K`, VTAB-1k's size, [P] §4.1); ViT-Nano/4 and BiT-R14x0.25, 3 seeds. The pre-training runs
    and their fine-tunes are the scaling notebook's (one run, many uses); fine-tuning follows [P] App. B.1.1 at
    CPU scale (recipes.py).

    The upstream sets are the scaling sweep's fine-tuned sizes (no fine-tune is trained for transfer alone); the
    designs that can test each claim at this scale (docs/cpu-profile-budget.md):
    * higher-resolution fine-tuning with real extra pixels: ViT-Nano/4 pre-trained on Fashion-MNIST
      downsampled to 16 px (4x4 patches), fine-tuned at 16 px and at its native 28 px (7x7, position
      embeddings interpolated bilinearly as in [VT]); paired by seed (both fine-tunes start from one parent);
    * the upsampled control: the 55k 28 px ViT fine-tuned at 28 and at 36 px (9x9 patches: more tokens, no new
      information), also paired;
    * from scratch with the fine-tuning budget (`recipes.CPU_FINETUNE_STEPS` on MNIST-1k, chosen on
      validation) and, for the ViT, with the budget of the 1.8k pre-training plus fine-tuning.

    Expected (paper, qualitatively): the 55k rows above the 1.8k rows; 28 px (from 16) above 16 px;
    every pre-trained row above scratch.
    Command: papermill notebooks/transfer.ipynb out.ipynb -p profile cpu
    """
    return Profile(upstream="fashion_mnist", upstream_sizes=(1800, None), downstream=(recipes.MNIST_1K,),
                   models=("ViT-Nano/4", "BiT-R14x0.25"), img_size=28, finetune_sizes=(28,), seeds=3,
                   pretrain=None, finetune=dict(recipes.CPU_FINETUNE), finetune_augment=False,
                   resolution_pretrain=16, resolution_finetune=(16, 28), upsampled_finetune=(36,))


def gpu() -> Profile:
    """CIFAR-100 10k subset vs all 50k -> CIFAR-10, Pets, Flowers-102 at 32 and 64 px (ViT-S/4, ViT-B/4).
    With pretrained=vit_base_patch16_224.orig_in21k: the paper's fine-tuning recipe at 384 px instead."""
    return Profile(upstream="cifar100", upstream_sizes=(10000, None),
                   downstream=("cifar10", "oxford_iiit_pet", "oxford_flowers102"), models=("ViT-S/4", "ViT-B/4"),
                   img_size=32, finetune_sizes=(32, 64), seeds=3,
                   pretrain=dict(steps=10000, batch_size=512, optimizer="adam", lr=1e-3, weight_decay=0.1,
                                 warmup_steps=500, schedule="linear"),
                   finetune=dict(steps=1000, batch_size=512, optimizer="sgd", lr=0.01, warmup_steps=100,
                                 schedule="cosine", weight_decay=0.0))


def paper() -> Profile:
    """[P] Table 5 ImageNet vs ImageNet-21k rows for B/16: pre-trained with Table 3's ImageNet recipe
    (`recipes.paper_pretrain`, 93,836 steps; a 128k class-balanced subset drawn by streaming stands for the
    smaller set), fine-tuned at 224 and 384 px with Table 4's recipe per dataset (`recipes.paper_finetune`).
    ImageNet-21k itself is not in the data table: pass upstream= a local copy.
    Expected: B/16 CIFAR-10 98.13 (ImageNet) / 98.95 (I21k), CIFAR-100 87.13 / 91.67, Pets 93.81 / 94.43."""
    return Profile(upstream="imagenet-1k", upstream_sizes=(128000, None),
                   downstream=("cifar10", "cifar100", "oxford_iiit_pet", "oxford_flowers102"), models=("ViT-B/16",),
                   img_size=224, finetune_sizes=(224, 384), seeds=1, pretrain=recipes.paper_pretrain("imagenet-1k"),
                   finetune=recipes.paper_finetune("cifar10", img_size=None), paper_recipe=True)


PROFILES = skeleton.profiles_by_name(smoke, cpu, gpu, paper)
validate_params = skeleton.parameter_validator(Params)
profile = skeleton.profile_chooser(PROFILES, "upstream", "downstream", "seeds", "models", "upstream_sizes",
                                   "finetune_sizes", "scratch")


def pretrained_recipe(params: Params, p: Profile, model: str, dataset: str) -> dict:
    """The fine-tuning recipe for released weights in this profile: [P] Table 4 at 384 px in gpu/paper; the
    cpu recipe (`recipes.CPU_FINETUNE`) at a 4x4 patch grid in cpu; the profile's own in smoke."""
    from ..models.registry import parse_name

    if params.profile in ("gpu", "paper"):
        return recipes.paper_finetune(dataset)
    if p.pretrained_finetune is not None:
        return dict(p.pretrained_finetune)
    patch = getattr(parse_name(model), "patch", 16)
    return dict(recipes.CPU_FINETUNE, steps=recipes.cpu_finetune_steps(dataset), img_size=4 * patch)


def _finetune_recipe(p: Profile, dataset: str) -> dict:
    return recipes.paper_finetune(dataset, img_size=None) if p.paper_recipe else dict(p.finetune)


def jobs(params: Params) -> list[Job]:
    p = profile(params)
    exp, first = f"{NOTEBOOK}-{params.profile}", p.models[0]
    if params.pretrained:  # fine-tune the released weights with the profile's recipe
        model = pretrained_model_name(params.pretrained, params.pretrained_model)
        return [Job(common.train_config(experiment=exp, model=model, dataset=ds, seed=seed, init=params.pretrained,
                                        augment=recipes.finetune_augment(ds, ft.get("img_size")),
                                        train_examples=p.finetune_examples, **ft),
                    stage="finetune", upstream=params.pretrained)
                for ds in p.downstream for ft in [pretrained_recipe(params, p, model, ds)] for seed in range(p.seeds)]

    def pretrain(model: str, seed: int, n: int | None = None, img_size: int = p.img_size) -> dict:
        if p.pretrain is None:  # cpu: the shared upstream runs of recipes.py
            return recipes.upstream_config(params.profile, model, seed, n=n, dataset=p.upstream, img_size=img_size)
        return common.train_config(experiment=exp, model=model, dataset=p.upstream, train_examples=n,
                                   img_size=img_size, seed=seed, **p.pretrain)

    def finetune(model: str, ds: str, seed: int, size: int) -> dict:
        if p.pretrain is None:  # cpu: the fine-tunes the scaling notebook shares
            return recipes.finetune_config(params.profile, model, ds, seed, size)
        augment = recipes.finetune_augment(ds, size) if p.paper_recipe else p.finetune_augment
        return common.train_config(experiment=exp, model=model, dataset=ds, img_size=size, seed=seed, augment=augment,
                                   train_examples=p.finetune_examples, **_finetune_recipe(p, ds))

    out = []
    for model in p.models:
        for seed in range(p.seeds):
            for n in p.upstream_sizes:
                pre = Job(pretrain(model, seed, n), stage="pretrain", upstream=p.upstream, upstream_examples=n)
                up = p.upsampled_finetune if n is None and model == first else ()  # more tokens, no new pixels
                out += [pre] + [Job(finetune(model, ds, seed, size), stage="finetune", upstream=p.upstream,
                                    upstream_examples=n, parent=pre)
                                for ds in p.downstream for size in (*p.finetune_sizes, *up)]
            out += _scratch_jobs(params, p, model, seed) if p.scratch else []
            if model == first and p.resolution_pretrain:  # real extra pixels: pre-train low, fine-tune at native
                low = f"{p.upstream} at {p.resolution_pretrain} px"
                pre = Job(pretrain(model, seed, img_size=p.resolution_pretrain), stage="pretrain", upstream=low)
                out += [pre] + [Job(finetune(model, p.downstream[0], seed, size), stage="finetune", upstream=low,
                                    parent=pre) for size in p.resolution_finetune]
    return out


def _scratch_jobs(params: Params, p: Profile, model: str, seed: int) -> list[Job]:
    """From scratch: the profile's pre-training recipe for each downstream set's fine-tuning budget (paper: a 10k
    warm-up, 500-10k steps); cpu: the fine-tuning budget on every downstream set and, for the first model, on
    the first set the budget of the small pre-training plus fine-tuning."""
    if p.pretrain is not None:
        return [Job(common.train_config(
            experiment=f"{NOTEBOOK}-{params.profile}", model=model, dataset=ds, img_size=p.img_size, seed=seed,
            train_examples=p.finetune_examples,
            **skeleton.with_steps(p.pretrain, _finetune_recipe(p, ds).get("steps", p.pretrain.get("steps")))),
            stage="scratch") for ds in p.downstream]
    out = [Job(recipes.scratch_config(params.profile, model, ds, seed, steps), stage="scratch",
               upstream=f"none ({steps} steps, the fine-tuning budget)")
           for ds in p.downstream for steps in [recipes.cpu_finetune_steps(ds)]]
    if model == p.models[0]:
        small = recipes.pretrain_steps(p.upstream_sizes[0]) + recipes.cpu_finetune_steps(p.downstream[0])
        out.append(Job(recipes.scratch_config(params.profile, model, p.downstream[0], seed, small), stage="scratch",
                       upstream=f"none ({small} steps, {p.upstream_sizes[0]} pre-training + fine-tuning)"))
    return out


def baseline_rows(params: Params, log=print) -> pd.DataFrame:
    """Pixel logistic regression on every downstream set and on each upstream set (same splits)."""
    p = profile(params)
    hold = skeleton.held_out_fraction(p.pretrain is None)  # cpu: the shared upstream runs' hold-out
    ups = [] if params.pretrained else [(p.upstream, n, hold) for n in p.upstream_sizes]
    return floors.rows(params, NOTEBOOK, trained_on=[(ds, None, 0.0) for ds in p.downstream] + ups, log=log)


run, collect = skeleton.run_and_collect(NOTEBOOK, jobs, baseline_rows)


def tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    d = df[(df.metric == "top1") & df.stage.isin(["finetune", "scratch"])].copy()
    if d.empty:
        return {}
    d["pre-training"] = [(f"from scratch, {u}" if s == "scratch" else
                          f"{u or 'released weights'}" + ("" if pd.isna(n) else f" ({int(n)})"))
                         for s, u, n in zip(d.stage, d.upstream, d.upstream_examples)]
    w = skeleton.percent_table(d, ["model", "pre-training", "img_size"], "dataset").reset_index()
    w.columns = [str(c) for c in w.columns]
    b = df[(df.stage == "baseline") & (df.metric == "top1")]
    base = {ds: common.fmt_pm(g.value.mean(), 0, 1, 100) for ds, g in b.groupby("dataset")}
    w.loc[len(w)] = ["-", "pixels: logistic regression", None] + [base.get(c, "") for c in w.columns[3:]]
    out = {"Table 5 analogue: fine-tuned top-1 (%) by model, upstream and fine-tuning resolution, "
           "with the pixel baseline": w}
    up = df[(df.metric == "top1") & (df.stage == "pretrain")]
    if len(up):  # the upstream accuracy of the models compared above
        by = ["model", "upstream", "size", "img_size"]
        u = skeleton.percent_cells(up.assign(size=up.upstream_examples.fillna(-1)), by)
        out["Upstream test top-1 (%) of the pre-trained models"] = u.rename(columns={"cell": "upstream top-1 (%)"})[
            by + ["upstream top-1 (%)"]]
    return out


def figures(df: pd.DataFrame) -> dict:
    import seaborn as sns

    d = df[(df.metric == "top1") & (df.stage == "finetune")].copy()
    if d.empty:
        return {}
    d["upstream set"] = ["all" if pd.isna(n) else str(int(n)) for n in d.upstream_examples]
    d["img_size"] = d["img_size"].astype(int)  # 28, not 28.0, whether the frame came from the runs or a CSV
    g = sns.catplot(data=d, x="img_size", y="value", hue="upstream set", col="dataset", row="model", kind="point",
                    errorbar="sd", height=2.8, aspect=1.1, sharey=False)
    g.set_axis_labels("fine-tuning resolution (px)", "top-1")
    g.set_titles("{row_name}\n{col_name}", size=8)  # one line each overlapped its neighbour's
    g.figure.suptitle("Table 5 analogue: upstream size and fine-tuning resolution", y=1.02)
    return {"table5_transfer": g.figure}
