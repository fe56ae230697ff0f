# Two commands do all the set-up: `make demo` and `make test` (see README.md).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench bench-gpu zoo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest tests cases -q

demo: install
	$(BIN)/surgery run cases --report reports

zoo: install
	$(BIN)/surgery zoo build

bench: install
	$(BIN)/python -m pytest benchmarks --benchmark-autosave --benchmark-columns=mean,stddev,rounds -q

bench-gpu: install
	$(BIN)/python -m pytest benchmarks --benchmark-autosave --surgery-device cuda -q
	$(BIN)/python -m pytest cases --surgery-device cuda -q

clean:
	rm -rf $(VENV) reports/* .benchmarks
