# Two commands for a newcomer: `make train` and `make test`. Both create .venv with the
# pinned stack first (once; the stamp file makes later runs skip it).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CUDA hosts get fbgemm-gpu, every other host the CPU build (see requirements/).
FBGEMM_VARIANT := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
STAMP := $(VENV)/.installed-$(FBGEMM_VARIANT)
REQS := pyproject.toml requirements/base.txt requirements/$(FBGEMM_VARIANT).txt requirements/torchrec.txt requirements/dev.txt

TWHIN_CONFIG ?= projects/twhin/config/local.yaml
SAVE_DIR ?= runs/twhin
NPROC ?= 2
# More flags for projects/twhin/run.py, e.g. TRAIN_ARGS="--set training.num_train_steps=300".
TRAIN_ARGS ?=
PYTEST_ARGS ?=
# pytest-xdist processes for `make test` / `make test-fast`: by default 2 where the machine
# has 2 cores or more, else 0 (this one process); TEST_WORKERS=0 forces one process,
# TEST_WORKERS=N or auto more. Capped at 2 by default because a multi-process test starts 2-4
# worker processes of its own: 2 test processes already keep 2 cores busy (one process left
# ~0.9 of 2 cores idle while it waited on its workers' start-up), and more would overload a
# small machine and stretch the gloo timeouts. Measured on 2 cores (README, 2026-12-02):
# 2 processes 10 min 21 s - 10 min 53 s in three fresh-clone CI runs (idle box) against
# 15 min 35 s - 16 min 30 s for one; 28-31 min at load 7-8 from other jobs. A file's tests stay in one process, the SLURM tests share one,
# and so do the big-memory tests; the costliest groups start first (tests/conftest.py, whose
# scheduler, tests/xdist_schedule.py, replaces xdist's loadgroup: it loses the groups under pytest 9.2).
TEST_WORKERS ?= $(shell [ "$$(nproc 2>/dev/null || echo 1)" -ge 2 ] && echo 2 || echo 0)
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder)

.PHONY: venv data train test test-fast test-bazel lint bench bench-peers bench-quality bench-neighbors clean config-docs

venv: $(STAMP)

$(STAMP): $(REQS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/base.txt -r requirements/$(FBGEMM_VARIANT).txt -r requirements/dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements/torchrec.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -c "import torch, torchrec, fbgemm_gpu; print('stack:', 'torch', torch.__version__, '| torchrec', torchrec.__version__)"
	touch $(STAMP)

data: $(STAMP)
	$(PY) -m projects.twhin.data.generate --out data/twhin

train: data
	$(PY) projects/twhin/run.py --config_yaml_path=$(TWHIN_CONFIG) --save_dir=$(SAVE_DIR) --nproc_per_node=$(NPROC) $(TRAIN_ARGS)

# Every test (CI runs this): each test is bounded by pytest-timeout (pyproject.toml).
test: $(STAMP)
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# For development: skips the tests that start worker processes (marker slow).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

# Each project's configuration reference, generated from its config models (tests check
# that the committed pages are current).
config-docs: $(STAMP)
	$(PY) -m tml.core.config.reference projects.twhin.config:TwhinConfig --out docs/projects/twhin/configuration.md
	$(PY) -m tml.core.config.reference projects.home.recap.config:RecapConfig --out docs/projects/recap/configuration.md

# Bazel (4.2.3, offline, native Python rules); installs Debian's bazel-bootstrap if missing.
test-bazel: $(STAMP)
	bash tools/bazel/test.sh

# Side-by-side benchmark (tml 1 and 2 workers, plain PyTorch, reader, launcher);
# writes benchmarks/results/$(BENCH_NAME).json and .md.
BENCH_NAME ?= cpu-$(shell nproc)core
PEERS ?=
bench: $(STAMP)
	$(PY) -m benchmarks.run --name $(BENCH_NAME)
	$(if $(PEERS),$(MAKE) bench-peers)

# tml against PyTorch-BigGraph 1.0 on the same graph, interleaved rounds, one report
# (benchmarks/results/peers-$(BENCH_NAME).json and .md). PBG lives in its own venv
# (.venv-pbg: it needs setuptools<81); its HDF5 copy of the graph is cached in
# benchmarks/.data/pbg-<hash>. `make bench PEERS=1` runs this after `make bench`.
PBG_VENV := .venv-pbg
PBG_STAMP := $(PBG_VENV)/.installed
PEER_ARGS ?=
$(PBG_STAMP):
	test -x $(PBG_VENV)/bin/python || $(PYTHON) -m venv $(PBG_VENV)
	$(PBG_VENV)/bin/pip install --quiet torch==2.13.0 'setuptools<81'
	$(PBG_VENV)/bin/pip install --quiet torchbiggraph==1.0.0
	touch $(PBG_STAMP)

bench-peers: $(STAMP) $(PBG_STAMP)
	$(PY) -m benchmarks.peers --name peers-$(BENCH_NAME) $(PEER_ARGS)

# Nearest-neighbour indexes for `twhin neighbors` on 1M x 64 rows: the IVF index `twhin
# export --index` writes (k-means and scan by faiss and by numpy) against hnswlib's HNSW:
# build time, recall@10 against exact search, queries/s; writes
# benchmarks/results/neighbors-$(BENCH_NAME).json. Not part of `make bench`: the HNSW build
# takes over 10 minutes on 2 cores. hnswlib is installed for it only (it compiles C++).
bench-neighbors: $(STAMP)
	$(PY) -m pip install --quiet hnswlib==0.8.0
	$(PY) -m benchmarks.neighbors --name $(BENCH_NAME)

# Link-prediction quality of `twhin import`'s config (issue 20): the generated check graphs
# and Nations / UMLS / Kinships, the written config as is against PyKEEN's TransE / RotatE /
# ComplEx on the same splits in the same run, and the popularity baseline; writes
# benchmarks/results/quality.json. PyKEEN 1.11.1 lives in its own venv (.venv-pykeen,
# created here once, as .venv-pbg is for bench-peers; PYKEEN_VENV=... uses another).
# QUALITY_GRAPHS=nations runs a subset (about a minute after the venv).
PYKEEN_VENV ?= .venv-pykeen
PYKEEN_STAMP := $(PYKEEN_VENV)/.installed

$(PYKEEN_STAMP):
	test -x $(PYKEEN_VENV)/bin/python || $(PYTHON) -m venv $(PYKEEN_VENV)
	$(PYKEEN_VENV)/bin/pip install --quiet torch==2.13.0
	$(PYKEEN_VENV)/bin/pip install --quiet pykeen==1.11.1
	touch $(PYKEEN_STAMP)

QUALITY_GRAPHS ?= patterns:3000:40000:21,longtail:10000:60000:21,nations,umls,kinships

bench-quality: $(STAMP) $(PYKEEN_STAMP)
	$(PY) -m benchmarks.quality --pykeen $(PYKEEN_VENV) --candidates defaults \
		--graphs $(QUALITY_GRAPHS)

lint: $(STAMP)
	$(PY) -m ruff check tml projects tests

clean:
	rm -rf $(VENV) $(PBG_VENV) .venv-pykeen data runs
