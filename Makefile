# Two commands do all the set-up: `make demo` and `make test` (each creates .venv when missing).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test docs lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,docs,bench]'
	$(MAKE) mathjax
	touch $@

# MathJax for the docs site, from the npm registry (package.json pins it), served with the site
MATHJAX = docs/assets/vendor/mathjax/tex-svg-full.js
.PHONY: mathjax
mathjax: $(MATHJAX)
$(MATHJAX): package.json
	npm install --silent --no-audit --no-fund
	mkdir -p $(dir $@)
	cp node_modules/mathjax/es5/tex-svg-full.js node_modules/mathjax/LICENSE $(dir $@)

demo: $(BIN)/.installed
	$(BIN)/pyrovae compare examples/configs/digits_vae.toml --out runs/demo

test: $(BIN)/.installed $(MATHJAX)
	$(BIN)/python -m pytest

docs: $(BIN)/.installed $(MATHJAX)
	$(BIN)/python docs/gen_lessons.py
	PYROVAE_DOCS_EXECUTE=true $(BIN)/mkdocs build --strict -d site  # notebooks executed

lint: $(BIN)/.installed
	$(BIN)/ruff check pyrovae tests benchmarks examples

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf runs site .pytest_cache
