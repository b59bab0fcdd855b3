# Two commands on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
RUN_DIR ?= runs/demo

.PHONY: venv demo test ablate clean bench

# torch goes in first, pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[text,logging,test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/lightning fit --config recipes/casc_base_synth.yaml --trainer.default_root_dir $(RUN_DIR)
	$(BIN)/lightning test --config recipes/casc_base_synth.yaml --trainer.default_root_dir $(RUN_DIR) \
		--ckpt_path $(RUN_DIR)/checkpoints/best.ckpt

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python scripts/bench_eval.py

clean:
	rm -rf $(VENV) runs .cache
