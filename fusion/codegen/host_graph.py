"""Host graphs: a captured step's kernel launches as one native function.

A decode step on the host is ~200 small launches; handing each to a thread pool costs
tens of microseconds, more than most of the kernels themselves. Like a CUDA graph, a
`HostGraph` records the launches once (their function addresses, arguments and grids)
and compiles them into `step(thread, barrier)`: every thread runs its share of each
launch's blocks, then meets the others at a spinning barrier where the next launch
reads what this one wrote. A replay is one call per thread, not one pool round trip
per launch.
"""
from __future__ import annotations

import ctypes
import itertools
from dataclasses import dataclass
from typing import Sequence

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir

from fusec.fusion.codegen.host import HostKernel, HostLauncher, grid_parts
from fusec.fusion.codegen.target import HOST, init_llvm

I32, I64, F32, VOID = ir.IntType(32), ir.IntType(64), ir.FloatType(), ir.VoidType()
_ARG_TYPES = {"ptr": I64, "i32": I32, "f32": F32}  # pointers passed as integers: no casts needed
_names = itertools.count()


@dataclass(frozen=True)
class HostCall:
    """One recorded launch: a linked kernel, its argument values and its grid."""

    kernel: HostKernel
    kinds: tuple[str, ...]  # "ptr" | "i32" | "f32" per argument
    values: tuple[int | float, ...]
    grid: tuple[int, int]

    def parts(self, threads: int) -> int:
        """Threads that share this launch, as the pool launcher splits it."""
        return grid_parts(self.grid[0] * self.grid[1], threads)


class HostGraph:
    """A compiled step over `threads` threads; `replay` runs it once."""

    def __init__(self, calls: Sequence[HostCall], launcher: HostLauncher) -> None:
        init_llvm()
        self.launcher, self.threads = launcher, launcher.threads
        name = f"fusec_host_graph_{next(_names)}"
        module = llvm.parse_assembly(str(_step_module(name, calls, self.threads)))
        module.verify()
        # an engine per graph: dropping the graph frees its code
        self._engine = llvm.create_mcjit_compiler(module, HOST.new_machine())
        self._engine.finalize_object()
        addr = self._engine.get_function_address(name)
        self._fn = ctypes.CFUNCTYPE(None, ctypes.c_int32, ctypes.c_void_p)(addr)  # releases the GIL
        self._barrier = np.zeros(2, np.int32)  # arrivals, generation

    def replay(self) -> None:
        fn, at = self._fn, self._barrier.ctypes.data
        self.launcher.parallel([lambda t=t: fn(t, at) for t in range(self.threads)])


def _step_module(name: str, calls: Sequence[HostCall], threads: int) -> ir.Module:
    module = ir.Module(name)
    module.triple = HOST.triple
    fn = ir.Function(module, ir.FunctionType(VOID, [I32, I64]), name)
    tid, state = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    barrier = _barrier_function(module, threads)
    tid64 = b.sext(tid, I64)
    since_barrier: set[int] = set()  # threads that worked since the last barrier
    for call in calls:
        parts = call.parts(threads)
        if not parts:
            continue
        workers = set(range(parts))
        # a barrier orders this launch after the last one unless one thread ran both
        if since_barrier and (since_barrier | workers) != {0}:
            b.call(barrier, [state])
            since_barrier = set()
        since_barrier |= workers
        total = call.grid[0] * call.grid[1]
        target = _kernel_symbol(module, call)
        # this thread's blocks: [total * t / parts, total * (t + 1) / parts)
        lo = b.sdiv(b.mul(tid64, ir.Constant(I64, total)), ir.Constant(I64, parts))
        hi = b.sdiv(b.mul(b.add(tid64, ir.Constant(I64, 1)), ir.Constant(I64, total)), ir.Constant(I64, parts))
        with b.if_then(b.icmp_signed("<", tid, ir.Constant(I32, parts))):
            args = [ir.Constant(_ARG_TYPES[k], v) for k, v in zip(call.kinds, call.values)]
            b.call(target, args + [ir.Constant(I32, call.grid[0]), b.trunc(lo, I32), b.trunc(hi, I32)])
    b.ret_void()
    return module


def _kernel_symbol(module: ir.Module, call: HostCall) -> ir.Function:
    """The kernel as an external function of the step module, named by its address (the
    JIT resolves the name through LLVM's symbol table)."""
    addr = ctypes.cast(call.kernel.fn, ctypes.c_void_p).value
    name = f"fusec_kernel_{addr:x}"
    if name in module.globals:
        return module.globals[name]
    llvm.add_symbol(name, addr)
    kty = ir.FunctionType(VOID, [_ARG_TYPES[k] for k in call.kinds] + [I32, I32, I32])
    return ir.Function(module, kty, name)


def _barrier_function(module: ir.Module, threads: int) -> ir.Function:
    """barrier(state): state = [arrivals, generation] (int32). The last thread to arrive
    resets the count and bumps the generation; the others spin until it changes."""
    fn = ir.Function(module, ir.FunctionType(VOID, [I64]), "barrier")
    fn.linkage = "internal"
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    base = b.inttoptr(fn.args[0], I32.as_pointer())
    count, generation = base, b.gep(base, [ir.Constant(I32, 1)])
    gen = b.load_atomic(generation, "acquire", 4)
    arrived = b.atomic_rmw("add", count, ir.Constant(I32, 1), "acq_rel")
    last, wait, done = (fn.append_basic_block(n) for n in ("last", "wait", "done"))
    b.cbranch(b.icmp_signed("==", arrived, ir.Constant(I32, threads - 1)), last, wait)
    b.position_at_end(last)
    b.store_atomic(ir.Constant(I32, 0), count, "monotonic", 4)
    b.store_atomic(b.add(gen, ir.Constant(I32, 1)), generation, "release", 4)
    b.branch(done)
    b.position_at_end(wait)
    if HOST.triple.startswith("x86_64"):  # spin politely: pause between polls
        b.call(ir.Function(module, ir.FunctionType(VOID, []), "llvm.x86.sse2.pause"), [])
    now = b.load_atomic(generation, "acquire", 4)
    b.cbranch(b.icmp_signed("==", now, gen), wait, done)
    b.position_at_end(done)
    b.ret_void()
    return fn
