"""Kernels -> cached artifacts (PTX for GPUs, object code for the host).

The cache key covers everything that determines an artifact: the kernel's
specialisation, the source of its generator (the files defining its class hierarchy
and the codegen package), the target, the compile options, and the llvmlite / LLVM /
fusec versions. Keying on the generator rather than on its IR output lets a cache
hit skip IR construction entirely; any edit to a generator changes the key.
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from fusec.fusion.cache import KernelCache, artifact_key
from fusec.fusion.codegen.compile import compile_ir
from fusec.fusion.codegen.target import Target

COMPILE_OPTIONS = "O3 vectorize reloc=default"  # what fusion.codegen.compile does; part of every key
CODEGEN_DIR = Path(__file__).parent / "codegen"


@dataclass(frozen=True)
class Artifact:
    kernel: Any
    target: Target
    data: bytes  # PTX text (UTF-8) or a host object file
    key: str

    @property
    def suffix(self) -> str:
        return artifact_suffix(self.target)


def artifact_suffix(target: Target) -> str:
    return ".ptx" if target.is_gpu else ".o"


@lru_cache(maxsize=None)
def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def generator_digest(kernel: Any) -> str:
    """SHA-256 over the source files that generate this kernel's IR."""
    files = {str(p) for p in CODEGEN_DIR.glob("*.py")}
    untracked = []
    for cls in type(kernel).__mro__[:-1]:  # all but object
        try:
            source = inspect.getsourcefile(cls)
        except TypeError:  # defined where no file records it (exec'd code)
            source = None
        if source and Path(source).is_file():
            files.add(source)
        else:
            untracked.append(f"{cls.__module__}.{cls.__qualname__}")
    parts = [_file_digest(f) for f in sorted(files)] + untracked
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def kernel_key(kernel: Any, target: Target) -> str:
    spec = f"{kernel.name}|{kernel.describe()}|{generator_digest(kernel)}"
    return artifact_key(spec, target.fingerprint(), COMPILE_OPTIONS)


def is_cached(kernel: Any, target: Target, cache: KernelCache) -> bool:
    return cache.path(kernel_key(kernel, target), artifact_suffix(target)).is_file()


def compile_kernel(kernel: Any, target: Target, cache: KernelCache) -> Artifact:
    key = kernel_key(kernel, target)
    data = cache.get_or_build(key, artifact_suffix(target), lambda: compile_ir(kernel.build(target), target),
                              label=kernel.name)
    return Artifact(kernel, target, data, key)
