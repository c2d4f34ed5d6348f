# `make train` and `make test` install into .venv on first use: the pinned set in
# constraints.txt, checked by scripts/check_pins.py after the install and before every test run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export WANDB_MODE ?= offline

.PHONY: install check-pins lint train test test-all fuzz bench report clean

install: $(STAMP)

# PYTHONWARNINGS: setuptools adds a note to every editable install of this layout (configs/
# mapped into the package) that folders named like the package may shadow it; here that folder is the package.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt pip
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -c constraints.txt -e ".[test,bench,sweep]"
	$(PY) scripts/check_pins.py
	touch $(STAMP)

check-pins: $(STAMP)
	$(PY) scripts/check_pins.py

# ruff's rules and line length live in pyproject.toml ([tool.ruff])
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

train: $(STAMP)
	$(PY) train.py $(ARGS)

test: check-pins lint
	$(PY) -m pytest -q -m "not slow" $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

# FUZZ_CASES generated cases per target (the 19 quantizer set-ups tagged `fuzz` in tests/quantizer_cases.py x 2 entry points,
# audio files, image files; damaged files: a checkpoint, a token shard, index.json, the audio header cache); `make test` runs 60
fuzz: $(STAMP)
	VQTRAIN_FUZZ_CASES=$(or $(FUZZ_CASES),1000) $(PY) -m pytest -q tests/test_fuzz.py tests/test_fuzz_files.py $(ARGS)

bench: $(STAMP)
	$(PY) scripts/bench.py quantizers --compare vector-quantize-pytorch

clean:
	rm -rf $(VENV) runs multirun outputs wandb
