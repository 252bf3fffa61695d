"""A sweep's results: the long-form frame (`SCHEMA`, `tidy`, `collect` from the run store), the files a
notebook writes (`write_results`: results.csv, tables.md, PNG figures), the numbers its tables show
(`mean_spread`, `fmt_pm`) and `load_run_model`, which rebuilds any stored run for analysis."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .jobs import Job, finetune_from
from .params import NotebookParams, runs_dir
from .sweep import LAST_SWEEP, SweepError, run_threads

# The long-form results frame every notebook writes (results.csv) and vitrepro.report reads. data_seed: the
# seed of the run's training subset / hold-out draw (the model seed unless fixed); shot_draws: how many shot
# draws each few-shot value averages (issue 27: whether the data varied with the seed, how noisy the probe is)
SCHEMA = ["notebook", "profile", "run_id", "stage", "model", "family", "upstream", "upstream_examples",
          "dataset", "img_size", "pos_embed", "pos_embed_at", "pool", "lr", "seed", "metric", "value",
          "train_flops", "params", "wall_s", "data_seed", "shot_draws"]
ARCH_KEYS = ("pool", "pos_embed", "pos_embed_at", "head", "representation_size")


def atomic_write_text(path: Path, text: str) -> None:
    from ..store import atomic_write

    atomic_write(Path(path), lambda f: f.write(text.encode()))


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure atomically as PNG."""
    from ..store import atomic_write

    # no "Software" entry (matplotlib's version): a redraw of unchanged results is byte-identical
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight",
                                                   metadata={"Software": None}))
    return Path(path)


def grid_rows(values, dims: Sequence[str], **keys):
    """A small array (a similarity grid, filter components, attention maps) as a long-form frame: the constant
    `keys` (e.g. seed, run_id), one column per axis (`dims`, the index along it), then `value`."""
    a = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)
    if a.ndim != len(dims):
        raise ValueError(f"an array of shape {a.shape} needs {a.ndim} axis names, got {list(dims)}")
    index = np.indices(a.shape).reshape(a.ndim, -1)
    return pd.DataFrame({**keys, **{d: index[i] for i, d in enumerate(dims)}, "value": a.reshape(-1)})


def grid_array(frame, dims: Sequence[str]):
    """The array `grid_rows` wrote (rows of one key combination), back as a numpy array."""
    out = np.full(tuple(int(frame[d].max()) + 1 for d in dims), np.nan)
    out[tuple(frame[d].astype(int).to_numpy() for d in dims)] = frame["value"].to_numpy(dtype=float)
    return out


def write_results(out: Path, frame, tables: dict[str, Any], figures: dict[str, Any], notes: str = "",
                  analysis: dict[str, Any] | None = None, redraw: bool = False) -> list[Path]:
    """Write `<out>/results.csv` (long form), `<out>/tables.md`, one PNG per figure and one `<name>.csv` per
    frame of `analysis` (what figures that need model weights are drawn from; small, so that
    `source="results"` redraws them without the run store). With `redraw`, the CSVs are where they were read
    from (`make figures`): only tables.md and the figures are rewritten.

    Refuses an empty frame (nothing finished: no header-only files). Partial results (`allow_partial=True`
    where some runs failed: the frame's mark, else what `run_jobs` reported) are marked so at the top of
    tables.md and in every table title."""
    import matplotlib.pyplot as plt

    out, written = Path(out), []
    if frame is None or len(frame) == 0:
        raise SweepError(f"nothing to write to {out}: no run of the sweep finished (the results frame is empty)")
    partial = frame.attrs.get("partial") or LAST_SWEEP.get("partial")

    def put(name: str, text: str) -> None:
        atomic_write_text(out / name, text)
        written.append(out / name)

    if not redraw:
        put("results.csv", frame.to_csv(index=False))
    md = [notes.strip(), ""] if notes else []
    if partial:
        md = (["> **Partial results** (`allow_partial=True`): these tables leave out the runs below.", ">"]
              + [f"> {line}" for line in str(partial).splitlines()] + [""] + md)
    for title, table in tables.items():
        md += [f"## {title}{' (partial)' if partial else ''}", "",
               table.to_markdown(index=False) if hasattr(table, "to_markdown") else str(table), ""]
    put("tables.md", "\n".join(md))
    for name, table in ({} if redraw else analysis or {}).items():
        put(f"{name}.csv", table.to_csv(index=False, float_format="%.6g"))
    for name, fig in figures.items():
        written.append(save_figure(fig, out / f"{name}.png"))
        plt.close(fig)
    return written


def mean_spread(frame, by: Sequence[str], value: str = "value"):
    """Mean, standard deviation and count over seeds for each group (what every table shows)."""
    table = frame.groupby(list(by), dropna=False)[value].agg(mean="mean", std="std", n="count").reset_index()
    table["std"] = table["std"].fillna(0.0)
    return table


def fmt_pm(mean: float, std: float, n: int, scale: float = 1.0, digits: int = 1) -> str:
    return f"{mean * scale:.{digits}f}" + (f" ± {std * scale:.{digits}f}" if n > 1 else "")


