# Two commands do everything on a fresh clone: `make test` and `make reproduce-table1`.
# Each builds .venv (and reinstalls when pyproject.toml changes) before running.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test reproduce-table1 report clean-cache

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# pip < 24.1: the dcbench/meerkat-ml 0.2.5 stack has metadata newer pip rejects.
	$(PY) -m pip install --quiet "pip<24.1"
	$(PY) -m pip install --quiet -e ".[test,text]"
	touch $(STAMP)

install: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || echo "note: tests/test_report.py renders reports in headless Chromium and is skipped without it; Debian/Ubuntu: sudo apt-get install -y chromium"

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

reproduce-table1: $(STAMP)
	$(PY) -m experiments.demo

report: $(STAMP)
	$(PY) -m harness report results

clean-cache:
	rm -rf .cache
