"""Jupyter plumbing of a clone: its own kernel, papermill's output folder under ``runs/``, the front end.

- ``install_kernel`` writes the kernel "Python (vitrepro)" (name ``vitrepro``, the name the notebooks'
  metadata give) into ``<prefix>/share/jupyter/kernels/vitrepro``, ``<prefix>`` being this clone's
  ``.venv``; its command is that venv's own python. Jupyter looks in an environment's own prefix before the
  user's folder (``jupyter_core.paths.prefer_environment_over_user``: true in a virtual environment), so
  ``make lab`` and ``.venv/bin/papermill`` of each clone start that clone's kernel, and no clone re-points
  another's (a user-wide kernel, as ``make kernel`` installed before, is what the newest clone left there
  for every clone).
- ``RunsFolderHandler``: papermill refuses an output path whose folder is missing; for the project's own
  ``runs/`` folder (``papermill notebooks/x.ipynb runs/executed/x.cpu.ipynb`` on a fresh clone) it creates it.
- ``widget_frontend``: whether the code runs in a kernel that JupyterLab started (a tqdm widget bar shows
  there), rather than under papermill / nbclient or in a terminal (plain log lines).

``python -m vitrepro.jupyter install-kernel`` (what ``make kernel`` runs) installs the kernel for the
python that runs it; ``python -m vitrepro.jupyter which-kernel`` shows the kernel this environment resolves.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

KERNEL_NAME = "vitrepro"
DISPLAY_NAME = "Python (vitrepro)"
TEMPLATE = Path(__file__).resolve().parent.parent / "env" / "kernel" / "kernel.json.in"


def kernel_spec(python: str | os.PathLike, template: Path = TEMPLATE) -> dict:
    """The kernel.json of the project kernel that runs ``python`` (from ``env/kernel/kernel.json.in``)."""
    return json.loads(Path(template).read_text().replace("@PYTHON@", str(python)))


def kernel_dir(prefix: str | os.PathLike) -> Path:
    """Where an environment at ``prefix`` keeps the project kernel (Jupyter's ``{prefix}/share/jupyter/kernels``)."""
    return Path(prefix) / "share" / "jupyter" / "kernels" / KERNEL_NAME


def install_kernel(prefix: str | os.PathLike | None = None, python: str | os.PathLike | None = None,
                   template: Path = TEMPLATE) -> Path:
    """Install the project kernel into ``prefix`` (default: this python's environment, ``sys.prefix``),
    running ``python`` (default: this interpreter). Returns the kernel's folder.

    Nothing outside ``prefix`` changes. A user-wide "vitrepro" kernel (what ``make kernel`` installed before,
    ``~/.local/share/jupyter/kernels``) stays where it is: other clones may still use it, and this
    environment's Jupyter finds its own copy first."""
    prefix = Path(prefix or sys.prefix)
    python = Path(python or sys.executable).absolute()
    dest = kernel_dir(prefix)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "kernel.json").write_text(json.dumps(kernel_spec(python, template), indent=1) + "\n")
    try:
        from ipykernel.kernelspec import RESOURCES  # the Python logos Lab shows on the launcher
        for logo in Path(RESOURCES).glob("logo-*"):
            shutil.copyfile(logo, dest / logo.name)
    except ImportError:  # pragma: no cover - ipykernel is a dependency; the kernel works without logos
        pass
    return dest


def resolved_kernel_python(name: str = KERNEL_NAME) -> tuple[str, str]:
    """(the python the kernel ``name`` runs, its folder), as this environment's Jupyter resolves it."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec(name)
    return spec.argv[0], spec.resource_dir


# --------------------------------------------------------------------------- papermill: the runs/ folder

class RunsFolderHandler:
    """papermill I/O handler for local paths under ``runs/`` (entry point ``papermill.io``): papermill's own
    local handler stops on a missing output folder; ``runs/`` is the project's scratch folder (out of git),
    so its subfolders are created. Reading and listing are papermill's."""

    @staticmethod
    def _local():
        from papermill.iorw import LocalHandler
        return LocalHandler()

    def read(self, path):
        return self._local().read(path)

    def listdir(self, path):
        return self._local().listdir(path)

    def write(self, buf, path):
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        return self._local().write(buf, path)

    def pretty_path(self, path):
        return path


papermill_runs_handler = RunsFolderHandler()


# --------------------------------------------------------------------------- the front end

def widget_frontend() -> bool:
    """True in an IPython kernel that a Jupyter server (JupyterLab, Notebook) started: ipywidgets render
    there. False under papermill / nbclient (a widget would be a line of ``HBox(...)`` in the log), in a
    terminal and in plain Python. ``VITREPRO_PROGRESS`` decides when set (``bar``: True, else False)."""
    forced = os.environ.get("VITREPRO_PROGRESS")
    if forced:
        return forced == "bar"
    shell = sys.modules.get("IPython")
    shell = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return False
    from .settings import _parent_is_jupyter_server
    return _parent_is_jupyter_server()


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vitrepro.jupyter", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["install-kernel", "which-kernel"])
    ap.add_argument("--prefix", default=None, help="environment to install into (default: this python's, sys.prefix)")
    args = ap.parse_args(argv)
    if args.command == "install-kernel":
        dest = install_kernel(args.prefix)
        print(f"kernel {KERNEL_NAME!r} ({DISPLAY_NAME}) installed in {dest}, running {Path(sys.executable).absolute()}")
        if args.prefix is not None:
            return
    python, where = resolved_kernel_python()
    print(f"kernel {KERNEL_NAME!r} resolves to {where}, running {python}")


if __name__ == "__main__":
    main()
