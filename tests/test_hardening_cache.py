"""Corrupt kernel-cache entries, as a bad disk or a hostile writer leaves them: rebuilt
from source with one warning line, never handed to the JIT linker (which aborts the
process on a malformed object) or the CUDA driver."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np

from fusec.fusion.cache import MAGIC, KernelCache
from fusec.fusion.codegen.target import parse_arch
from fusec.fusion.compiler import compile_kernel, kernel_key
from fusec.fusion.dtypes import DType
from fusec.kernels.elementwise import Add

COLS = (300, 517, 1100)  # one Add kernel each
# Loads and runs the kernels in a fresh process: an LLVM abort shows as a signal's rc.
RUN = """
import logging, sys
from pathlib import Path
import numpy as np
from fusec.fusion.cache import KernelCache
from fusec.fusion.dtypes import DType
from fusec.kernels.elementwise import Add
from fusec.runtime.backends.cpu import HostDevice

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
cache = KernelCache(Path(sys.argv[1]))
dev = HostDevice(cache, threads=1)
rng = np.random.default_rng(7)
for cols in map(int, sys.argv[2:]):
    spec = Add(cols=cols, act=DType.F32)
    a, b = (rng.standard_normal((5, cols)).astype(np.float32) for _ in range(2))
    y = np.full_like(a, np.nan)
    dev.launch_kernel(spec, [a, b, y, np.int32(5)], spec.grid({"num_rows": 5}))
    assert np.array_equal(y, a + b), cols
print("stats", cache.stats.hits, cache.stats.misses, cache.stats.corrupt)
"""


def run_kernels(cache_dir: Path) -> tuple[list[str], tuple[int, int, int]]:
    """The run's warning lines and (hits, misses, corrupt); fails on any crash."""
    res = subprocess.run([sys.executable, "-c", RUN, str(cache_dir), *map(str, COLS)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"rc {res.returncode}: {res.stderr[-2000:]}"
    stats = next(line for line in res.stdout.splitlines() if line.startswith("stats"))
    hits, misses, corrupt = map(int, stats.split()[1:])
    return [line for line in res.stderr.splitlines() if line.startswith("WARNING")], (hits, misses, corrupt)


def entry(cache_dir: Path, cols: int, arch: str = "host") -> Path:
    target = parse_arch(arch)
    return KernelCache(cache_dir).path(kernel_key(Add(cols=cols, act=DType.F32), target),
                                      ".ptx" if target.is_gpu else ".o")


def payload(path: Path) -> bytes:
    return path.read_bytes()[len(MAGIC) + 65:]


def rewrite(path: Path, data: bytes) -> None:
    """Store `data` as the entry, its checksum recomputed so the cache's check passes."""
    path.write_bytes(MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + data)


def test_rewritten_entries_are_rebuilt_without_a_crash(tmp_path):
    cache = tmp_path / "cache"
    assert run_kernels(cache) == ([], (0, 3, 0))
    rng = np.random.default_rng(0)
    objects = {cols: payload(entry(cache, cols)) for cols in COLS}
    # random bytes over the section headers and symbol table (code bytes cannot be checked)
    tail = bytearray(objects[300])
    tail[-200:] = rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
    rewrite(entry(cache, 300), bytes(tail))
    rewrite(entry(cache, 517), objects[517][: len(objects[517]) // 2])  # truncated
    rewrite(entry(cache, 1100), objects[300])  # another kernel's object under this key
    warnings, stats = run_kernels(cache)
    assert stats == (0, 3, 3)
    assert len(warnings) == 1 and "corrupt" in warnings[0] and str(cache) in warnings[0], warnings
    assert run_kernels(cache) == ([], (3, 0, 0))  # rebuilt entries were stored


def test_bad_disk_entries_give_one_warning(tmp_path):
    cache = tmp_path / "cache"
    run_kernels(cache)
    rng = np.random.default_rng(1)
    for cols in COLS:  # flipped bytes, checksum left alone
        path = entry(cache, cols)
        data = bytearray(path.read_bytes())
        at = int(rng.integers(len(MAGIC) + 65, len(data) - 8))
        data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])
        path.write_bytes(bytes(data))
    warnings, stats = run_kernels(cache)
    assert stats == (0, 3, 3) and len(warnings) == 1, warnings


def test_ptx_without_its_entry_is_rebuilt(tmp_path):
    cache, kernel, target = KernelCache(tmp_path), Add(cols=300, act=DType.F32), parse_arch("sm_90")
    good = compile_kernel(kernel, target, cache).data
    path = entry(tmp_path, 300, "sm_90")
    rewrite(path, good.replace(f".entry {kernel.name}".encode(), b".entry other_kernel"))
    assert compile_kernel(kernel, target, cache).data == good
    assert cache.stats.corrupt == 1 and payload(path) == good
