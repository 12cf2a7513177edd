"""Time from starting `fusec serve` to its first answered completion, as a user sees it:
the process starts, loads the model, compiles or finds its kernels, captures graphs,
opens the port, and answers one 16-token request. Run twice: the first run fills the
kernel cache (FUSEC_CACHE_DIR, a fresh folder), the second finds it warm.
Usage (on a GPU machine, the server's packages installed):
  python bench/serve_startup.py [--model bench/models/qwen2.5-7b] [-- extra serve flags]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_answer(cmd: list[str], env: dict, timeout: float,
                 answered: Callable[[subprocess.Popen], None] | None = None) -> tuple[float, str]:
    """Seconds from Popen to the first completion's response, and its text; `answered`
    sees the server process once it has answered, before it is stopped."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # token ids: the benchmark configs ship no tokenizer
    body = json.dumps({"model": "m", "prompt": [1, 2, 3, 4], "max_tokens": 16, "temperature": 0}).encode()
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([*cmd, "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            while time.perf_counter() - start < timeout:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"server exited:\n{log.read()[-3000:]}")
                try:
                    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
                    with urllib.request.urlopen(req, timeout=30) as resp:
                        text = json.loads(resp.read())["choices"][0]["text"]
                    seconds = time.perf_counter() - start
                    if answered is not None:
                        answered(proc)
                    return seconds, text
                except urllib.error.HTTPError as e:  # answered, with an error: not a startup wait
                    raise RuntimeError(f"HTTP {e.code}: {e.read()[:500]!r}") from None
                except OSError:
                    time.sleep(0.05)
            log.seek(0)
            raise RuntimeError(f"no answer in {timeout:.0f} s; the server's log ends:\n{log.read()[-3000:]}")
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "qwen2.5-7b"))
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("serve_args", nargs="*", help="extra `fusec serve` flags (after --)")
    args = ap.parse_args()
    fusec = shutil.which("fusec")
    base = [fusec] if fusec else [sys.executable, "-P", "-m", "fusec.cli.main"]
    cmd = [*base, "serve", "--model", args.model, "--served-model-name", "m", "--load-format", "dummy",
           "--dtype", "float16", "--device", "cuda", *args.serve_args]
    cache = tempfile.mkdtemp(prefix="fusec-cache-")
    env = {**os.environ, "FUSEC_CACHE_DIR": cache}
    try:
        for label in ("cold kernel cache", "warm kernel cache"):
            seconds, text = first_answer(cmd, env, args.timeout)
            print(f"{label}: first completion answered {seconds:.1f} s after `fusec serve` started "
                  f"({len(text)} chars)", flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
