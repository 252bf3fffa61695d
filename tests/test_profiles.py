"""Every profile runs (issue 14): the jobs of all 16 (notebook, profile) pairs build and validate without
data or training; one paper recipe; released weights fine-tune with their profile's recipe; streamed sets
(subsets, few-shot, bounded evaluation) on the dry run's stand-in data; the gpu and paper dry runs; a
torchrun sweep equals a local one."""
import importlib
import math

import pytest

NOTEBOOKS = ["scaling", "position_embeddings", "transfer", "attention"]
PROFILES = ["smoke", "cpu", "gpu", "paper"]


def _module(nb):
    return importlib.import_module(f"vitrepro.experiments.{nb}")


def _static_check(cfg: dict, shapes_seen: set) -> None:
    """What the trainer would refuse before compute, checked without data: the configuration (types,
    choices, steps vs warm-up, evaluators), the rules of streamed sets, and the model's shapes (meta device)."""
    from vitrepro import train
    from vitrepro.data import DATASETS

    c = train.TrainConfig.from_dict(cfg)
    spec = DATASETS.get(c.dataset)
    if spec is not None and spec.streaming:
        assert c.steps is not None and c.epochs is None, f"{c.dataset} is streamed: give steps, not epochs ({cfg})"
        assert c.val_fraction == 0, f"{c.dataset} is streamed: no val_fraction ({cfg})"
        assert c.warmup_steps < c.steps or c.schedule == "constant"
    for e in c.evaluators:
        ds = DATASETS.get(e.get("dataset") or c.dataset)
        if e.get("type") == "fewshot" and ds is not None and ds.streaming:
            assert e.get("train_split", "train") != "val", "few-shot shots from a hold-out of a streamed set"
    if c.img_size:
        key = (c.model, tuple(sorted(c.model_options().items())), c.img_size, c.in_chans)
        if key not in shapes_seen:
            shapes_seen.add(key)
            n_cls = spec.num_classes if spec is not None and spec.num_classes else 10
            (getattr(train, "check_shapes", None) or train._check_shapes)(c, c.img_size, c.in_chans or 3, n_cls)


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_jobs_build_and_validate(nb, profile):
    """Catches: a profile whose job list cannot be built (transfer paper's duplicate img_size), a config the
    trainer rejects (epochs on streamed imagenet-1k, warm-up >= steps on Pets/Flowers), impossible shapes."""
    mod = _module(nb)
    params = mod.validate_params({"profile": profile})
    jobs = mod.jobs(params)
    assert jobs, f"{nb}/{profile}: no jobs"
    seen: set = set()
    ids = {id(j) for j in jobs}
    for job in jobs:
        _static_check(job.config, seen)
        assert job.stage in ("pretrain", "finetune", "scratch")
        if job.parent is not None:
            assert id(job.parent) in ids, "a fine-tune whose parent is not in the sweep"


def test_one_paper_recipe():
    """Catches: a second copy of the paper's recipe drifting from recipes.py (the copy in transfer.py spread
    the epochs-on-a-streamed-set bug), and a wrong epochs -> steps conversion."""
    from vitrepro.experiments import attention, position_embeddings, recipes, scaling, transfer

    assert not hasattr(transfer, "PAPER_FINETUNE")
    pre = recipes.paper_pretrain("imagenet-1k")
    assert pre["steps"] == math.ceil(300 * 1_281_167 / 4096) == 93836 and "epochs" not in pre
    assert scaling.paper().pretrain == pre and transfer.paper().pretrain == pre
    assert position_embeddings.paper().train == pre and attention.paper().train == pre
    assert scaling.paper().finetune == recipes.paper_finetune("imagenet-1k")
    for ds, steps in (("cifar10", 10000), ("oxford_iiit_pet", 500), ("imagenet-1k", 20000)):
        ft = recipes.paper_finetune(ds)
        assert ft["steps"] == steps and ft["img_size"] == 384 and ft["optimizer"] == "sgd"
        assert ft["warmup_steps"] < steps