def tidy(results: Sequence[tuple[Job, dict]], notebook: str, profile: str):
    """Long-form frame (`SCHEMA`): one row per run, seed and metric, from the stored records. A
    partial sweep (`run_jobs` with allow_partial) marks the frame: `frame.attrs["partial"]`."""
    rows = []
    by_job = {id(job): rec for job, rec in results}
    for job, rec in results:
        if rec.get("status") != "ok":
            continue
        upstream_size = job.upstream_examples  # the configured subset, else the size the pre-training run resolved
        if upstream_size is None and job.stage != "scratch":
            upstream_size = ((by_job.get(id(job.parent or job)) or {}).get("resolved") or {}).get("train_size")
        cfg, res = rec.get("config") or job.config, rec.get("resolved") or {}
        arch = {**{k: cfg.get(k) for k in ARCH_KEYS}, **{k: v for k, v in (res.get("arch") or {}).items()
                                                         if v is not None}}  # resolved (complete), else the config
        probes = [e for e in cfg.get("evaluators") or [] if isinstance(e, dict) and e.get("type") == "fewshot"]
        model = cfg["model"]
        for key, value in (rec.get("metrics") or {}).items():  # `top1` on the test split, `fewshot<k>` per probe
            kind, *rest = key.split("/")
            if kind not in ("acc", "fewshot") or len(rest) != 2:
                continue
            dataset, split = rest
            metric = (("top1" if split == "test" else f"top1_{split}") if kind == "acc"
                      else f"fewshot{split.removesuffix('shot')}")
            rows.append(dict(
                notebook=notebook, profile=profile, run_id=rec["run_id"], stage=job.stage, model=model,
                family="Hybrid" if "+" in model else ("ResNet" if model.startswith("BiT") else "ViT"),
                upstream=job.upstream, upstream_examples=upstream_size, dataset=dataset,
                img_size=res.get("img_size", cfg.get("img_size")), pos_embed=arch.get("pos_embed") or "1d",
                pos_embed_at=arch.get("pos_embed_at") or "stem", pool=arch.get("pool") or "token", lr=cfg.get("lr"),
                seed=cfg.get("seed"), metric=metric, value=value, train_flops=rec.get("train_flops"),
                params=rec.get("params"), wall_s=rec.get("wall_time_s"),
                data_seed=cfg.get("seed") if cfg.get("data_seed") is None else cfg.get("data_seed"),
                shot_draws=len(probes[0].get("seeds", (0, 1, 2))) if probes else None))
    frame = pd.DataFrame(rows, columns=SCHEMA)
    if getattr(results, "partial", None):
        frame.attrs["partial"] = results.partial
    return frame


def collect(jobs: Sequence[Job], params: NotebookParams, notebook: str):
    """Finished runs of a sweep, read back from the run store without training anything."""
    from ..store import RunStore
    from ..train import ConfigError, finished_record, run_id_of

    store = RunStore(runs_dir(params))
    threads = run_threads(params)  # the thread count `run_jobs` would train with: the same run ids
    records: dict[int, dict] = {}
    order = [j for j in jobs if j.parent is None] + [j for j in jobs if j.parent is not None]
    for job in order:
        cfg = dict(job.config)
        if job.parent is not None:
            if id(job.parent) not in records:
                continue
            cfg["init"] = finetune_from(records[id(job.parent)])
        if params.device != "auto":
            cfg["device"] = params.device
        try:
            rid = run_id_of(cfg, threads=threads)
        except ConfigError as e:
            print(f"[vitrepro] {job.stage} {cfg.get('model')}: {e}", file=sys.stderr)
            continue
        rec = finished_record(store, cfg["experiment"], rid)  # a damaged record or model is named, then skipped
        if rec is not None:
            records[id(job)] = rec
    return tidy([(j, records[id(j)]) for j in order if id(j) in records], notebook, params.profile)


def _arch_chain(store, conf: dict, depth: int = 0) -> dict:
    """Architecture of a stored run from its config: `_resolved.arch` (complete), else (runs stored
    before it was recorded) the options inherited along its `init=run:...` chain plus its own."""
    arch = dict((conf.get("_resolved") or {}).get("arch") or {})
    if arch:
        return arch
    init = conf.get("init") or ""
    if init.startswith("run:") and depth < 16:
        from ..store import check_json_file

        try:
            arch = _arch_chain(store, check_json_file(store.resolve(init) / "config.json"), depth + 1)
        except FileNotFoundError:
            arch = {}
    return arch | {k: conf[k] for k in ARCH_KEYS if conf.get(k) is not None}


def load_run_model(params: NotebookParams, run_ref: str):
    """The final model of any stored run (`run:<experiment>/<run_id>`, `<experiment>/<run_id>` or a
    bare run id of this store), pre-trained or fine-tuned, with the architecture it was trained with."""
    import torch

    from ..models import create_model
    from ..store import RunStore, check_json_file, check_torch_file, load_weights

    store = RunStore(runs_dir(params))
    exp, rid, d = store.find(run_ref)
    conf = check_json_file(d / "config.json", f"{exp}/{rid}")
    res = conf.get("_resolved", {})
    arch = _arch_chain(store, conf)
    model = create_model(conf["model"], img_size=res["img_size"], in_chans=res["in_chans"],
                         num_classes=res["num_classes"], **{k: arch[k] for k in ARCH_KEYS if arch.get(k) is not None})
    if res.get("head_reset", bool(conf.get("init")) and conf.get("reset_head") is not False):
        model.reset_head(res["num_classes"])  # fine-tuned runs carry the zero-initialised linear head
    if not (d / "model.pt").exists():
        raise FileNotFoundError(f"{d / 'model.pt'} does not exist: run {exp}/{rid} has not finished")
    check_torch_file(d / "model.pt", f"{exp}/{rid}")
    state = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
    load_weights(model, state, d / "model.pt", f"{exp}/{rid}")  # weights of another model: named as damage
    return model.eval()
