# causal-ltar: `make demo` and `make test` do all set-up on a new machine.
# Stage targets take CONFIG=pipeline.yaml and SET="key=value key=value".

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
LTAR   := $(VENV)/bin/ltar
CONFIG ?= pipeline.yaml
SET    ?=
ARGS   := --config $(CONFIG) $(foreach kv,$(SET),--set $(kv))

.PHONY: setup demo synth pretrain-vlm pretrain-video extract dictionaries train ablate benchmark frames confounders grounding-premise test bench lint clean

# FAISS build: cpu (faiss-cpu, the default) or gpu (faiss-gpu-cu12, on a CUDA machine): `make setup FAISS=gpu`.
# Exactly one is installed; the other is removed, since both install the module `faiss`.
FAISS  ?= cpu
OTHER_FAISS := $(if $(filter gpu,$(FAISS)),faiss-cpu,faiss-gpu faiss-gpu-cu11 faiss-gpu-cu12)

# The venv is rebuilt only when the package metadata, the pinned versions or the FAISS build change.
$(VENV)/.installed-$(FAISS): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip uninstall -y -q $(OTHER_FAISS) 2>/dev/null || true
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,$(FAISS)]'
	@rm -f $(VENV)/.installed-*
	@touch $@

setup: $(VENV)/.installed-$(FAISS)

synth: setup
	$(LTAR) synth $(ARGS)

pretrain-vlm: setup
	$(LTAR) pretrain-vlm $(ARGS)

pretrain-video: setup
	$(LTAR) pretrain-video $(ARGS)

extract: setup
	$(LTAR) extract $(ARGS)

dictionaries: setup
	$(LTAR) dictionaries $(ARGS)

train: setup
	$(LTAR) train $(ARGS)

ablate: setup
	$(LTAR) ablate $(ARGS)

# Every stage, in order, on the embedded synthetic dataset; ends by printing the main table.
demo: setup
	$(LTAR) synth $(ARGS)
	$(LTAR) pretrain-vlm $(ARGS)
	$(LTAR) pretrain-video $(ARGS)
	$(LTAR) extract $(ARGS)
	$(LTAR) dictionaries $(ARGS)
	$(LTAR) ablate --table main $(ARGS)

# Stage 1 of a world in its own data and cache folders (render, tiny encoders, extract, dictionaries): $(call world,ARGS)
world = $(LTAR) synth $(1) && $(LTAR) pretrain-vlm $(1) && $(LTAR) pretrain-video $(1) && $(LTAR) extract $(1) && \
	$(LTAR) dictionaries $(1)

# The worlds are override files in configs/worlds/ (each file's top comment says what its world is), deep-merged over
# $(CONFIG) in order: `--config` repeats, a later file wins; SET's `--set`s apply after every file.

# The powered benchmark: 512 videos per test split and the unconfounded train_oracle split, in its own data and
# cache folders; the main table with its bounds (table `benchmark`).
BENCH_ARGS := --config $(CONFIG) --config configs/worlds/benchmark.yaml $(foreach kv,$(SET),--set $(kv))

benchmark: setup
	$(call world,$(BENCH_ARGS))
	$(LTAR) ablate --table benchmark --diagnose $(BENCH_ARGS)

# CMDCL Fig. 7b: the benchmark world extracted again at 32 frames (a second store beside the 16-frame one), table
# cmdcl_frames (8, 16, 32 frames subsampled from it).
FRAMES_ARGS := --config $(CONFIG) --config configs/worlds/benchmark.yaml --config configs/worlds/frames32.yaml \
	$(foreach kv,$(SET),--set $(kv))

frames: setup
	$(call world,$(FRAMES_ARGS))
	$(LTAR) ablate --table cmdcl_frames --diagnose $(FRAMES_ARGS)

# Which head removes which bias: the world with the distractor and one ood split per named confounder; table
# `confounders` and each head's paired table.
CONF_ARGS := --config $(CONFIG) --config configs/worlds/confounders.yaml $(foreach kv,$(SET),--set $(kv))

confounders: setup
	$(call world,$(CONF_ARGS))
	$(LTAR) ablate --table confounders --diagnose $(CONF_ARGS)
	$(LTAR) ablate --table confounders_cmdcl --table confounders_pcmci --table confounders_ecrl $(CONF_ARGS)

# IGV's premise test on three worlds (activity, 3 seeds), each in its own data and cache folders: the idle-frame
# shortcut world (idle-only.yaml), today's benchmark world (benchmark.yaml), an unconfounded world
# (unconfounded.yaml); tables grounding_premise / grounding_today / grounding_unconfounded, grounding_eigv and
# grounding_oracle_control (idle world) and grounding_indicator (unconfounded world).
PREMISE_ARGS := --config $(CONFIG) --config configs/worlds/idle-only.yaml $(foreach kv,$(SET),--set $(kv))
UNCONF_ARGS := --config $(CONFIG) --config configs/worlds/unconfounded.yaml $(foreach kv,$(SET),--set $(kv))

grounding-premise: setup
	$(call world,$(PREMISE_ARGS))
	$(call world,$(BENCH_ARGS))
	$(call world,$(UNCONF_ARGS))
	$(LTAR) ablate --table grounding_premise $(PREMISE_ARGS)
	$(LTAR) ablate --table grounding_eigv $(PREMISE_ARGS)
	$(LTAR) ablate --table grounding_oracle_control $(PREMISE_ARGS)
	$(LTAR) ablate --table grounding_today $(BENCH_ARGS)
	$(LTAR) ablate --table grounding_unconfounded $(UNCONF_ARGS)
	$(LTAR) ablate --table grounding_indicator $(UNCONF_ARGS)

test: setup
	$(PY) -m pytest -q

bench: setup
	@for b in bench/[!_]*.py; do echo "== $$b"; $(PY) -m bench.$$(basename $$b .py) || exit 1; done

# Style, and the import contract (bench/imports.py: train/ reaches stage 1 only through extract/contract/, the
# contract imports no encoder, decoder or cluster library, no import circles).
lint: setup
	$(VENV)/bin/ruff check extract train tests bench
	$(VENV)/bin/ruff format --check extract train tests bench
	$(PY) -m bench.imports --check

clean:
	rm -rf data runs
	find cache -mindepth 1 -not -name README.md -exec rm -rf {} +
