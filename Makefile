# The two commands a new user needs (see README): `make demo` and `make test`.
# Both install what is missing first (scripts/bootstrap.sh is idempotent and quick when done).
# `make check` is the fast loop while editing: lint, types and every test that needs no broker,
# worker process or long training (tests/conftest.py marks the others `kafka` / `slow`).

VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo check test lint typecheck clean

install:
	@bash scripts/bootstrap.sh

demo: install
	$(BIN)/promo demo

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy

check: install lint typecheck
	$(BIN)/pytest -m "not kafka and not slow"

# Four test processes on two cores: most broker tests wait (on timers, rebalances, Prometheus
# rules), so four overlap well; tests/conftest.py orders and groups them.
test: install lint typecheck
	$(BIN)/pytest -n 4 --dist loadgroup --no-loadscope-reorder

clean:
	rm -rf .promo .pytest_cache .ruff_cache .mypy_cache
