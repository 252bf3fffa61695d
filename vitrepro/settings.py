"""One place for the settings every entry point reads: data directory, run store, array cache, offline mode and
the Hub timeout (``VITREPRO_HUB_TIMEOUT`` / ``hub_timeout``, 3 s), so a notebook started from Lab finds the same
data as ``make reproduce``. Each comes from the environment, then the project file ``vitrepro.toml`` (repository
root, or ``$VITREPRO_CONFIG``; relative paths are relative to its folder), then the default; the table of
variables, keys and defaults is in docs/usage.md ("Settings"). ``python -m vitrepro.settings`` prints the
resolved values and where each came from.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_NAME = "vitrepro.toml"
KEYS = ("data", "runs", "cache", "offline", "hub_timeout")  # in vitrepro.toml
NAMES = ("data_dir", "runs_dir", "cache_dir", "offline", "hub_timeout")  # of `Settings`
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


class SettingsError(ValueError):
    """A malformed vitrepro.toml or setting value."""


@dataclass(frozen=True)
class Settings:
    data_dir: Path | None
    runs_dir: Path
    cache_dir: Path | None
    offline: bool
    hub_timeout: float
    config_file: Path | None = None
    origin: dict = field(default_factory=dict, compare=False)  # setting -> where it came from

    def describe(self) -> str:
        lines = [f"{k:12s} {'(none)' if v is None else v}    [{self.origin.get(k, '')}]"
                 for k, v in ((k, getattr(self, k)) for k in NAMES)]
        return "\n".join(lines + [f"config file  {self.config_file or f'(none: {REPO_ROOT / CONFIG_NAME} absent)'}"])


# --------------------------------------------------------------------------- project file
def _config_path(env) -> Path | None:
    explicit = env.get("VITREPRO_CONFIG")
    p = Path(explicit).expanduser() if explicit else REPO_ROOT / CONFIG_NAME
    if explicit and not p.is_file():
        raise SettingsError(f"VITREPRO_CONFIG={explicit} is not a file")
    return p if p.is_file() else None


def _read_config(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10: the tomli dependency (pyproject.toml)
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        values = tomllib.loads(path.read_text())
    except Exception as e:  # noqa: BLE001 - tomllib.TOMLDecodeError and friends
        raise SettingsError(f"{path}: not valid TOML ({e})") from e
    values = values.get("vitrepro", values)  # a [vitrepro] table or top-level keys
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        import difflib
        hints = [k + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(k, KEYS, n=1)) else "")
                 for k in unknown]
        raise SettingsError(f"{path}: unknown setting(s) {', '.join(hints)}; valid: {', '.join(KEYS)}")
    return values


# --------------------------------------------------------------------------- resolution
def _path(value: str, base: Path) -> Path:
    p = Path(os.path.expandvars(str(value))).expanduser()
    return p if p.is_absolute() else (base / p)


def _bool(value, what: str) -> bool:
    v = str(value).strip().lower()  # a TOML bool too: "true" / "false"
    if v not in _TRUE + _FALSE:
        raise SettingsError(f"{what}={value!r}: use 1/0, true/false, yes/no or on/off")
    return v in _TRUE


_OVERRIDES: dict = {}  # this process's replacements (`override`): a dry run's stand-in data, no array cache


def override(values: dict) -> dict:
    """Replace settings for this process, e.g. a dry run's ``{"data_dir": <stand-ins>, "cache_dir": None}``,
    instead of rewriting the environment; returns the replacements in force before (give them back to undo).
    The processes a sweep starts receive them as an argument (`overrides`), torchrun children as variables."""
    unknown = set(values) - {"data_dir", "runs_dir", "cache_dir", "offline"}
    if unknown:
        raise SettingsError(f"override: unknown setting(s) {sorted(unknown)}")
    global _OVERRIDES
    before, _OVERRIDES = _OVERRIDES, dict(values)
    return before


def overrides() -> dict:
    return dict(_OVERRIDES)


def as_environment(s: Settings) -> dict[str, str]:
    """``s``'s data settings as the variables of a child process that is not a pool worker (torchrun)."""
    return {"VITREPRO_DATA": str(s.data_dir or ""), "VITREPRO_CACHE": str(s.cache_dir or "off"),
            "VITREPRO_OFFLINE": "1" if s.offline else "0"}


