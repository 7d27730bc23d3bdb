#!/usr/bin/env bash
# One-shot GPU check for a lent device machine (CuPy + CUDA PyTorch preinstalled, no network):
#   the test suite on CuPy (every test parametrised by the xp/device fixture, CuPy half only),
#   the model benchmark against PyTorch CUDA at OS 16 (the row; as is and with the 3x3 convs through
#   im2col), and the time per step of the demo's training on CuPy. Default timeouts sum to 570 s (one call).
# Usage (repo root): OUT=/some/dir bash benchmarks/gpu_check.sh     (results land in $OUT)
set -u
OUT=${OUT:-/tmp/minideeplab-gpu}
mkdir -p "$OUT"
export PYTHONPATH=. MPLBACKEND=Agg CUPY_TF32=0
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import cupy, numpy, torch; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1
start=$(date +%s)
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -k "cupy or cuda" tests \
    --ignore=tests/test_notebooks.py > "$OUT/pytest_cupy.txt" 2>&1
echo "pytest exit $? in $(( $(date +%s) - start )) s" >> "$OUT/pytest_cupy.txt"
start=$(date +%s)
timeout "${BENCH_TIMEOUT:-150}" python3 -m minideeplab.bench --device cuda --os 16 --out "$OUT" > "$OUT/bench_cuda.txt" 2>&1
echo "bench exit $? in $(( $(date +%s) - start )) s" >> "$OUT/bench_cuda.txt"
start=$(date +%s)
# the same row with the stride-1 3x3 convs forced through im2col: fewer, larger array operations (count_ops.py:
# 9526 against 11305 per training step), which may suit a launch-bound GPU better than kn2row; ours only
timeout "${IM2COL_TIMEOUT:-90}" python3 -m minideeplab.bench --device cuda --os 16 --no-torch --no-profile \
    --conv-algorithm im2col --out "$OUT/im2col" > "$OUT/bench_cuda_im2col.txt" 2>&1
echo "bench im2col exit $? in $(( $(date +%s) - start )) s" >> "$OUT/bench_cuda_im2col.txt"
start=$(date +%s)
# the demo's configuration (DenseNet121, OS 16, 8 images of 128 px, AdamW), 40 steps, timed per step
timeout "${TRAIN_TIMEOUT:-90}" python3 -m minideeplab.cli train --device cuda --model densenet121 --output-stride 16 \
    --image-size 128 --batch-size 8 --optimizer adamw --lr 2e-3 --epochs 1 --train-size 320 --val-size 16 \
    --quiet --log-every 5 --out /tmp/minideeplab-gpu-run > "$OUT/train_cuda.txt" 2>&1
echo "train exit $? in $(( $(date +%s) - start )) s" >> "$OUT/train_cuda.txt"
cp /tmp/minideeplab-gpu-run/history.csv "$OUT/train_history.csv" 2>/dev/null
tail -n 3 "$OUT"/*.txt
