"""The run store: one folder per (experiment, configuration), written atomically, owned by one process at a time
(``RunLock``: ``flock``, released by the kernel when the owner dies); every file is validated where it is read.
The layout, the run id and ``NUMERICS_VERSION``: docs/design.md; every damage case, its message and remedy
(``_FILES``): docs/damage.md::

    python -m vitrepro.store check                      # list damaged files (every kind the readers reject)
    python -m vitrepro.store repair EXPERIMENT/RUN_ID   # mend them: the run resumes, re-evaluates or retrains
    python -m vitrepro.store forget EXPERIMENT/RUN_ID   # delete the run folder (its dependants are named)
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

from . import __version__, settings

_PKG = Path(__file__).resolve().parent
_NUMERICS = sorted(_PKG.glob("models/*.py")) + [_PKG / "data.py", _PKG / "train.py", _PKG / "evaluate.py"]
NUMERICS_FILES = tuple(str(p.relative_to(_PKG.parent)) for p in _NUMERICS)

# Calls whose only effect is a message to the user (print, warnings.warn, train._say): not numerics.
_MESSAGE_CALLS = frozenset({"print", "warn", "_say"})


class _Numerics(ast.NodeTransformer):
    """The part of a syntax tree that computes numbers: drops docstrings, the messages of ``raise``/``assert``
    and message calls, command-line functions (``main``, any function importing argparse) and
    ``if __name__ == "__main__"`` blocks; keeps constants, control flow and the exception classes raised."""

    def _body(self, node):
        first = node.body[0] if node.body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            node.body = node.body[1:] or [ast.Pass()]
        return self.generic_visit(node)

    visit_Module = visit_ClassDef = _body

    def visit_FunctionDef(self, node):
        cli = node.name == "main" or any(isinstance(n, ast.Import) and any(a.name == "argparse" for a in n.names)
                                         for n in ast.walk(node))
        return None if cli else self._body(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node):
        t = node.test
        main = isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__"
        return None if main else self.generic_visit(node)

    def visit_Raise(self, node):  # which exception, not its message
        exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        return ast.Raise(exc=exc, cause=None)

    def visit_Assert(self, node):
        return ast.Assert(test=node.test, msg=None)

    def visit_Call(self, node):
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        return ast.Constant(None) if name in _MESSAGE_CALLS else self.generic_visit(node)


def numerics_version(files: list[Path] | None = None) -> str:
    """Hash of what of the numerics sources computes numbers (`_Numerics`; comments and layout never reach the
    tree): a code edit gives new run ids, a prose, message or command-line edit keeps the stored runs."""
    h = hashlib.sha256()
    for f in map(Path, _NUMERICS if files is None else files):
        tree = _Numerics().visit(ast.parse(f.read_bytes(), filename=str(f)))
        h.update(f.name.encode() + b"\0" + ast.dump(tree).encode() + b"\0")
    return h.hexdigest()[:12]


NUMERICS_VERSION = numerics_version()


class DamagedRunError(RuntimeError):
    """A run-store file that cannot be read. ``path``: the file; ``ref``: ``<experiment>/<run_id>`` of its run
    (None for a loose file)."""

    def __init__(self, message: str, path: Path | str | None = None, ref: str | None = None):
        super().__init__(message)
        self.path, self.ref = (Path(path) if path is not None else None), ref


class _WriteError(OSError):
    def __str__(self) -> str:  # the message alone, not OSError's "[Errno N] ...: filename"
        return str(self.args[0])


class NoSpaceError(_WriteError):
    """The disk filled up while saving (ENOSPC): "no space left on <folder>", with the remedy."""


class NotWritableError(_WriteError):
    """A folder of the store cannot be written (EROFS, EACCES, EPERM): "cannot write to <folder>", with the remedy."""


# Per file of a run folder: what its damage loses, and what `repair` does about it (the remedy right for it).
_FILES = {
    "config.json": ("the run's configuration (the store cannot list, reuse or fine-tune from the run)",
                    "rebuilds it from record.json (a finished or failed run) or checkpoint.pt (an unfinished "
                    "one); with neither it deletes the run and names the runs fine-tuned from it"),
    "record.json": ("the run's final record (nothing of its training)",
                    "drops it so that the run is evaluated again from its checkpoint"),
    "metrics.jsonl": ("the damaged log lines (the model, checkpoint and record are intact)",
                      "keeps its readable rows and drops the damaged lines"),
    "checkpoint.pt": ("the training state to resume from",
                      "drops it; an unfinished run then trains again from step 0, a finished run stays finished"),
    "model.pt": ("the final weights",
                 "drops it and the record, so that the run resumes from its final checkpoint and writes it again"),
    ".lock": ("nothing (it only names the process that trains the run)",
              "deletes it; the next process of the run makes a new one"),
}


def _remedy(ref: str | None, name: str) -> str:
    lost, what = _FILES.get(name, ("", "drops it"))
    out = f" Lost: {lost}." if lost else ""
    return out if ref is None else out + (f" Remedy: `python -m vitrepro.store repair {ref}` ({what}), or "
                                          f"`python -m vitrepro.store forget {ref}` (delete the run); a sweep "
                                          "repairs and retrains just this run.")


def _damaged(path: Path, problem: str, ref: str | None) -> DamagedRunError:
    if ref is None:  # a file of a run folder (the folder has a config.json or a lock file): name its run
        d = path.parent
        ref = f"{d.parent.name}/{d.name}" if (d / "config.json").exists() or (d / ".lock").exists() else None
    return DamagedRunError(f"{path} is damaged: {problem}." + _remedy(ref, path.name), path, ref)


def _missing(path: Path, problem: str, ref: str) -> str:
    return str(_damaged(path, f"missing {problem}", ref)).replace(" is damaged: missing", " is missing")


# what each JSON file of a run must hold (a valid JSON text of another shape is damage too)
_JSON_KEYS = {"config.json": ("experiment",), "record.json": ("status",)}


def check_json_file(path, ref: str | None = None) -> dict:
    """Read a JSON file of the store; a truncated or garbled one, or (config.json, record.json) one that is
    not an object with the keys every such file has, raises ``DamagedRunError``."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        what = "truncated" if raw.strip() and not raw.rstrip().endswith(b"}") else "not valid JSON"
        raise _damaged(path, f"{what} ({len(raw)} bytes; {e})", ref) from e
    need = _JSON_KEYS.get(path.name, ())
    if need and not (isinstance(obj, dict) and all(isinstance(obj.get(k), str) for k in need)):
        raise _damaged(path, f"not a run's {path.name} (a JSON {type(obj).__name__}"
                       f"{'' if not isinstance(obj, dict) else ' without ' + ' / '.join(need)})", ref)
    return obj


