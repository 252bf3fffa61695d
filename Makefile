# Two entry points for a fresh machine: `make reproduce` (the cpu profile of every notebook
# plus results/REPORT.md) and `make test`. Each creates .venv/ when it is missing.
SHELL := /bin/bash
PY := .venv/bin/python
PROFILE ?= cpu
NOTEBOOKS := scaling position_embeddings transfer attention
# Local copies of the Hub datasets (../shared/data on the development machines).
export VITREPRO_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export HF_DATASETS_OFFLINE ?= $(if $(VITREPRO_DATA),1,0)

.PHONY: reproduce test venv notebooks report bench clean-venv

venv: .venv/.installed
.venv/.installed: pyproject.toml env/constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c env/constraints.txt -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name vitrepro --display-name "Python (vitrepro)" >/dev/null
	touch $@

test: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest tests

reproduce: venv
	$(PY) -m vitrepro.experiments.run_all --profile $(PROFILE)

bench: venv
	$(PY) -m vitrepro.bench

clean-venv:
	rm -rf .venv
