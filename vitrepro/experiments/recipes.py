"""Every training recipe the experiments use, each value with its source.

[P] = Dosovitskiy et al., ICLR 2021 (arXiv 2010.11929); [VT] = google-research/vision_transformer;
digest with page references: ../shared/docs/paper-numbers.md (sections 4 and 5).

Two kinds of recipe live here:

* the paper's own (`paper_pretrain`, `paper_finetune`, from `PAPER_PRETRAIN` and `PAPER_FINETUNE`): Table 3
  (pre-training; epochs turned into steps, as streamed sets need) and App. B.1.1 / Table 4 (fine-tuning, steps
  per dataset), used by the `paper` profiles and, for released weights, by `gpu`; the only copy;
* the `cpu` profile's, for models of 0.2-0.5 M parameters trained on Fashion-MNIST on two CPU cores.
  The paper's learning rates belong to batch 4096 with 10k warm-up steps; at batch 128 they diverge
  or stall, so these were chosen on a held-out part of the training data by the searches in
  `SEARCHES` (`python -m vitrepro.experiments.recipes <name>`; results in `results/recipes/`), never
  on test. Where a value was not searched, its source is given.

A pre-training run that several notebooks need is built by one function here (`upstream_config`),
with one experiment name, so the run store trains it once and every notebook reuses it.
"""
from __future__ import annotations

import math

from .jobs import train_config
from .select import Search

# ---------------------------------------------------------------------------------- the paper's
# [P] App. B.1, Table 3: Adam (0.9, 0.999), batch 4096, 10k linear warm-up, grad clip 1 (ImageNet).
PAPER_PRETRAIN_COMMON = dict(optimizer="adam", batch_size=4096, warmup_steps=10000, grad_clip=1.0)
PAPER_PRETRAIN = {
    # dataset: (epochs, base lr, decay, weight decay, dropout)              [P] Table 3 rows
    "imagenet-1k": dict(epochs=300, lr=3e-3, schedule="cosine", weight_decay=0.3, drop_rate=0.1),
    "imagenet-21k": dict(epochs=90, lr=1e-3, schedule="linear", weight_decay=0.03, drop_rate=0.1),
    "jft-300m": dict(epochs=7, lr=8e-4, schedule="linear", weight_decay=0.1, drop_rate=0.0),  # ViT-B rows
}


# Training images per set, to turn Table 3's epochs into steps (streamed sets take steps, not epochs).
TRAIN_IMAGES = {
    "imagenet-1k": 1_281_167,     # ILSVRC-2012 train split (ILSVRC/imagenet-1k on the Hub)
    "imagenet-21k": 14_197_122,   # ImageNet Fall 2011 release; [P] §4.1 "21k classes and 14M images"
    "jft-300m": 303_000_000,      # [P] §4.1 "18k classes and 303M high-resolution images"
}


def paper_pretrain(dataset: str) -> dict:
    """[P] Table 3's recipe for ViT-B on ``dataset`` (ImageNet-1k, ImageNet-21k or JFT-300M).

    Its epochs are given as steps over the whole set (ImageNet-1k: 300
    epochs at batch 4096 = 93,836 steps, [P] "~93k"): these sets are streamed, which takes steps, and a
    class-balanced subset of them trains the same number of steps ([P] §4.3: the same hyper-parameters for
    every subset)."""
    recipe = {**PAPER_PRETRAIN_COMMON, **PAPER_PRETRAIN[dataset]}
    recipe["steps"] = math.ceil(recipe.pop("epochs") * TRAIN_IMAGES[dataset] / recipe["batch_size"])
    return recipe


# [P] App. B.1.1 / Table 4: SGD momentum 0.9, batch 512, cosine, no weight decay, clip 1, 384 px,
# zero-initialised head; lr from {0.001, 0.003, 0.01, 0.03} on a held-out split; warm-up 500 and 10k
# steps for CIFAR from [VT] vit_jax/configs/common.py (the paper gives none).
PAPER_FINETUNE = dict(steps=10000, batch_size=512, optimizer="sgd", lr=0.01, weight_decay=0.0, warmup_steps=500,
                      schedule="cosine", grad_clip=1.0, img_size=384)
