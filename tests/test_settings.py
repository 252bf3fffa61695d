"""vitrepro.settings: environment, then vitrepro.toml, then defaults; and a fast, helpful offline error."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vitrepro import settings
from vitrepro.settings import SettingsError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def empty_config(tmp_path):
    p = tmp_path / "empty.toml"
    p.write_text("")
    return p


def test_defaults(tmp_path, empty_config, monkeypatch):
    repo = tmp_path / "clone"
    repo.mkdir()
    monkeypatch.setattr(settings, "REPO_ROOT", repo)
    s = settings.get({"VITREPRO_CONFIG": str(empty_config)})
    assert s.data_dir is None and "no ../shared/data" in s.origin["data_dir"]
    assert s.runs_dir == repo / "runs"
    assert s.cache_dir == Path.home() / ".cache" / "vitrepro" / "arrays"
    assert s.offline is False and s.hub_timeout == 3.0
    (tmp_path / "shared" / "data").mkdir(parents=True)  # the repository's ../shared/data is found
    s = settings.get({"VITREPRO_CONFIG": str(empty_config)})
    assert s.data_dir == (tmp_path / "shared" / "data").resolve()
    assert s.origin["data_dir"] == "default (../shared/data found)"


def test_order_env_then_file_then_default(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "REPO_ROOT", tmp_path)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    cfg = tmp_path / "proj" / "vitrepro.toml"
    cfg.parent.mkdir()
    cfg.write_text('data = "mydata"\nruns = "/abs/runs"\ncache = "off"\noffline = true\nhub_timeout = 1.5\n')
    file_only = settings.get({"VITREPRO_CONFIG": str(cfg)})
    assert file_only.data_dir == cfg.parent / "mydata"  # relative to the file's folder, not ../shared/data
    assert file_only.runs_dir == Path("/abs/runs") and file_only.cache_dir is None
    assert file_only.offline is True and file_only.hub_timeout == 1.5
    assert set(file_only.origin.values()) == {"vitrepro.toml"}

    env = {"VITREPRO_CONFIG": str(cfg), "VITREPRO_DATA": str(tmp_path / "envdata"),
           "VITREPRO_RUNS": str(tmp_path / "envruns"), "VITREPRO_CACHE": str(tmp_path / "c"),
           "VITREPRO_OFFLINE": "0", "HF_HUB_OFFLINE": "1", "VITREPRO_HUB_TIMEOUT": "2"}
    s = settings.get(env)
    assert (s.data_dir, s.runs_dir, s.cache_dir) == (tmp_path / "envdata", tmp_path / "envruns", tmp_path / "c")
    assert s.offline is False  # VITREPRO_OFFLINE decides before HF_HUB_OFFLINE
    assert s.hub_timeout == 2.0 and s.origin["data_dir"] == "env VITREPRO_DATA"
    # HF_*_OFFLINE before the file; an empty VITREPRO_DATA means "no data directory"
    s = settings.get({"VITREPRO_CONFIG": str(cfg), "HF_DATASETS_OFFLINE": "1", "VITREPRO_DATA": ""})
    assert s.offline is True and s.origin["offline"].startswith("env HF_")
    assert s.data_dir is None


def test_project_file_at_repo_root_and_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "REPO_ROOT", tmp_path)
    (tmp_path / "vitrepro.toml").write_text('[vitrepro]\nruns = "elsewhere"\n')
    assert settings.get({}).runs_dir == tmp_path / "elsewhere"
    (tmp_path / "vitrepro.toml").write_text('dta = "x"\n')
    with pytest.raises(SettingsError, match="did you mean 'data'"):
        settings.get({})
    with pytest.raises(SettingsError, match="not a file"):
        settings.get({"VITREPRO_CONFIG": str(tmp_path / "missing.toml")})
    with pytest.raises(SettingsError, match="VITREPRO_OFFLINE"):
        settings.get({"VITREPRO_OFFLINE": "maybe", "VITREPRO_CONFIG": _empty(tmp_path)})


def _empty(tmp_path):
    p = tmp_path / "e.toml"
    p.write_text("")
    return str(p)


def test_data_and_store_read_the_settings(tmp_path, monkeypatch):
    """A data directory named only in vitrepro.toml is where data.py looks; the run store follows `runs`."""
    from vitrepro import data, store

    (tmp_path / "d" / "mnist").mkdir(parents=True)
    (tmp_path / "d" / "mnist" / "train-00000-of-00001.parquet").write_bytes(b"")
    cfg = tmp_path / "vitrepro.toml"
    cfg.write_text('data = "d"\nruns = "r"\ncache = "cache"\n')
    for v in ("VITREPRO_DATA", "VITREPRO_RUNS", "VITREPRO_CACHE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("VITREPRO_CONFIG", str(cfg))
    src = data.resolve_source("mnist")
    assert src.kind == "local" and Path(src.location) == (tmp_path / "d" / "mnist").resolve()
    assert store.default_root() == tmp_path / "r"
    assert data._cache_dir() == tmp_path / "cache"
    monkeypatch.setenv("VITREPRO_OFFLINE", "1")
    assert data._offline() is True


def _silent_server():
    """A TCP port that accepts connections and never answers: a Hub that hangs."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    return srv


def test_hub_check_is_short(monkeypatch):
    srv = _silent_server()
    try:
        t0 = time.time()
        ok, why = settings.hub_reachable(timeout=0.5, endpoint=f"http://127.0.0.1:{srv.getsockname()[1]}")
        assert not ok and time.time() - t0 < 3, why
    finally:
        srv.close()
    with socket.socket() as s:  # a closed port: refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ok, why = settings.hub_reachable(timeout=2, endpoint=f"http://127.0.0.1:{port}")
    assert not ok and "Refused" in why


def test_offline_without_data_fails_fast_and_names_the_fix(tmp_path):
    """No data directory and a Hub that does not answer: the error comes in seconds, not minutes."""
    srv = _silent_server()
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "VITREPRO_OFFLINE", "VITREPRO_CONFIG")}
    env.update(VITREPRO_DATA="", VITREPRO_CACHE="off", HF_HOME=str(tmp_path / "hf"),
               HF_ENDPOINT=f"http://127.0.0.1:{srv.getsockname()[1]}")
    code = ("from vitrepro.data import load_arrays\n"
            "load_arrays('fashion_mnist', 'train')\n")
    try:
        t0 = time.time()
        r = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(ROOT), capture_output=True,
                           text=True, timeout=120)
        wall = time.time() - t0
    finally:
        srv.close()
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert wall < 10, f"{wall:.1f} s: {last}"
    assert "DatasetNotFoundError" in last and "unreachable" in last, last
    assert "Set VITREPRO_DATA to a folder holding fashion_mnist/" in last, last
    assert "Retrying" not in r.stderr


def test_settings_cli():
    r = subprocess.run([sys.executable, "-m", "vitrepro.settings"], capture_output=True, text=True, cwd=str(ROOT))
    assert r.returncode == 0 and "data_dir" in r.stdout and "runs_dir" in r.stdout
    r = subprocess.run([sys.executable, "-m", "vitrepro.settings", "--get", "runs_dir"],
                       capture_output=True, text=True, cwd=str(ROOT), env={**os.environ, "VITREPRO_RUNS": "/x/r"})
    assert r.stdout.strip() == "/x/r"
