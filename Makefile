# Two entry points do all the set-up on a fresh machine: `make demo` (main job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test train-builtin bench

$(BIN)/robustvtc: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0            # first: the CPU wheel; nothing may pull the CUDA build
	$(BIN)/pip install -q -e ".[test,ray]"             # ray: tests/test_ray_executor.py runs a local cluster
	$(BIN)/pip install -q --no-deps torchattacks==3.5.1  # its declared deps drag in torchvision
	@$(BIN)/python -c "import importlib.util,sys; sys.exit('torchvision is installed: it breaks transformers LLaVA imports here' if importlib.util.find_spec('torchvision') else 0)"
	@touch $@

setup: $(BIN)/robustvtc

demo: setup
	$(BIN)/robustvtc run quickstart --output runs/quickstart --overwrite

test: setup
	$(BIN)/python -m pytest -q

train-builtin: setup  # writes runs/builtin-<UTC time>/; OUT=dir to choose (never the shipped weights unless --replace-shipped)
	$(BIN)/python -m tools.train_builtin $(if $(OUT),--out $(OUT),)

bench: setup
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f; done
