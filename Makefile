# The README's two commands: `make bench` (the main job) and `make test`. Both set up everything
# on a fresh machine through scripts/env.sh.
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: env test test-cpu bench clean

env:
	@bash scripts/env.sh >/dev/null

test:
	@PY=$$(bash scripts/env.sh) && "$$PY" -m pytest $(PYTEST_ARGS)

# The CPU-only, Triton-free configuration (torch's CPU wheel, no CUDA, no triton, fastnn installed as
# a wheel in .venv-cpu) and its tests: what CI runs after `make test`.
test-cpu:
	@bash scripts/cpu_only.sh $(PYTEST_ARGS)

# Every benchmark case available on the best device present (a GPU if one is visible).
bench:
	@PY=$$(bash scripts/env.sh) && "$$PY" -m fastnn.bench.cli $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info fastnn/_C*.so
