# The two commands a new machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# DVC runs as the `dvc` command from its own environment: its hydra-core/omegaconf pin the
# ANTLR 4.9 runtime, which breaks the ANTLR 4.13 parser behind every Dagster `--select`.
DVC_VENV := .venv-dvc
LOCK := requirements/lock.txt
BOOTSTRAP_LOCK := requirements/bootstrap.lock.txt
DVC_LOCK := requirements/dvc.lock.txt
# `make lock UPGRADE=1` moves every pin to the newest release the ranges allow.
PIP_COMPILE = $(BIN)/pip-compile --quiet --allow-unsafe --generate-hashes --strip-extras \
	--no-emit-index-url --no-emit-find-links $(if $(UPGRADE),--upgrade)
export MRI_ASSETS_HOME ?= $(CURDIR)/.mri_assets
export DVC_NO_ANALYTICS := 1
export MLFLOW_ENABLE_TELEMETRY := false
# Dagster's webserver and daemon create logs/ and .logs_queue/ in DAGSTER_HOME for telemetry
# uploads unless this is set (the instance's `telemetry: enabled: false` does not stop that).
export DAGSTER_DISABLE_TELEMETRY := 1
SYSTEM_PACKAGES := chromium redis-server prometheus-pushgateway postgresql

.PHONY: demo test dev system-deps install install-dev dvc-env lock lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Exactly the lock (runtime + dev extras, hash-checked). First pip, pip-tools and PyTorch
# (torch==2.14.1 torchvision==0.29.1: the wheels on this machine's disk), pinned as in the lock;
# then pip-sync installs every other locked package and removes what the lock does not hold;
# then the project itself, without dependencies.
$(VENV)/.installed: $(BOOTSTRAP_LOCK) $(LOCK) pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --require-hashes -r $(BOOTSTRAP_LOCK)
	$(BIN)/pip-sync --quiet $(LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# The dev extras are in the lock already; this stamp adds the DVC environment the tests use.
$(VENV)/.installed-dev: $(VENV)/.installed $(DVC_VENV)/.installed
	touch $@

# DVC's environment, rebuilt from scratch whenever its lock changes.
$(DVC_VENV)/.installed: $(DVC_LOCK)
	rm -rf $(DVC_VENV)
	$(PYTHON) -m venv $(DVC_VENV)
	$(DVC_VENV)/bin/pip install --quiet --require-hashes -r $(DVC_LOCK)
	touch $@

install: $(VENV)/.installed $(DVC_VENV)/.installed
install-dev: $(VENV)/.installed-dev
dvc-env: $(DVC_VENV)/.installed

# Refresh the locks: requirements/lock.txt from pyproject.toml (runtime + dev extras), the
# bootstrap subset of it (requirements/bootstrap.in) and requirements/dvc.lock.txt from
# requirements/dvc.in. Existing pins stay where the ranges allow them, unless UPGRADE=1.
lock: | $(BIN)/python
	test -x $(BIN)/pip-compile || $(BIN)/pip install --quiet pip-tools
	$(PIP_COMPILE) --extra dev -o $(LOCK) pyproject.toml
	$(PIP_COMPILE) -o $(BOOTSTRAP_LOCK) requirements/bootstrap.in
	$(PIP_COMPILE) -o $(DVC_LOCK) requirements/dvc.in

# Debian's chromium, redis-server, prometheus-pushgateway and postgresql for the integration tests.
system-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v prometheus-pushgateway >/dev/null || missing="$$missing prometheus-pushgateway"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

demo: install
	$(BIN)/mri-assets demo

test: install-dev system-deps
	$(BIN)/python -m pytest

# DAGSTER_HOME is the repository, so `dg dev` reads the top-level dagster.yaml (and has no other
# one to warn about); that file sends every record to $(MRI_ASSETS_HOME)/dagster through the two
# variables below, the folders `mri-assets` uses too. Nothing is written into the repository.
dev: install
	mkdir -p $(MRI_ASSETS_HOME)/dagster/storage
	DAGSTER_HOME=$(CURDIR) MRI_ASSETS_DAGSTER_DIR=$(MRI_ASSETS_HOME)/dagster \
	  MRI_ASSETS_DAGSTER_LOGS=$(MRI_ASSETS_HOME)/dagster/storage \
	  $(BIN)/dg dev -w workspace.yaml

lint: install-dev
	$(BIN)/ruff check mri_assets mri_assets_tests benchmarks

clean:
	rm -rf $(MRI_ASSETS_HOME)
