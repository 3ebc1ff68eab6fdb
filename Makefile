# The two commands a new user needs (see README): `make demo` and `make test`.
# Both install what is missing first (scripts/bootstrap.sh is idempotent and quick when done).

VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint typecheck clean

install:
	@bash scripts/bootstrap.sh

demo: install
	$(BIN)/promo demo

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy

test: install lint typecheck
	$(BIN)/pytest

clean:
	rm -rf .promo .pytest_cache .ruff_cache .mypy_cache
