"""Every command the README documents works as written on a fresh clone (issue 29), run in its cheapest form.

The commands are read from README.md's fenced ``bash`` blocks (continuation lines joined, comments dropped).
`CHEAPEST` maps each one, by a pattern, to the cheapest run that still executes the documented entry point
with the documented arguments (e.g. papermill with ``--prepare-only``, ``make test`` collecting its tier);
a command the table does not know fails `test_every_documented_command_has_a_cheapest_form`, so a README
edit that documents a new command must say here how to try it.

The runs happen in a fresh clone built in a temporary folder (`fresh_clone`): the Makefile, notebooks and
env/ of this checkout, copies of vitrepro/ and results/ (so that nothing here is written), and a `.venv`
of its own: its own prefix (its own Jupyter kernel folder) over this environment's packages, so the
kernel "vitrepro" that `make` installs there is that clone's, and nothing outside the folder changes.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def documented_commands(text: str) -> list[str]:
    """The commands of the README's ```bash blocks (indented ones too), one per (joined) line."""
    cmds = []
    for block in re.findall(r"^[ \t]*```bash\n(.*?)^[ \t]*```", text, re.S | re.M):
        joined = re.sub(r"\s*\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = _strip_comment(line).strip()
            if line:
                cmds.append(line)
    return cmds


def _strip_comment(line: str) -> str:
    """The line without its shell comment (a # outside quotes that starts a word)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


# ----------------------------------------------------------------------------------- a fresh clone

@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory):
    """A clone in a temporary folder, as after `git clone` and the install: sources linked or copied, a `.venv`
    of its own (its own prefix over this environment's packages, a .pth file) into which the clone is installed
    the way the Makefile does (``pip install -e .``, here without dependencies or network), and the project kernel
    installed into it (``make kernel``). Returns (folder, environment for its commands)."""
    import sysconfig

    clone = tmp_path_factory.mktemp("clone")
    for name in ("Makefile", "env", "notebooks", "tests", "jupytext.toml", "README.md"):
        (clone / name).symlink_to(ROOT / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("vitrepro", "results"):  # copies: the clone's REPO_ROOT is the clone, results/ its own
        shutil.copytree(ROOT / name, clone / name, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", clone / "pyproject.toml")
    venv = clone / ".venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "PYTEST", "VIRTUAL_ENV", "PYTHON"))}
    env.update(VITREPRO_RUNS=str(clone / "runs"), JUPYTER_DATA_DIR=str(clone / "user-jupyter"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MAKEFLAGS="", NODE_RANK="0")
    _install(py, clone, Path(site), env)
    jup = venv / "share" / "jupyter"
    jup.mkdir(parents=True)
    for entry in Path(sys.prefix, "share", "jupyter").glob("*"):
        if entry.name != "kernels":  # Lab's assets and extensions: shared; kernels: the clone's own
            (jup / entry.name).symlink_to(entry)
    if Path(sys.prefix, "etc").exists():
        (venv / "etc").symlink_to(Path(sys.prefix, "etc"))
    for tool, module in {"papermill": "papermill", "jupyter": "jupyter", "jupyter-lab": "jupyterlab",
                         "pytest": "pytest"}.items():  # the venv's programs, run by the venv's python
        script = venv / "bin" / tool
        script.write_text(f'#!/bin/sh\nexec "$(dirname "$0")/python" -m {module} "$@"\n')
        script.chmod(0o755)
    (venv / ".installed").touch()  # newer than pyproject.toml: make does not reinstall
    r = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", "kernel"], cwd=clone, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return clone, env


def _install(py: Path, clone: Path, site: Path, env: dict) -> None:
    """``pip install -e`` the clone into its venv (``--ignore-installed``: never touching the vitrepro of the
    environment the packages come from). Without setuptools here (pip builds offline, so it needs it), what
    the install leaves that the commands use: the clone on sys.path and its entry points (papermill.io)."""
    import importlib.util

    if importlib.util.find_spec("setuptools") is not None:
        r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", "--no-index",
                            "--no-build-isolation", "-e", str(clone)], cwd=clone, env=env, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        return
    import tomllib

    project = tomllib.loads((clone / "pyproject.toml").read_text())["project"]
    (site / "vitrepro-clone.pth").write_text(f"{clone}\n")
    info = site / f"vitrepro-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vitrepro\nVersion: {project['version']}\n")
    groups = {"console_scripts": project.get("scripts", {}), **project.get("entry-points", {})}
    (info / "entry_points.txt").write_text("".join(
        f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for g, eps in groups.items()))


def _sh(cmd: str, clone: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    """``cmd`` in the clone's shell; `make` never rebuilds the venv (``-o .venv/.installed``)."""
    cmd = re.sub(r"^make\b", "make --no-print-directory -o .venv/.installed", cmd)
    r = subprocess.run(["bash", "-c", cmd], cwd=clone, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


# ----------------------------------------------------------------------------------- cheapest forms

def _papermill(cmd, clone, env):
    """The documented papermill run, prepared but not executed (``--prepare-only``): its input, output path
    (folder created under runs/ on a fresh clone) and parameters as written; then the parameters checked by the
    notebook's own validate_params unless they name a placeholder folder (/data/my_set)."""
    argv = shlex.split(cmd.replace(".venv/bin/papermill", "papermill", 1).replace("$NODE_RANK", "0"))
    if "--help-notebook" in argv:
        out = _sh(".venv/bin/" + shlex.join(argv), clone, env).stdout
        assert "Parameters inferred for notebook" in out and "profile" in out
        return
    out_path = next((a for a in argv[2:] if not a.startswith("-") and a.endswith(".ipynb")), None)
    _sh(".venv/bin/" + shlex.join(argv + ["--prepare-only"]), clone, env)
    import nbformat

    written = clone / out_path if out_path else next((clone / "runs" / "executed").glob("*.ipynb"))
    nb = nbformat.read(written, as_version=4)
    assert nb.metadata.kernelspec.name == "vitrepro"
    params = nb.metadata.papermill.parameters
    if "/data/" not in json.dumps(params):  # a placeholder folder of the README (your own data): not here
        check = (f"from vitrepro.experiments import module; import json, sys; "
                 f"module({Path(argv[1]).stem!r}).validate_params(json.loads(sys.argv[1]))")
        _sh(shlex.join([".venv/bin/python", "-c", check, json.dumps(params)]), clone, env)


def _make_test(cmd, clone, env):
    """The test tier collected through the make target (what runs, without running it)."""
    tier = "test-slow" if "test-slow" in cmd else "test"
    out = _sh(f"make {tier} PYTEST_ARGS='--collect-only'", clone, env).stdout
    m = re.search(r"(\d+)/(\d+) tests collected \((\d+) deselected\)", out)
    assert m and int(m.group(1)) > 0 and int(m.group(3)) > 0, out[-500:]


def _make_notebook(cmd, clone, env):
    """`make notebook` with the documented NB (smoke profile, prepared only): the executed notebook's path."""
    nb = re.search(r"NB=(\w+)", cmd).group(1)
    _sh(f"make notebook NB={nb} PROFILE=smoke ARGS='--prepare-only'", clone, env)
    assert (clone / "runs" / "executed" / f"{nb}.smoke.ipynb").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_lab(cmd, clone, env):
    """`make lab` starts JupyterLab; its kernel "vitrepro" is the clone's own python (then stopped)."""
    port, log = _free_port(), clone / "lab.log"
    with open(log, "w") as err:
        p = subprocess.Popen(["make", "--no-print-directory", "-o", ".venv/.installed", "lab", f"LAB_PORT={port}",
                              "LAB_ARGS=--no-browser --IdentityProvider.token=t"], cwd=clone, env=env,
                             stdout=err, stderr=subprocess.STDOUT, start_new_session=True)
    specs, deadline = None, time.time() + 120
    try:
        while specs is None and time.time() < deadline and p.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/kernelspecs?token=t", timeout=5) as r:
                    specs = json.load(r)
            except OSError:
                time.sleep(0.5)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, 15)
        p.wait(30)
    assert specs is not None, f"JupyterLab did not answer: {log.read_text()[-2000:]}"
    assert specs["kernelspecs"]["vitrepro"]["spec"]["argv"][0] == str(clone / ".venv" / "bin" / "python")
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def _python_m(cmd, clone, env):
    """``python -m vitrepro.<module> ...``: settings and figures run as written; report and run_all (which
    would write results/ or train) into a copy of results/ (report) or as --help, which must list every
    option the README uses."""
    argv = shlex.split(cmd.replace("[", "").replace("]", ""))
    argv[0] = ".venv/bin/python"
    mod = argv[argv.index("-m") + 1]
    if mod == "vitrepro.settings" or mod.startswith("vitrepro.figures"):
        _sh(shlex.join(argv), clone, env)
    elif mod == "vitrepro.report":
        _sh(shlex.join(argv + ["--results", str(clone / "results")]), clone, env)  # the clone's copy
        assert (clone / "results" / "REPORT.md").exists()
    else:
        helptext = _sh(shlex.join(argv[:argv.index("-m") + 2] + ["--help"]), clone, env).stdout
        for opt in (a for a in argv if a.startswith("--")):
            assert opt in helptext, f"{cmd}: {opt} not in {mod} --help"


def _make_dry(cmd, clone, env):
    """A make target that would run for long (reproduce, figures): it exists and names its command."""
    target = cmd.split()[1]
    out = _sh(cmd.replace(f"make {target}", f"make -n {target}", 1), clone, env).stdout
    assert out.strip(), f"make -n {target} printed nothing"


def _docker(cmd, clone, env):
    """Docker is not run in the tests: the image's Dockerfile exists and the run mounts no clone over /work."""
    if cmd.startswith("docker build"):
        assert (ROOT / re.search(r"-f (\S+)", cmd).group(1)).exists()
    else:
        assert '"$PWD:/work"' not in cmd and "$PWD:/work " not in cmd


def _settings_make(cmd, clone, env):
    _sh(cmd, clone, env)


# pattern (on the documented command, env assignments removed) -> (slow tier?, cheapest form)
CHEAPEST = [
    (r"^make test(-slow)?\b", True, _make_test),
    (r"^make notebook\b", False, _make_notebook),
    (r"^make lab\b", True, _make_lab),
    (r"^make settings\b", False, _settings_make),
    (r"^make (reproduce|figures|bench)\b", False, _make_dry),
    (r"^(\.venv/bin/)?papermill\b", False, _papermill),
    (r"^(\.venv/bin/)?python -m vitrepro\.", False, _python_m),
    (r"^docker (build|run)\b", False, _docker),
]


def _unprefixed(cmd: str) -> str:
    """The command without leading VAR=value assignments."""
    return re.sub(r"^(\w+=(\"[^\"]*\"|'[^']*'|\S+)\s+)+", "", cmd)


def _entry(cmd: str):
    for pattern, slow, fn in CHEAPEST:
        if re.search(pattern, _unprefixed(cmd)):
            return slow, fn
    return None


COMMANDS = documented_commands(README.read_text())


def test_every_documented_command_has_a_cheapest_form():
    """Catches: a README command that no test tries (add its cheapest form to CHEAPEST)."""
    assert COMMANDS, "no ```bash block in README.md"
    unknown = [c for c in COMMANDS if _entry(c) is None]
    assert not unknown, f"README commands without a cheapest form in {Path(__file__).name}: {unknown}"


def test_documented_commands_are_parsed_as_written():
    text = "```bash\nmake a   # note\nVAR=1 b --x 'y # z' \\\n    --w\n```\n  ```bash\n  c\n  ```\n"
    assert documented_commands(text) == ["make a", "VAR=1 b --x 'y # z' --w", "c"]
    assert _unprefixed('A=1 B="x y" papermill n.ipynb') == "papermill n.ipynb"


@pytest.mark.parametrize("cmd", [pytest.param(c, marks=[pytest.mark.slow] if (_entry(c) or (False,))[0] else [],
                                              id=re.sub(r"\s+", " ", c)[:60]) for c in COMMANDS])
def test_documented_command_runs(cmd, fresh_clone):
    entry = _entry(cmd)
    if entry is None:
        pytest.fail(f"no cheapest form for {cmd!r}: add one to CHEAPEST")
    clone, env = fresh_clone
    entry[1](_unprefixed(cmd), clone, env)
