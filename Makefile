PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# An interpreter with jax, numpy and keras for the benchmarks' JAX peers (outside the repo),
# e.g. make bench JAX_PYTHON=/work/jaxenv/bin/python; empty: those cases are unavailable.
JAX_PYTHON ?=
BENCH_PEERS := $(if $(JAX_PYTHON),--jax-python $(JAX_PYTHON))

.PHONY: demo test test-numerics check bench bench-quick clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
	touch $@

## demo: train the reference LSTM and stream its Jacobian at T=2000 into demo-output/
demo: $(VENV)/.installed
	$(VENV)/bin/jacstream demo --output demo-output

## test: lint, type-check and run the test suite
test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check jacstream tests benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --durations=15

## test-numerics: only the test modules that compare computations (CI reruns them with
## other kernels: TF_ENABLE_ONEDNN_OPTS=0, OMP_NUM_THREADS=1, ONEDNN_MAX_CPU_ISA=AVX2)
NUMERIC_TESTS := tests/test_core.py tests/test_causal.py tests/test_strategies.py \
                 tests/test_pfor.py tests/test_properties.py tests/test_analysis.py \
                 tests/test_dask.py tests/test_resume.py tests/test_sensitivity.py
test-numerics: $(VENV)/.installed-test
	$(PY) -m pytest -q -p no:cacheprovider -n 2 $(NUMERIC_TESTS)

## bench-quick: the benchmark runner's smoke suite (under 3 minutes)
bench-quick: $(VENV)/.installed-test
	$(PY) -m benchmarks --suite quick --output bench-results/quick $(BENCH_PEERS)

## bench: the full benchmark suite (long: about an hour on 2 cores)
bench: $(VENV)/.installed-test
	$(PY) -m benchmarks --suite full --output bench-results/full $(BENCH_PEERS)

clean:
	rm -rf $(VENV) demo-output bench-results