# [P] Table 4 steps per dataset; warm-up 100 for Pets/Flowers ([BV] configs/transfer.py: 500 would leave
# no decay in their 500 steps); ImageNet lr 0.03 ([VT] vit_jax/configs/common.py base_lr, inside Table 4's grid).
PAPER_FINETUNE_STEPS = {"imagenet-1k": 20000, "cifar10": 10000, "cifar100": 10000, "oxford_iiit_pet": 500,
                        "oxford_flowers102": 500}
PAPER_FINETUNE_OVERRIDES = {"imagenet-1k": dict(lr=0.03), "oxford_iiit_pet": dict(warmup_steps=100),
                            "oxford_flowers102": dict(warmup_steps=100)}
# Fine-tuning augmentation ([VT] input_pipeline.py: random crop of area 0.05-1, resize, flip); none for
# sets whose classes a flip does not preserve (digits, MNIST) or that are too small to crop (Fashion-MNIST).
NO_FLIP_DATASETS = ("digits", "mnist", "fashion_mnist")


def paper_finetune(dataset: str, *, img_size: int | None = 384) -> dict:
    """[P] App. B.1.1 / Table 4: the fine-tuning recipe on ``dataset`` (steps per Table 4; CIFAR's 10k where
    the table has no row), at ``img_size`` (384 in the paper; None: keep the key out)."""
    recipe = {k: v for k, v in PAPER_FINETUNE.items() if k != "img_size"} | PAPER_FINETUNE_OVERRIDES.get(dataset, {})
    recipe["steps"] = PAPER_FINETUNE_STEPS.get(dataset, PAPER_FINETUNE["steps"])
    return recipe if img_size is None else recipe | {"img_size": img_size}


def finetune_augment(dataset: str, img_size: int | None = None) -> str:
    """Fine-tuning augmentation that follows the dataset: none on digit-like sets, else [VT]'s
    random-resized crop + flip at high resolution (> 64 px) and pad-crop + flip on small images."""
    from ..data import split_ref

    if split_ref(dataset)[0] in NO_FLIP_DATASETS:  # "mnist[train_examples=1000]" is MNIST
        return "none"
    return "rrc_flip" if (img_size or 384) > 64 else "crop_flip"

# ------------------------------------------------------------------------------------- cpu recipes
FASHION_VAL = 5000 / 60000  # 5,000 of the 60,000 training images held out for selection (never trained on)
FASHION_TRAIN = 55000        # what is left to pre-train on
CPU_BATCH = 128              # small-data ViT recipes use ~1e-3 at batch 128 (e.g. Lee et al. 2021)

# Pre-training, shared by ViT and ResNet except where noted:
#   AdamW, decoupled weight decay 0.05 (DeiT, Touvron et al. 2021: 0.05 for small data, [P] uses 0.1-0.3 at
#   batch 4096), cosine decay ([P] Table 3, ImageNet row), grad clip 1 ([P] App. B.1), learning rate from the
#   `vit_pretrain` / `bit_pretrain` searches. No augmentation: crop + flip lost on validation at this budget
#   (results/recipes/augmentation.md); it pays off only over longer schedules.
CPU_PRETRAIN = dict(optimizer="adam", batch_size=CPU_BATCH, weight_decay=0.05, schedule="cosine", grad_clip=1.0,
                    augment="none")
# Chosen on validation: results/recipes/{vit,bit}_pretrain.md (each grid extended until its winner had a loser on
# each side). Hybrids: their ViT's ([P] B.1).
CPU_LR = {"vit": 2e-3, "bit": 1e-2, "hybrid": 2e-3}
CPU_EPOCHS = 8               # of the 55k set: the upstream budget (one long schedule, early-stopped on validation)
CPU_MAX_SUBSET_EPOCHS = 30   # a subset trains the same schedule, capped at this many passes over it

