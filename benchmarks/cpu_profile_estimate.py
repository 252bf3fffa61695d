"""The cpu profile's wall time estimated before it runs (issue 27), from committed per-run times.

    python benchmarks/cpu_profile_estimate.py            # prints the per-item table and the total

Builds the profile's sweep as `run_all` does (the four notebooks' jobs, each shared run once) and gives every
run a time from the committed results (`results/*/results.csv`, column `wall_s`: one process on one core,
bf16, 2 cores busy), in this order:

1. the same configuration in the committed results (stage, model, size, downstream set, resolution,
   position embedding, pooling; the learning rate does not change the cost);
2. the same run at another pre-training size: scaled by the committed ViT-Nano/4 (1-D, stem) time ratio
   between the two sizes (Table 8's cells at 18k from their 5.5k runs);
3. another model or resolution: the ViT-Nano/4 run of the same kind scaled by the larger of the FLOPs ratio
   (`vitrepro.models.flops`) and a measured time ratio where one exists (`MEASURED`): tiny models are
   overhead-bound, so FLOPs alone under-estimate their time. The hybrid: the ViT's time plus the ResNet's
   (its convolutions run at the ResNet's speed per FLOP, far below the ViT's), an upper bound;
4. another step count: proportional to the steps.

Wall time = (sum of per-run process seconds) / 2 workers x `PACKING` + the notebooks' own execution
(`results/timings_cpu.json`, everything but "training"). `PACKING` = 0.91 is the 2026-11-26 run's training
wall time over half its runs' committed process time (5,043 s / 5,538 s); that run also trained digits
fine-tunes that no results file records, so the true ratio is lower and 0.91 errs long.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
PACKING = 0.91
# measured time ratios to ViT-Nano/4 at 28 px where FLOPs mislead (results/benchmarks/sweep_cpu.md: ViT-Nano/7
# 7,927 vs ViT-Nano/4 3,176 img/s in the same 2-worker pool, bf16; the committed MNIST fine-tunes at 16 vs 28 px)
MEASURED = {("ViT-Nano/7", 28): 3176 / 7927, ("ViT-Nano/4", 16): 82.76 / 171.56}
KEYS = ["stage", "model", "n", "dataset", "img_size", "pos_embed", "pos_embed_at", "pool"]


def committed() -> pd.DataFrame:
    frames = [pd.read_csv(f) for f in sorted(ROOT.glob("results/*/results.csv"))]
    d = pd.concat(frames)
    d = d[d.stage.isin(["pretrain", "finetune", "scratch"])].drop_duplicates("run_id")
    d = d.assign(n=d.upstream_examples.where(d.stage == "pretrain"))
    d.loc[(d.stage == "pretrain") & (d.n == 55000), "n"] = -1  # the whole set
    d["steps"] = d.upstream.astype(str).str.extract(r"\((\d+) steps")[0].astype(float)
    return d


def _flops(model: str, img: int) -> float:
    from vitrepro.models import create_model
    from vitrepro.models.flops import flops

    return float(flops(create_model(model, num_classes=10, img_size=img), img))


def _key(job) -> dict:
    c = job.config
    n = c.get("train_examples") if job.stage == "pretrain" else None
    return dict(stage=job.stage, model=c["model"], n=-1 if job.stage == "pretrain" and n is None else n,
                dataset=c["dataset"], img_size=c.get("img_size") or 28, pos_embed=c.get("pos_embed") or "1d",
                pos_embed_at=c.get("pos_embed_at") or "stem", pool=c.get("pool") or "token", steps=c.get("steps"))


def _lookup(d: pd.DataFrame, **k) -> float:
    m = pd.Series(True, index=d.index)
    for col, v in k.items():
        m &= d[col].isna() if v is None else (d[col] == v)
    return float(d[m].wall_s.mean()) if m.any() else math.nan


def estimate(job, d: pd.DataFrame) -> tuple[float, str]:
    k = _key(job)
    steps = k.pop("steps")
    exact = _lookup(d[d.steps.isna() | (d.steps == steps)], **k)
    if not math.isnan(exact):
        return exact, "committed"
    if job.stage == "scratch":  # another step count of the same scratch run
        same = d[(d.stage == "scratch") & (d.model == k["model"]) & (d.dataset == k["dataset"])]
        return float((same.wall_s / same.steps).mean() * steps), "scratch, per step"
    if k["stage"] == "pretrain" and (k["pos_embed"], k["pos_embed_at"], k["pool"]) != ("1d", "stem", "token"):
        other = d[(d.stage == "pretrain") & (d.model == k["model"]) & (d.pos_embed == k["pos_embed"]) &
                  (d.pos_embed_at == k["pos_embed_at"]) & (d.pool == k["pool"])]
        if len(other):
            n0 = other.n.iloc[0]
            base = dict(k, pos_embed="1d", pos_embed_at="stem", pool="token")
            ratio = _lookup(d, **base) / _lookup(d, **dict(base, n=n0))
            return float(other[other.n == n0].wall_s.mean() * ratio), f"cell at {int(n0)} x size ratio"
    if "+" in k["model"]:  # hybrid: the ViT's time plus the ResNet's, an upper bound
        vit = k["model"].split("+", 1)[1]
        res = "BiT-" + k["model"].split("+", 1)[0]
        return _lookup(d, **dict(k, model=vit)) + _lookup(d, **dict(k, model=res)), "ViT + ResNet times"
    ref = dict(k, model="ViT-Nano/4", img_size=28)
    base = _lookup(d, **ref)
    flop_ratio = _flops(k["model"], k["img_size"]) / _flops("ViT-Nano/4", 28)
    ratio = max(flop_ratio, MEASURED.get((k["model"], k["img_size"]), 0.0))
    return base * ratio, f"ViT-Nano/4 x {ratio:.2f} (FLOPs {flop_ratio:.2f})"


def main() -> None:
    from vitrepro.experiments import attention, jobs as J, position_embeddings, scaling, transfer

    d = committed()
    runs = J.unique([j for m in (scaling, transfer, position_embeddings, attention)
                     for j in m.jobs(m.validate_params({"profile": "cpu"}))])
    rows = []
    for j in runs:
        s, how = estimate(j, d)
        rows.append(dict(_key(j), seconds=s, how=how))
    t = pd.DataFrame(rows)
    g = (t.groupby(["stage", "model", "n", "dataset", "img_size", "pos_embed", "pos_embed_at", "pool", "how"], dropna=False)
         .agg(runs=("seconds", "size"), seconds_per_run=("seconds", "mean"), process_min=("seconds", "sum")).reset_index())
    g["process_min"] = (g.process_min / 60).round(1)
    g["seconds_per_run"] = g.seconds_per_run.round(0)
    print(g.to_markdown(index=False))
    timings = json.loads((ROOT / "results" / "timings_cpu.json").read_text())
    notebooks = sum(v for k, v in timings.items() if k != "training")
    total = t.seconds.sum()
    wall = total / 2 * PACKING
    print(f"\n{len(t)} runs, {total / 60:.1f} process-min; training {total / 120:.1f} min at perfect packing x "
          f"{PACKING} = {wall / 60:.1f} min; notebooks {notebooks:.0f} s; whole profile ~{(wall + notebooks) / 60:.1f} min "
          f"(bound without the packing factor: {(total / 2 + notebooks) / 60:.1f} min)")


if __name__ == "__main__":
    main()
