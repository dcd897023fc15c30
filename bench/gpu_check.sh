#!/usr/bin/env bash
# The GPU check: every GPU target of BENCHMARKS.md measured on one GPU and printed as ONE table
# (bench/gpu_table.py), in under 9.75 minutes on one H100/H200 (budget per step below).
#
#   bash bench/gpu_check.sh                      # device cuda, full sizes, results in gpu_check_out/
#   bash bench/gpu_check.sh --out DIR --device cuda:1
#   bash bench/gpu_check.sh --device cpu --tiny  # tiny sizes end to end (tests/test_gpu_check.py)
#   bash bench/gpu_check.sh --random-weights always --only train_tltr,tag   # no weight download; two steps
#
# Python: $PYTHON, else .venv/bin/python when present, else python3. On a box without network whose
# python lacks wat's dependencies, `make gpu-wheels` here first and carry wheels/ along: the script
# installs wat from it (pip --no-index). Whisper large-v1 weights are used when they load (cached or
# downloadable), random weights of the same shapes otherwise (throughput only; the table says so);
# `--random-weights always` skips the attempt (a box whose network drops packets can stall a download
# for minutes inside a step's time limit).
# Each step runs under a time limit and writes OUT/STEP.json and OUT/STEP.log; a failed step is a
# row saying so, the other steps still run. Exit status: that of gpu_table.py (1 if a step failed).
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
TINY=0
OUT=gpu_check_out
WEIGHTS=""
ONLY=""
STEPS="extract_pad30 extract_trim extract_hf train_tltr train_wamlp probe tag robust"
usage() { echo "usage: bash bench/gpu_check.sh [--device cuda|cuda:N|cpu] [--tiny] [--out DIR] [--random-weights fallback|always] [--only STEP,...]" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --device) [ $# -ge 2 ] || usage; DEVICE=$2; shift 2 ;;
        --tiny) TINY=1; shift ;;
        --out) [ $# -ge 2 ] || usage; OUT=$2; shift 2 ;;
        --random-weights) [ $# -ge 2 ] || usage; WEIGHTS=$2; shift 2 ;;
        --only) [ $# -ge 2 ] || usage; ONLY=$2; shift 2 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: error: unknown argument $1" >&2; usage ;;
    esac
done
case "$DEVICE" in cpu|cuda|cuda:[0-9]*) ;; *) echo "gpu_check.sh: error: --device must be cpu, cuda or cuda:N" >&2; exit 2 ;; esac
case "$WEIGHTS" in ""|fallback|always) ;; *) echo "gpu_check.sh: error: --random-weights must be fallback or always" >&2; exit 2 ;; esac
for s in ${ONLY//,/ }; do
    case " $STEPS " in *" $s "*) ;; *) echo "gpu_check.sh: error: --only: unknown step '$s' (steps: $STEPS)" >&2; exit 2 ;; esac
