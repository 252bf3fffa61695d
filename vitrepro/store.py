"""The run store: one folder per (experiment, configuration), written atomically.

Layout: ``root/<experiment>/<run_id>/{config.json, metrics.jsonl, record.json, checkpoint.pt, model.pt, .lock}``.
``run_id`` is a short sha256 of the canonical JSON of the full configuration, the code-relevant
versions (vitrepro version, torch major.minor, ``NUMERICS_VERSION``) and what the trainer resolved
for this machine and data (``train.run_id_of``: device type, precision, CPU thread count, data fingerprints).
``NUMERICS_VERSION`` is a hash of the code of the source files that define the numbers (``NUMERICS_FILES``:
models, data, trainer, evaluators; their syntax trees without docstrings), so any code edit there gives new
run ids instead of reusing records computed by other code, while a comment or docstring edit keeps them.
``record.json`` is written last and marks a finished run (``status`` "ok") or a failed one (``status``
"failed", with ``error``).

A run folder is owned by one process at a time: ``RunStore.lock`` takes an OS lock (``flock``) on
``<run>/.lock``, which the kernel releases when the owner dies.

Damaged files (a truncated ``record.json``, ``checkpoint.pt`` or ``model.pt``) raise
``DamagedRunError`` naming the file, what is wrong and the one-run remedy::

    python -m vitrepro.store check                 # list damaged runs
    python -m vitrepro.store repair EXPERIMENT/RUN_ID   # drop damaged files: the run resumes or retrains
    python -m vitrepro.store forget EXPERIMENT/RUN_ID   # delete the run folder

A full disk while saving raises ``NoSpaceError`` ("no space left on <folder>").
"""
from __future__ import annotations

import ast
import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

__all__ = ["RunStore", "default_root", "code_versions", "run_id_for", "atomic_write_json",
           "atomic_torch_save", "canonical_json", "NUMERICS_VERSION", "NUMERICS_FILES", "numerics_version",
           "DamagedRunError", "NoSpaceError", "RunLock", "check_json_file", "check_torch_file"]

_PKG = Path(__file__).resolve().parent


def _numerics_files() -> list[Path]:
    return sorted(_PKG.glob("models/*.py")) + [_PKG / "data.py", _PKG / "train.py", _PKG / "evaluate.py"]


NUMERICS_FILES = tuple(str(p.relative_to(_PKG.parent)) for p in _numerics_files())


def _code_of(source: bytes, name: str) -> bytes:
    """What of a Python source defines numbers: its syntax tree without docstrings (comments, blank lines
    and layout never reach the tree), so editing prose does not re-key the run store."""
    tree = ast.parse(source, filename=name)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree).encode()


def numerics_version(files: list[Path] | None = None) -> str:
    """Hash of the code of the source files that define the numbers a run produces (models, data,
    trainer, evaluators): any edit to their code is a new numerics version, hence new run ids; an edit to
    comments, docstrings or layout only is not (``_code_of``), so stored runs stay valid through it."""
    h = hashlib.sha256()
    for f in files if files is not None else _numerics_files():
        f = Path(f)
        h.update(f.name.encode() + b"\0" + _code_of(f.read_bytes(), str(f)) + b"\0")
    return h.hexdigest()[:12]


NUMERICS_VERSION = numerics_version()


class DamagedRunError(RuntimeError):
    """A run-store file that cannot be read (truncated, not JSON, not a torch archive).
    ``path``: the file; ``ref``: ``<experiment>/<run_id>`` of its run (None for a loose file)."""

    def __init__(self, message: str, path: Path | str | None = None, ref: str | None = None):
        super().__init__(message)
        self.path, self.ref = (Path(path) if path is not None else None), ref


class NoSpaceError(OSError):
    """The disk filled up while saving (errno ENOSPC); the message says "no space left on <folder>"."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "no space left on device"


def _remedy(ref: str | None, what: str) -> str:
    if ref is None:
        return ""
    return (f" Remedy: `python -m vitrepro.store repair {ref}` ({what}), or `python -m vitrepro.store "
            f"forget {ref}` (delete the run); a sweep repairs and retrains just this run.")


def _ref_of(path: Path) -> str | None:
    """``<experiment>/<run_id>`` when ``path`` is a file of a run folder (the folder has a config.json)."""
    d = Path(path).parent
    return f"{d.parent.name}/{d.name}" if (d / "config.json").exists() or (d / ".lock").exists() else None


def check_json_file(path, ref: str | None = None) -> dict:
    """Read a JSON file of the store; a truncated or garbled one raises ``DamagedRunError``."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        ref = ref or _ref_of(path)
        what = "truncated" if raw.strip() and not raw.rstrip().endswith(b"}") else "not valid JSON"
        raise DamagedRunError(f"{path} is damaged: {what} ({len(raw)} bytes; {e})."
                              + _remedy(ref, "drops it so that the run is evaluated again from its checkpoint"),
                              path, ref) from e


_TORCH_FILES = {"checkpoint.pt": "drops it; an unfinished run then trains again from step 0",
                "model.pt": "drops it and the record, so that the run resumes from its final checkpoint "
                            "and writes it again"}


