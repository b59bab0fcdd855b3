# Two commands on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
DEMO    ?= recipes/casc_base_synth.yaml
DEMO_CKPT ?= runs/casc_base_synth/checkpoints/best.ckpt

.PHONY: venv demo test clean bench bench-data bench-search attention ablate report ensemble twins

# torch goes in first, pinned: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[text,logging,search,test]"
	touch $(STAMP)

venv: $(STAMP)

# Train CASC-base on SynthScenes (generated on first use), then test the best checkpoint: prints the R@K table.
# OMP_WAIT_POLICY=PASSIVE (also zoo's default): spinning OpenMP barriers stall on a busy machine (README, Speed).
demo: $(STAMP)
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/lightning fit --config $(DEMO)
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/lightning test --config $(DEMO) --ckpt_path $(DEMO_CKPT)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Fast path next to the slow reference (pairs/s, ms per training step, peak memory, ratio); e.g.
# make bench BENCH_ARGS="--threads 1 --images 200 --train-batch 64"   (README, Speed)
# OMP_WAIT_POLICY=PASSIVE: OpenMP threads sleep instead of spinning at barriers; on a shared (oversubscribed)
# CPU spinning threads stall every op, the many mid-sized ops of the fast path most (README, Speed).
bench: $(STAMP)
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/python -m zoo.bench $(BENCH_ARGS)

# Training-loader images/s per data.train_features store (mmap, memory, memory_fp16, device_fp16) vs mmap.
bench-data: $(STAMP)
	$(BIN)/python -m zoo.bench data $(BENCH_ARGS)

# zoo.search at scale on random embeddings with COCO's shapes (README, Search): build time, bytes/item, query p50/p99;
# e.g. make bench-search BENCH_ARGS="--sizes 10000 100000 1000000 --full-max 100000"
bench-search: $(STAMP)
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/python -m zoo.bench search $(BENCH_ARGS)

# After `make demo`: where each word of a test caption looks (T2I attention over the region boxes).
attention: $(STAMP)
	$(BIN)/python -m zoo.tools.pictures attention --ckpt $(DEMO_CKPT) --root .cache/synthscenes --image 3 --caption 1 \
		--out runs/attention.png

# Every ablation row of a method: `make ablate METHOD=casc DATA=synthetic [TABLE=..] [ROWS=a,b] [LOGGER=csv]`.
# Resumable (run it again after a kill); ends by writing the report. ARGS='--trainer.max_epochs 1' reaches lightning.
METHOD  ?= casc
DATA    ?= synthetic
LOGGER  ?= wandb
ABLATE_OPTS = $(if $(TABLE),--table $(TABLE)) $(if $(ROWS),--rows $(ROWS)) --logger $(LOGGER)
ablate: $(STAMP)
	$(BIN)/python -m zoo.experiments.ablate $(METHOD) $(DATA) $(ABLATE_OPTS) $(if $(ARGS),-- $(ARGS))

# The Markdown/CSV/PNG report from finished rows alone (runs/ablate/<method>_<data>/report.*);
# SEEDS="runs/ablate_seed1 ..." adds those folders' rsum per row and the ordering agreement per table; TABLE=t: that table only.
report: $(STAMP)
	$(BIN)/python -m zoo.experiments.report $(METHOD) $(DATA) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(TABLE),--tables $(TABLE))

# Box positions on SynthScenes twins (README, CCCL): CCCL, CCCL w/o POS and CASC-base at SEEDS_TWINS, 8 epochs, the
# last checkpoint, every row's lr halved every 3 epochs (the runner's --lr-decay 0.5), twin accuracy also on a
# 2,000-scene twin test split; resumable; writes zoo/reports/position_twins/report.{md,csv}. About 55 min on the
# shared 2-core machine (three seeds in a row).
SEEDS_TWINS ?= 0 1 2
twins: $(STAMP)
	$(BIN)/python -m zoo.experiments.twins --seeds $(SEEDS_TWINS) --epochs 8 --checkpoint last --twin-test 2000 \
		--runs runs/position_twins \
		--out zoo/reports/position_twins --logger $(if $(filter wandb,$(LOGGER)),wandb,csv) $(if $(ARGS),-- $(ARGS))

# Mean of the similarity matrices of several checkpoints: `make ensemble RECIPE=recipes/x.yaml CKPTS="a.ckpt b.ckpt"`.
RECIPE ?= $(DEMO)
ensemble: $(STAMP)
	$(BIN)/python -m zoo.experiments.ensemble --config $(RECIPE) --ckpt $(CKPTS)

clean:
	rm -rf $(VENV) runs .cache
