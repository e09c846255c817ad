# Two commands for a fresh machine (see README.md):
#   make demo   set up, then run the main job on the embedded model
#   make test   set up, then check the import layers and the policies, then run the test suite
#
# TORCH pins the CPU wheel here; on a GPU box pass your CUDA build, e.g. TORCH=torch==2.11.0.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
DEMO   ?= results/demo

.PHONY: setup demo test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# The main job on the embedded default (SmolLM2-135M-Instruct, CPU; its measured time is in README.md):
# data → baseline evaluation → LoRA fit → evaluation of the best adapter → paired report.
# Trained on spelling, evaluated on position and count only.
EVAL = --decoding greedy --limit 100 --overwrite true \
	--questions $(DEMO)/data/position_test.jsonl $(DEMO)/data/count_test.jsonl

demo: setup
	$(PY) -m spellxfer assets fetch
	$(PY) -m spellxfer data build --out $(DEMO)/data --profile demo --seed 0 --overwrite true
	$(PY) -m spellxfer evaluate --model smollm2-135m $(EVAL) --out $(DEMO)/base
	$(PY) -m spellxfer fit --config configs/demo.yaml --trainer.default_root_dir $(DEMO)/fit \
		--data.data_dir $(DEMO)/data
	$(PY) -m spellxfer evaluate --model smollm2-135m --adapter $(DEMO)/fit/best_adapter $(EVAL) \
		--out $(DEMO)/tuned --compare_to $(DEMO)/base

test: setup
	$(VENV)/bin/ruff check spellxfer tests tools
	$(VENV)/bin/lint-imports
	$(PY) tools/policy_check.py
	$(PY) -m pytest -q --timeout 900

lint: setup
	$(VENV)/bin/ruff check spellxfer tests tools
	$(VENV)/bin/lint-imports
	$(PY) tools/policy_check.py
