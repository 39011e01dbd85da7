# The two commands a new machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export MRI_ASSETS_HOME ?= $(CURDIR)/.mri_assets
export DVC_NO_ANALYTICS := 1
export MLFLOW_ENABLE_TELEMETRY := false
SYSTEM_PACKAGES := chromium redis-server prometheus-pushgateway postgresql

.PHONY: demo test dev system-deps install install-dev lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch and torchvision come first and pinned: the wheels on this machine's disk.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

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

dev: install
	mkdir -p $(MRI_ASSETS_HOME)/dagster
	cp -n dagster.yaml $(MRI_ASSETS_HOME)/dagster/dagster.yaml || true
	DAGSTER_HOME=$(MRI_ASSETS_HOME)/dagster $(BIN)/dagster dev -w workspace.yaml

lint: install-dev
	$(BIN)/ruff check mri_assets mri_assets_tests benchmarks

clean:
	rm -rf $(MRI_ASSETS_HOME)
