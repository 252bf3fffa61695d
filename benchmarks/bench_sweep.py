"""Sweep throughput: what the whole machine trains per second when it runs a sweep of cpu-profile runs.

    python -m benchmarks.bench --sweep                  # the cpu-profile ViTs, every layout, one run
    python -m benchmarks.bench --sweep --sweep-models ViT-Nano/4 --jobs 4 --sweep-steps 20   # shorter
    python -m benchmarks.bench --sweep --precisions fp32                # fp32 whatever this CPU has

A cpu-profile sweep is dozens of small runs (ViT-Nano/4, ViT-Nano/7, ViT-Micro/7 at 28 px, batch 128, bf16 on
CPUs that have it, fp32 on the others: the precision the trainer's ``precision="auto"`` picks, or the one
``--precisions`` names). For each model, ``--jobs`` configurations (seeds 0..N-1: own initialisation, own data
order) are trained through the trainer's own parts -- ``vitrepro.data.Batches`` over Fashion-MNIST with the
``crop_flip`` augmentation, the trainer's AdamW (``train._make_optimizer``), bf16 autocast (bf16 sweeps), clipping at global
norm 1 -- in each *layout*:

* ``pool``          today's scheduler: one process per core, one torch thread each, the jobs shared out;
* ``pool+compile``  the same with the model's forward and backward through ``torch.compile`` (inductor);
* ``one``           one process with every core's thread, the jobs one after another;
* ``one+compile``   the same, compiled;
* ``pool+stack``    each worker trains its jobs *stacked*: parameters stacked (``torch.func.stack_module_state``)
                    and the model vmapped, so every kernel call serves all of them at once; per-model gradient
                    clipping by hand, one AdamW over the stacked tensors;
* ``pool+stack+compile``  the same with the vmapped forward and backward through ``torch.compile``.

Each worker prepares its next job (and runs ``--sweep-warmup`` untimed steps, which include compiling),
waits at a barrier for the others, then all time ``--sweep-steps`` steps together: the aggregate images/s
of the layout is all timed images over the longest worker's timed seconds. ``ratio`` is against ``pool``
measured in the same run; ``% of peak`` counts the FLOPs the model executes (3 x ``models.flops(model,
executed=True)`` per image) over the bf16 (or fp32) matmul peak measured in the same run
(``machine_info.matmul_peak``, all threads). ``warm-up s`` is the first job's warm-up time per worker (compile
time included; inductor caches compiled code on disk, so a second run of a shape starts in seconds).
Results: ``<out>/sweep_<device>.md`` and ``.json``.
"""
from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["Layout", "LAYOUTS", "SWEEP_MODELS", "run_sweep", "sweep_markdown"]

SWEEP_MODELS = ("ViT-Nano/4", "ViT-Nano/7", "ViT-Micro/7")


@dataclass(frozen=True)
class Layout:
    name: str
    workers: int      # processes
    threads: int      # torch threads per process
    compile: bool     # torch.compile the model
    stack: int        # jobs trained together in one vmapped model (1: one at a time)


