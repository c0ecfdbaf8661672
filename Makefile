# Pagoda — two commands set everything up on a fresh machine:
#   make serve   create .venv, install, pull the default model, start it
#   make test    install dev dependencies and run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
MODEL  ?= smollm2-135m-instruct

.PHONY: serve test bench lint clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, pinned: the build this project is tested with (pyproject declares the range).
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	touch $@

$(VENV)/.app: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.dev: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.app

serve: $(VENV)/.app
	$(BIN)/pagoda pull $(MODEL)
	$(BIN)/pagoda serve --model $(MODEL)

test: $(VENV)/.dev browser
	$(BIN)/python -m pytest

# Test-only Debian packages for the web UI browser test (headless Chromium + a CJK font);
# installed once when missing. Without them (no apt, no root) that one test is skipped.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
browser:
	@test -x /usr/bin/chromium && test -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc || \
	  { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    chromium fonts-wqy-microhei >/dev/null; } || \
	  echo "note: could not install chromium; the web UI browser test will be skipped"

bench: $(VENV)/.dev
	$(BIN)/python benchmarks/decode.py

lint: $(VENV)/.dev
	$(BIN)/ruff check pagoda tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
