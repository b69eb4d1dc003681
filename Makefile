# llmc developer tasks. Everything runs in the virtual environment .venv.
#
#   make setup       create .venv, install llmc[dev] (CPU torch first), fetch the quickstart model
#   make quickstart  run configs/quickstart.yml on the real SmolLM2-135M model, offline, and write its report
#   make test        run the test suite, the real-model tests included
#   make lint        ruff check
#   make clean       remove caches and build output (keeps .venv and the model cache)
#   make distclean   clean, and remove .venv too

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# torch is installed first and pinned: 2.13.0 is the CPU build that lies on this machine's disk.
# Any other spec (plain `torch`, a range) lets pip pull a CUDA build of several GB.
TORCH  := torch==2.13.0
# Test-only consumers of the AutoAWQ / GPTQ exports (tests/export_consumer.py). GPTQModel and
# AutoAWQ declare torch>=2.14 / triton, so they cannot sit in the dev extra without pip replacing
# torch: they are installed --no-deps, pinned, with GPTQModel's pure-Python imports.
EXPORT_CONSUMERS := autoawq==0.2.9 gptqmodel==7.7.0 optimum==2.3.0 pypcre==0.6.4 logbar==0.4.15 \
	threadpoolctl==3.8.0 device-smi==0.5.7 tokenicer==0.0.14 defuser==0.0.28 pillow==13.0.0

.PHONY: setup quickstart test lint clean distclean

setup: $(VENV)/.installed
	$(PY) -m llmc.fetch

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall only when pyproject.toml or this Makefile changes (or the venv is new).
$(VENV)/.installed: pyproject.toml Makefile | $(PY)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps $(EXPORT_CONSUMERS)
	touch $@

quickstart: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/llmc run configs/quickstart.yml
	$(VENV)/bin/llmc report outputs/quickstart

# Two workers (pytest-xdist), one test file each at a time: the tiny-model tests run on one thread
# (tests/conftest.py), so a second worker uses the second core.
test: setup
	HF_HUB_OFFLINE=1 LLMC_REQUIRE_REAL_MODEL=1 $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check llmc tests

clean:
	rm -rf build dist .pytest_cache .ruff_cache .hypothesis *.egg-info llmc.egg-info
	find llmc tests -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
