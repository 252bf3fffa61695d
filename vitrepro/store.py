"""The run store: one folder per (experiment, configuration), written atomically.

Layout: ``root/<experiment>/<run_id>/{config.json, metrics.jsonl, record.json, checkpoint.pt, model.pt}``.
``run_id`` is a short sha256 of the canonical JSON of the full configuration plus the
code-relevant versions (vitrepro version, torch major.minor). ``record.json`` is written last and
marks a finished run (``status`` "ok") or a failed one (``status`` "failed", with ``error``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ["RunStore", "default_root", "code_versions", "run_id_for", "atomic_write_json",
           "atomic_torch_save", "canonical_json"]


def default_root() -> Path:
    env = os.environ.get("VITREPRO_RUNS")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / "runs"


def code_versions() -> dict:
    from . import __version__
    return {"vitrepro": __version__, "torch": ".".join(torch.__version__.split("+")[0].split(".")[:2])}


def _jsonable(o: Any):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if hasattr(o, "item") and callable(o.item):
        return o.item()
    return o


def canonical_json(o: Any) -> str:
    return json.dumps(_jsonable(o), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def run_id_for(config: dict, versions: dict | None = None) -> str:
    payload = {"config": config, "versions": versions or code_versions()}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:12]


def atomic_write(path: Path, write) -> None:
    """Write a file atomically: `write(f)` fills a temp file in the same folder, then it is renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj) -> None:
    data = json.dumps(_jsonable(obj), indent=2, sort_keys=True).encode()
    atomic_write(Path(path), lambda f: f.write(data))


def atomic_torch_save(path, obj) -> None:
    atomic_write(Path(path), lambda f: torch.save(obj, f))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


class RunStore:
    """Folder of runs. ``RunStore()`` uses ``$VITREPRO_RUNS`` or ``<repo>/runs``."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    # paths -----------------------------------------------------------------
    def run_id(self, config: dict) -> str:
        return run_id_for(config)

    def run_dir(self, experiment: str, run_id: str) -> Path:
        return self.root / experiment / run_id

    def resolve(self, ref: str) -> Path:
        """``'<experiment>/<run_id>'`` (optionally prefixed ``run:``) -> its folder (must exist)."""
        ref = ref[4:] if ref.startswith("run:") else ref
        d = self.root / ref
        if not (d / "config.json").exists():
            raise FileNotFoundError(f"no stored run {ref!r} under {self.root}")
        return d

    # reading -----------------------------------------------------------------
    def record(self, experiment: str, run_id: str) -> dict | None:
        p = self.run_dir(experiment, run_id) / "record.json"
        if not p.exists():
            return None
        with open(p) as f:
            return json.load(f)

    def metrics(self, experiment: str, run_id: str) -> list[dict]:
        p = self.run_dir(experiment, run_id) / "metrics.jsonl"
        if not p.exists():
            return []
        rows = []
        with open(p) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # a line cut by a kill
        return rows

    def runs(self, experiment: str | None = None) -> Iterator[tuple[str, str, Path]]:
        if not self.root.is_dir():
            return
        exps = [experiment] if experiment else sorted(p.name for p in self.root.iterdir() if p.is_dir())
        for e in exps:
            ed = self.root / e
            if not ed.is_dir():
                continue
            for rd in sorted(ed.iterdir()):
                if (rd / "config.json").exists():
                    yield e, rd.name, rd

    def records(self, experiment: str | None = None) -> list[dict]:
        out = []
        for e, r, rd in self.runs(experiment):
            rec = self.record(e, r)
            if rec is not None:
                out.append(rec)
        return out

    def frame(self, experiment: str | None = None, include_incomplete: bool = False):
        """Long form: one row per (run, metric). Columns: run_id, experiment, status, every config
        field flattened (nested dicts joined with '.'), metric, value. Metrics are the record's
        ``metrics`` (final evaluations) plus wall_time_s, train_flops, params, images_seen."""
        import pandas as pd
        rows = []
        for e, r, rd in self.runs(experiment):
            rec = self.record(e, r)
            if rec is None and not include_incomplete:
                continue
            with open(rd / "config.json") as f:
                cfg = json.load(f)
            base = {"run_id": r, "experiment": e,
                    "status": rec.get("status", "ok") if rec else "incomplete"}
            flat = _flatten(cfg)
            flat.pop("experiment", None)
            base.update({k: v for k, v in flat.items() if k not in ("run_id", "status", "metric", "value")})
            mets = dict((rec or {}).get("metrics", {}))
            for k in ("wall_time_s", "train_flops", "params", "images_seen", "steps"):
                if rec and isinstance(rec.get(k), (int, float)):
                    mets[k] = rec[k]
            if not mets:
                rows.append({**base, "metric": None, "value": float("nan")})
            for k, v in mets.items():
                rows.append({**base, "metric": k, "value": float(v) if v is not None else float("nan")})
        cols = ["run_id", "experiment", "status"]
        df = pd.DataFrame(rows)
        if df.empty:
            return pd.DataFrame(columns=cols + ["metric", "value"])
        rest = [c for c in df.columns if c not in cols + ["metric", "value"]]
        return df[cols + rest + ["metric", "value"]]

    # writing -----------------------------------------------------------------
    def create(self, experiment: str, run_id: str, config: dict, meta: dict | None = None) -> Path:
        d = self.run_dir(experiment, run_id)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(d / "config.json", config)
        if meta is not None:
            atomic_write_json(d / "meta.json", meta)
        return d

    def log(self, experiment: str, run_id: str, row: dict) -> None:
        p = self.run_dir(experiment, run_id) / "metrics.jsonl"
        with open(p, "a") as f:
            f.write(json.dumps(_jsonable(row)) + "\n")

    def truncate_metrics(self, experiment: str, run_id: str, max_step: int) -> None:
        """Drop log lines after ``max_step`` (used when resuming from a checkpoint)."""
        rows = [r for r in self.metrics(experiment, run_id) if int(r.get("step", 0)) <= max_step]
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        atomic_write(self.run_dir(experiment, run_id) / "metrics.jsonl", lambda f: f.write(data))

    def write_record(self, experiment: str, run_id: str, record: dict) -> None:
        atomic_write_json(self.run_dir(experiment, run_id) / "record.json", record)

    def clear_record(self, experiment: str, run_id: str) -> None:
        p = self.run_dir(experiment, run_id) / "record.json"
        if p.exists():
            p.unlink()