def layouts(cores: int, jobs: int) -> list[Layout]:
    """The layouts measured on a machine with ``cores`` cores for a sweep of ``jobs`` runs."""
    per_worker = max(1, jobs // cores)
    return [Layout("pool", cores, 1, False, 1), Layout("pool+compile", cores, 1, True, 1),
            Layout("one", 1, cores, False, 1), Layout("one+compile", 1, cores, True, 1),
            Layout("pool+stack", cores, 1, False, per_worker), Layout("pool+stack+compile", cores, 1, True, per_worker)]


LAYOUTS = layouts(os.cpu_count() or 1, 6)


@dataclass
class SweepSpec:
    model: str
    jobs: int = 6
    img_size: int = 28
    in_chans: int = 1
    batch: int = 128
    precision: str = "bf16"
    dataset: str = "fashion_mnist"
    augment: str = "crop_flip"
    steps: int = 30      # timed steps per job
    warmup: int = 3      # untimed steps per job (compile happens here)
    lr: float = 2e-3


# ------------------------------------------------------------------------------------------- one worker

def _job(spec: SweepSpec, seed: int, arrays):
    """One run's model, optimiser and batches, exactly as the trainer builds them for seed ``seed``."""
    from vitrepro.data import Batches
    from vitrepro.models import create_model
    from vitrepro.train import TrainConfig, _make_optimizer

    torch.manual_seed(seed)
    model = create_model(spec.model, img_size=spec.img_size, in_chans=spec.in_chans, num_classes=10)
    opt = _make_optimizer(model, TrainConfig(optimizer="adam", lr=spec.lr, weight_decay=0.05, steps=10))
    batches = Batches(arrays, spec.batch, spec.img_size, spec.in_chans, augment=spec.augment, seed=seed)
    return model.train(), opt, batches


def _single_step(model, train_model, opt, batches, amp):
    x, y = batches.next()
    with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        logits = train_model(x)
    F.cross_entropy(logits.float(), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


class _Stacked:
    """S models of one architecture trained as one: stacked parameters, a vmapped forward, per-model
    clipping at global norm 1 (``clip_grad_norm_``'s formula per member) and one AdamW over the stacks
    (Adam is elementwise, so this is S separate AdamWs). Measurement only (see the module docstring)."""

    def __init__(self, models, spec: SweepSpec, batches, compile: bool = False):
        from torch.func import functional_call, stack_module_state

        self.params, self.buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")
        self.forward = torch.vmap(lambda p, b, x: functional_call(base, (p, b), (x,)))
        if compile:  # the vmapped forward (and its backward) through inductor, as `pool+compile` does one model
            self.forward = torch.compile(self.forward)
        decay = [p for n, p in self.params.items() if p.ndim > 2 and "pos_embed" not in n and "cls_token" not in n]
        rest = [p for p in self.params.values() if all(p is not q for q in decay)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                                     lr=spec.lr, fused=True)
        self.batches = batches

    def step(self, amp) -> None:
        xs, ys = zip(*(b.next() for b in self.batches))
        x, y = torch.stack(xs), torch.stack(ys)                      # (S, B, C, H, W), (S, B)
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            logits = self.forward(self.params, self.buffers, x)      # (S, B, classes)
        # the sum of the S mean losses: each member's gradient is its own loss's gradient
        F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").div(y.shape[1]).backward()
        grads = [p.grad for p in self.params.values()]
        norms = torch.stack([g.float().flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()   # (S,)
        coef = (1.0 / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *[1] * (g.dim() - 1)).to(g.dtype))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _make_step(spec: SweepSpec, layout: Layout, seeds: list[int], arrays):
    """A zero-argument training step for the worker's next job (or stack of jobs)."""
    amp = torch.bfloat16 if spec.precision == "bf16" else None
    if layout.stack > 1:
        parts = [_job(spec, s, arrays) for s in seeds]
        stacked = _Stacked([m for m, _, _ in parts], spec, [b for _, _, b in parts], compile=layout.compile)
        return lambda: stacked.step(amp)
    model, opt, batches = _job(spec, seeds[0], arrays)
    train_model = torch.compile(model) if layout.compile else model
    return lambda: _single_step(model, train_model, opt, batches, amp)


def _worker(rank: int, spec: SweepSpec, layout: Layout, seeds: list[int], barrier, results) -> None:
    """Train this worker's share of the sweep; report timed images and seconds, and warm-up seconds."""
    from vitrepro.data import load_arrays
    from vitrepro.machine import tune_cpu_allocator

    torch.set_num_threads(layout.threads)
    tune_cpu_allocator()
    arrays = load_arrays(spec.dataset, "train")
    groups = [seeds[i:i + layout.stack] for i in range(0, len(seeds), layout.stack)]
    timed_s, images, warmups = 0.0, 0, []
    for group in groups:
        t = time.perf_counter()
        step = _make_step(spec, layout, group, arrays)
        for _ in range(spec.warmup):
            step()
        warmups.append(time.perf_counter() - t)
        barrier.wait()
        t = time.perf_counter()
        for _ in range(spec.steps):
            step()
        timed_s += time.perf_counter() - t
        images += spec.steps * spec.batch * len(group)
        barrier.wait()
    results.put({"rank": rank, "timed_s": timed_s, "images": images, "warmup_s": warmups})


# ------------------------------------------------------------------------------------------- a layout

def _share(jobs: int, layout: Layout) -> list[list[int]]:
    """Seeds per worker: equal shares (the barrier needs the same number of groups on every worker)."""
    per = jobs // layout.workers
    return [list(range(w * per, (w + 1) * per)) for w in range(layout.workers)]


def measure_layout(spec: SweepSpec, layout: Layout) -> dict:
    """Aggregate images/s of ``layout`` on the sweep ``spec`` (spawned workers, timed together)."""
    ctx = mp.get_context("spawn")
    shares = _share(spec.jobs, layout)
    if not shares[0]:
        raise ValueError(f"{spec.jobs} jobs cannot be shared among {layout.workers} workers")
    barrier, results = ctx.Barrier(layout.workers), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, spec, layout, shares[r], barrier, results), daemon=True)
             for r in range(layout.workers)]
    for p in procs:
        p.start()
    try:
        reports = [results.get(timeout=1800) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    images = sum(r["images"] for r in reports)
    wall = max(r["timed_s"] for r in reports)
    return {"layout": asdict(layout), "images": images, "timed_s": wall,
            "images_per_s": images / wall, "warmup_s": round(max(r["warmup_s"][0] for r in reports), 1)}


# ------------------------------------------------------------------------------------------- the sweep

def _executed_flops(spec: SweepSpec) -> int:
    from vitrepro.models import create_model, flops
    model = create_model(spec.model, img_size=spec.img_size, in_chans=spec.in_chans, num_classes=10)
    return int(flops(model, spec.img_size, executed=True))


def _peaks(sizes) -> dict:
    from .machine_info import matmul_peak
    cpu = torch.device("cpu")
    return {p: matmul_peak(cpu, dt, sizes=sizes) for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


def run_sweep(specs: list[SweepSpec], chosen: list[Layout], log=print,
              peak_sizes=(128, 256, 512, 1024, 2048)) -> dict:
    """Every (model, layout), with the matmul peaks measured in the same run (before and after)."""
    from .machine_info import machine_info

    cpu = torch.device("cpu")
    t0 = time.time()
    peaks = _peaks(peak_sizes)
    rows = []
    for spec in specs:
        fl = _executed_flops(spec)
        for layout in chosen:
            row = {"model": spec.model, "spec": asdict(spec), "executed_flops": fl, **measure_layout(spec, layout)}
            rows.append(row)
            log(f"[sweep] {spec.model} {layout.name}: {row['images_per_s']:.0f} img/s "
                f"({100 * 3 * fl * row['images_per_s'] / peaks[spec.precision]['flops_per_s']:.1f}% of the "
                f"{spec.precision} peak so far), warm-up {row['warmup_s']} s")
    after = _peaks(peak_sizes)
    for p in peaks:  # the best of the two measurements: a peak is a maximum
        if after[p]["flops_per_s"] > peaks[p]["flops_per_s"]:
            peaks[p] = after[p]
    for row in rows:
        row["fraction_of_peak"] = 3 * row["executed_flops"] * row["images_per_s"] / peaks[row["spec"]["precision"]][
            "flops_per_s"]
        base = next(r for r in rows if r["model"] == row["model"] and r["layout"]["name"] == chosen[0].name)
        row["ratio"] = row["images_per_s"] / base["images_per_s"]
    return {"machine": machine_info(cpu), "peaks": peaks, "rows": rows, "seconds": round(time.time() - t0, 1)}


def sweep_markdown(result: dict, command: str) -> str:
    m, peaks = result["machine"], result["peaks"]
    spec = result["rows"][0]["spec"]
    lines = [
        "# vitrepro sweep benchmark: cpu", "",
        f"- CPU: {m.get('cpu')}; {m.get('cpus_usable')} usable cores; torch {m.get('torch')}",
        f"- command `{command}`; took {result['seconds']:.0f} s",
        f"- sweep per model: {spec['jobs']} runs (seeds), {spec['dataset']} through `data.Batches` with "
        f"`{spec['augment']}`, {spec['img_size']} px, batch {spec['batch']}, {spec['precision']}, AdamW, clip 1; "
        f"{spec['warmup']} untimed + {spec['steps']} timed steps per run",
        f"- matmul peak (all threads, same run): fp32 {peaks['fp32']['flops_per_s'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {peaks['bf16']['flops_per_s'] / 1e9:.0f} GFLOP/s", "",
        "| model | layout | processes x threads | stacked | compiled | aggregate img/s | ratio to pool | "
        "% of peak | warm-up s |",
        "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lay = r["layout"]
        lines.append(f"| {r['model']} | {lay['name']} | {lay['workers']} x {lay['threads']} | {lay['stack']} | "
                     f"{'yes' if lay['compile'] else 'no'} | {r['images_per_s']:.0f} | {r['ratio']:.2f} | "
                     f"{100 * r['fraction_of_peak']:.1f} | {r['warmup_s']} |")
    lines += ["", __doc__.split("\n\n", 2)[2].strip()]
    return "\n".join(lines) + "\n"


def _sweep_precision(precisions) -> str:
    """The sweep's one precision: ``--precisions`` when it names exactly one, else what the trainer's
    ``precision="auto"`` picks on this CPU (bf16 with native bf16 instructions, fp32 on AVX2-only CPUs, where
    bf16 is emulated and ~10x slower), so the benchmark measures what a cpu-profile sweep runs here."""
    from vitrepro.machine import resolve_precision
    if precisions and len(set(precisions)) > 1:
        raise SystemExit(f"--sweep measures one precision; got --precisions {' '.join(precisions)}")
    return precisions[0] if precisions else resolve_precision("auto", torch.device("cpu"))


def main(args) -> int:
    from vitrepro.store import atomic_write

    cores = args.sweep_workers or os.cpu_count() or 1
    chosen = layouts(cores, args.jobs)
    if args.layouts:
        unknown = set(args.layouts) - {lay.name for lay in chosen}
        if unknown:
            raise SystemExit(f"unknown layout(s) {sorted(unknown)}; choose from {[lay.name for lay in chosen]}")
        chosen = [lay for lay in chosen if lay.name in args.layouts or lay.name == "pool"]
    if args.jobs % cores:
        raise SystemExit(f"--jobs {args.jobs} must be a multiple of the {cores} workers")
    precision = _sweep_precision(args.precisions)
    specs = [SweepSpec(m, jobs=args.jobs, steps=args.sweep_steps, warmup=args.sweep_warmup, precision=precision,
                       dataset=args.dataset, augment=args.augment) for m in (args.sweep_models or SWEEP_MODELS)]
    result = run_sweep(specs, chosen)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.bench " + " ".join(args.argv)
    for name, text in (("sweep_cpu.json", json.dumps(result, indent=1)), ("sweep_cpu.md", sweep_markdown(result, command))):
        atomic_write(out / name, lambda f, data=text.encode(): f.write(data))
    print(f"[sweep] wrote {out / 'sweep_cpu.md'}")
    return 0