@pytest.mark.parametrize("profile", PROFILES)
def test_released_weights_use_the_profile_recipe(profile):
    """Catches: pretrained= falling back to the paper's 384 px, 10k-step recipe on a CPU profile, and flips
    on digit sets."""
    from vitrepro.data import split_ref
    from vitrepro.experiments import recipes, transfer

    params = transfer.validate_params({"profile": profile, "pretrained": "timm:vit_base_patch16_224.orig_in21k"})
    jobs = transfer.jobs(params)
    assert jobs
    for job in jobs:
        c = job.config
        assert c["init"] == "timm:vit_base_patch16_224.orig_in21k" and c["model"] == "ViT-B/16"
        if profile in ("gpu", "paper"):
            assert c["img_size"] == 384 and c["steps"] == recipes.paper_finetune(c["dataset"])["steps"]
        else:
            assert c["img_size"] <= 64 and c["steps"] <= recipes.cpu_finetune_steps(c["dataset"]) < 10000
        if split_ref(c["dataset"])[0] in ("digits", "mnist", "fashion_mnist"):  # mnist[train_examples=1000] too
            assert c["augment"] == "none"
        else:
            assert c["augment"] in ("crop_flip", "rrc_flip")
        _static_check(c, set())


def test_cpu_profiles_unchanged_by_the_paper_recipe():
    """Catches: the cpu profile picking up the paper recipe (its committed results come from recipes.CPU_*)."""
    from vitrepro.experiments import recipes, scaling, transfer

    for mod in (scaling, transfer):
        for job in mod.jobs(mod.validate_params({"profile": "cpu"})):
            c = job.config
            assert c["batch_size"] == recipes.CPU_BATCH and c.get("img_size", 28) <= 44


# ----------------------------------------------------------------------------------- streamed sets
@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """The dry run's stand-in data directory (imagenet-1k streamed, 1000 classes, 100 of them with 5 images)."""
    import os

    from vitrepro.experiments import dryrun

    old = os.environ.get("VITREPRO_DATA")
    root = dryrun.standin_root(["imagenet-1k", "cifar10"])
    os.environ["VITREPRO_DATA"] = str(root)
    yield root
    if old is None:
        os.environ.pop("VITREPRO_DATA", None)
    else:
        os.environ["VITREPRO_DATA"] = old


def test_streamed_subset_is_class_balanced_and_fixed(standin):
    """Catches: a streamed subset that is not class-balanced, changes between passes, or ignores its size."""
    import torch

    from vitrepro.data import class_quota, stream_batches

    quota = class_quota(200, 1000, seed=0)
    assert sum(quota) == 200 and max(quota) - min(quota) <= 1
    seen = []
    for epoch in (0, 1):
        ys = torch.cat([y for _, y in stream_batches("imagenet-1k", "train", 10, 16, 3, train_examples=300,
                                                     num_classes=1000, epoch=epoch, seed=0)])
        seen.append(sorted(ys.tolist()))
    assert seen[0] == seen[1]  # the same subset on every pass (order shuffled per epoch)
    counts = torch.bincount(torch.tensor(seen[0]), minlength=1000)
    assert counts.max() <= 1 and 0 < counts.sum() <= 300  # <= quota per class (the stand-in has 100 classes)


def test_streamed_fewshot_and_bounded_accuracy(standin):
    """Catches: FewShot raising on a streamed set; streamed accuracy reading past max_examples."""
    from vitrepro.evaluate import Accuracy, FewShot
    from vitrepro.models import create_model

    model = create_model("ViT-Nano/16", img_size=32, num_classes=1000).eval()
    out = FewShot("imagenet-1k", shots=(5,), seeds=(0, 1), max_test=40)(model)
    assert 0.0 <= out["fewshot/imagenet-1k/5shot"] <= 1.0 and "fewshot/imagenet-1k/5shot/seed1" in out
    import torch

    from vitrepro.data import stream_batches

    got = Accuracy("imagenet-1k", "test", batch_size=16, max_examples=37)(model)["acc/imagenet-1k/test"]
    with torch.no_grad():
        pairs = [(model(x).argmax(1), y) for x, y in stream_batches("imagenet-1k", "test", 16, 32, 3, drop_last=False)]
    pred, y = torch.cat([p for p, _ in pairs])[:37], torch.cat([t for _, t in pairs])[:37]
    assert got == pytest.approx(float((pred == y).float().mean()))  # exactly the first 37, not whole batches


