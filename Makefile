# Two commands for a new user: `make demo` and `make test`.
# TORCH_SPEC picks the torch build; override it to keep your usual one, e.g.
#   make test TORCH_SPEC="torch"        (latest from PyPI, CUDA build on Linux)
#   make test TORCH_SPEC=""             (keep whatever torch the venv already has)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo_out
DEMO_MODEL ?= base
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=23" "setuptools>=64" wheel
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install -q -e ".[offline,dev]"
	# hearvalidator declares a dependency on full tensorflow, which it only uses for TF models;
	# the HEAR test gives it a stand-in module, so install it without its dependencies.
	$(BIN)/python -m pip install -q --no-deps hearvalidator==2021.0.2
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The whole product on the embedded synthetic dataset (11 sound classes, 5 folds), ~4 min on 2 CPU
# cores: demo data -> Whisper features -> TL-Tr head (ESC-50 5-fold protocol) -> layer-wise probe ->
# transcript + tags for two files. Outputs in $(DEMO_DIR)/; a rerun resumes the finished extraction.
demo: $(STAMP)
	$(BIN)/wat-data demo --out $(DEMO_DIR)/esc50-demo --clips-per-class 10
	$(BIN)/wat-extract --dataset esc50 --root $(DEMO_DIR)/esc50-demo --model $(DEMO_MODEL) --policy pad30 \
		--out $(DEMO_DIR)/feats.h5
	$(BIN)/wat-cache info $(DEMO_DIR)/feats.h5
	$(BIN)/wat-train --features $(DEMO_DIR)/feats.h5 --folds 5 --head tl-tr --dim 128 --epochs 30 \
		--out $(DEMO_DIR)/tl-tr
	$(BIN)/wat-probe --features $(DEMO_DIR)/feats.h5 --folds 5 --fusion mean,concat --out $(DEMO_DIR)/probe
	$(BIN)/wat-tag tests/fixtures/speech_en.wav \
		$(DEMO_DIR)/esc50-demo/audio/$$(grep -m1 ',siren,' $(DEMO_DIR)/esc50-demo/meta/esc50.csv | cut -d, -f1) \
		--model $(DEMO_MODEL) --head $(DEMO_DIR)/tl-tr/fold1/wa.pt --time-res 5 --top-k 3 --format text
	@echo
	@echo "== demo results in $(DEMO_DIR)/"
	@echo "features:     $(DEMO_DIR)/feats.h5 (+ feats.shards/)"
	@echo "TL-Tr head:   per-fold accuracy above; $(DEMO_DIR)/tl-tr/{metrics.json,per_class.csv,curves.png}"
	@echo "layer probe:  best layer above; $(DEMO_DIR)/probe/{layers.csv,layers.png,best_layer_hist.png}"
	@echo "tagging head: $(DEMO_DIR)/tl-tr/fold1/wa.pt (use with: wat-tag FILE --model $(DEMO_MODEL) --head ...)"

# CPU benchmarks (ratios; see BENCHMARKS.md). Not part of `make test`.
bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python bench/extract_throughput.py --model base --policy trim
	$(BIN)/python bench/extract_throughput.py --rss 1000 5000 --model tiny.en
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/probe_speed.py
	$(BIN)/python bench/tag_overhead.py --model base --runs 7 --temperature 0 --threads 1

clean:
	rm -rf $(VENV) $(DEMO_DIR)
