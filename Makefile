# Two commands do everything on a fresh clone: `make test` and `make reproduce-table1`.
# Each builds .venv (and reinstalls when pyproject.toml changes) before running.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=
# reproduce-table1: SOURCE=mini (offline mini-dcbench, default) or SOURCE=dcbench (the real benchmark)
SOURCE ?= mini
# mini-dcbench problems run in this many processes (one thread each)
WORKERS ?= 2
NPROC ?= 2

.PHONY: install test data reproduce-table1 table1-kernel-spread ablations update-regression bench mutation embed-distributed report agnews imagenet boneage covid figures clean-cache

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# pip < 24.1: the dcbench/meerkat-ml 0.2.5 stack has metadata newer pip rejects.
	$(PY) -m pip install --quiet "pip<24.1"
	$(PY) -m pip install --quiet -e ".[test,text,xray]"
	# The 2021 reference stack (Domino, dcbench) for the agreement tests and SOURCE=dcbench: their
	# metadata pins long-gone releases, so --no-deps plus what they import; harness/compat.py patches them.
	$(PY) -m pip install --quiet --no-deps domino==0.1.5 dcbench==0.0.4 meerkat-ml==0.2.5
	$(PY) -m pip install --quiet dill==0.4.1 cytoolz==1.2.0 ujson==6.1.0 pyarrow==26.0.1 fvcore==0.1.5.post20221221 \
		ipython==9.18.1 ipywidgets==8.1.9 seaborn==0.13.2 pytorch-lightning==2.6.6
	touch $(STAMP)

install: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || echo "note: tests/test_report.py renders reports in headless Chromium and is skipped without it; Debian/Ubuntu: sudo apt-get install -y chromium"

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Every dataset of README.md's Data section from its public source into the data folder
# (INFEMBED_DATA, else ../shared/data if present, else data/); present ones are left alone.
# DATASETS="mnist timeseries" fetches only those.
DATASETS ?=
data: $(STAMP)
	$(PY) -m harness.data.download $(DATASETS)

reproduce-table1: $(STAMP)
	$(PY) -m experiments.table1 --source $(SOURCE) --workers $(WORKERS)

# InfEmbed's design choices on development problems -> results/ablations.md (and the grid Table 1's
# configuration was chosen from -> results/ablations_grid.md).
ablations: $(STAMP)
	$(PY) -m experiments.ablations --grid --problems 6 --workers $(WORKERS)
	$(PY) -m experiments.ablations --problems 4 --workers $(WORKERS)

# How much Table 1 moves between CPU kernel sets: the ECG suite, 4 problems per cell, native vs the scalar
# `default` kernels, each from an empty cache -> results/table1_kernel_spread.json.
table1-kernel-spread: $(STAMP)
	INFEMBED_CACHE=$$(mktemp -d) $(PY) -m experiments.table1 --suites ecg --problems 4 --out .cache/spread/native
	ATEN_CPU_CAPABILITY=default INFEMBED_CACHE=$$(mktemp -d) $(PY) -m experiments.table1 --suites ecg --problems 4 \
		--out .cache/spread/default
	$(PY) -m experiments.kernel_spread .cache/spread/native/table1_problems.csv .cache/spread/default/table1_problems.csv

# The CI regression baselines (results/regression/) change only through this explicit target.
update-regression: $(STAMP)
	$(PY) -m experiments.regression --update

# Ours vs Captum (and kronfluence) on W1-W3; writes results/bench/*.json and README.md.
# Paper scale on a GPU: make bench BENCH_ARGS="--device cuda"
bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) -m benchmarks.run $(BENCH_ARGS)

# Mutation testing of the core against its fast tests (mutmut 3, configured in pyproject.toml's
# [tool.mutmut]): score and surviving mutants -> results/mutation/, triage in tests/mutation_equivalents.toml.
# All modules take many CPU hours; MUTANTS picks mutant-name globs, e.g. MUTANTS='harness.slicing.*'.
# mutants/ keeps earlier results, so modules can be run one after another; rm -rf mutants to start afresh.
MUTANTS ?= harness.slicing.* harness.dcbench.metrics.* harness.baselines.simple.* harness.hessian.* harness.batching.* harness.embed.* harness.fastpaths.*
MUTATION_JOBS ?= 2
mutation: $(STAMP)
	$(PY) -m pip install --quiet -e ".[mutation]"
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(MUTATION_JOBS) $(MUTANTS)
	$(PY) tests/mutation_report.py --command "make mutation MUTANTS='$(MUTANTS)'"

# The paper's case studies (offline defaults; ARGS="--device cuda" for the paper-scale configuration).
agnews: $(STAMP)
	$(PY) -m experiments.agnews_bert $(ARGS)

imagenet: $(STAMP)
	$(PY) -m experiments.imagenet_resnet18 $(ARGS)

boneage: $(STAMP)
	$(PY) -m experiments.boneage_spurious $(ARGS)

covid: $(STAMP)
	$(PY) -m experiments.covid_xray $(ARGS)

# Every figure and table of the case studies (stages are cached: reruns take about a minute each).
figures: agnews imagenet boneage covid

# The CLI's embedding stage data-parallel over NPROC processes (gloo on CPU, NCCL on GPU), e.g.
# make embed-distributed NPROC=2 ARGS="--model-module m.py:build --train train.pt --test test.pt --out emb.npz"
embed-distributed: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc-per-node=$(NPROC) -m harness embed $(ARGS)

report: $(STAMP)
	$(PY) -m harness report results

clean-cache:
	rm -rf .cache
