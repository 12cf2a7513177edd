#!/usr/bin/env bash
# GPU checks in one call on a GPU machine (e.g. through the device tool):
# install carried wheels if any (./.whl, git-ignored), install fusec without touching the
# machine's own packages, run the GPU tests, then print a short table last.
#   bash bench/gpu_check.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${SITE:-/tmp/fusec-site}
rm -rf "$SITE"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" .
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
log=${OUT:-/tmp}/gpu_tests.log
(cd tests && PYTHONUNBUFFERED=1 python3 -m pytest -q -p no:cacheprovider --rootdir=. test_gpu.py) | tee "$log"
echo
echo "| check | result |"
echo "| --- | --- |"
echo "| GPU tests (tests/test_gpu.py) | $(tail -1 "$log") |"
