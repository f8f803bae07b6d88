# grasp — set-up, demo, tests, benchmarks.
#   make demo      create .venv, install, run the whole pipeline on the built-in demo corpus
#   make hf-demo   the same pipeline with a Hugging Face model and a BPE tokenizer built offline
#   make test      create .venv, install with test extras (incl. transformers for the HF tests), run pytest
# Torch defaults to the CPU build that lies on this machine's disk; pick another with e.g.
#   make demo TORCH_SPEC='torch==2.5.1' TORCH_INDEX='--index-url https://download.pytorch.org/whl/cu124'

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
CONFIG      ?= configs/demo.toml
RUN         ?= runs/demo
PYTEST_ARGS ?= -m "not slow"
# Local parallel shards for the heavy stages (one per core), split as a SLURM array would.
SHARDS      ?= 2
# Closed-loop rounds after the first selection (0 = open loop).
LOOP_ROUNDS ?= 2

BIN   := $(VENV)/bin
GRASP := $(BIN)/grasp

.PHONY: demo hf-demo vision pipeline test test-all lint bench bench-fidelity repro clean install install-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e ".[report,anchors]"
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@ $(VENV)/.installed

$(VENV)/.installed-hf: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e ".[report,hf]"
	touch $@ $(VENV)/.installed

$(VENV)/.installed-vision: pyproject.toml $(VENV)/.torch
	$(BIN)/python -m pip install --quiet -e ".[report,vision]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(MAKE) --no-print-directory pipeline CONFIG=configs/demo.toml RUN=$(RUN)

# A tiny GPT-2 and a BPE tokenizer trained on the demo corpus (offline, deterministic) in
# runs/hf-demo/hf-model, then the whole pipeline with prepare.tokenizer and model.kind = "hf".
hf-demo: $(VENV)/.installed-hf
	$(BIN)/python scripts/make_hf_demo_model.py --out runs/hf-demo/hf-model
	$(MAKE) --no-print-directory pipeline CONFIG=configs/hf-demo.toml RUN=runs/hf-demo

# The whole pipeline for one config, locally; each stage skips work that is already done.
pipeline:
	$(GRASP) prepare --config $(CONFIG) --run $(RUN)
	scripts/run_shards.sh $(SHARDS) $(GRASP) sketch --config $(CONFIG) --run $(RUN)
	scripts/run_shards.sh $(SHARDS) $(GRASP) retrain-subsets --config $(CONFIG) --run $(RUN)
	$(GRASP) fit-surrogate --config $(CONFIG) --run $(RUN)
	scripts/run_shards.sh $(SHARDS) $(GRASP) score --config $(CONFIG) --run $(RUN)
	$(GRASP) select --config $(CONFIG) --run $(RUN)
	scripts/loop.sh $(LOOP_ROUNDS) $(SHARDS) $(GRASP) --config $(CONFIG) --run $(RUN)
	scripts/run_shards.sh $(SHARDS) $(GRASP) retrain-subsets --config $(CONFIG) --run $(RUN) --curation
	$(GRASP) report --config $(CONFIG) --run $(RUN)
	@echo "report: $(RUN)/report/index.html"

# The image demo: sklearn's digits in six visual domains (needs the [vision] extra).
vision: $(VENV)/.installed-vision
	$(MAKE) --no-print-directory pipeline CONFIG=configs/vision-demo.toml RUN=runs/vision

repro: $(VENV)/.installed
	$(MAKE) --no-print-directory pipeline CONFIG=$(CONFIG) RUN=runs/$(basename $(notdir $(CONFIG)))

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: $(VENV)/.installed-test
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check grasp_cli tests scripts
	$(BIN)/ruff format --check grasp_cli tests scripts

bench: $(VENV)/.installed-test
	$(BIN)/python scripts/bench_sketch.py --gpt2-small --json bench-sketch.json
	$(BIN)/python scripts/bench_retrain.py --json bench-retrain.json
	$(BIN)/python scripts/bench_select.py --json bench-select.json
	$(BIN)/python scripts/bench_scale.py --json bench-scale.json

# Fidelity on a bigger subset design (~1 hour on 2 cores; resumable): every method, and GRASP
# fitted on n subsets against datamodels fitted on 10n.
bench-fidelity: $(VENV)/.installed
	$(BIN)/python scripts/bench_fidelity.py --json bench-fidelity.json

clean:
	rm -rf $(VENV) runs .pytest_cache