def test_streamed_training_run_with_subset(standin, tmp_path):
    """Catches: the trainer refusing train_examples on a streamed set, or steps/fewshot failing there."""
    from vitrepro import train
    from vitrepro.store import RunStore

    rec = train.run({"experiment": "stream", "model": "ViT-Nano/16", "dataset": "imagenet-1k", "img_size": 32,
                     "train_examples": 200, "steps": 2, "batch_size": 8, "warmup_steps": 1, "precision": "fp32",
                     "evaluators": [{"type": "accuracy", "max_examples": 20},
                                    {"type": "fewshot", "shots": [5], "seeds": [0], "max_test": 20}]},
                    store=RunStore(tmp_path / "runs"), progress="none")
    assert rec["status"] == "ok" and rec["steps"] == 2
    assert "fewshot/imagenet-1k/5shot" in rec["metrics"] and "acc/imagenet-1k/test" in rec["metrics"]


# ----------------------------------------------------------------------------------- dry runs
@pytest.mark.slow
@pytest.mark.parametrize("profile", ["cpu", "gpu", "paper"])
def test_dry_run(profile, monkeypatch):
    """Every configuration of the cpu / gpu / paper profile trains 2 steps with its real optimizer, schedule,
    evaluators and resolution on stand-in data (the largest models swapped for tiny ones of their family),
    through each notebook's own cells. Catches whatever would fail on the cluster before the first step
    (streamed epochs, subsets, few-shot on streamed sets, resolution changes, parents of fine-tunes, tables;
    for cpu: a validation hold-out and its 5-shot probe on Fashion-MNIST, which an empty hold-out broke)."""
    from notebook_runner import run_profile

    monkeypatch.setenv("VITREPRO_WORKERS", "1")  # one run at a time: < 2 GB
    out = run_profile(profile, tiny=True)
    assert set(out) == set(NOTEBOOKS)
    assert all(v["configurations"] > 0 for v in out.values())


def test_dry_run_shrinks_but_keeps_the_recipe():
    """Catches: a dry run that changes what it should test (optimizer, lr, schedule, resolution, evaluators)."""
    from vitrepro.experiments import dryrun, recipes, scaling

    job = next(j for j in scaling.jobs(scaling.validate_params({"profile": "paper"}))
               if j.config.get("train_examples") and j.config["model"] == "ViT-B/32")
    small = dryrun.shrink(job.config, tiny=True)
    for k in ("optimizer", "lr", "schedule", "weight_decay", "img_size", "evaluators", "drop_rate", "dataset"):
        assert small[k] == job.config[k], k
    assert small["steps"] == dryrun.STEPS and small["batch_size"] <= dryrun.BATCH and small["warmup_steps"] == 1
    assert small["model"] == "ViT-Nano/32" and job.config["model"] == "ViT-B/32"
    assert small["train_examples"] <= dryrun.available("imagenet-1k")
    assert dryrun.shrink(dict(recipes.paper_finetune("cifar10"), model="ViT-S/16", dataset="cifar10"),
                         tiny=True)["model"] == "ViT-S/16"  # below the size limit: kept


# ----------------------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_torchrun_sweep_equals_local(tmp_path):
    """A smoke sweep (transfer: pre-training, fine-tunes from it at two resolutions, scratch) through
    launcher='torchrun' with 2 CPU processes (DDP, gloo) writes the same runs and metrics as a local sweep
    (fp32). Catches a launcher that loses records, breaks the parent -> fine-tune chain or changes numerics."""
    from vitrepro.experiments import launch, transfer

    def sweep(launcher, store):
        params = transfer.validate_params({"profile": "smoke", "runs_dir": str(store), "launcher": launcher,
                                           **({"nproc_per_node": 2} if launcher == "torchrun" else {})})
        jobs = transfer.jobs(params)[:3]  # the 200-example pre-training run and its two fine-tunes
        for j in jobs:
            j.config = dict(j.config, precision="fp32")
        return [(j.stage, rec) for j, rec in launch.run_jobs(jobs, params, log=lambda m: None)]

    local = sweep("local", tmp_path / "local")
    dist = sweep("torchrun", tmp_path / "torchrun")
    assert [s for s, _ in local] == [s for s, _ in dist]
    for (_, a), (_, b) in zip(local, dist):
        assert a["status"] == b["status"] == "ok"
        assert a["run_id"] == b["run_id"] and b["world_size"] == 2 and a["world_size"] == 1
        assert set(a["metrics"]) == set(b["metrics"])
        for k, v in a["metrics"].items():
            assert b["metrics"][k] == pytest.approx(v, abs=1e-4), k