_CHECKPOINT_KEYS = ("model", "optimizer", "data", "step", "loss_sum", "loss_n", "rng_cpu")


def _torch_content_problem(name: str, obj: Any) -> str | None:
    """What is wrong with the loaded content of a run's model.pt or checkpoint.pt (None: nothing)."""
    if name == "model.pt":
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return None
        return f"not a model's state dict (a {type(obj).__name__} that is not a mapping of names to tensors)"
    if not isinstance(obj, dict):
        return f"not a training checkpoint (a {type(obj).__name__})"
    missing = [k for k in _CHECKPOINT_KEYS if k not in obj]
    if missing:
        return f"not a training checkpoint (no {', '.join(missing)})"
    if isinstance(obj["step"], bool) or not isinstance(obj["step"], int) or obj["step"] < 0:
        return f"not a training checkpoint (step {obj['step']!r})"
    return _torch_content_problem("model.pt", obj["model"])


def check_torch_content(obj: Any, path, ref: str | None = None) -> Any:
    """``obj``, loaded from a run's ``checkpoint.pt`` or ``model.pt``, if it has that file's content."""
    problem = _torch_content_problem(Path(path).name, obj)
    if problem:
        raise _damaged(Path(path), problem, ref)
    return obj


def load_weights(model: torch.nn.Module, state: dict, path, ref: str | None = None) -> None:
    """``model.load_state_dict(state)`` for weights read from ``path``, a file of the model's own run: weights
    that do not fit the model its config.json builds (other names or shapes) are damage of that file."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).strip().splitlines()[:3])[:300]
        raise _damaged(Path(path), f"its weights do not fit the run's model ({detail})", ref) from e


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # mmap: the tensors are not read


def check_torch_file(path, ref: str | None = None) -> None:
    """A file written by ``torch.save`` is a complete zip archive with a ``data.pkl`` (a truncated file has lost
    its central directory) whose content is what the file's name says (``check_torch_content``); a model.pt
    also has the names and shapes of the weights in its run's checkpoint.pt. Else ``DamagedRunError``."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            problem = None if any(n.endswith("data.pkl") for n in z.namelist()) else \
                "not a torch.save archive (no data.pkl)"
    except zipfile.BadZipFile:
        problem = f"truncated or corrupt ({size} bytes; not a complete torch.save zip archive)" if size else \
            "empty (0 bytes)"
    if problem is None and path.name in ("checkpoint.pt", "model.pt"):
        try:
            problem = _torch_content_problem(path.name, _load(path))
        except Exception as e:  # noqa: BLE001 - any unpickling failure is damage
            problem = f"cannot be loaded ({type(e).__name__}: {e})"
    if problem is None and path.name == "model.pt":
        problem = _model_differs_from_checkpoint(path.parent)
    if problem:
        raise _damaged(path, problem, ref)


