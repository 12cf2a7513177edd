"""Kernels -> cached artifacts (PTX for GPUs, object code for the host)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from fusec.fusion.cache import KernelCache, artifact_key
from fusec.fusion.codegen.compile import compile_ir
from fusec.fusion.codegen.target import Target

COMPILE_OPTIONS = "O3 vectorize reloc=default"  # part of every cache key


@dataclass(frozen=True)
class Artifact:
    kernel: Any
    target: Target
    data: bytes  # PTX text (UTF-8) or a host object file
    key: str

    @property
    def suffix(self) -> str:
        return ".ptx" if self.target.is_gpu else ".o"


def compile_kernel(kernel: Any, target: Target, cache: KernelCache) -> Artifact:
    ir_text = kernel.build(target)
    key = artifact_key(ir_text, target.fingerprint(), COMPILE_OPTIONS)
    suffix = ".ptx" if target.is_gpu else ".o"
    data = cache.get_or_build(key, suffix, lambda: compile_ir(ir_text, target), label=kernel.name)
    return Artifact(kernel, target, data, key)


def compile_kernels(kernels: Iterable[Any], target: Target, cache: KernelCache, progress=None) -> list[Artifact]:
    out = []
    for kernel in kernels:
        out.append(compile_kernel(kernel, target, cache))
        if progress is not None:
            progress(kernel)
    return out
