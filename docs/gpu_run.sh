#!/usr/bin/env bash
# One GPU call (timeout_s 580), three parts, each alone on the GPU (2026-12-04: tests run beside eight ladder
# processes timed out after 14 of 64; alone they took 101 s):
#     OUT=out_gpu bash docs/gpu_run.sh
# 1. (101-182 s, the longer on a cold machine) the GPU tests: every kernel against float64, every model's step;
# 2. (~CELL_S s) Perceiver AR copy-ladder cells (issue #36), one bench.py --stages ladder process each, side by
#    side (seconds per step are of a shared GPU), width 128, rotary_base 0: 16,384 (chance through 23,000 steps
#    on 2026-12-04: does a stair come by ~50,000?), 4,096 with seed 2 (how much the first stair's step varies
#    between runs: 4,900 with seed 1, none by 10,250 at base 10,000) and 65,536 (chance through 6,750); and the
#    Reformer (the CPU recipe) at 1,024;
# 3. (~BENCH_BUDGET s, 0 skips it) bench.py: the kernels beside FlexAttention (cut short on 2026-12-04).
# Everything lands in $OUT: versions.txt, gpu_tests.txt, summary.txt and results.tgz (every bench.json record,
# bench.md, ladder curves and logs; copy a record to docs/bench/DEVICE-DATE-WHAT.json and link it beside its
# figure). CELL_S and BENCH_BUDGET shorten a dry run on the CPU (CELL_S=60 BENCH_BUDGET=20 OUT=/tmp/o bash ...).
set -u
OUT=${OUT:-out_gpu}
RUN=${RUN:-/tmp/nanolong_gpu_run}
CELL_S=${CELL_S:-300}
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
TRITON_INTERPRET=0 timeout 240 python -m pytest test_all.py -q -k gpu > "$OUT/gpu_tests.txt" 2>&1
echo "GPU tests: exit $? ($(tail -1 "$OUT/gpu_tests.txt"))" | tee "$OUT/summary.txt"
cell pa_w128_base_16384 perceiver_ar 16384 --ladder_flags "--n_embd 128 --rotary_base 0"
cell pa_w128_base_4096_seed2 perceiver_ar 4096 --ladder_flags "--n_embd 128 --rotary_base 0 --seed 2"
cell pa_w128_base_65536 perceiver_ar 65536 --ladder_flags "--n_embd 128 --rotary_base 0"
cell reformer_1024 reformer 1024  # the Reformer's GPU rung (500 steps at chance in the first call)
wait
cat "$RUN/cells.txt" >> "$OUT/summary.txt"
grep -h "accuracy" "$RUN"/*.log | grep -v "^    " >> "$OUT/summary.txt"
[ "${BENCH_BUDGET:-60}" = 0 ] || python bench.py --stages kernels --budget "${BENCH_BUDGET:-60}" --out_dir "$RUN/bench" \
    > "$RUN/bench.log" 2>&1
echo "bench: exit $?" | tee -a "$OUT/summary.txt"
tail -c 5000 "$RUN/bench/bench.md"
(cd "$RUN" && find . -name "*.json" -o -name "*.md" -o -name "*.log" -o -name "*.png" -o -name "*.txt" \
    | tar czf "$OUT/results.tgz" -T -)
