"""One source of settings, passed on as arguments: a run store named only in vitrepro.toml is where sweeps
and run_all write; a dry run steers nothing through os.environ; its preflight checks its own disk needs;
run_all writes the committed results/ only for the committed profile."""
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from vitrepro import settings
from vitrepro.experiments import NOTEBOOKS, module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def toml_store(tmp_path, monkeypatch):
    """A project file that names the run store (and the real data directory); no VITREPRO_RUNS."""
    data = settings.get().data_dir
    cfg = tmp_path / "vitrepro.toml"
    cfg.write_text(f'runs = "from-toml"\n' + (f'data = "{data}"\n' if data else ""))
    monkeypatch.delenv("VITREPRO_RUNS", raising=False)
    monkeypatch.setenv("VITREPRO_CONFIG", str(cfg))
    monkeypatch.setenv("VITREPRO_WORKERS", "1")
    return tmp_path / "from-toml"


@pytest.mark.slow
def test_notebook_sweep_writes_to_the_run_store_of_vitrepro_toml(toml_store, one_thread):
    """Catches: sweeps and run_all reading only $VITREPRO_RUNS (they wrote to <repo>/runs while
    `python -m vitrepro.settings` said the store was the one in vitrepro.toml)."""
    from vitrepro.experiments import run_all
    from notebook_runner import run_notebook

    ns = run_notebook("scaling", {"profile": "smoke"})  # the notebook's own cells, its smoke sweep
    runs = [p for p in toml_store.glob("scaling*/*") if (p / "record.json").exists()]
    trained = {r for r in ns["df"].run_id.dropna() if not r.startswith("baseline")}
    assert {p.name for p in runs} == trained and len(trained) == 12
    assert all((p / "model.pt").exists() for p in runs)
    assert list((toml_store / "results" / "scaling" / "smoke").iterdir())  # its tables and figures
    assert not any((ROOT / "runs" / p.parent.name / p.name).exists() for p in runs)
    assert run_all.default_results("smoke", None) == toml_store / "results" / "run_all" / "smoke"


def test_dry_run_steers_through_settings_not_the_environment(tmp_path, monkeypatch):
    """Validating a dry run's parameters points this process's settings (not os.environ) at the stand-ins;
    the overrides travel to pool workers as an argument and to torchrun children as their environment."""
    from vitrepro.experiments import dryrun, scaling, sweep

    monkeypatch.setattr(dryrun, "standin_root", lambda names=None: tmp_path / "standins")
    before_env, before = dict(os.environ), settings.overrides()
    try:
        p = scaling.validate_params({"profile": "smoke", "dry_run": True, "runs_dir": str(tmp_path / "r")})
        assert dict(os.environ) == before_env
        s = settings.get()
        assert s.data_dir == tmp_path / "standins" and s.cache_dir is None and p.seeds == 1
        assert "override" in s.origin["data_dir"]
        child = settings.as_environment(s)
        assert child["VITREPRO_DATA"] == str(tmp_path / "standins") and child["VITREPRO_CACHE"] == "off"
        assert settings.get({**os.environ, **child}).data_dir == s.data_dir  # what a torchrun child resolves
        assert not hasattr(sweep, "ENV")  # no VITREPRO_LAUNCHER: the sweep passes torchrun=N
    finally:
        settings.override(before)
    assert settings.get().data_dir != tmp_path / "standins"
    with pytest.raises(Exception, match="tiny=True is only used with dry_run=True"):
        scaling.validate_params({"profile": "smoke", "tiny": True})


def test_no_module_writes_the_environment_to_steer_another():
    """The package writes os.environ in one place only: the Jupyter kernel's entry (progress mode of the
    kernel, inherited by its training workers)."""
    out = subprocess.run(["grep", "-rn", r"os.environ\[.*\] *=\|os.environ.update\|os.environ.pop\|putenv",
                          "vitrepro/"], cwd=ROOT, capture_output=True, text=True).stdout.splitlines()
    assert [line.split(":")[0] for line in out] == ["vitrepro/settings.py"], out


