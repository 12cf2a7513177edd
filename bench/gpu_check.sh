#!/usr/bin/env bash
# GPU checks in one call on a GPU machine (e.g. through the device tool):
#  1. install carried wheels if any (./.whl/*.whl, git-ignored: fastapi, uvicorn,
#     pydantic, gguf, nvmath-python for a machine without them) and fusec, into a
#     folder on PYTHONPATH, without touching the machine's own packages;
#  2. join the SmolLM2 GGUF from parts if carried (./.whl/smollm2.gguf.part*: the file is
#     larger than one carry, so it travels in pieces over several calls; make them with
#     `split -b 48M SmolLM2-135M-Instruct.Q4_1.gguf .whl/smollm2.gguf.part`);
#  3. run the GPU tests;
#  4. run the GPU standard workload (Qwen2.5-7B shape, dummy f16 weights) unless
#     SKIP_BENCH=1: `fusec bench` as the CUDA backend issue gives it, then
#     bench/gpu_standard.py (fusec beside HF transformers, vLLM's published figures;
#     writes bench/results/gpu-*) unless SKIP_STANDARD=1; print a table last.
#   bash bench/gpu_check.sh            (from the repository root; results land in $OUT)
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${SITE:-/tmp/fusec-site}
OUT=${OUT:-/tmp}
rm -rf "$SITE"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" .
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/smollm2.gguf.part*" > /dev/null; then
  cat .whl/smollm2.gguf.part* > /tmp/smollm2.gguf
  export FUSEC_SMOLLM2_GGUF=/tmp/smollm2.gguf
fi
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "unknown GPU")
echo "$gpu"
log=$OUT/gpu_tests.log
(cd tests && PYTHONUNBUFFERED=1 python3 -m pytest -q -p no:cacheprovider --rootdir=. test_gpu.py test_sampling.py) \
  | tee "$log" || true
bench_json=$OUT/gpu-bench-qwen2.5-7b.json
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  python3 -m fusec.cli.main bench --device cuda --model bench/models/qwen2.5-7b --load-format dummy \
    --dtype float16 --n 1,16,64,128 --input-len 32 --output-len 128 --profile --json "$bench_json" \
    | tee "$OUT/gpu_bench.log"
  if [ "${SKIP_STANDARD:-0}" != 1 ]; then
    python3 bench/gpu_standard.py | tee "$OUT/gpu_standard.log"
    cp bench/results/gpu-* "$OUT/" 2>/dev/null || true
  fi
fi
echo
echo "GPU: $gpu"
echo "| check | result |"
echo "| --- | --- |"
echo "| tests/test_gpu.py + test_sampling.py | $(tail -1 "$log") |"
if [ -f "$bench_json" ]; then
  python3 - "$bench_json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
for r in report["results"]:
    print(f"| Qwen2.5-7B f16 dummy, N={r['n']} | {r['output_tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} ms, "
          f"ITL p50 {r['itl_p50_ms']:.1f} ms |")
EOF
fi
