# Quick start: `make demo` and `make test` work on a fresh machine with nothing else done first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo_out
STAMP := $(VENV)/.installed
# The torch build: empty = the pinned torch/torchvision from the default index (the CUDA 13 build: NVIDIA driver
# ≥ 580, runs on CPU too). Another build, installed first from that index, same pinned versions (README "Install
# for any GPU"): make venv TORCH_INDEX=https://download.pytorch.org/whl/cu126 (driver ≥ 525). Read when the venv
# is built: rm -rf .venv to switch.
TORCH_INDEX ?=
TORCH_PINS = $(shell grep -E '^(torch|torchvision)==' requirements.txt)
# A flaky network should not fail a fresh install: pip retries a broken connection and resumes a cut download
# (the CUDA torch build is several GB). Unknown to an older pip, which ignores them.
export PIP_RETRIES ?= 10
export PIP_RESUME_RETRIES ?= 10

.PHONY: demo test test-slow test-slurm test-pacs test-dicom lint bench fuzz clean venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip

$(STAMP): $(BIN)/python requirements.txt requirements-dev.txt pyproject.toml
	$(if $(TORCH_INDEX),$(BIN)/pip install --quiet --index-url $(TORCH_INDEX) $(TORCH_PINS))
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/rsna19 demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# The SLURM executor against a throw-away single-node cluster on this machine (installs slurm-wlm and munge with
# apt-get when missing, so root; nothing under /etc is changed; the daemons stop when the tests end).
test-slurm: $(STAMP)
	RSNA19_REQUIRE_SLURM=1 tests/slurm/with_slurm.sh $(BIN)/python -m pytest -q -m slurm tests/test_slurm.py

# `rsna19 serve` against a real PACS (Orthanc) and browser (headless Chromium), both on loopback ports started by
# the tests (installs the Debian packages orthanc and chromium with apt-get when missing, so root; a few minutes).
test-pacs: $(STAMP)
	RSNA19_REQUIRE_PACS=1 tests/pacs/ensure_tools.sh $(BIN)/python -m pytest -q -m pacs tests/test_pacs.py tests/test_pacs_dicom.py

# Every kind of DICOM object rsna19 writes (SR, SC, SEG; single-frame and Enhanced CT sources) through Debian's
# dciodvfy (dicom3tools) and DCMTK's dsrdump: 0 errors, no unrecognized term; then the predict-study tests that run
# dciodvfy on what a bundle writes (installs dicom3tools and dcmtk with apt-get when missing, so root).
test-dicom: $(STAMP)
	RSNA19_REQUIRE_DICOM_TOOLS=1 tests/dicom/ensure_tools.sh $(BIN)/python -m pytest -q -p no:xdist \
		tests/test_dicom_conformance.py tests/test_study_dicom.py tests/test_seg.py tests/test_not_assessable.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# Many more fuzz examples than `make test` runs, then the atheris target (skipped with a message if not installed).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest tests/test_fuzz_dicom.py -q -p no:xdist
	$(BIN)/python fuzz/atheris_dicom.py fuzz/corpus -max_total_time=$${FUZZ_SECONDS:-300} -timeout=5 -rss_limit_mb=2048

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