def get(env=None) -> Settings:
    """The settings: the environment, then vitrepro.toml, then the defaults, then this process's
    `override`s. Cheap (environment look-ups and a small file read), so entry points call it where they
    start and pass the values on; a changed environment (tests, ``%env`` in a notebook) takes effect."""
    if env is None and _OVERRIDES:
        s = get(os.environ)
        return replace(s, **_OVERRIDES, origin={**s.origin, **{k: "override (dry run)" for k in _OVERRIDES}})
    env = os.environ if env is None else env
    cfg_path = _config_path(env)
    cfg = _read_config(cfg_path)
    base = cfg_path.parent if cfg_path else REPO_ROOT
    src_cfg = cfg_path.name if cfg_path else CONFIG_NAME
    origin = {}

    def pick(var: str, key: str, empty_ok: bool = False):
        """(value, where it came from, base of a relative path): the environment, then the file; None: the default."""
        if var in env and (empty_ok or env[var].strip()):
            return env[var].strip(), f"env {var}", Path.cwd()
        if key in cfg and (empty_ok or str(cfg[key]).strip()):
            return cfg[key], src_cfg, base
        return None, "default", base

    v, origin["data_dir"], rel = pick("VITREPRO_DATA", "data", empty_ok=True)  # empty: no data directory
    data = _path(v, rel) if v is not None and str(v).strip() else None
    origin["data_dir"] += "" if data or v is None else " (empty: no data directory)"
    if v is None:
        shared = (REPO_ROOT.parent / "shared" / "data").resolve()
        data = shared if shared.is_dir() else None
        origin["data_dir"] = "default (../shared/data found)" if data else "default (no ../shared/data: none)"
    v, origin["runs_dir"], rel = pick("VITREPRO_RUNS", "runs")
    runs = REPO_ROOT / "runs" if v is None else _path(v, rel)
    v, origin["cache_dir"], rel = pick("VITREPRO_CACHE", "cache")
    cache = (Path.home() / ".cache" / "vitrepro" / "arrays" if v is None else
             None if str(v).strip().lower() in ("0", "off", "none", "false") else _path(v, rel))
    hf = any(env.get(h, "0").strip().lower() in _TRUE for h in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    v, origin["offline"], _ = pick("VITREPRO_OFFLINE", "offline")
    if hf and not origin["offline"].startswith("env"):  # the Hub's own variables outrank the file
        v, origin["offline"] = True, "env HF_HUB_OFFLINE/HF_DATASETS_OFFLINE"
    what = "VITREPRO_OFFLINE" if origin["offline"].startswith("env") else f"{src_cfg} offline"
    offline = False if v is None else _bool(v, what)
    v, origin["hub_timeout"], _ = pick("VITREPRO_HUB_TIMEOUT", "hub_timeout")
    try:
        timeout = 3.0 if v is None else float(v)
    except (TypeError, ValueError):
        raise SettingsError(f"hub_timeout={v!r} is not a number of seconds") from None

    return Settings(data, runs, cache, offline, timeout, cfg_path, origin)


# --------------------------------------------------------------------------- Hub reachability
_HUB_CACHE: dict[str, tuple[float, bool, str]] = {}


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float | None = None, endpoint: str | None = None,
                  dataset: str | None = None) -> tuple[bool, str]:
    """One short request to the Hub for ``dataset`` (else ``/api/whoami-v2``): ``(reachable, why_not)``, so that
    an unreachable Hub fails in seconds instead of minutes of retries. 2xx/3xx, 401 and 403 (gated) count as
    reachable. The request runs in a daemon thread (a slow DNS lookup cannot hold the caller past ``timeout``);
    answers are remembered for a minute, so a sweep checks once."""
    timeout = get().hub_timeout if timeout is None else float(timeout)
    url = (endpoint or hub_endpoint()) + (f"/api/datasets/{dataset}" if dataset else "/api/whoami-v2")
    hit = _HUB_CACHE.get(url)
    if hit and time.monotonic() - hit[0] < 60:  # a minute
        return hit[1], hit[2]
    result: list = []

    def probe():
        import urllib.request
        try:
            req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "vitrepro-hub-check"})
            urllib.request.urlopen(req, timeout=timeout).close()
            result.append((True, ""))
        except urllib.request.HTTPError as e:  # the server answered
            result.append((e.code in (401, 403), "" if e.code in (401, 403) else f"HTTP {e.code} for {url}"))
        except Exception as e:  # noqa: BLE001 - URLError, socket.timeout, ssl errors, ...
            reason = getattr(e, "reason", e)
            result.append((False, f"{type(reason).__name__}: {reason}"))

    th = threading.Thread(target=probe, name="vitrepro-hub-check", daemon=True)
    th.start()
    th.join(timeout + 0.5)
    ok, why = result[0] if result else (False, f"no answer within {timeout:g} s")
    _HUB_CACHE[url] = (time.monotonic(), ok, why)
    return ok, why


# --------------------------------------------------------------------------- papermill without an output path
def executed_notebook_path(nb_json: str) -> Path:
    """Where ``papermill notebooks/<nb>.ipynb`` (no output path) writes the executed notebook:
    ``<runs_dir>/executed/<nb>.<profile>.ipynb``, the same place ``make reproduce`` uses."""
    import json
    import re
    nb = json.loads(nb_json)
    pm = nb.get("metadata", {}).get("papermill", {})
    stem = Path(str(pm.get("input_path") or "notebook")).name
    stem = stem.removesuffix(".ipynb") if stem != "-" else "notebook"
    profile = (pm.get("parameters") or {}).get("profile")
    if profile is None:  # not passed with -p: the parameters cell's default
        for cell in nb.get("cells", []):
            if "parameters" in cell.get("metadata", {}).get("tags", []):
                m = re.search(r"^profile\s*(?::[^=]*)?=\s*[\"']([\w-]+)[\"']", "".join(cell.get("source", "")), re.M)
                profile = m.group(1) if m else None
    return get().runs_dir / "executed" / (f"{stem}.{profile}.ipynb" if profile else f"{stem}.ipynb")


