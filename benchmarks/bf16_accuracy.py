"""Does bf16 autocast train as well as fp32? Accuracy after a fixed budget, several seeds.

    python benchmarks/bf16_accuracy.py [--steps 300] [--seeds 3]

ViT-Nano/2 on scikit-learn digits (8 px), identical configurations but `precision`; writes
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
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO_ROOT / "results" / "benchmarks"))
    args = ap.parse_args()
    store = RunStore(tempfile.mkdtemp())
    rows = []
    for precision in ("fp32", "bf16"):
        for seed in range(args.seeds):
            cfg = dict(experiment="bf16-check", model="ViT-Nano/2", dataset="digits", img_size=8, steps=args.steps,
                       batch_size=32, lr=1e-3, warmup_steps=20, weight_decay=0.1, precision=precision, seed=seed)
            t0 = time.time()
            rec = train.run(cfg, store=store, progress="none")
            rows.append(dict(precision=rec["precision"], seed=seed, accuracy=rec["metrics"]["acc/digits/test"],
                             seconds=round(time.time() - t0, 1)))
            print(rows[-1], flush=True)
    summary = {}
    for p in ("fp32", "bf16"):
        acc = [r["accuracy"] for r in rows if r["precision"] == p]
        sec = [r["seconds"] for r in rows if r["precision"] == p]
        summary[p] = dict(mean=statistics.mean(acc), std=statistics.stdev(acc) if len(acc) > 1 else 0.0,
                          seconds_per_run=statistics.mean(sec))
    out = Path(args.out)
    atomic_write_text(out / "bf16_accuracy.json", json.dumps(dict(rows=rows, summary=summary,
                                                                  threads=torch.get_num_threads()), indent=1))
    md = ["| precision | test accuracy (mean ± std) | seconds per run |", "|---|---|---|"]
    md += [f"| {p} | {100 * s['mean']:.1f} ± {100 * s['std']:.1f} (n={args.seeds}) | {s['seconds_per_run']:.0f} |"
           for p, s in summary.items()]
    atomic_write_text(out / "bf16_accuracy.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
