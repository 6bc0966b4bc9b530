# The README's two commands are `make demo` and `make test`; both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo tour test compat compat-lowest docs runbook generated lint typecheck unit integration bench clean chaos

$(STAMP): pyproject.toml
	.ci/setup-venv $(PYTHON) $(VENV)

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
	@$(MAKE) --no-print-directory compat
	@$(MAKE) --no-print-directory compat-lowest

# The other Pythons pyproject.toml claims, each in its own .venv-X.Y: the unit tests
# and the integration tests that lean on asyncio's transports (Redis, RabbitMQ, the
# drill), where Python versions differ (python/cpython#136234 is one such case).
COMPAT_PYTHONS ?= 3.12 3.13
COMPAT_TESTS   := tests/unit tests/integration/test_redis.py tests/integration/test_ratelimit.py \
                  tests/integration/test_cache.py tests/integration/test_revocation.py \
                  tests/integration/test_eventbus.py tests/integration/test_proxy_services.py \
                  tests/integration/test_example_app.py::TestDrill

compat:
	@for version in $(COMPAT_PYTHONS); do \
	  py=$$(.ci/find-python $$version); \
	  if [ -z "$$py" ]; then \
	    if [ "$$CI" = true ]; then echo "compat: Python $$version is missing"; exit 1; fi; \
	    echo "compat: Python $$version not found, skipped"; continue; \
	  fi; \
	  venv=.venv-$$version; \
	  if [ ! $$venv/.installed -nt pyproject.toml ]; then \
	    echo "compat: setting up $$venv with $$py"; \
	    .ci/setup-venv $$py $$venv || exit 1; \
	  fi; \
	  echo "compat: $$($$venv/bin/python -V)"; \
	  $$venv/bin/pytest -q -p no:cacheprovider $(COMPAT_TESTS) || exit 1; \
	done

# Every direct dependency at the floor pyproject.toml declares (uv's lowest-direct
# resolution, in .venv-lowest): the unit tests and the integration tests that touch
# each driver. A floor that does not pass is raised (or the code made to work there).
# Deselected there: TestPileUp, whose checkouts abandoned in a blackhole leave, on
# SQLAlchemy 2.0.30-2.1.0 (some runs; none on 2.0.58 or 2.1.9), a connection that the
# garbage collector terminates and an asyncpg "connection_lost" future nobody reads:
# the bound holds, the warning fails the test (see CHANGELOG).
LOWEST_TESTS := tests/unit tests/integration/test_redis.py tests/integration/test_ratelimit.py \
                tests/integration/test_cache.py tests/integration/test_revocation.py \
                tests/integration/test_eventbus.py tests/integration/test_db.py \
                tests/integration/test_db_load.py tests/integration/test_example_app.py::TestDrill

compat-lowest: $(STAMP)
	@if [ ! .venv-lowest/.installed -nt pyproject.toml ]; then \
	  echo "compat-lowest: setting up .venv-lowest (uv --resolution lowest-direct)"; \
	  rm -rf .venv-lowest && $(BIN)/uv venv -q .venv-lowest --python $(BIN)/python && \
	  VIRTUAL_ENV=$(CURDIR)/.venv-lowest $(BIN)/uv pip install -q --resolution lowest-direct -e ".[all]" --group dev && \
	  touch .venv-lowest/.installed || exit 1; \
	fi
	@.venv-lowest/bin/python -c "import importlib.metadata as m; print('compat-lowest:', ', '.join(f'{d} {m.version(d)}' for d in ('starlette','sqlalchemy','asyncpg','redis','aio-pika','aiormq','tenacity','structlog','sentry-sdk')))"
	.venv-lowest/bin/pytest -q -p no:cacheprovider $(LOWEST_TESTS) \
	  --deselect tests/integration/test_db.py::TestPileUp::test_200_concurrent_requests_against_a_blackhole

bench: $(STAMP)
	for b in bench/bench_*.py; do $(BIN)/python $$b || exit 1; done

# The end-to-end bench alone (uvicorn + wrk; `make bench` runs it too). Needs wrk: apt-get install wrk.
.PHONY: bench-e2e
bench-e2e: $(STAMP)
	$(BIN)/python bench/bench_e2e.py

# The transactional outbox bench alone (relay vs raw aio-pika, add() statements; `make bench` runs it too).
.PHONY: bench-outbox
bench-outbox: $(STAMP)
	$(BIN)/python bench/bench_outbox.py

clean:
	rm -rf $(VENV) .venv-* .mypy_cache .ruff_cache .pytest_cache .site .alerts.yml

# Chaos under load (docs/chaos.md): the example app under uvicorn, every dependency broken for real
# under 200 clients, two pods, fuzzing, a soak, secrets. One table; non-zero exit on any violation.
# `make chaos SOAK=600` for a long soak; CHAOS_FLAGS="--write-results" to record it in bench/RESULTS.md.
SOAK ?= 120
chaos: $(STAMP)
	$(BIN)/python bench/chaos.py --soak $(SOAK) $(CHAOS_FLAGS)

# The integration tests at their long durations (the outbox's 60 s broker blackhole); CI runs them short.
.PHONY: test-long
test-long: $(STAMP)
	DEGRADE_LONG=1 $(BIN)/pytest tests/integration/test_outbox.py -k blackhole