class PapermillHandler:
    """A papermill I/O handler (entry point ``papermill.io``) that writes its own way; reading and listing are
    those of papermill's handler ``_base`` (a class of ``papermill.iorw``, imported only when papermill calls)."""

    def _papermill(self):
        from papermill import iorw
        return getattr(iorw, self._base)()

    def __getattr__(self, name):  # read, listdir: papermill's handler's
        if name not in ("read", "listdir"):
            raise AttributeError(name)
        return getattr(self._papermill(), name)

    def pretty_path(self, path):
        return path


class PapermillDefaultOutput(PapermillHandler):
    """papermill I/O handler for the path ``-``. The papermill CLI turns a missing OUTPUT_PATH into ``-`` (the
    notebook JSON on stdout) whenever stdout is not a terminal; here that form writes the executed notebook to
    ``executed_notebook_path`` and says so on stderr. An explicit ``-`` on the command line, and every call
    through papermill's Python API, keep papermill's behaviour (stdout)."""

    _base = "StreamHandler"

    @staticmethod
    def _implicit(path) -> bool:
        argv0 = Path(sys.argv[0]).name if sys.argv else ""
        cli = argv0.startswith("papermill") or getattr(sys.modules.get("__main__"), "__package__", None) == "papermill"
        return path == "-" and cli and "-" not in sys.argv[1:]

    def write(self, buf, path):
        if not self._implicit(path):
            return self._papermill().write(buf, path)
        out = executed_notebook_path(buf)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(buf)
        os.replace(tmp, out)
        print(f"papermill: no output path given, so the executed notebook was written to {out} "
              "(vitrepro; pass an output path, or '-' for the notebook JSON on stdout)",
              file=sys.stderr, flush=True)

    def pretty_path(self, path):
        """Where the CLI's missing output path became ``-``, papermill also turned its log down to errors (meant
        for JSON on stdout), silencing ``--log-output``; the notebook goes to a file here, so the cells' output
        is logged (on stderr) when the user asked for it."""
        if self._implicit(path) and "--log-output" in sys.argv[1:]:
            import logging
            logging.getLogger("papermill").setLevel(logging.INFO)
        return path


papermill_output_handler = PapermillDefaultOutput()

# papermill warns that "-" has no file extension each time it writes there (every papermill run without an
# output path, through the handler above): "-" is the stdout / run-store path on purpose, not a typo.
warnings.filterwarnings("ignore", message=r"the file is not specified with any extension : -$")


# --------------------------------------------------------------------------- the project's Jupyter kernel
def _parent_is_jupyter_server() -> bool:
    """True when the process that started this one is JupyterLab / Jupyter Server / Notebook."""
    try:
        import psutil
        argv = psutil.Process().parent().cmdline()
    except Exception:  # noqa: BLE001 - no psutil, no parent, no permission
        return False
    return any(n.startswith("jupyter") or n == "notebook" for n in map(os.path.basename, argv[:3]))


def launch_kernel() -> None:
    """Entry of the kernel "Python (vitrepro)" (env/kernel/kernel.json.in), then ipykernel as usual. The
    kernel's own stdout goes to /dev/null (ipykernel copies the training workers' output to the notebook *and*
    to it: under papermill ``--log-output`` every step line showed twice). Not started by Jupyter Server:
    ``VITREPRO_PROGRESS=log`` unless set. ipykernel's "running over TCP without encryption" warning is dropped:
    the kernel listens on 127.0.0.1 with a user-only connection file whose key signs every message."""
    if sys.path and sys.path[0] == "":  # as ipykernel_launcher: not the current directory first
        del sys.path[0]
    fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.close(fd)
    if "VITREPRO_PROGRESS" not in os.environ and not _parent_is_jupyter_server():
        os.environ["VITREPRO_PROGRESS"] = "log"
    from ipykernel import kernelapp
    app = kernelapp.IPKernelApp.instance()  # the instance launch_new_instance() then starts
    app.log.addFilter(lambda record: "running over TCP without encryption" not in record.getMessage())
    kernelapp.launch_new_instance()


def main(argv=None) -> None:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m vitrepro.settings", description=__doc__.split("\n\n")[0])
    ap.add_argument("--get", choices=NAMES, help="print one value only (for scripts and the Makefile)")
    ap.add_argument("--check-hub", action="store_true", help="also try the Hub once")
    args = ap.parse_args(argv)
    s = get()
    if args.get:
        v = getattr(s, args.get)
        print("" if v is None else v)
        return
    print(s.describe())
    if args.check_hub:
        t0 = time.time()
        ok, why = hub_reachable()
        print(f"hub          {hub_endpoint()} {'reachable' if ok else 'unreachable: ' + why} "
              f"({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