def _metrics_rows(path: Path) -> tuple[list[dict], list[str]]:
    """The rows of a metrics.jsonl and its damaged lines ("line N: what"). A last line without its newline
    is a row cut by a kill, not damage (a resume rewrites the file without it)."""
    lines = path.read_bytes().split(b"\n")
    rows, bad = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            bad.append(f"line {i}: binary bytes, not text")
            continue
        except json.JSONDecodeError:
            if i < len(lines):  # the last one, without its newline, was cut by a kill: not damage
                bad.append(f"line {i}: not JSON ({line[:40]!r})")
            continue
        if not isinstance(row, dict):
            bad.append(f"line {i}: a JSON {type(row).__name__}, not a row object")
        elif isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int) or row["step"] < 0:
            bad.append(f"line {i}: step {row.get('step')!r} is not a step number")
        else:
            rows.append(row)
    return rows, bad


def _shapes(state: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _model_differs_from_checkpoint(d: Path) -> str | None:
    """model.pt holds the weights of the run's final checkpoint: other names or shapes are damage of model.pt
    (the store cannot build the model to compare with; the checkpoint is the weights the run resumes from)."""
    try:
        a, b = _shapes(_load(d / "model.pt")), _shapes(_load(d / "checkpoint.pt")["model"])
    except Exception:  # noqa: BLE001 - no checkpoint, or unreadable: check_torch_file reports it
        return None
    diff = sorted(set(a) ^ set(b)) or [k for k in a if a[k] != b[k]]
    return f"its weights do not fit the run's model (they differ from checkpoint.pt's at {', '.join(diff[:3])})" \
        if a != b else None


def _found_by_the_run(d: Path) -> dict[str, str]:
    """Damage only a full load reveals (weights that do not fit the model), as the run that failed on it
    recorded it: {file name: message}, while that file is still the one the run read."""
    p = d / "record.json"
    try:
        rec = json.loads(p.read_bytes()) if p.exists() else None
    except (ValueError, OSError):
        return {}
    if not (isinstance(rec, dict) and rec.get("status") == "failed" and rec.get("error_type") == "DamagedRunError"):
        return {}
    msg = str(rec.get("error", "")).removeprefix("DamagedRunError: ")
    return {f.name: msg + " (found by the run that failed on it)"
            for f in (d / n for n in ("checkpoint.pt", "model.pt", "metrics.jsonl", "config.json"))
            if msg.startswith(f"{f} is damaged") and f.exists() and f.stat().st_mtime <= p.stat().st_mtime}


# --------------------------------------------------------------------------- writes: disk full, read-only
def existing_ancestor(p: Path) -> Path:
    """``p`` or its nearest folder above that exists (where a folder not yet made would go)."""
    p = Path(p).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


_ELSEWHERE = ("or point the run store / results elsewhere (--store DIR on the command line, VITREPRO_RUNS=DIR, "
              "runs_dir=... / results_dir=... in a notebook)")


def write_error(path: Path, err: BaseException) -> BaseException:
    """The error to raise for a failed write of ``path``: ``NoSpaceError`` (ENOSPC) or ``NotWritableError``
    (EROFS, EACCES, EPERM), naming the folder and the remedy; any other error as it is."""
    path = Path(path)
    if isinstance(err, _WriteError) or not isinstance(err, OSError):
        return err
    if err.errno == errno.ENOSPC:
        try:
            free = f"; {shutil.disk_usage(existing_ancestor(path.parent)).free / 2**20:.1f} MiB free"
        except OSError:
            free = ""
        e = NoSpaceError(f"no space left on {path.parent} (while writing {path.name}{free}). Free some space "
                         f"there, {_ELSEWHERE}")
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = "read-only file system" if err.errno == errno.EROFS else err.strerror or "permission denied"
        e = NotWritableError(f"cannot write to {path.parent} ({why}, while writing {path.name}). Make it "
                             f"writable, {_ELSEWHERE}")
    else:
        return err
    e.errno, e.filename = err.errno, str(path)
    return e


@contextlib.contextmanager
def writing(path) -> Iterator[None]:
    """Around a write of ``path``: a full disk or a read-only folder becomes the store's named error."""
    try:
        yield
    except OSError as e:
        mapped = write_error(path, e)
        if mapped is e:
            raise
        raise mapped from e


def default_root() -> Path:
    return settings.get().runs_dir  # $VITREPRO_RUNS, else `runs` in vitrepro.toml, else <repo>/runs


def code_versions() -> dict:
    return {"vitrepro": __version__, "torch": ".".join(torch.__version__.split("+")[0].split(".")[:2]),
            "numerics": NUMERICS_VERSION}


def _jsonable(o: Any):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, Path) or (isinstance(o, float) and not math.isfinite(o)):
        return str(o)
    return o.item() if callable(getattr(o, "item", None)) else o


