#!/usr/bin/env bash
# One-shot GPU check for a lent device machine (CuPy + CUDA PyTorch preinstalled, no network), most important first:
#   0. the CUDA graph and kernel fusion tests alone (tests/test_graph.py, tests/test_fuse.py on CuPy: a capture
#      that fails shows its traceback here, early; every backend.fuse function against the plain one, and whether
#      CuPy fused it at all);
#   0b. trainer_graph: the Trainer's captured loop (tests/test_graph_step.py on CuPy: replays against the eager loop,
#      resume, validation with a smaller last batch);
#   0c. loop: the training loop end to end, Trainer (captured) against a PyTorch loop, images/s at OS 16
#      (minideeplab bench --loop; LOOP_STEPS steps per side, default 100), results in $W/loop;
#   1. the model benchmark at OS 16 (the row) with our steps replayed as a captured CUDA graph, against
#      PyTorch CUDA (eager), no profile;
#   2. the same, ours only, with the k x k convs forced to kn2row (the CPU's path, the GPU's default until this
#      round) instead of "gather", which "auto" now picks on a GPU for its fewer array operations (count_ops.py:
#      3812 per eager training step against 6634);
#   3. the same row with our steps run eagerly (default paths), against PyTorch, with the per-layer-type profile;
#   4. the test suite on CuPy (every test parametrised by the xp/device fixture, CuPy half only; tests/test_graph.py
#      checks that graph replays train exactly as eager steps do, and shows the traceback if a capture fails);
#   5. the time per step of the demo's training on CuPy (captured, Trainer's default; demo_eager: --no-cuda-graph).
# Default parts (timeouts sum to 565 s, one call): graph_tests trainer_graph loop demo tests. The benchmark rows of
# the twelfth round (graph kn2row eager) and demo_eager run by name. PARTS picks parts by name, in this order:
#   graph_tests trainer_graph loop graph kn2row eager tests demo demo_eager
#   (GRAPH_OS="32 16 8": the graph rows at those output strides)
# Results land in a work folder packed into $OUT/results.tgz after each part (the device tool brings back at most
# 8 files; a part killed by the call's limit still leaves the earlier ones), the last lines of each in
# $OUT/summary.txt.
# Usage (repo root): OUT=/some/dir [PARTS="graph_tests graph"] bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/minideeplab-gpu}
W=${GPU_CHECK_WORK:-/tmp/minideeplab-gpu-work}
PARTS=" ${PARTS:-graph_tests trainer_graph loop demo tests} "
mkdir -p "$OUT" "$W"
export PYTHONPATH=. MPLBACKEND=Agg CUPY_TF32=0
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import cupy, numpy, torch; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} > "$W/env.txt" 2>&1
XDIST=""   # the CuPy half of the suite in parallel workers where pytest-xdist is there (16 cores, one GPU)
python3 -c "import xdist" 2>/dev/null && XDIST="-n 6"
pack() {
    tar czf "$OUT/results.tgz.part" -C "$W" . && mv "$OUT/results.tgz.part" "$OUT/results.tgz"
    tail -n 3 "$W"/*.txt > "$OUT/summary.txt.part" 2>&1; mv "$OUT/summary.txt.part" "$OUT/summary.txt"
}
run() {   # run PART NAME TIMEOUT command...: output to $W/NAME.txt, then its exit status and duration
    local part=$1 name=$2 limit=$3 start
    shift 3
    [[ "$PARTS" == *" $part "* ]] || return 0
    start=$(date +%s)
    timeout "$limit" "$@" > "$W/$name.txt" 2>&1
    echo "$name exit $? in $(( $(date +%s) - start )) s" >> "$W/$name.txt"
    pack
}
run graph_tests pytest_graph "${GRAPH_TEST_TIMEOUT:-70}" python3 -m pytest -q -p no:cacheprovider -k "cupy or cuda" \
    tests/test_cublas.py tests/test_graph.py tests/test_fuse.py
run trainer_graph pytest_trainer_graph "${TRAINER_GRAPH_TIMEOUT:-120}" python3 -m pytest -q -p no:cacheprovider \
    -k "cupy or cuda" tests/test_graph_step.py
run loop bench_loop_cuda "${LOOP_TIMEOUT:-150}" python3 -m minideeplab.bench --loop --device cuda --os 16 \
    --loop-steps ${LOOP_STEPS:-100} --out "$W/loop"
run graph bench_cuda_graph "${GRAPH_TIMEOUT:-110}" python3 -m minideeplab.bench --device cuda --os ${GRAPH_OS:-16} --cuda-graph \
    --repeats ${GRAPH_REPEATS:-10} --no-profile --out "$W/graph"
run kn2row bench_cuda_graph_kn2row "${KN2ROW_TIMEOUT:-45}" python3 -m minideeplab.bench --device cuda --os 16 \
    --cuda-graph --no-torch --no-profile --conv-algorithm kn2row --out "$W/graph_kn2row"
run eager bench_cuda "${BENCH_TIMEOUT:-130}" python3 -m minideeplab.bench --device cuda --os 16 ${EAGER_FLAGS:-} \
    --out "$W"
run tests pytest_cupy "${TEST_TIMEOUT:-165}" python3 -m pytest -q -p no:cacheprovider $XDIST -k "cupy or cuda" tests \
    --ignore=tests/test_notebooks.py
# the demo's configuration (DenseNet121, OS 16, 8 images of 128 px, AdamW), 40 steps, timed per step (the log's
# s/step is the running mean: the warm-up steps and the capture are in it)
DEMO_ARGS="--model densenet121 --output-stride 16 --image-size 128 --batch-size 8 --optimizer adamw --lr 2e-3
    --epochs 1 --train-size 320 --val-size 16 --quiet --log-every 5"
run demo train_cuda "${TRAIN_TIMEOUT:-60}" python3 -m minideeplab.cli train --device cuda $DEMO_ARGS \
    --out /tmp/minideeplab-gpu-run
cp /tmp/minideeplab-gpu-run/history.csv "$W/train_history.csv" 2>/dev/null && pack
run demo_eager train_cuda_eager "${TRAIN_TIMEOUT:-60}" python3 -m minideeplab.cli train --device cuda $DEMO_ARGS \
    --no-cuda-graph --out /tmp/minideeplab-gpu-run-eager
cp /tmp/minideeplab-gpu-run-eager/history.csv "$W/train_history_eager.csv" 2>/dev/null && pack
cat "$OUT/summary.txt"
