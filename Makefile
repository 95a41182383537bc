# The two commands of the README: `make demo` (main job) and `make test`. Both set up .venv first.
VENV := .venv
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR := $(CURDIR)/build/torch_extensions

.PHONY: setup demo test test-all test-floor bench clean

$(STAMP): requirements.txt constraints.txt setup.cfg pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/eve-demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not gpu"

# The transformers-facing tests again on the oldest supported transformers (own venv, .venv-floor).
test-floor:
	bash scripts/test_transformers_floor.sh

bench: $(STAMP)
	$(VENV)/bin/python bench/model_overhead.py
	$(VENV)/bin/python bench/train_throughput.py

clean:
	rm -rf $(VENV) .venv-floor build
