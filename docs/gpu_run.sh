#!/usr/bin/env bash
# The next GPU run (issue #26), in one call (timeout_s 570): tests <= 220 s, bench 300 s, the rest ~15 s
#     OUT=out_gpu bash docs/gpu_run.sh
# 1. the GPU tests (every kernel against float64, the sweep's options, a training step of every model);
# 2. bench.py: the launch-settings sweep (bench.SWEEP, most promising first), the kernels beside FlexAttention
#    with the default settings and the sweep's best (bench.sweep_best; Flex's table variant last), the Reformer up
#    to 2^20 tokens, generation. Time goes first to what comes first (bench.STAGE_WEIGHT; inside a stage, cells
#    in order); bench.json and bench.md are rewritten after each stage, so a run cut short keeps them.
# Everything lands in $OUT: versions, test output, bench.json/bench.md. Figures go to docs/results.md with the
# device, the versions and this command.
set -u
OUT=${OUT:-out_gpu}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"
TRITON_INTERPRET=0 timeout 220 python -m pytest test_all.py -q -x -k gpu > "$OUT/gpu_tests.txt" 2>&1
echo "GPU tests: exit $? ($(tail -1 "$OUT/gpu_tests.txt"))"
python bench.py --stages kernel_sweep,kernels,reformer,generate --budget 300 --out_dir "$OUT/bench" \
    > "$OUT/bench.log" 2>&1
echo "bench: exit $?"
tail -c 6000 "$OUT/bench/bench.md"