def test_paper_dry_run_preflight_needs_less_disk_than_the_paper_sweep(tmp_path, monkeypatch):
    """Catches: `run_all --profile paper --dry-run` refused on a disk with 42 GB free because preflight asked
    for the real sweep's 139 GB; the dry run keeps no checkpoints (it is never resumed). The disk is
    made smaller than the real sweep needs by patching the free-space probe preflight reads."""
    from vitrepro import train
    from vitrepro.experiments import dryrun, preflight

    real = {}
    for nb in NOTEBOOKS:
        m = module(nb)
        jobs = m.jobs(m.validate_params({"profile": "paper"}))
        real[nb] = preflight._bytes_needed([(j, train.TrainConfig.from_dict(j.config)) for j in jobs])
    free = max(real.values()) * 0.35  # 139 GB needed by the real scaling sweep -> 49 GB free
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 * free, 9 * free, int(free)))
    monkeypatch.setattr(preflight, "_open_splits", lambda cfgs, params: {})  # disk only: no stand-ins written
    monkeypatch.setattr(preflight, "_check_job", lambda *a: None)
    for nb in NOTEBOOKS:
        m = module(nb)
        p = m.validate_params({"profile": "paper", "runs_dir": str(tmp_path / "dry"), "results_dir": str(tmp_path)})
        p.dry_run = True  # as validated with dry_run=True, without switching this process to stand-ins
        jobs = dryrun.shrink_jobs(m.jobs(p))
        need = preflight.preflight(jobs, p, workers=2)["need_bytes"]
        assert need < free and (need < real[nb] or real[nb] < free)
        p.dry_run = False  # the same jobs as a real sweep: refused, naming the folder and the parameter
        if real[nb] > free:
            with pytest.raises(preflight.PreflightError, match="MiB free on its disk.*runs_dir="):
                preflight.preflight(m.jobs(p), p, workers=2)


def test_run_all_writes_committed_results_only_for_the_committed_profile(tmp_path, monkeypatch, capsys):
    """`run_all --profile smoke` (and any --only subset) writes under the run store, never results/; only
    the whole cpu profile (`make reproduce`) or an explicit --results writes there; --help says so."""
    from vitrepro.experiments import run_all

    monkeypatch.setenv("VITREPRO_RUNS", str(tmp_path / "runs"))
    seen = []
    monkeypatch.setattr(run_all, "_run", lambda args, pm, report: seen.append(args.results))
    run_all.main(["--profile", "smoke"])
    run_all.main(["--profile", "cpu", "--only", "scaling"])
    run_all.main(["--profile", "cpu"])
    run_all.main(["--profile", "smoke", "--results", str(tmp_path / "mine")])
    assert seen == [str(tmp_path / "runs" / "results" / "run_all" / "smoke"),
                    str(tmp_path / "runs" / "results" / "run_all" / "cpu"),
                    str(ROOT / "results"), str(tmp_path / "mine")]
    with pytest.raises(SystemExit):
        run_all.main(["--help"])
    assert "results/ for the whole cpu profile" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_run_all_smoke_leaves_committed_results_untouched(tmp_path):
    """The command issue 29 found rewriting results/: `run_all --profile smoke --only scaling`."""
    def status():
        return subprocess.run(["git", "status", "--porcelain", "results/"], cwd=ROOT, capture_output=True,
                              text=True).stdout
    before = status()
    env = {**os.environ, "VITREPRO_RUNS": str(tmp_path / "runs"), "VITREPRO_WORKERS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "vitrepro.experiments.run_all", "--profile", "smoke", "--only", "scaling"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    assert status() == before
    assert (tmp_path / "runs" / "results" / "run_all" / "smoke" / "REPORT.md").exists()


def test_one_validator_from_type_hints():
    """TrainConfig and the notebook parameters are checked by their fields' type hints (vitrepro.typed): a
    bool is not an int, an int is a float, a tuple a list; an annotation it does not know raises, where the
    hand-kept table of params.py skipped it silently."""
    import dataclasses

    from vitrepro import train, typed
    from vitrepro.experiments import scaling
    from vitrepro.experiments.params import ParameterError

    cfg = train.TrainConfig.from_dict({"steps": 3, "lr": 1, "evaluators": ({"type": "accuracy"},)})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and isinstance(cfg.evaluators, list)
    for bad, msg in (({"steps": True}, "steps=True: expected int or None"), ({"lr": "1e-3", "steps": 3}, "expected float"),
                     ({"reset_head": 1, "steps": 3}, "expected bool or None")):
        with pytest.raises(train.ConfigError, match=msg):
            train.TrainConfig.from_dict(bad)
    with pytest.raises(ParameterError, match="seeds='2': expected int or None"):
        scaling.validate_params({"profile": "smoke", "seeds": "2"})
    with pytest.raises(ParameterError, match="sizes=5: expected list or None"):
        scaling.validate_params({"profile": "smoke", "sizes": 5})

    @dataclasses.dataclass
    class Odd:
        when: set = dataclasses.field(default_factory=set)

    with pytest.raises(TypeError, match="no validator for the annotation"):
        typed.check(Odd, "when", set())
    assert set(typed.field_types(train.TrainConfig)) == {f.name for f in dataclasses.fields(train.TrainConfig)}
