# sce-hf: the README's commands. `make quickstart` and `make test` work on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
DEBIAN_PACKAGES ?= dataset-fashion-mnist chromium ffmpeg
PYTEST_ARGS ?=
DEMO ?= 1
QUICKSTART_DIR ?= outputs/fashion-mnist-cpu

export HF_HUB_DISABLE_TELEMETRY := 1
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: setup test test-slow quickstart bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip

# Installs torch first (the CPU build on our machines), then the package with every extra, then the Debian
# packages the tests need. A stamp keyed on pyproject.toml skips the pip step when nothing changed.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -e ".[dev]"
	touch $@

setup: $(VENV)/.installed
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "Installing Debian packages:$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; \
	fi

test: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

quickstart: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) training/pretrain.py --config training/configs/fashion-mnist-cpu.yaml --output_dir $(QUICKSTART_DIR)
	@if [ "$(DEMO)" = "1" ] && [ -f demo/app.py ]; then \
		HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) demo/app.py --model_name_or_path $(QUICKSTART_DIR); \
	fi

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) outputs
