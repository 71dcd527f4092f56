#!/usr/bin/env bash
# moemix's GPU checks in one run: the CUDA tests, then benchmarks/moe_layer.py on CUDA in float32 and in
# bfloat16, the latter with megablocks as a peer when it can be built, and benchmarks/grouped_mm.py in
# both dtypes. Logs, JSON and tables go to OUT_DIR.
#
#     bash benchmarks/cuda_suite.sh OUT_DIR [SDIST_DIR]
#
# Run from the repository root with a Python whose torch sees a GPU (`python3`, or $PYTHON). moemix is
# imported from the checkout; the CUDA tests need pytest and hypothesis, the peers transformers.
#
# megablocks (0.10) needs a CUDA build of its own kernels and of grouped_gemm (0.3) with this torch and
# nvcc. SDIST_DIR holds their source distributions and stanford-stk's (0.7.1), built offline with
# `pip --no-build-isolation` into a folder put on PYTHONPATH for the bfloat16 run only; their version
# pins on torch are ignored (--no-deps), and two build fixes for CUDA 13 and C++20 are applied first. Fetch them where PyPI is reachable (`pip download` cannot
# prepare megablocks' metadata without a GPU, so take the files themselves):
#     base=https://files.pythonhosted.org/packages
#     curl -sO $base/4d/25/ecff9513c08530e1f4366994c7dc08c18a9f43d8146a454dac3b4037e4d1/megablocks-0.10.0.tar.gz
#     curl -sO $base/1a/90/d255544a8da444fdfab7287850316d2c7961003586a35d3042787982e66c/grouped_gemm-0.3.0.tar.gz
#     curl -sO $base/f6/ae/eeb2c3bd17fa94ed36530d53a8c06acf2f75a14f8f12aa701f6cf2504203/stanford_stk-0.7.1.tar.gz
# Without SDIST_DIR the bfloat16 run uses whatever megablocks is importable, if any (the benchmark
# notes why it was skipped). The build runs while the tests do, and is waited for before timing; it is
# given BUILD_TIMEOUT seconds (300), after which the bfloat16 run goes on without megablocks. The float32 layer
# benchmark and the grouped_mm benchmark need no peer and run during the build, which is left 4 of the cores
# (MAX_JOBS).
#
# Files in OUT_DIR: summary.txt, tests.log, build.log; per dtype (float32, bfloat16) cuda_DTYPE.json and
# bench_DTYPE.log (the layer benchmark), grouped_mm_DTYPE.json/.md/.log. The exit status is that of the
# last failing step.
set -uo pipefail
OUT_DIR=${1:?usage: bash benchmarks/cuda_suite.sh OUT_DIR [SDIST_DIR]}
SDIST_DIR=${2:-}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
say() { echo "$*" | tee -a "$OUT_DIR/summary.txt"; }
: > "$OUT_DIR/summary.txt"

"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, torch.cuda.get_device_name(), torch.cuda.device_count(), 'GPU(s)')" \
    | tee -a "$OUT_DIR/summary.txt" || exit 1

PEERS_SITE=""
build_pid=""
if [ -n "$SDIST_DIR" ]; then
    PEERS_SITE=$(mktemp -d)
    arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    nvcc_path=$(readlink -f "$(command -v nvcc)" 2>/dev/null || true)
    (
        export TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-$(( $(nproc) > 8 ? $(nproc) - 4 : 4 ))}"
        [ -n "${CUDA_HOME:-}" ] || [ -z "$nvcc_path" ] || export CUDA_HOME=$(dirname "$(dirname "$nvcc_path")")
        src=$(mktemp -d)
        for name in stanford_stk grouped_gemm megablocks; do tar xzf "$SDIST_DIR/$name"-*.tar.gz -C "$src"; done
        # CUDA 13's CCCL dropped cub's debug_synchronous argument; torch >= 2.10's headers need C++20.
        "$PYTHON" - "$src" <<'PATCH'
import glob, re, sys
def patch(pattern, old, new):
    for path in glob.glob(f"{sys.argv[1]}/{pattern}"):
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(re.sub(old, new, text))
patch("megablocks-*/csrc/cumsum.h", r",\s*debug_synchronous\)\)", "))")
patch("grouped_gemm-*/setup.py", r'"-std=c\+\+17"', '"-std=c++20"')
PATCH
        time timeout "${BUILD_TIMEOUT:-300}" "$PYTHON" -m pip install --no-deps --no-build-isolation --no-index \
            --no-cache-dir --target "$PEERS_SITE" "$src"/stanford_stk-* "$src"/grouped_gemm-* "$src"/megablocks-*
    ) > "$OUT_DIR/build.log" 2>&1 &
    build_pid=$!
fi

# The layer benchmark in one dtype, with extra entries on PYTHONPATH (the peers' site) when given.
layer_benchmark() {
    local dtype=$1 site=${2:-}
    PYTHONPATH="$PYTHONPATH${site:+:$site}" "$PYTHON" benchmarks/moe_layer.py --device cuda --dtype "$dtype" \
        --quick --layouts sorted,padded,grouped_mm --json "$OUT_DIR/cuda_$dtype.json" \
        > "$OUT_DIR/bench_$dtype.log" 2>&1
    local rc=$?
    say "benchmark $dtype: exit $rc"
    [ "$rc" -eq 0 ] || { status=$rc; tail -n 20 "$OUT_DIR/bench_$dtype.log"; }
}

# The test files that exercise the GPU (each skips without one); NCCL runs on up to 2 GPUs.
"$PYTHON" -m pytest -q -p no:cacheprovider tests/layers/test_cuda.py tests/mix/test_cuda.py \
    tests/parallel/test_nccl.py 2>&1 | tee "$OUT_DIR/tests.log" | tail -n 5
rc=${PIPESTATUS[0]}
say "tests: exit $rc"
[ "$rc" -eq 0 ] || status=$rc

# What needs no peer build is timed while the build goes on (the build leaves 4 cores free).
layer_benchmark float32
for dtype in float32 bfloat16; do
    "$PYTHON" benchmarks/grouped_mm.py --device cuda --dtype "$dtype" --json "$OUT_DIR/grouped_mm_$dtype.json" \
        --markdown "$OUT_DIR/grouped_mm_$dtype.md" > "$OUT_DIR/grouped_mm_$dtype.log" 2>&1
    rc=$?
    say "grouped_mm $dtype: exit $rc"
    [ "$rc" -eq 0 ] || { status=$rc; tail -n 20 "$OUT_DIR/grouped_mm_$dtype.log"; }
done

if [ -n "$build_pid" ]; then
    wait "$build_pid"
    rc=$?
    say "megablocks build: exit $rc ($(grep -m1 '^real' "$OUT_DIR/build.log" || echo 'no time'))"
    if [ "$rc" -ne 0 ]; then
        tail -n 30 "$OUT_DIR/build.log"
        PEERS_SITE=""
    fi
fi

layer_benchmark bfloat16 "$PEERS_SITE"
grep -h -A 12 '^| case' "$OUT_DIR"/bench_*.log "$OUT_DIR"/grouped_mm_*.md
exit "$status"
