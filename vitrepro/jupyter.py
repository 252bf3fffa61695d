"""Jupyter plumbing of a clone: its own kernel, papermill's output folder under ``runs/``, the front end.

``python -m vitrepro.jupyter install-kernel`` (what ``make kernel`` runs) installs the kernel for the
python that runs it; ``python -m vitrepro.jupyter which-kernel`` shows the kernel this environment resolves.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from .settings import PapermillHandler

KERNEL_NAME = "vitrepro"
TEMPLATE = Path(__file__).resolve().parent.parent / "env" / "kernel" / "kernel.json.in"


def install_kernel(prefix: str | os.PathLike | None = None, python: str | os.PathLike | None = None) -> Path:
    """Install the kernel "Python (vitrepro)" running ``python`` (default: this interpreter) into
    ``<prefix>/share/jupyter/kernels/vitrepro`` (default: ``sys.prefix``) and return that folder. Jupyter looks
    in an environment's own prefix first, so each clone's ``make lab`` and papermill start its own kernel."""
    dest = Path(prefix or sys.prefix) / "share" / "jupyter" / "kernels" / KERNEL_NAME
    dest.mkdir(parents=True, exist_ok=True)
    spec = json.loads(TEMPLATE.read_text().replace("@PYTHON@", str(Path(python or sys.executable).absolute())))
    (dest / "kernel.json").write_text(json.dumps(spec, indent=1) + "\n")
    from ipykernel.kernelspec import RESOURCES  # the Python logos Lab shows on the launcher
    for logo in Path(RESOURCES).glob("logo-*"):
        shutil.copyfile(logo, dest / logo.name)
    return dest


class RunsFolderHandler(PapermillHandler):
    """papermill I/O handler for local paths under ``runs/``: papermill's own local handler stops on a missing
    output folder; ``runs/`` is the project's scratch folder (out of git), so its subfolders are created."""

    _base = "LocalHandler"

    def write(self, buf, path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return self._papermill().write(buf, path)


papermill_runs_handler = RunsFolderHandler()


def widget_frontend() -> bool:
    """True in an IPython kernel that a Jupyter server (JupyterLab, Notebook) started: ipywidgets render
    there. False under papermill / nbclient (a widget would be a line of ``HBox(...)`` in the log), in a
    terminal and in plain Python. ``VITREPRO_PROGRESS`` decides when set (``bar``: True, else False)."""
    forced = os.environ.get("VITREPRO_PROGRESS")
    if forced:
        return forced == "bar"
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()  # None outside IPython
    from .settings import _parent_is_jupyter_server
    return type(shell).__name__ == "ZMQInteractiveShell" and _parent_is_jupyter_server()


def main(argv=None) -> None:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m vitrepro.jupyter", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["install-kernel", "which-kernel"])
    ap.add_argument("--prefix", default=None, help="environment to install into (default: this python's, sys.prefix)")
    args = ap.parse_args(argv)
    if args.command == "install-kernel":
        dest = install_kernel(args.prefix)
        print(f"kernel {KERNEL_NAME!r} (Python (vitrepro)) installed in {dest}, running "
              f"{Path(sys.executable).absolute()}")
        if args.prefix is not None:
            return
    from jupyter_client.kernelspec import KernelSpecManager
    spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    print(f"kernel {KERNEL_NAME!r} resolves to {spec.resource_dir}, running {spec.argv[0]}")


if __name__ == "__main__":
    main()