# Fine-tuning ([P] App. B.1.1 at CPU scale): SGD momentum 0.9, no weight decay, clip 1, cosine, zero head,
# batch 128; lr 0.3 from the `finetune` search, then 2,000 steps with `crop` (random translation by up to 3 px;
# no flip, digits are not mirror-symmetric) from the `finetune_budget` search by the one-standard-error rule
# (`select.cheapest_within_one_se`: 4,000 steps was within one binomial SE, at twice the cost); results/recipes/.
# The 1,437 scikit-learn digits keep 500 steps (not searched), as [P] Table 4 gives each dataset its own steps.
CPU_FINETUNE = dict(optimizer="sgd", batch_size=CPU_BATCH, weight_decay=0.0, schedule="cosine", grad_clip=1.0,
                    lr=0.3, steps=2000, warmup_steps=20)
CPU_FINETUNE_AUGMENT = "crop"
# The low-data downstream task: MNIST with 1,000 training images, VTAB-1k's size ([P] §4.1: "1000 training
# examples per task"); on MNIST's whole split every fine-tune reached 98-99 %, too close to the ceiling to tell
# upstream sets or pre-training from scratch apart.
LOW_DATA_EXAMPLES = 1000
MNIST_1K = f"mnist[train_examples={LOW_DATA_EXAMPLES}]"
# Its budget from the `finetune_1k` search (results/recipes/finetune_1k.md): 1,000 steps with `crop`, the most the
# profile affords (`max_cost`; the rule alone would take 4,000, the top of its grid).
MNIST_1K_MAX_STEPS = 1000
CPU_FINETUNE_STEPS = {"digits": 500, MNIST_1K: 1000}


def cpu_finetune_steps(dataset: str) -> int:
    """The cpu fine-tuning budget on ``dataset`` in steps (`CPU_FINETUNE_STEPS`, else `CPU_FINETUNE`'s)."""
    return CPU_FINETUNE_STEPS.get(dataset, CPU_FINETUNE["steps"])


def family(model: str) -> str:
    from ..models.registry import parse_name

    return parse_name(model).family


def pretrain_steps(n: int, epochs: float = CPU_EPOCHS) -> int:
    """One long schedule for every subset size ([P] §4.3: same hyper-parameters for every subset, early
    stopping), capped at `CPU_MAX_SUBSET_EPOCHS` passes over a small subset (what a 2-core machine affords)."""
    return int(min(math.ceil(epochs * FASHION_TRAIN / CPU_BATCH), math.ceil(CPU_MAX_SUBSET_EPOCHS * n / CPU_BATCH)))


# The upstream runs' data draw and probe (issue 27). CPU_DATA_SEED: the seed of every run's training subset
# and 5k hold-out (None: each model seed draws its own, so a verdict is not conditional on one subset).
# CPU_FEWSHOT_SHOTS / CPU_FEWSHOT_DRAWS: the shots probed and how many class-balanced shot draws each averages
# (the probe's own noise shrinks as 1/sqrt(draws); a draw costs milliseconds).
CPU_DATA_SEED: int | None = None
CPU_FEWSHOT_SHOTS: tuple[int, ...] = (5, 10, 25)
CPU_FEWSHOT_DRAWS = 10
# What the recipe searches of results/recipes/ ran with (their run ids must not move when the profile's change)
SEARCH_DATA = dict(data_seed=0, fewshot_shots=(5,), fewshot_draws=3)


def fewshot_on_heldout(dataset: str, shots=(5,), seeds=(0, 1, 2)) -> dict:
    """The few-shot probe with its shots drawn from the held-out (validation) part of the training set,
    images no model pre-trained on, scored on the test split ([P] §4.1: 'few-shot ... on a subset of
    training images'; here the classes are the upstream's, as ImageNet's after JFT in Table 8 / Fig. 4)."""
    return {"type": "fewshot", "dataset": dataset, "train_split": "val", "shots": [int(k) for k in shots],
            "seeds": [int(s) for s in seeds]}


