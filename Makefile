# Two commands do all the set-up: `make demo` and `make test` (each creates .venv when missing).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test docs lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,docs,bench]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/pyrovae compare examples/configs/digits_vae.toml --out runs/demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest

docs: $(BIN)/.installed
	$(BIN)/python docs/gen_lessons.py
	PYROVAE_DOCS_EXECUTE=true $(BIN)/mkdocs build --strict -d site  # notebooks executed

lint: $(BIN)/.installed
	$(BIN)/ruff check pyrovae tests benchmarks examples

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf runs site .pytest_cache
