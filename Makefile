# The two commands: `make run` starts the whole platform on the embedded default,
# `make test` runs the test suite against a real PostgreSQL and a real broker.
SHELL := /bin/bash
PY := .venv/bin/python

.PHONY: bootstrap run stop test test-chaos test-fast demo bench lint fmt clean

bootstrap:
	@./scripts/bootstrap.sh

run: bootstrap
	$(PY) -m crm_common.devstack run

stop: bootstrap
	$(PY) -m crm_common.devstack stop

test: bootstrap
	$(PY) -m pytest $(PYTEST_ARGS)

# The long chaos run (>= 50,000 events under kills and outages); `make test` runs only its short version.
# CRM_CHAOS_SEED=n replays a seed (the run prints the one it used).
test-chaos: bootstrap
	CRM_CHAOS=long $(PY) -m pytest -s -q tests/chaos -k long $(PYTEST_ARGS)

demo: bootstrap
	$(PY) scripts/demo.py $(DEMO_ARGS)

bench: bootstrap
	@set -e; for b in bench/*.py; do echo "== $$b"; $(PY) $$b; done

lint: bootstrap
	.venv/bin/ruff check libs services tests bench
	.venv/bin/mypy libs/common/crm_common services/ingest/ingest services/loyalty/loyalty services/notifier/notifier \
		services/offers/offers services/segmentation/segmentation

fmt: bootstrap
	.venv/bin/ruff format libs services tests bench

clean:
	rm -rf .venv .local
