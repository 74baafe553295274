#!/usr/bin/env bash
# One GPU call (timeout_s 540): the GPU tests beside Perceiver AR / Reformer copy-ladder cells, then the bench.
#     OUT=out_gpu bash docs/gpu_run.sh
# 1. (together, ~235 s) the GPU tests (every kernel against float64, a training step of every model) in the
#    foreground; ladder cells (issue #36: the copy at long distance; position encodings at the brief's width 128)
#    as background processes, one per cell, each its own bench.py --stages ladder run with its own record;
# 2. (alone, ~230 s) bench.py: kernels beside FlexAttention, the Reformer up to 2^20 tokens, generation.
# Everything lands in $OUT: versions.txt, gpu_tests.txt, summary.txt and results.tgz (every bench.json record,
# bench.md, ladder curves and logs; copy a record to docs/bench/DEVICE-DATE-WHAT.json and link it beside its
# figure). CELL_S and BENCH_BUDGET shorten a dry run on the CPU (CELL_S=20 BENCH_BUDGET=20 OUT=/tmp/o bash ...).
set -u
OUT=${OUT:-out_gpu}
RUN=${RUN:-/tmp/nanolong_gpu_run}
CELL_S=${CELL_S:-235}
rm -rf "$RUN" && mkdir -p "$OUT" "$RUN"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"
minutes=$(python -c "print(($CELL_S - 40) / 60)")  # rounds start while this much training time is left
cell() {  # cell NAME MODEL DISTANCES [bench flags]: one ladder run in the background
    local name=$1 model=$2 distances=$3; shift 3
    ( timeout "$CELL_S" python bench.py --stages ladder --models "$model" --distances "$distances" \
        --ladder_cap 100000 --ladder_check 250 --ladder_minutes "$minutes" --out_dir "$RUN/$name" "$@" \
        > "$RUN/$name.log" 2>&1
      echo "$name: exit $?" >> "$RUN/cells.txt" ) &
}
cell pa_w64_4096 perceiver_ar 4096  # the CPU ladder's recipe, past the 5,250 steps the CPU gave it
cell pa_w64_65536 perceiver_ar 65536
cell pa_w128_1024 perceiver_ar 1024 --ladder_flags "--n_embd 128"  # the brief's width: rotary, base 10,000
cell pa_w128_sin002_1024 perceiver_ar 1024 --ladder_flags "--n_embd 128 --sinusoid 0.02 --rotary_frac 0"
cell pa_w128_sin1_1024 perceiver_ar 1024 --ladder_flags "--n_embd 128 --sinusoid 1 --rotary_frac 0"
cell pa_w128_sin002_4096 perceiver_ar 4096 --ladder_flags "--n_embd 128 --sinusoid 0.02 --rotary_frac 0"
cell pa_w128_base_4096 perceiver_ar 4096 --ladder_flags "--n_embd 128 --rotary_base 0"  # wavelengths to 2d
cell reformer reformer 1024,4096,16384,65536 --ladder_minutes 0.75
TRITON_INTERPRET=0 timeout 220 python -m pytest test_all.py -q -x -k gpu > "$OUT/gpu_tests.txt" 2>&1
echo "GPU tests: exit $? ($(tail -1 "$OUT/gpu_tests.txt"))" | tee "$OUT/summary.txt"
wait
cat "$RUN/cells.txt" >> "$OUT/summary.txt"
grep -h "accuracy" "$RUN"/*.log | grep -v "^    " >> "$OUT/summary.txt"
python bench.py --stages kernels,reformer,generate --budget "${BENCH_BUDGET:-230}" --out_dir "$RUN/bench" \
    > "$RUN/bench.log" 2>&1
echo "bench: exit $?" | tee -a "$OUT/summary.txt"
tail -c 5000 "$RUN/bench/bench.md"
(cd "$RUN" && find . -name "*.json" -o -name "*.md" -o -name "*.log" -o -name "*.png" -o -name "*.txt" \
    | tar czf "$OUT/results.tgz" -T -)
