"""Loading host-target object code and launching kernels on CPU threads."""
from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import llvmlite.binding as llvm

from fusec.fusion.codegen.builder import Param
from fusec.fusion.codegen.target import HOST, init_llvm

_CTYPES = {"ptr": ctypes.c_void_p, "i32": ctypes.c_int32, "f32": ctypes.c_float}
MIN_BLOCKS_PER_THREAD = 4  # below this a grid runs on the calling thread


class HostKernel:
    """A linked kernel: `fn(*args, grid_x, first_block, end_block)` through ctypes."""

    def __init__(self, name: str, fn: ctypes._CFuncPtr, linker: "HostLinker") -> None:
        self.name, self.fn = name, fn
        self.linker = linker  # the engine owning the code must outlive the pointer


class HostLinker:
    """Links kernels' object code in memory with one MCJIT engine."""

    def __init__(self) -> None:
        init_llvm()
        self.engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), HOST.new_machine())
        self.kernels: dict[str, HostKernel] = {}

    def load(self, obj: bytes, name: str, params: Sequence[Param]) -> HostKernel:
        if name in self.kernels:
            return self.kernels[name]
        self.engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
        self.engine.finalize_object()
        addr = self.engine.get_function_address(name)
        if not addr:
            raise RuntimeError(f"kernel {name} not found in its object code")
        types = [_CTYPES[p.kind] for p in params] + [ctypes.c_int32] * 3
        # CFUNCTYPE calls release the GIL, so blocks run in parallel on threads.
        kernel = HostKernel(name, ctypes.CFUNCTYPE(None, *types)(addr), self)
        self.kernels[name] = kernel
        return kernel


def split(total: int, parts: int) -> list[tuple[int, int]]:
    """[0, total) in `parts` contiguous, near-equal, non-empty ranges."""
    bounds = [total * i // parts for i in range(parts + 1)]
    return [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


def grid_parts(total: int, threads: int) -> int:
    """Threads that share a grid of `total` blocks: small grids stay on one."""
    return min(threads, max(1, total // MIN_BLOCKS_PER_THREAD)) if total else 0


class HostLauncher:
    """Runs a grid of blocks, split into contiguous ranges over a thread pool."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="fusec-host") if self.threads > 1 else None

    def launch(self, module: HostKernel, args: Sequence[int | float], grid: tuple[int, int]) -> None:
        gx, gy = grid
        total = gx * gy
        if total == 0:
            return
        parts = grid_parts(total, self.threads)
        if parts == 1 or self.pool is None:
            module.fn(*args, gx, 0, total)
            return
        (first, *rest) = split(total, parts)
        futures = [self.pool.submit(module.fn, *args, gx, lo, hi) for lo, hi in rest]
        module.fn(*args, gx, *first)  # the calling thread takes the first share
        for f in futures:
            f.result()

    def parallel(self, tasks: Sequence) -> None:
        """Run no-argument callables (that release the GIL) over the threads, the first inline."""
        if self.pool is None or len(tasks) == 1:
            for task in tasks:
                task()
            return
        futures = [self.pool.submit(task) for task in tasks[1:]]
        tasks[0]()
        for f in futures:
            f.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
