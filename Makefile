# The README's two commands are `make demo` and `make test`; both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo tour test docs runbook generated lint typecheck unit integration bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25.1"
	$(BIN)/python -m pip install --quiet -e ".[all]" --group dev
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/drill.py

tour: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy --strict src
	$(BIN)/mypy --strict tests/typing

unit: $(STAMP)
	$(BIN)/pytest tests/unit

integration: $(STAMP)
	$(BIN)/pytest tests/integration

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir .site

runbook: $(STAMP)
	$(BIN)/python -m degrade runbook examples.app:registry > docs/runbook.md

# The committed runbook must match the code; the alert rules must load in promtool.
generated: $(STAMP)
	$(BIN)/python -m degrade runbook examples.app:registry --check docs/runbook.md
	$(BIN)/python -m degrade alerts examples.app:registry > .alerts.yml
	@if command -v promtool >/dev/null; then promtool check rules .alerts.yml; \
	elif [ "$$CI" = true ]; then echo "promtool is missing (apt-get install prometheus)"; exit 1; \
	else echo "promtool not installed: alert rules not checked"; fi

test: lint typecheck docs generated
	$(BIN)/pytest

bench: $(STAMP)
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .site .alerts.yml
