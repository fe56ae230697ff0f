# Two commands do all the set-up: `make demo` and `make test` (see README.md).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-slow demo screenshots bench bench-publish bench-gpu zoo perturb calibrate schema docs lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# CI runs one seed per case; `surgery run cases` / `pytest cases` without the cap run them all (nightly).
# Two pytest-xdist workers of one torch thread each (the calibrated `threads1` profile; a case's items stay on
# one worker; cases that would train the same baseline too). Warm, on 2 cores: 217 s at 0.12 s per ResNet-18
# step (AVX-512, 2026-12-07, pytest alone, median of 2; 414-450 s from a fresh clone, empty cache, steps 0.10-0.14
# s). A machine whose step is 0.5 s takes about four times as long (docs/performance.md).
# The plugin runs the workers with OMP_WAIT_POLICY=PASSIVE (README).
# Tests marked `slow` (the long forms of checks whose fast form runs here) are left to `make test-slow`, which
# the nightly runs; --durations prints the 25 slowest, so the budget is seen (issue 30: none over 60 s but cases).
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest tests cases -q --surgery-seeds 1 -n $(TEST_WORKERS) -m "not slow" --durations=25

test-slow: install
	$(BIN)/python -m pytest tests cases -q --surgery-seeds 1 -n $(TEST_WORKERS) -m slow --durations=25

# The cases marked slow (the 224 px ones in cases/scale/, minutes each on a CPU, and the long forms of the
# two whose *-short.yaml runs instead) are left out: `surgery run cases` runs them.
demo: install
	$(BIN)/surgery run cases --report reports --seeds 1 --quiet --skip-slow

# The report's screenshot in docs/report.md is the browser test's own (tests/test_report_browser.py checks it).
screenshots: install
	SURGERY_DOCS_SCREENSHOTS=1 $(BIN)/python -m pytest tests/test_report_browser.py -q

zoo: install
	$(BIN)/surgery zoo build

# The CI seed of every case under native numerics, 1 thread, ATEN_CPU_CAPABILITY=default and a zoo rebuilt
# with 1 thread in a fresh cache; prints a table; exit 1 if any expectation failed anywhere.
perturb: install
	$(BIN)/python -m surgery.running.perturb cases --report reports/perturb

# Recalibrate every case as the committed records were (records beside the cases, thresholds written back): the
# 32 px cases at 8 seeds native and 2 under each perturbation; the 224 px cases of cases/scale/ (minutes a run on
# a CPU) at 3 seeds native; the quiet example at 8 seeds native. About 75 minutes on 2 cores whose ResNet-18 step
# is 0.11 s (2026-12-06: 54 + 11 + 7, and the perturbed zoo's build).
calibrate: install
	$(BIN)/surgery calibrate $$(find cases -name '*.yaml' -not -path 'cases/scale/*' | sort) --seeds 8 \
		--perturbed-seeds 2 --profiles native,threads1,isa-default,isa-avx2,zoo-threads1 --write
	$(BIN)/surgery calibrate cases/scale --seeds 3 --profiles native --write
	$(BIN)/surgery calibrate examples/strategies-quiet-90.yaml --seeds 8 --profiles native --write

# Benchmarks: results saved as JSON under .benchmarks/; compare two nights with
#   pytest benchmarks --benchmark-compare --benchmark-compare-fail=mean:10%
# Each run also writes .benchmarks/latest-{fast,slow}.json; `make bench-publish MACHINE=name` copies them to
# docs/benchmarks/<name>/, from which docs/performance_hook.py generates the performance page's tables.
bench: install
	$(BIN)/python -m pytest benchmarks -m "not slow" --benchmark-autosave --benchmark-columns=min,mean,rounds -q \
		--benchmark-json=.benchmarks/latest-fast.json
	$(BIN)/python -m pytest benchmarks -m slow --benchmark-autosave --benchmark-columns=min,rounds -q \
		--benchmark-json=.benchmarks/latest-slow.json

MACHINE ?=
bench-publish:
	@test -n "$(MACHINE)" || { echo "make bench-publish MACHINE=name (for example 2026-12-06-epyc-avx2-2core)"; exit 2; }
	mkdir -p docs/benchmarks/$(MACHINE)
	for run in fast slow; do \
		test ! -f .benchmarks/latest-$$run.json || cp .benchmarks/latest-$$run.json docs/benchmarks/$(MACHINE)/$$run.json; \
	done

# RAY=ADDRESS runs the case suite on that Ray cluster (RAY=local: a cluster on this machine), one task per
# case and seed with one GPU each; the driver (this machine) writes reports/nightly/<UTC time>/, points
# reports/nightly/latest at it and renders reports/nightly/history.html over every night (failed cases too).
RAY ?=
bench-gpu: install
	$(BIN)/python -m pytest benchmarks --benchmark-autosave --surgery-device cuda -q \
		--benchmark-compare --benchmark-compare-fail=mean:10%
	$(BIN)/python -m pytest cases --surgery-device cuda --surgery-report reports/nightly --surgery-report-dated -q \
		$(if $(RAY),--surgery-ray=$(RAY)); status=$$?; $(BIN)/surgery history reports/nightly; exit $$status

# Lint and types, as the pre-commit hooks run them (.pre-commit-config.yaml) and CI (.ci/run).
lint: install
	$(BIN)/ruff check surgery tests benchmarks
	$(BIN)/ruff format --check surgery tests benchmarks
	$(BIN)/mypy surgery

# The docs site (MkDocs + Material) into site/; the case-file reference is generated from the pydantic models
# at build time (docs/hooks.py), so it cannot drift from the code.
docs: install
	$(BIN)/mkdocs build --strict

# The case file's JSON Schema for editors (seed cases point at it: `# yaml-language-server: $schema=…`);
# tests/test_case_schema.py fails when the committed file is stale.
schema: install
	$(BIN)/surgery schema -o schema/case.schema.json

clean:
	rm -rf $(VENV) reports/* .benchmarks