def check_torch_file(path, ref: str | None = None) -> None:
    """Cheap integrity check of a file written by ``torch.save``: a complete zip archive with a
    ``data.pkl`` (a truncated file has lost its central directory). Raises ``DamagedRunError``."""
    path = Path(path)
    problem = None
    size = path.stat().st_size
    if size == 0:
        problem = "empty (0 bytes)"
    else:
        try:
            with zipfile.ZipFile(path) as z:
                if not any(n.endswith("data.pkl") for n in z.namelist()):
                    problem = "not a torch.save archive (no data.pkl)"
        except zipfile.BadZipFile:
            problem = f"truncated or corrupt ({size} bytes; not a complete torch.save zip archive)"
    if problem:
        ref = ref or _ref_of(path)
        raise DamagedRunError(f"{path} is damaged: {problem}." + _remedy(ref, _TORCH_FILES.get(path.name, "drops it")),
                              path, ref)


def default_root() -> Path:
    from . import settings
    return settings.get().runs_dir  # $VITREPRO_RUNS, else `runs` in vitrepro.toml, else <repo>/runs


def code_versions() -> dict:
    from . import __version__
    return {"vitrepro": __version__, "torch": ".".join(torch.__version__.split("+")[0].split(".")[:2]),
            "numerics": NUMERICS_VERSION}


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


def run_id_for(config: dict, versions: dict | None = None, resolved: dict | None = None) -> str:
    """Short hash of the configuration, the code versions (with ``NUMERICS_VERSION``) and, where given,
    what the configuration resolves to on this machine (``train.run_id_of`` passes device type,
    precision, the CPU thread count and data fingerprints)."""
    payload = {"config": config, "versions": versions or code_versions()}
    if resolved is not None:
        payload["resolved"] = resolved
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:12]


class _Tracked:
    """A file object that remembers the OSError of a failed write (torch.save turns it into an
    opaque ``RuntimeError: [enforce fail at inline_container.cc...]``)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):  # tell, seek, flush, fileno, ...: the real file's
        return getattr(self.f, name)


def _no_space(path: Path, err: BaseException | None) -> NoSpaceError:
    try:
        free = shutil.disk_usage(path.parent).free
        free_s = f"; {free / 2**20:.1f} MiB free"
    except OSError:
        free_s = ""
    e = NoSpaceError(f"no space left on {path.parent} (while writing {path.name}{free_s}). Free some space "
                     "there, or point the run store / results elsewhere (VITREPRO_RUNS, runs_dir=..., results_dir=...)")
    e.errno, e.filename = errno.ENOSPC, str(path)
    return e


def atomic_write(path: Path, write) -> None:
    """Write a file atomically: `write(f)` fills a temp file in the same folder, then it is renamed.
    A full disk raises ``NoSpaceError`` ("no space left on <folder>")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    tracked = None
    try:
        with os.fdopen(fd, "wb") as f:
            tracked = _Tracked(f)
            write(tracked)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = tracked.error if tracked is not None and tracked.error is not None else e
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            raise _no_space(path, cause) from e
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


class RunLock:
    """An exclusive OS lock (``fcntl.flock``) on ``<run folder>/.lock``: held by one process at a
    time, released by ``release()`` or by the kernel when the owner dies (even by SIGKILL). The lock
    file keeps the owner's pid and host (shown to a waiting process). Where ``fcntl`` is missing
    (Windows) it is a no-op."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None
        self.waited = False

    def owner(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def acquire(self, blocking: bool = True, on_wait: Callable[[str], None] | None = None) -> bool:
        """Take the lock; ``on_wait(owner)`` is called once when another process holds it. With
        ``blocking=False`` returns False instead of waiting."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not blocking:
                    os.close(fd)
                    return False
                self.waited = True
                if on_wait is not None:
                    on_wait(self.owner())
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%H:%M:%S')}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            import fcntl
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False


