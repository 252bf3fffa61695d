"""One clone never changes another (issue 29): each clone's environment resolves the kernel "vitrepro" to its
own python, whatever another clone installed, and papermill's output folder under runs/ is created."""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _clone_env(path: Path) -> Path:
    """A virtual environment standing for one clone's .venv: its own prefix and python, with this
    environment's packages (jupyter_client, ipykernel) visible through a .pth file. Returns its python."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(path)], check=True)
    py = path / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py


def _jupyter(py: Path, *args: str, env: dict) -> str:
    r = subprocess.run([str(py), "-m", "vitrepro.jupyter", *args], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_each_clone_resolves_its_own_kernel(tmp_path):
    """Catches: a kernel installed for the user (the newest clone's python for every clone), or one that an
    environment's Jupyter does not find before a user-wide one."""
    user = tmp_path / "user"  # the user's Jupyter folder, holding the kernel an older `make kernel` left there
    (user / "kernels" / "vitrepro").mkdir(parents=True)
    other = "/elsewhere/clone/.venv/bin/python"
    (user / "kernels" / "vitrepro" / "kernel.json").write_text(json.dumps(
        {"argv": [other, "-m", "ipykernel_launcher", "-f", "{connection_file}"], "display_name": "Python (vitrepro)",
         "language": "python"}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER")}
    env.update(JUPYTER_DATA_DIR=str(user), PYTHONPATH=str(ROOT))
    clones = [_clone_env(tmp_path / name / ".venv") for name in ("a", "b")]
    for py in clones:
        out = _jupyter(py, "install-kernel", env=env)
        assert f"running {py}" in out
    for py in clones:  # after both installed: each still its own, the user-wide kernel shadowed
        out = _jupyter(py, "which-kernel", env=env)
        assert out.strip().endswith(f"running {py}"), out
        assert str(py.parent.parent / "share" / "jupyter" / "kernels" / "vitrepro") in out
        spec = json.loads((py.parent.parent / "share/jupyter/kernels/vitrepro/kernel.json").read_text())
        assert spec["argv"][0] == str(py) and spec["display_name"] == "Python (vitrepro)"
        assert "{connection_file}" in spec["argv"]
    assert json.loads((user / "kernels/vitrepro/kernel.json").read_text())["argv"][0] == other  # not touched


def test_install_kernel_writes_only_into_its_prefix(tmp_path, monkeypatch):
    """The environment's folder gets the kernel (and the Python logos Lab shows); the user's folder, which
    another clone's kernel may live in, is left as it was."""
    from vitrepro import jupyter

    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "user"))
    py = tmp_path / "clone" / ".venv" / "bin" / "python"
    dest = jupyter.install_kernel(tmp_path / "clone" / ".venv", py)
    assert dest == tmp_path / "clone/.venv/share/jupyter/kernels/vitrepro"
    assert json.loads((dest / "kernel.json").read_text())["argv"][0] == str(py)
    assert (dest / "logo-64x64.png").exists()
    assert not (tmp_path / "user").exists()


def test_runs_handler_creates_the_output_folder(tmp_path, monkeypatch):
    """papermill's local handler stops on a missing output folder; under runs/ the project creates it."""
    from vitrepro.jupyter import papermill_runs_handler

    monkeypatch.chdir(tmp_path)
    papermill_runs_handler.write('{"cells": []}', "runs/executed/x.cpu.ipynb")
    assert (tmp_path / "runs/executed/x.cpu.ipynb").read_text() == '{"cells": []}'
    assert papermill_runs_handler.read("runs/executed/x.cpu.ipynb") == '{"cells": []}'
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"runs/" = "vitrepro.jupyter:papermill_runs_handler"' in pyproject
