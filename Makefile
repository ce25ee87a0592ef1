# The two commands a newcomer runs: `make demo` (the main job, against the lab) and `make test`.
SHELL := /bin/bash
VENV := .venv/bin
LAB_CONFIG ?= deployments/lab/config.yml

.PHONY: setup lint test demo lab-up lab-down plan bench deployments

setup:
	@bash scripts/setup.sh

lint: setup
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .

test: setup lint
	$(VENV)/python -m pytest -q -p no:cacheprovider

# prefect.yaml from deployments/*/config.yml (one deployment set per cluster folder)
deployments: setup
	$(VENV)/python -m gpuforge.fleet

plan: setup
	$(VENV)/gpuforge plan --config deployments/prod/config.yml --out out/plan-prod

demo: setup
	bash scripts/demo.sh $(LAB_CONFIG)

lab-up: setup
	$(VENV)/gpuforge lab up --config $(LAB_CONFIG)

lab-down:
	$(VENV)/gpuforge lab down --config $(LAB_CONFIG)

bench: setup
	for b in bench/*.py; do $(VENV)/python $$b || exit 1; done