class RunStore:
    """Folder of runs. ``RunStore()`` uses ``vitrepro.settings``: ``$VITREPRO_RUNS``, vitrepro.toml or ``<repo>/runs``."""

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
        """The run's record.json (None if it has none); a damaged one raises ``DamagedRunError``."""
        p = self.run_dir(experiment, run_id) / "record.json"
        if not p.exists():
            return None
        return check_json_file(p, f"{experiment}/{run_id}")

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

    def _record_or_warn(self, experiment: str, run_id: str) -> dict | None:
        try:
            return self.record(experiment, run_id)
        except DamagedRunError as e:
            print(f"[vitrepro] skipping a damaged run: {e}", file=sys.stderr)
            return None

    def records(self, experiment: str | None = None) -> list[dict]:
        """Every readable record (a damaged one is skipped with a message naming it)."""
        out = []
        for e, r, rd in self.runs(experiment):
            rec = self._record_or_warn(e, r)
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
            rec = self._record_or_warn(e, r)
            if rec is None and not include_incomplete:
                continue
            try:
                cfg = check_json_file(rd / "config.json", f"{e}/{r}")
            except DamagedRunError as err:
                print(f"[vitrepro] skipping a damaged run: {err}", file=sys.stderr)
                continue
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

    # ownership, damage, remedies ------------------------------------------------
    def lock(self, experiment: str, run_id: str) -> RunLock:
        """The OS lock of one run folder (not yet acquired)."""
        return RunLock(self.run_dir(experiment, run_id) / ".lock")

    def find(self, ref: str) -> tuple[str, str, Path]:
        """``'<experiment>/<run_id>'``, ``'run:<experiment>/<run_id>'`` or a bare run id ->
        (experiment, run_id, folder). The folder need not have a config.json (a damaged run)."""
        ref = ref[4:] if ref.startswith("run:") else ref
        ref = ref.strip("/")
        if "/" in ref:
            exp, rid = ref.split("/", 1)
            d = self.run_dir(exp, rid)
            if not d.is_dir():
                raise FileNotFoundError(f"no run folder {d}")
            return exp, rid, d
        hits = [(p.parent.name, p.name, p) for p in self.root.glob(f"*/{ref}") if p.is_dir()] \
            if self.root.is_dir() else []
        if not hits:
            raise FileNotFoundError(f"no run {ref!r} under {self.root}")
        if len(hits) > 1:
            raise ValueError(f"run id {ref!r} is in several experiments: "
                             f"{', '.join(f'{e}/{r}' for e, r, _ in hits)}; say which with <experiment>/<run_id>")
        return hits[0]

    def damage(self, experiment: str, run_id: str) -> dict[str, str]:
        """{file name: what is wrong} for the damaged files of one run (empty when all read)."""
        d = self.run_dir(experiment, run_id)
        out = {}
        ref = f"{experiment}/{run_id}"
        for name in ("config.json", "record.json"):
            if (d / name).exists():
                try:
                    check_json_file(d / name, ref)
                except DamagedRunError as e:
                    out[name] = str(e)
        for name in ("checkpoint.pt", "model.pt"):
            if (d / name).exists():
                try:
                    check_torch_file(d / name, ref)
                except DamagedRunError as e:
                    out[name] = str(e)
        return out

    def repair(self, ref: str) -> list[str]:
        """Drop the damaged files of one run so that the next ``train.run`` of its configuration
        resumes (damaged record or model: from the final checkpoint) or retrains (damaged checkpoint
        of an unfinished run: from step 0, with a fresh metrics.jsonl; a finished run stays finished).
        Returns what was done, one line per file."""
        exp, rid, d = self.find(ref)
        lk = self.lock(exp, rid)
        if not lk.acquire(blocking=False):
            raise RuntimeError(f"run {exp}/{rid} is being trained right now ({lk.owner()}); repair it after that")
        try:
            bad = self.damage(exp, rid)
            done = []
            if "model.pt" in bad and (d / "record.json").exists() and "record.json" not in bad:
                bad["record.json"] = "its model.pt is damaged"
            for name in ("record.json", "model.pt", "checkpoint.pt", "config.json"):
                if name in bad:
                    (d / name).unlink()
                    done.append(f"dropped {d / name}: {bad[name].split(' Remedy:')[0]}")
            if not done:
                done.append(f"{exp}/{rid}: nothing damaged")
            return done
        finally:
            lk.release()

    def forget(self, ref: str) -> Path:
        """Delete one run folder (refused while a process trains it). Returns the folder."""
        exp, rid, d = self.find(ref)
        lk = self.lock(exp, rid)
        if not lk.acquire(blocking=False):
            raise RuntimeError(f"run {exp}/{rid} is being trained right now ({lk.owner()}); stop it first")
        try:
            shutil.rmtree(d)
        finally:
            lk.release()
        return d

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


def main(argv: list[str] | None = None) -> int:
    """``python -m vitrepro.store check|repair|forget ...``"""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m vitrepro.store", description="Inspect and mend the run store.")
    ap.add_argument("--store", help="run store root (default $VITREPRO_RUNS or <repo>/runs)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="list runs with damaged files")
    c.add_argument("experiment", nargs="?")
    r = sub.add_parser("repair", help="drop the damaged files of a run, so that it resumes or retrains")
    r.add_argument("run", help="<experiment>/<run_id> or a run id")
    f = sub.add_parser("forget", help="delete one run folder")
    f.add_argument("run", help="<experiment>/<run_id> or a run id")
    a = ap.parse_args(argv)
    st = RunStore(a.store) if a.store else RunStore()
    try:
        if a.cmd == "check":
            n = 0
            exps = [a.experiment] if a.experiment else (sorted(p.name for p in st.root.iterdir() if p.is_dir())
                                                         if st.root.is_dir() else [])
            for e in exps:
                for rd in sorted((st.root / e).iterdir()) if (st.root / e).is_dir() else []:
                    if rd.is_dir():
                        for name, msg in st.damage(e, rd.name).items():
                            n += 1
                            print(msg)
            print(f"{n} damaged file(s) under {st.root}")
            return 1 if n else 0
        if a.cmd == "repair":
            for line in st.repair(a.run):
                print(line)
            return 0
        d = st.forget(a.run)
        print(f"deleted {d}")
        return 0
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
