"""Kernels -> cached artifacts (PTX for GPUs, object code for the host).

The cache key covers everything that determines an artifact: the kernel's
specialisation (`describe()`: sizes, dtypes, flags), every source its IR can come from
(the whole kernel library, the codegen package and `fusion/dtypes.py`, plus any class
of its hierarchy defined outside them), the target, the compile options, and the
llvmlite / LLVM / fusec versions. Keying on the generator rather than on its IR output
lets a cache hit skip IR construction entirely; any edit to a generator changes the key.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from fusec.fusion.artifact_check import check_artifact
from fusec.fusion.cache import KernelCache, artifact_key
from fusec.fusion.codegen.compile import compile_ir
from fusec.fusion.codegen.target import Target

COMPILE_OPTIONS = "O3 vectorize reloc=default"  # what fusion.codegen.compile does; part of every key
# Whole packages, not a kernel's class hierarchy: a kernel's IR also comes from helpers in
# other modules (SampleRows draws through kernels/random.py, where none of its classes live).
GENERATOR_SOURCES = ("fusec.kernels", "fusec.fusion.codegen", "fusec.fusion.dtypes")


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


def _source_path(module: str) -> Path:
    """A package's folder or a module's file, found without importing it."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, module
    return Path(spec.origin).parent if spec.submodule_search_locations is not None else Path(spec.origin)


GENERATOR_ROOTS: tuple[Path, ...] = tuple(_source_path(m) for m in GENERATOR_SOURCES)


@lru_cache(maxsize=None)
def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@lru_cache(maxsize=None)
def library_digest(roots: tuple[Path, ...]) -> str:
    """SHA-256 over every `.py` under `roots` and their names (a moved or new file
    changes it). Cached: every kernel's key needs it at startup, and sources do not
    change under a running process."""
    h = hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            h.update(f"{path.relative_to(root.parent).as_posix()}\0{_file_digest(str(path))}\0".encode())
    return h.hexdigest()


def generator_digest(kernel: Any) -> str:
    """SHA-256 over the sources that generate this kernel's IR: the generator packages,
    and the file of any class in its hierarchy defined outside them (a kernel written
    elsewhere, like docs/adding-a-pattern.md's example)."""
    roots = GENERATOR_ROOTS  # looked up per call, so a test can point it at a copy
    parts = [library_digest(roots)]
    for cls in type(kernel).__mro__[:-1]:  # all but object
        try:
            source = inspect.getsourcefile(cls)
        except TypeError:  # defined where no file records it (exec'd code)
            source = None
        if not source or not Path(source).is_file():
            parts.append(f"{cls.__module__}.{cls.__qualname__}")
        elif not any(Path(source).is_relative_to(root) for root in roots):
            parts.append(_file_digest(source))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def kernel_key(kernel: Any, target: Target) -> str:
    spec = f"{kernel.name}|{kernel.describe()}|{generator_digest(kernel)}"
    return artifact_key(spec, target.fingerprint(), COMPILE_OPTIONS)


def is_cached(kernel: Any, target: Target, cache: KernelCache) -> bool:
    return cache.path(kernel_key(kernel, target), artifact_suffix(target)).is_file()


def compile_kernel(kernel: Any, target: Target, cache: KernelCache) -> Artifact:
    key = kernel_key(kernel, target)
    data = cache.get_or_build(key, artifact_suffix(target), lambda: compile_ir(kernel.build(target), target),
                              label=kernel.name, check=lambda payload: check_artifact(payload, kernel.name, target))
    return Artifact(kernel, target, data, key)