def upstream_config(profile: str, model: str, seed: int, *, n: int | None = None, img_size: int = 28,
                    dataset: str = "fashion_mnist", epochs: float = CPU_EPOCHS, lr: float | None = None,
                    data_seed: int | None = CPU_DATA_SEED, fewshot_shots: tuple[int, ...] = CPU_FEWSHOT_SHOTS,
                    fewshot_draws: int = CPU_FEWSHOT_DRAWS, steps: int | None = None,
                    **model_options) -> dict:
    """The pre-training run on ``n`` examples of the cpu profile's upstream set (all 55k when None).

    Every notebook that needs this model asks for it here, so the configuration (and its run id)
    is the same and the run store trains it once. A ViT on the whole set also stores 8 evenly spaced
    copies of itself during training (the attention notebook follows its structure over training).
    `steps` replaces the schedule's length (a notebook's `steps` parameter; None: `pretrain_steps`)."""
    steps = steps or pretrain_steps(FASHION_TRAIN if n is None else n, epochs)
    # 4 validation checks per run (plus the last step): a check of 5k images costs ~20 training steps, and under
    # the cosine decay the best check is one of the last
    select_every = max(1, steps // 4)
    cfg = dict(CPU_PRETRAIN, experiment=f"upstream-{profile}", model=model, dataset=dataset, img_size=img_size,
               train_examples=n, val_fraction=FASHION_VAL, data_seed=seed if data_seed is None else data_seed,
               seed=seed, steps=steps, lr=lr if lr is not None else CPU_LR[family(model)],
               warmup_steps=min(500, steps // 10),
               select_on="val", select_every=select_every, checkpoint_every=select_every, log_every=100,
               evaluators=[{"type": "accuracy"}, fewshot_on_heldout(dataset, fewshot_shots, range(fewshot_draws))],
               **model_options)
    if n is None and family(model) == "vit":
        cfg["snapshot_every"] = max(1, steps // 8)
    return cfg


# ------------------------------------------------------------------------ searches on validation
def _pretrain_search(model: str, lrs: list) -> Search:
    return Search(base=upstream_config("select", model, 0, epochs=3, **SEARCH_DATA), grid={"lr": lrs},
                  note=f"{model}, Fashion-MNIST 55k, 3 epochs, seed 0; validation = 5k held-out training images.")


def _finetune() -> Search:
    parent = upstream_config("select", "ViT-Nano/4", 0, epochs=3, **SEARCH_DATA)
    base = dict(CPU_FINETUNE, steps=250, augment="none", experiment="finetune-select", model="ViT-Nano/4",
                dataset="mnist", img_size=28, val_fraction=0.1, data_seed=0, select_on="val",
                evaluators=[{"type": "accuracy", "split": "val"}])
    return Search(base=base, grid={"lr": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0]}, parent=parent,
                  note=f"Fine-tuning ViT-Nano/4 (pre-trained 3 epochs on Fashion-MNIST, lr {CPU_LR['vit']:g}) on "
                       "MNIST, 10% of its training split held out; the [P] Table 4 grid without 0.001, extended "
                       "upwards until its largest value lost.")


def _finetune_bit() -> Search:
    """The `finetune` lr grid with the ResNet's parent, on MNIST-1k at its step budget; its winner is
    `CPU_FINETUNE_LR["bit"]` (results/recipes/finetune_bit.md)."""
    parent = upstream_config("select", "BiT-R14x0.25", 0, epochs=3, **SEARCH_DATA)
    base = dict(_finetune_1k().base, model="BiT-R14x0.25", steps=cpu_finetune_steps(MNIST_1K),
                augment=CPU_FINETUNE_AUGMENT)
    return Search(base=base, grid={"lr": [0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0]}, parent=parent,
                  note=f"Fine-tuning BiT-R14x0.25 (pre-trained 3 epochs on Fashion-MNIST, lr {CPU_LR['bit']:g}) on "
                       f"MNIST with {LOW_DATA_EXAMPLES:,} training images, 10% of MNIST's split held out; the ViT's "
                       "grid, extended upwards until its largest value lost (1.0, the top of the ViT's grid, won a "
                       "first pass).")


def _finetune_budget() -> Search:
    lr_search = _finetune()
    base = dict(lr_search.base, lr=CPU_FINETUNE["lr"])
    return Search(base=base, grid={"steps": [500, 1000, 2000, 4000], "augment": ["none", "crop"]},
                  parent=lr_search.parent, cost="steps",
                  note="The `finetune` search's model and held-out MNIST at its chosen lr: steps (9 to 71 passes over "
                       "the 7.2k training images) and random translation by up to 3 px (`crop`; no flip on digits).")


def _finetune_1k() -> Search:
    budget = _finetune_budget()
    base = dict(budget.base, train_examples=LOW_DATA_EXAMPLES)
    return Search(base=base, grid={"steps": [125, 250, 500, 1000, 2000, 4000], "augment": ["none", "crop"]},
                  parent=budget.parent, cost="steps", max_cost=MNIST_1K_MAX_STEPS,
                  note=f"The `finetune_budget` search with {LOW_DATA_EXAMPLES:,} training images (class-balanced, "
                       "drawn from MNIST's training split after its 10% hold-out; VTAB-1k's size, [P] §4.1): steps "
                       "(16 to 512 passes) and random translation by up to 3 px (`crop`).")


SEARCHES = {"vit_pretrain": lambda: _pretrain_search("ViT-Nano/4", [5e-4, 1e-3, 2e-3, 4e-3, 8e-3]),
            "bit_pretrain": lambda: _pretrain_search("BiT-R14x0.25", [1e-3, 3e-3, 1e-2, 3e-2]), "finetune": _finetune,
            "finetune_budget": _finetune_budget, "finetune_1k": _finetune_1k, "finetune_bit": _finetune_bit}
PENDING_SEARCHES: tuple[str, ...] = ()  # searches defined but not yet run (no results/recipes/<name>.csv)
# The fine-tuning lr per family, each chosen on validation: the ViT's by the `finetune` search, the ResNet's by
# `finetune_bit` (1.0, between 0.3 and 3.0: results/recipes/finetune_bit.md); the hybrid takes the ViT's
CPU_FINETUNE_LR = {"vit": CPU_FINETUNE["lr"], "bit": 1.0, "hybrid": CPU_FINETUNE["lr"]}


def finetune_config(profile: str, model: str, dataset: str, seed: int, img_size: int = 28) -> dict:
    """A cpu fine-tuning run (its ``init`` is added by the sweep once the parent has finished), shared by the
    scaling and transfer notebooks (same experiment name, so the same run)."""
    return train_config(**{**CPU_FINETUNE, "lr": CPU_FINETUNE_LR[family(model)], "steps": cpu_finetune_steps(dataset)},
                        experiment=f"finetune-{profile}", model=model, dataset=dataset, img_size=img_size, seed=seed,
                        augment=CPU_FINETUNE_AUGMENT)


def scratch_config(profile: str, model: str, dataset: str, seed: int, steps: int, img_size: int = 28) -> dict:
    """Training on a downstream set from random weights: the pre-training recipe (its optimiser, lr and
    weight decay) with the fine-tuning augmentation (so only the initialisation differs from a fine-tune),
    for ``steps`` steps on the whole training split."""
    return train_config(**dict(CPU_PRETRAIN, augment=CPU_FINETUNE_AUGMENT), experiment=f"scratch-{profile}",
                        model=model, dataset=dataset, img_size=img_size, seed=seed, steps=steps,
                        lr=CPU_LR[family(model)], warmup_steps=min(500, steps // 10))


if __name__ == "__main__":  # the searches' command line (select.main); select itself never imports recipes
    from .select import main

    main(SEARCHES)
