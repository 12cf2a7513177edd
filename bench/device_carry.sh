#!/usr/bin/env bash
# Prepare ./.whl (git-ignored) for a GPU machine without network that has Python 3.12,
# torch, transformers, cuda-core and cuda-bindings, but not nvmath-python or gguf:
#   .whl/*.whl                      wheels bench/gpu_check.sh installs beside fusec
#   .whl/smollm2.gguf.part{aa,ab}   the default model in pieces, each under one carry's
#                                   64 MiB; carry the first with the wheels, the second in
#                                   a later call (files already on the machine stay there)
#   bash bench/device_carry.sh      (from the repository root, with network)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl nvmath-python==1.0.0 gguf==0.19.0
gguf=$(.venv/bin/python -c "from fusec.models.loader import default_model_path; print(default_model_path())")
split -b 48M "$gguf" .whl/smollm2.gguf.part
ls -l .whl