def canonical_json(o: Any) -> str:
    return json.dumps(_jsonable(o), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def run_id_for(config: dict, versions: dict | None = None, resolved: dict | None = None) -> str:
    """Short hash of the configuration, the code versions (with ``NUMERICS_VERSION``) and, where given,
    what the configuration resolves to on this machine and data (``train.resolved_identity``)."""
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


def atomic_write(path: Path, write) -> None:
    """`write(f)` fills a temp file in the same folder, then it is renamed (a failed write: ``write_error``)."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    tracked = _Tracked(os.fdopen(fd, "wb"))
    try:
        with tracked.f as f:
            write(tracked)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = tracked.error or e
        mapped = write_error(path, cause)
        if mapped is not cause:
            raise mapped from e
        raise


def atomic_write_json(path, obj) -> None:
    atomic_write(Path(path), lambda f: f.write(json.dumps(_jsonable(obj), indent=2, sort_keys=True).encode()))


def atomic_torch_save(path, obj) -> None:
    atomic_write(Path(path), lambda f: torch.save(obj, f))


def _write_rows(path: Path, rows: list[dict]) -> None:
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


class RunLock:
    """An exclusive ``fcntl.flock`` on ``<run folder>/.lock``, released by ``release()`` or by the kernel when
    the owner dies (even by SIGKILL); the file names the owner (pid, host). A no-op without ``fcntl``."""

    def __init__(self, path: Path):
        self.path, self._fd, self.waited = Path(path), None, False  # waited: another process held it first

    def owner(self) -> str:
        """The owner line the holder wrote ("pid N on HOST since T"); "unknown" when the file holds none
        (garbage in it is harmless: every owner rewrites it)."""
        try:
            text = self.path.read_bytes().decode("utf-8", "replace").strip()
        except OSError:
            return "unknown"
        return text if text.startswith("pid ") and "\ufffd" not in text and len(text) < 200 else "unknown"

    def acquire(self, blocking: bool = True, on_wait: Callable[[str], None] | None = None) -> bool:
        """Take the lock; ``on_wait(owner)`` is called once when another process holds it. With
        ``blocking=False`` returns False instead of waiting."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return True
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
            raise _damaged(self.path, "not a regular file", None)
        with writing(self.path):
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
            with writing(self.path):  # a full disk or read-only store fails here first, at the run's start
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%H:%M:%S')}\n"
                          .encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # closing alone would not release a copy a child inherited
        os.close(self._fd)
        self._fd = None


class RunStore:
    """Folder of runs; ``RunStore()``: the settings' run store (``$VITREPRO_RUNS``, vitrepro.toml, ``<repo>/runs``)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    # paths -----------------------------------------------------------------
    def run_dir(self, experiment: str, run_id: str) -> Path:
        return self.root / experiment / run_id

    def resolve(self, ref: str) -> Path:
        """``'<experiment>/<run_id>'`` (optionally prefixed ``run:``) -> its folder (must exist)."""
        ref = ref.removeprefix("run:")
        if not (self.root / ref / "config.json").exists():
            raise FileNotFoundError(f"no stored run {ref!r} under {self.root}")
        return self.root / ref

    # reading -----------------------------------------------------------------
    def record(self, experiment: str, run_id: str) -> dict | None:
        """The run's record.json (None if it has none); a damaged one raises ``DamagedRunError``."""
        p = self.run_dir(experiment, run_id) / "record.json"
        return check_json_file(p, f"{experiment}/{run_id}") if p.exists() else None

    def config(self, experiment: str, run_id: str) -> dict:
        """The run's config.json; a damaged one raises ``DamagedRunError`` (missing: FileNotFoundError)."""
        return check_json_file(self.run_dir(experiment, run_id) / "config.json", f"{experiment}/{run_id}")

    def metrics(self, experiment: str, run_id: str) -> list[dict]:
        """The rows of the run's metrics.jsonl; a damaged line raises ``DamagedRunError`` naming it."""
        p = self.run_dir(experiment, run_id) / "metrics.jsonl"
        if not p.exists():
            return []
        rows, bad = _metrics_rows(p)
        if bad:
            more = f"; {len(bad) - 3} more" if len(bad) > 3 else ""
            raise _damaged(p, f"{len(bad)} unreadable line(s) among {len(rows)} rows ({'; '.join(bad[:3])}{more})",
                           f"{experiment}/{run_id}")
        return rows

    def runs(self, experiment: str | None = None) -> Iterator[tuple[str, str, Path]]:
        for rd in sorted(self.root.glob(f"{experiment or '*'}/*")):
            if (rd / "config.json").exists():
                yield rd.parent.name, rd.name, rd

    @staticmethod
    def _or_warn(read, *args):  # None, with a message naming it, for a damaged file
        try:
            return read(*args)
        except DamagedRunError as e:
            print(f"[vitrepro] skipping a damaged run: {e}", file=sys.stderr)

    def records(self, experiment: str | None = None) -> list[dict]:
        """Every readable record (a damaged one is skipped with a message naming it)."""
        recs = (self._or_warn(self.record, e, r) for e, r, _ in self.runs(experiment))
        return [rec for rec in recs if rec is not None]

    def frame(self, experiment: str | None = None, include_incomplete: bool = False):
        """Long form: one row per (run, metric). Columns: run_id, experiment, status, every config
        field flattened (nested dicts joined with '.'), metric, value. Metrics are the record's
        ``metrics`` (final evaluations) plus wall_time_s, train_flops, params, images_seen, steps."""
        import pandas as pd
        rows = []
        for e, r, _ in self.runs(experiment):
            rec = self._or_warn(self.record, e, r)
            cfg = self._or_warn(self.config, e, r) if rec is not None or include_incomplete else None
            if cfg is None:
                continue
            base = {"run_id": r, "experiment": e, "status": rec.get("status", "ok") if rec else "incomplete"}
            base.update({k: v for k, v in _flatten(cfg).items() if k not in (*base, "metric", "value")})
            mets = dict((rec or {}).get("metrics", {}))
            mets.update({k: rec[k] for k in ("wall_time_s", "train_flops", "params", "images_seen", "steps")
                         if rec and isinstance(rec.get(k), (int, float))})
            rows += [{**base, "metric": k, "value": float("nan") if v is None else float(v)} for k, v in mets.items()]
            if not mets:
                rows.append({**base, "metric": None, "value": float("nan")})
        df = pd.DataFrame(rows)
        first, last = ["run_id", "experiment", "status"], ["metric", "value"]
        return df.reindex(columns=first + [c for c in df.columns if c not in first + last] + last)

    # ownership, damage, remedies ------------------------------------------------
    def lock(self, experiment: str, run_id: str) -> RunLock:
        return RunLock(self.run_dir(experiment, run_id) / ".lock")

    def find(self, ref: str) -> tuple[str, str, Path]:
        """``'<experiment>/<run_id>'``, ``'run:<experiment>/<run_id>'`` or a bare run id ->
        (experiment, run_id, folder). The folder need not have a config.json (a damaged run)."""
        ref = ref.removeprefix("run:").strip("/")
        if "/" in ref:
            exp, rid = ref.split("/", 1)
            if not self.run_dir(exp, rid).is_dir():
                raise FileNotFoundError(f"no run folder {self.run_dir(exp, rid)}")
            return exp, rid, self.run_dir(exp, rid)
        hits = [(p.parent.name, p.name, p) for p in self.root.glob(f"*/{ref}") if p.is_dir()]
        if not hits:
            raise FileNotFoundError(f"no run {ref!r} under {self.root}")
        if len(hits) > 1:
            raise ValueError(f"run id {ref!r} is in several experiments: "
                             f"{', '.join(f'{e}/{r}' for e, r, _ in hits)}; say which with <experiment>/<run_id>")
        return hits[0]

    def damage(self, experiment: str, run_id: str) -> dict[str, str]:
        """{file name: the DamagedRunError message} for the damaged files of one run (empty when all read):
        every check the readers make, so that `check` finds whatever would stop a run."""
        d = self.run_dir(experiment, run_id)
        out = {}
        ref = f"{experiment}/{run_id}"
        checks = {"config.json": check_json_file, "record.json": check_json_file,
                  "metrics.jsonl": lambda p, r: self.metrics(experiment, run_id),
                  "checkpoint.pt": check_torch_file, "model.pt": check_torch_file}
        for name, check in checks.items():
            if (d / name).exists():
                try:
                    check(d / name, ref)
                except DamagedRunError as e:
                    out[name] = str(e)
        if not (d / "config.json").exists() and any((d / n).exists() for n in checks):
            out["config.json"] = _missing(d / "config.json", "(the folder holds the run's other files)", ref)
        lock = d / ".lock"
        if lock.is_symlink() or (lock.exists() and not lock.is_file()):
            out[".lock"] = str(_damaged(lock, "not a regular file", ref))
        out.update({k: v for k, v in _found_by_the_run(d).items() if k not in out})
        if "record.json" not in out and not (d / "model.pt").exists() and (d / "record.json").exists():
            if check_json_file(d / "record.json", ref).get("status") == "ok":
                out["model.pt"] = _missing(d / "model.pt", "although record.json says the run finished", ref)
        return out

    def dependants(self, experiment: str, run_id: str) -> list[str]:
        """``<experiment>/<run_id>`` of the stored runs fine-tuned from this one (``init=run:...``)."""
        out = []
        for e, r, _ in self.runs():
            with contextlib.suppress(DamagedRunError, OSError):
                if self.config(e, r).get("init") == f"run:{experiment}/{run_id}":
                    out.append(f"{e}/{r}")
        return out

    def _rebuild_config(self, exp: str, rid: str, d: Path, problem: str) -> str | None:
        """Write a damaged or missing config.json again from record.json (checked against the run id) or
        checkpoint.pt; what was done, or None when neither holds the configuration."""
        rec = None
        with contextlib.suppress(DamagedRunError):
            rec = self.record(exp, rid)
        if rec and isinstance(rec.get("config"), dict) and isinstance(rec.get("resolved"), dict):
            res = rec["resolved"]
            facts = ("img_size", "in_chans", "num_classes", "steps", "train_size", "arch", "head_reset", "numerics")
            vers = rec.get("versions") or {}
            versions = {"vitrepro": vers.get("vitrepro"), "numerics": res.get("numerics"),
                        "torch": ".".join(str(vers.get("torch", "")).split("+")[0].split(".")[:2])}
            ok = run_id_for(rec["config"], versions, {k: v for k, v in res.items() if k not in facts}) == rid
            atomic_write_json(d / "config.json", {**rec["config"], "_resolved": res})
            how = "it hashes to the run id" if ok else "the run id could not be re-derived from it: check it"
            return f"rebuilt {d / 'config.json'} from record.json ({how}); it was {problem}"
        with contextlib.suppress(DamagedRunError):
            if (d / "checkpoint.pt").exists():
                check_torch_file(d / "checkpoint.pt", f"{exp}/{rid}")
                conf = _load(d / "checkpoint.pt").get("config")
                if isinstance(conf, dict) and isinstance(conf.get("experiment"), str):
                    atomic_write_json(d / "config.json", dict(conf))
                    return (f"rebuilt {d / 'config.json'} from checkpoint.pt (the machine facts `_resolved` are "
                            f"written again when the run resumes); it was {problem}")
        return None

    def repair(self, ref: str) -> list[str]:
        """Mend the damaged files of one run, never leaving it worse (``_FILES``); one line per file."""
        exp, rid, d = self.find(ref)
        done = []
        if ".lock" in self.damage(exp, rid):  # not a file: nobody can hold it, and the lock below needs it gone
            lock_path = d / ".lock"
            shutil.rmtree(lock_path) if lock_path.is_dir() and not lock_path.is_symlink() else lock_path.unlink()
            done.append(f"deleted {lock_path}: not a regular file")
        lk = self.lock(exp, rid)
        if not lk.acquire(blocking=False):
            raise RuntimeError(f"run {exp}/{rid} is being trained right now ({lk.owner()}); repair it after that")
        try:
            bad = self.damage(exp, rid)
            if "config.json" in bad:
                problem = bad["config.json"].split(" Lost:")[0].removeprefix(f"{d / 'config.json'} is ").rstrip(".")
                line = self._rebuild_config(exp, rid, d, problem)
                if line is None:
                    deps = self.dependants(exp, rid)
                    shutil.rmtree(d)
                    return [f"deleted {d}: its config.json is {problem} and neither record.json nor checkpoint.pt "
                            "holds the configuration (nothing of the run could be resumed)"
                            + (f"; runs fine-tuned from it (kept, their parent is gone): {', '.join(deps)}"
                               if deps else "")]
                done.append(line)
            if "metrics.jsonl" in bad:
                rows, lines = _metrics_rows(d / "metrics.jsonl")
                _write_rows(d / "metrics.jsonl", rows)
                done.append(f"rewrote {d / 'metrics.jsonl'} with its {len(rows)} readable rows, dropping "
                            f"{len(lines)} damaged line(s) ({'; '.join(lines[:3])})")
            if "model.pt" in bad and (d / "record.json").exists() and "record.json" not in bad:
                bad["record.json"] = "its model.pt is damaged"
            for name in ("record.json", "model.pt", "checkpoint.pt"):
                if name in bad:
                    (d / name).unlink(missing_ok=True)
                    done.append(f"dropped {d / name}: {bad[name].split(' Lost:')[0]}")
            return done or [f"{exp}/{rid}: nothing damaged"]
        finally:
            lk.release()  # an open descriptor: fine after the folder was deleted

    def forget(self, ref: str) -> tuple[Path, list[str]]:
        """Delete one run folder (not while it trains); the folder and the runs fine-tuned from it (kept)."""
        exp, rid, d = self.find(ref)
        lk = self.lock(exp, rid)
        if not lk.acquire(blocking=False):
            raise RuntimeError(f"run {exp}/{rid} is being trained right now ({lk.owner()}); stop it first")
        try:
            deps = self.dependants(exp, rid)
            shutil.rmtree(d)
        finally:
            lk.release()
        return d, deps

    # writing -----------------------------------------------------------------
    def create(self, experiment: str, run_id: str, config: dict) -> Path:
        d = self.run_dir(experiment, run_id)
        atomic_write_json(d / "config.json", config)  # makes the folder
        return d

    def log(self, experiment: str, run_id: str, row: dict) -> None:
        p = self.run_dir(experiment, run_id) / "metrics.jsonl"
        with writing(p), open(p, "a") as f:
            f.write(json.dumps(_jsonable(row)) + "\n")

    def truncate_metrics(self, experiment: str, run_id: str, max_step: int, rows: int | None = None) -> int:
        """Keep the log rows a checkpoint at ``max_step`` had written (its first ``rows``: a final evaluation at
        the same step is dropped; unknown: the rows up to ``max_step``); how many are kept."""
        kept = [r for r in self.metrics(experiment, run_id) if r["step"] <= max_step][:rows]
        _write_rows(self.run_dir(experiment, run_id) / "metrics.jsonl", kept)
        return len(kept)

    def write_record(self, experiment: str, run_id: str, record: dict) -> None:
        atomic_write_json(self.run_dir(experiment, run_id) / "record.json", record)

    def drop(self, experiment: str, run_id: str, name: str) -> None:
        """Delete one file of a run folder where it exists (a read-only store says so, naming the folder)."""
        p = self.run_dir(experiment, run_id) / name
        if p.exists():
            with writing(p):
                p.unlink()


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m vitrepro.store", description="Inspect and mend the run store.")
    ap.add_argument("--store", help="run store root (default: vitrepro.settings: $VITREPRO_RUNS, vitrepro.toml, "
                                    "<repo>/runs)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="list runs with damaged files").add_argument("experiment", nargs="?")
    sub.add_parser("repair", help="drop the damaged files of a run, so that it resumes or retrains") \
        .add_argument("run", help="<experiment>/<run_id> or a run id")
    sub.add_parser("forget", help="delete one run folder").add_argument("run", help="<experiment>/<run_id> or a run id")
    a = ap.parse_args(argv)
    st = RunStore(a.store or None)
    try:
        if a.cmd == "check":
            msgs = [msg for rd in sorted(p for p in st.root.glob(f"{a.experiment or '*'}/*") if p.is_dir())
                    for msg in st.damage(rd.parent.name, rd.name).values()]
            print("\n".join(msgs + [f"{len(msgs)} damaged file(s) under {st.root}"]))
            return 1 if msgs else 0
        if a.cmd == "repair":
            print("\n".join(st.repair(a.run)))
            return 0
        d, deps = st.forget(a.run)
        print(f"deleted {d}" + (f"; runs fine-tuned from it (kept, their parent is gone): {', '.join(deps)}"
                                if deps else ""))
        return 0
    except (FileNotFoundError, ValueError, RuntimeError, NoSpaceError, NotWritableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 4 if isinstance(e, _WriteError) else 2


if __name__ == "__main__":
    sys.exit(main())
