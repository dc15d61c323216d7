# Meshway: every target sets up what it needs, idempotently, on a fresh Debian machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# The venv is rebuilt when pyproject.toml changes.
DEPS_STAMP := $(VENV)/.deps-$(shell cat pyproject.toml 2>/dev/null | sha1sum | cut -c1-12)
APT_STAMP := .stamp-apt

.PHONY: all setup apt demo test lint fmt proto bench clean otel-protos

all: test

apt: $(APT_STAMP)
$(APT_STAMP): scripts/apt-deps.sh
	bash scripts/apt-deps.sh
	@touch $@

$(DEPS_STAMP): pyproject.toml | apt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Meshway needs Python >= 3.11"'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(MAKE) --no-print-directory otel-protos
	@rm -f $(VENV)/.deps-*
	@touch $@

setup: $(DEPS_STAMP)

# xds-protos installs its own, older opentelemetry/proto modules over opentelemetry-proto's,
# and the OTLP exporter then fails to import (docs/decisions/0011). Put the real ones back,
# at the version pip resolved; runs after every (re)build of the venv, and is safe to repeat.
otel-protos:
	$(PY) -m pip install -q --force-reinstall --no-deps \
	  "opentelemetry-proto==$$($(PY) -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	$(PY) -c 'from meshway.telemetry.otlp import check_otel_protos; check_otel_protos()'

proto: setup
	$(PY) scripts/genproto.py

lint: setup
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/mypy
	$(PY) scripts/genproto.py --check

fmt: setup
	$(BIN)/ruff format src tests bench scripts
	$(BIN)/ruff check --fix src tests bench scripts

test: setup lint
	$(BIN)/pytest

demo: setup
	$(PY) scripts/demo.py

bench: setup
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(MAKE) --no-print-directory otel-protos
	$(PY) bench/controlplane_scale.py
	$(PY) bench/node_rss.py
	$(PY) bench/dataplane.py
	$(PY) bench/waypoint_features.py
	$(PY) bench/tracing_overhead.py
	$(PY) bench/plots.py

clean:
	rm -rf $(VENV) .state $(APT_STAMP) build dist src/*.egg-info