done
[ -z "$ONLY" ] || [ -n "${ONLY//,/}" ] || { echo "gpu_check.sh: error: --only needs at least one step" >&2; exit 2; }

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
need="import wat.extract, wat.eval, whisper, dask.array, distributed, soxr, soundfile, av"
if ! "$PY" -c "$need" 2>/dev/null; then
    if [ -d wheels ]; then
        # --no-deps: wheels/ holds exactly what such a box lacks (Makefile GPU_WHEELS); the box's own
        # packages stay as they are, and an older pin there (click, say) cannot stop the install
        echo "installing wat and its missing dependencies from wheels/ (no network)"
        "$PY" -m pip install -q --no-index --no-deps --no-compile wheels/*.whl || exit 1
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-build-isolation -e . || exit 1
        "$PY" -c "$need" || { echo "gpu_check.sh: error: wat still does not import after installing wheels/" >&2; exit 2; }
    else
        echo "gpu_check.sh: error: $PY cannot import wat and its dependencies; run 'make gpu-wheels' where pip works and bring wheels/" >&2
        exit 2
    fi
fi
if [ "${DEVICE%%:*}" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check.sh: error: --device $DEVICE but torch sees no CUDA device" >&2; exit 2
fi

mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wat-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1
if [ "$TINY" = 1 ]; then
    MODEL=micro; RANDOM_WEIGHTS=always   # micro: a random 2 x 64 Whisper (bench/common.py)
    LIMITS=(120 120 120 120 120 120 120 120)
    EXTRACT_PAD30="--clips 4 --batch-size 2 --official-clips 2 --pool 4 --repeat 1 --clip-seconds 1 --num-workers 0"
    EXTRACT_TRIM="$EXTRACT_PAD30 --null-encoder"
    EXTRACT_HF="--hf-random micro --clips 4 --batch-size 2 --pool 4 --repeat 1 --clip-seconds 1 --num-workers 0"
    TRAIN_TLTR="--size tiny --clips 32 --steps 2 --per-round 1 --batch-size 8"
    TRAIN_WAMLP="--size tiny --clips 64 --steps 2 --per-round 1 --batch-size 16"
    PROBE="--clips 500 --layers 2 --dim 16 --sklearn-layers 1 --sklearn-classes 3 --max-iter 5"
    TAG="--runs 1 --seconds 4 --sample-len 4 --temperature 0"
    ROBUST="--random-weights micro --ctc micro --mixtures 2 --batch-size 2 --rounds 1"   # random weights as below
else
    # time limits per step (s), 9.75 minutes in all; the comments are the times of a run on an H200 (16 CPUs)
    # of these sizes or, where marked, estimates from a run of larger ones that ran out of its limit
    MODEL=large-v1; RANDOM_WEIGHTS=fallback
    LIMITS=(70 75 90 60 60 110 70 50)
    EXTRACT_PAD30="--clips 512 --batch-size 32 --official-clips 16 --repeat 1 --num-workers 8"     # est. ~45 s
    # trim also runs (d) the null-encoder pipeline and (e) the disk's write rate on 1024 clips (~2.2 GB each)
    EXTRACT_TRIM="--clips 2048 --batch-size 128 --official-clips 16 --repeat 1 --num-workers 12 --null-encoder --null-clips 1024"   # est. ~40 s + ~15 s
    # HuBERT X-Large's shape (964 M parameters, random) at wat-extract's default batch of 16 and the
    # longest clips (30 s): the extraction batch rule holds (peak GPU memory in the table)   # est. ~60 s
    EXTRACT_HF="--hf-random hubert-xlarge --clips 96 --batch-size 16 --clip-seconds 30 --repeat 1 --num-workers 8"
    TRAIN_TLTR="--size large --clips 1000 --steps 100 --per-round 10 --batch-size 48"             # 51 s
    TRAIN_WAMLP="--size large --clips 8000 --steps 40 --per-round 10 --batch-size 256"             # est. ~40 s
    PROBE="--clips 20000 --sklearn-layers 24 --sklearn-classes 8"                                 # 94 s
    TAG="--runs 2 --seconds 30 --temperature 0"                                                   # est. ~50 s
    ROBUST="--random-weights large-v1 --mixtures 32 --batch-size 32 --rounds 1"                   # est. ~40 s
fi

[ -z "$WEIGHTS" ] || RANDOM_WEIGHTS=$WEIGHTS

step() {  # step NAME LIMIT_S SCRIPT ARGS...: run one bench script, JSON into OUT/NAME.json
    local name=$1 limit=$2; shift 2
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then return; fi
    rm -f "$OUT/$name.json"
    echo "== $name: $*"
    local t0=$SECONDS
    timeout "$limit" "$PY" "$@" --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc $rc, $((SECONDS - t0)) s (log $OUT/$name.log)"
    [ $rc = 0 ] || tail -n 5 "$OUT/$name.log" | sed 's/^/   | /'
}

step extract_pad30 ${LIMITS[0]} bench/extract_throughput.py --device "$DEVICE" --model $MODEL --random-weights $RANDOM_WEIGHTS \
    --policy pad30 --workdir "$WORK/extract" $EXTRACT_PAD30
step extract_trim ${LIMITS[1]} bench/extract_throughput.py --device "$DEVICE" --model $MODEL --random-weights $RANDOM_WEIGHTS \
    --policy trim --workdir "$WORK/extract" $EXTRACT_TRIM
step extract_hf ${LIMITS[2]} bench/extract_throughput.py --device "$DEVICE" --workdir "$WORK/extract-hf" $EXTRACT_HF
rm -rf "$WORK/extract-hf"
step train_tltr ${LIMITS[3]} bench/train_throughput.py --device "$DEVICE" --head tl-tr --cache-dir "$WORK/train-tltr" $TRAIN_TLTR
step train_wamlp ${LIMITS[4]} bench/train_throughput.py --device "$DEVICE" --head wa-mlp --cache-dir "$WORK/train-wamlp" $TRAIN_WAMLP
rm -rf "$WORK/train-tltr" "$WORK/train-wamlp"
step probe ${LIMITS[5]} bench/probe_audioset.py --device "$DEVICE" --workdir "$WORK/probe" $PROBE
step tag ${LIMITS[6]} bench/tag_overhead.py --device "$DEVICE" --model $MODEL --random-weights $RANDOM_WEIGHTS $TAG
step robust ${LIMITS[7]} bench/robust_throughput.py --device "$DEVICE" $ROBUST
SKIP=""
if [ -n "$ONLY" ]; then   # steps not asked for are "not run" rows, not failures
    for s in $STEPS; do [[ ",$ONLY," == *",$s,"* ]] || SKIP="$SKIP${SKIP:+,}$s"; done
fi
echo
"$PY" bench/gpu_table.py "$OUT" --skip "$SKIP"
