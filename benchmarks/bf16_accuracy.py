"""Does bf16 autocast train as well as fp32? Accuracy after a fixed budget, several seeds.

    python benchmarks/bf16_accuracy.py [--model ViT-Nano/7] [--dataset fashion_mnist] [--steps 300] [--seeds 3]

Identical configurations but `precision` (the cpu profile's ViT-Nano/7 on Fashion-MNIST at 28 px by
default; `--dataset digits --img-size 8 --model ViT-Nano/2` runs offline anywhere); writes
results/benchmarks/bf16_accuracy.{json,md}: per-precision mean ± std of test accuracy and seconds per run.
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vitrepro import train
from vitrepro.experiments.common import REPO_ROOT, atomic_write_text
from vitrepro.store import RunStore


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-Nano/7")
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--img-size", type=int, default=28)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO_ROOT / "results" / "benchmarks"))
    args = ap.parse_args()
    store = RunStore(tempfile.mkdtemp())
    rows = []
    for precision in ("fp32", "bf16"):
        for seed in range(args.seeds):
            cfg = dict(experiment="bf16-check", model=args.model, dataset=args.dataset, img_size=args.img_size,
                       steps=args.steps, batch_size=args.batch_size, lr=1e-3, warmup_steps=20, weight_decay=0.1,
                       precision=precision, seed=seed)
            t0 = time.time()
            rec = train.run(cfg, store=store, progress="none")
            rows.append(dict(precision=rec["precision"], seed=seed, accuracy=rec["metrics"][f"acc/{args.dataset}/test"],
                             seconds=round(time.time() - t0, 1)))
            print(rows[-1], flush=True)
    summary = {}
    for p in ("fp32", "bf16"):
        acc = [r["accuracy"] for r in rows if r["precision"] == p]
        sec = [r["seconds"] for r in rows if r["precision"] == p]
        summary[p] = dict(mean=statistics.mean(acc), std=statistics.stdev(acc) if len(acc) > 1 else 0.0,
                          seconds_per_run=statistics.mean(sec))
    out = Path(args.out)
    setup = {k: v for k, v in vars(args).items() if k != "out"}
    atomic_write_text(out / "bf16_accuracy.json", json.dumps(dict(setup=setup, rows=rows, summary=summary,
                                                                  threads=torch.get_num_threads()), indent=1))
    md = [f"{args.model} on {args.dataset} at {args.img_size} px, {args.steps} steps of batch {args.batch_size}, "
          f"AdamW lr 1e-3; {torch.get_num_threads()} threads.", "",
          "| precision | test accuracy (mean ± std) | seconds per run |", "|---|---|---|"]
    md += [f"| {p} | {100 * s['mean']:.1f} ± {100 * s['std']:.1f} (n={args.seeds}) | {s['seconds_per_run']:.0f} |"
           for p, s in summary.items()]
    atomic_write_text(out / "bf16_accuracy.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
