"""A newcomer's first hour: README order, Makefile targets, the project kernel, papermill forms, Docker files."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["scaling", "position_embeddings", "transfer", "attention"]
PAPERMILL = [sys.executable, "-m", "papermill"]


def _make_n(*args):
    return subprocess.run(["make", "-n", "--no-print-directory", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "MAKEFLAGS": ""})


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_makefile_targets():
    text = (ROOT / "Makefile").read_text()
    for target in ("venv", "kernel", "test", "reproduce", "lab", "notebook", "settings"):
        assert re.search(rf"^{target}:", text, re.M), target
    assert "vitrepro.jupyter install-kernel" in text and "--user" not in text  # the kernel is the clone's own
    r = _make_n("lab")
    assert r.returncode == 0 and "jupyter lab" in r.stdout, r.stderr
    r = _make_n("notebook", "NB=scaling", "PROFILE=smoke")
    assert r.returncode == 0, r.stderr
    assert "papermill notebooks/scaling.ipynb" in r.stdout and "/executed" in r.stdout
    assert "scaling.smoke.ipynb" in r.stdout
    assert "-p profile smoke" in r.stdout


def test_readme_order():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    first = [ln.split("#")[0].strip() for ln in blocks[0].splitlines() if ln.strip()]
    assert first == ["make reproduce", "make test"]
    after = "".join(blocks[1:3])
    assert "make lab" in after and "make notebook NB=scaling PROFILE=cpu" in after
    assert ".venv/bin/papermill notebooks/scaling.ipynb" in after
    assert "docker run" in text and "-v $PWD:/work" not in text and '-v "$PWD:/work"' not in text


def test_notebooks_name_the_project_kernel_and_typed_parameters():
    import papermill

    for nb in NOTEBOOKS:
        node = nbformat.read(ROOT / "notebooks" / f"{nb}.ipynb", as_version=4)
        assert node.metadata.kernelspec.name == "vitrepro", nb
        assert node.metadata.kernelspec.display_name == "Python (vitrepro)"
        assert all(not c.get("outputs") for c in node.cells if c.cell_type == "code"), f"{nb}: outputs"
        params = papermill.inspect_notebook(str(ROOT / "notebooks" / f"{nb}.ipynb"))  # what --help-notebook shows
        assert params and all(p["inferred_type_name"] not in ("None", "", None) for p in params.values()), params
        assert "vitrepro" in (ROOT / "notebooks" / f"{nb}.py").read_text().split("# ---")[1]


def test_kernel_spec_template_and_dependencies():
    assert not (ROOT / "env" / "kernel" / "kernel.json").exists()
    spec = json.loads((ROOT / "env" / "kernel" / "kernel.json.in").read_text().replace("@PYTHON@", sys.executable))
    assert spec["display_name"] == "Python (vitrepro)" and "{connection_file}" in spec["argv"]
    assert '"ipywidgets' in (ROOT / "pyproject.toml").read_text()
    pins = (ROOT / "env" / "constraints.txt").read_text()
    import ipywidgets
    assert f"ipywidgets=={ipywidgets.__version__}" in pins
    cfg = (ROOT / "jupytext.toml").read_text()
    assert "notebooks///ipynb,notebooks///py:percent" in cfg


def _tiny_notebook(path: Path, code: str):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile: str = "smoke"  # a profile')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(code)]
    nb.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_papermill_without_output_path_writes_to_the_run_store(tmp_path):
    nb = tmp_path / "tiny.ipynb"
    _tiny_notebook(nb, "print('hello from tiny')")
    env = {**os.environ, "VITREPRO_RUNS": str(tmp_path / "runs")}
    r = subprocess.run(PAPERMILL + [str(nb), "-k", "python3"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)  # stdout is a pipe: papermill's "-"
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", "notebook JSON on stdout"
    out = tmp_path / "runs" / "executed" / "tiny.smoke.ipynb"
    assert out.exists() and str(out) in r.stderr
    done = nbformat.read(out, as_version=4)
    assert "hello from tiny" in done.cells[-1].outputs[0]["text"]
    # -p profile names the file; an explicit "-" keeps papermill's JSON on stdout
    r = subprocess.run(PAPERMILL + [str(nb), "-", "-k", "python3", "-p", "profile", "cpu"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["cells"], r.stderr
    assert not (tmp_path / "runs" / "executed" / "tiny.cpu.ipynb").exists()


def test_executed_notebook_path_from_parameters(monkeypatch, tmp_path):
    from vitrepro import settings

    monkeypatch.setenv("VITREPRO_RUNS", str(tmp_path))
    nb = nbformat.read(ROOT / "notebooks" / "scaling.ipynb", as_version=4)
    nb.metadata["papermill"] = {"input_path": "notebooks/scaling.ipynb", "parameters": {}}
    assert settings.executed_notebook_path(nbformat.writes(nb)) == tmp_path / "executed" / "scaling.cpu.ipynb"
    nb.metadata["papermill"]["parameters"] = {"profile": "smoke"}
    assert settings.executed_notebook_path(nbformat.writes(nb)).name == "scaling.smoke.ipynb"


def _kernel_installed(name):
    from jupyter_client.kernelspec import KernelSpecManager
    return name in KernelSpecManager().find_kernel_specs()


@pytest.mark.skipif(not _kernel_installed("vitrepro"), reason="the vitrepro kernel is not installed (make kernel)")
def test_log_output_shows_child_process_lines_once(tmp_path):
    """Training workers are child processes: their lines must appear once under papermill --log-output."""
    nb = tmp_path / "child.ipynb"
    _tiny_notebook(nb, "import subprocess, sys\n"
                       "subprocess.run([sys.executable, '-c', 'print(\"worker\" + \"-line\", flush=True)'])\n"
                       "import time; time.sleep(1)  # ipykernel forwards fd output from a thread\n"
                       "None")
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # else ipykernel captures no fds
    r = subprocess.run(PAPERMILL + [str(nb), str(tmp_path / "out.ipynb"), "-k", "vitrepro", "--log-output"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (r.stdout + r.stderr).count("worker-line") == 1, r.stdout + r.stderr
    outs = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[-1].outputs
    assert any("worker-line" in o.get("text", "") for o in outs)  # still in the notebook


def test_docker_files():
    df = (ROOT / "env" / "Dockerfile.gpu").read_text()
    base = re.search(r"^FROM (\S+)", df, re.M).group(1)
    assert base.startswith("python:3.11"), base  # the Python env/constraints.txt was frozen on
    pins = dict(ln.split("==") for ln in (ROOT / "env" / "constraints.txt").read_text().split() if "==" in ln)
    cuda_major = pins["nvidia-cuda-runtime"].split(".")[0]
    for frm in re.findall(r"^FROM (\S+)", df, re.M):  # a CUDA base, if any, must match torch's CUDA wheels
        m = re.match(r"nvidia/cuda:(\d+)\.", frm)
        assert m is None or m.group(1) == cuda_major, (frm, cuda_major)
    assert "-v $PWD:/work" not in df and '"$PWD:/work"' not in df
    ignore = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv/", "runs/", "results/**/*.ipynb"):
        assert entry in ignore
