# Two entry points for a fresh machine: `make reproduce` (the cpu profile of every notebook
# plus results/REPORT.md) and `make test`
# (`make test-slow`: the slow tier). Each creates .venv/ when it is missing.
# Then: `make lab` (JupyterLab on the project kernel) or `make notebook NB=scaling PROFILE=cpu`.
# Data directory, run store and offline mode come from vitrepro/settings.py (environment variables,
# then vitrepro.toml, then defaults; ../shared/data is found by itself): `make settings` shows them.
SHELL := /bin/bash
PY := .venv/bin/python
PROFILE ?= cpu
NB ?=
NOTEBOOKS := scaling position_embeddings transfer attention
LAB_PORT ?= 8888

.PHONY: reproduce test test-slow venv kernel lab notebook settings bench clean-venv figures

venv: .venv/.installed
.venv/.installed: pyproject.toml env/constraints.txt env/kernel/kernel.json.in
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c env/constraints.txt -e '.[dev]'
	$(MAKE) --no-print-directory kernel
	touch $@

# The project's Jupyter kernel "Python (vitrepro)", installed into this clone's .venv
# (.venv/share/jupyter/kernels/vitrepro), running this clone's .venv/bin/python: Jupyter looks in a virtual
# environment's own prefix before the user's folder, so `make lab` and .venv/bin/papermill of each clone start
# that clone's kernel and one clone never re-points another's (vitrepro/jupyter.py). The notebooks name it in
# their metadata. ipykernel copies the output of child processes (the training workers) to the kernel's own
# stdout as well as to the notebook; under papermill that stdout is the terminal, so with --log-output
# every line showed twice: the kernel's stdout goes to /dev/null (env/kernel/kernel.json.in).
kernel:
	$(PY) -m vitrepro.jupyter install-kernel

# Two tiers of the offline test suite. `make test`, the default: every test but those marked slow, a few
# minutes on 2 cores. `make test-slow`: the slow ones (each profile's full dry run, torchrun, compile, the
# notebooks beyond the smoke canary), about 12 minutes on 2 cores. CI (.ci/run) runs both.
# PYTEST_ARGS adds pytest options, e.g. make test PYTEST_ARGS='tests/test_store.py -x'.
PYTEST := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest
PYTEST_ARGS ?=

test: venv
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

test-slow: venv
	$(PYTEST) -m slow $(PYTEST_ARGS)

reproduce: venv
	$(PY) -m vitrepro.experiments.run_all --profile $(PROFILE)

# Every committed table, figure and results/REPORT.md rebuilt from results/ alone (no run store, no training;
# seconds): `python -m vitrepro.report --redraw`. A redraw of unchanged results leaves `git status` clean. Each
# notebook does the same with `-p source results`.
figures: venv
	$(PY) -m vitrepro.report --redraw

# JupyterLab at the repository root; open notebooks/<name>.ipynb (its .py twin is the same notebook, paired
# by jupytext). Kernels read the data directory and run store from vitrepro.settings.
lab: venv
	@$(PY) -m vitrepro.settings
	$(PY) -m jupyter lab --port=$(LAB_PORT) $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# One notebook from the shell: make notebook NB=scaling PROFILE=cpu [ARGS='-p seeds 1']
# The executed notebook goes to <runs>/executed/<NB>.<PROFILE>.ipynb, tables and figures to
# <runs>/results/<NB>/<PROFILE>/ (the committed results/ are rewritten only by `make reproduce`).
notebook: venv
	@if [[ ! " $(NOTEBOOKS) " == *" $(NB) "* ]]; then echo "usage: make notebook NB=<$(NOTEBOOKS)> [PROFILE=$(PROFILE)]" >&2; exit 2; fi
	@out="$$($(PY) -m vitrepro.settings --get runs_dir)/executed" && mkdir -p "$$out" && set -x && \
	$(PY) -m papermill notebooks/$(NB).ipynb "$$out/$(NB).$(PROFILE).ipynb" -p profile $(PROFILE) --log-output $(ARGS)

settings: venv
	@$(PY) -m vitrepro.settings --check-hub

bench: venv
	$(PY) -m benchmarks.bench $(ARGS)   # benchmarks/README.md (out of the installed package)

clean-venv:
	rm -rf .venv
