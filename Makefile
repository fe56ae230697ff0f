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

# CI runs one seed per case; `surgery run cases` / `pytest cases` without the cap run them all (nightly).
test: install
	$(BIN)/python -m pytest tests cases -q --surgery-seeds 1

demo: install
	$(BIN)/surgery run cases --report reports --seeds 1 --quiet

zoo: install
	$(BIN)/surgery zoo build

# Benchmarks: results saved as JSON under .benchmarks/; compare two nights with
#   pytest benchmarks --benchmark-compare --benchmark-compare-fail=mean:10%
bench: install
	$(BIN)/python -m pytest benchmarks -m "not slow" --benchmark-autosave --benchmark-columns=min,mean,rounds -q
	$(BIN)/python -m pytest benchmarks -m slow --benchmark-autosave --benchmark-columns=min,rounds -q

bench-gpu: install
	$(BIN)/python -m pytest benchmarks --benchmark-autosave --surgery-device cuda -q \
		--benchmark-compare --benchmark-compare-fail=mean:10%
	$(BIN)/python -m pytest cases --surgery-device cuda --surgery-report reports/nightly -q

clean:
	rm -rf $(VENV) reports/* .benchmarks
