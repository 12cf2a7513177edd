"""Host graphs: a step's kernel launches run as one native function.

A decode step on the host is ~200 small launches; handing each to a thread pool costs
tens of microseconds, more than most of the kernels themselves. Like a CUDA graph, a
`HostGraph` records the launches once and replays them with one call per thread: every
thread runs its share of each launch's blocks, then meets the others at a spinning
barrier where the next launch reads what this one wrote.

The native code (`HostProgram`) depends only on which kernels run in which order; the
launches' arguments, grids and barriers come from a table. So one program, compiled once
(LLVM takes ~0.2 s for a SmolLM2 step), serves every shape of a plan: each decode
bucket and each prefill length is a new table, filled in microseconds.
"""
from __future__ import annotations

import ctypes
import itertools
import struct
from dataclasses import dataclass
from typing import Sequence

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir

from fusec.fusion.codegen.host import HostKernel, HostLauncher, grid_parts
from fusec.fusion.codegen.target import HOST, init_llvm

I32, I64, F32, VOID = ir.IntType(32), ir.IntType(64), ir.FloatType(), ir.VoidType()
_ARG_TYPES = {"ptr": I64, "i32": I32, "f32": F32}  # pointers passed as integers: no casts needed
_HEADER = 4  # table words before a launch's arguments: barrier first, threads, grid x, blocks
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

    def address(self) -> int:
        return ctypes.cast(self.kernel.fn, ctypes.c_void_p).value or 0


def signature(calls: Sequence[HostCall]) -> tuple[tuple[int, tuple[str, ...]], ...]:
    """What a program's code depends on: the kernels and their argument kinds, in order."""
    return tuple((call.address(), call.kinds) for call in calls)


class HostProgram:
    """The native step for one launch sequence over `threads` threads: `run(table)` with
    a table from `table(calls)` for any calls of the same signature."""

    def __init__(self, calls: Sequence[HostCall], threads: int) -> None:
        init_llvm()
        self.signature, self.threads = signature(calls), threads
        self._kernels = [call.kernel for call in calls]  # their code must outlive ours
        name = f"fusec_host_program_{next(_names)}"
        module = llvm.parse_assembly(str(_step_module(name, calls, threads)))
        module.verify()
        # an engine per program: dropping the program frees its code
        self._engine = llvm.create_mcjit_compiler(module, HOST.new_machine())
        self._engine.finalize_object()
        addr = self._engine.get_function_address(name)
        # step(thread, barrier state, table); ctypes releases the GIL for the call
        self._fn = ctypes.CFUNCTYPE(None, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p)(addr)

    def table(self, calls: Sequence[HostCall]) -> np.ndarray:
        """The launches' arguments, grids and barriers as this program reads them."""
        if signature(calls) != self.signature:
            raise ValueError("these launches are not the ones this program was compiled for")
        words: list[int] = []
        since_barrier: set[int] = set()  # threads that worked since the last barrier
        for call in calls:
            parts = call.parts(self.threads)
            workers = set(range(parts))
            # a barrier orders this launch after the last one unless one thread ran both
            barrier = bool(workers) and bool(since_barrier) and (since_barrier | workers) != {0}
            if barrier:
                since_barrier = set()
            since_barrier |= workers
            words += [int(barrier), parts, call.grid[0], call.grid[0] * call.grid[1]]
            words += [_word(kind, value) for kind, value in zip(call.kinds, call.values)]
        return np.array(words, np.int64)

    def run(self, table: np.ndarray, barrier: np.ndarray, launcher: HostLauncher) -> None:
        fn, at, tab = self._fn, barrier.ctypes.data, table.ctypes.data
        launcher.parallel([lambda t=t: fn(t, at, tab) for t in range(self.threads)])


class HostGraph:
    """Recorded launches bound to a program (compiled here unless one is given)."""

    def __init__(self, calls: Sequence[HostCall], launcher: HostLauncher, program: HostProgram | None = None
                 ) -> None:
        self.launcher = launcher
        self.program = program or HostProgram(calls, launcher.threads)
        self.table = self.program.table(calls)
        self._barrier = np.zeros(2, np.int32)  # arrivals, generation

    def replay(self) -> None:
        self.program.run(self.table, self._barrier, self.launcher)


def _word(kind: str, value: int | float) -> int:
    """An argument as a table word (int64): f32 by its bits, integers as themselves."""
    if kind == "f32":
        return struct.unpack("<i", struct.pack("<f", value))[0]
    return int(value) if kind == "i32" else ctypes.c_int64(int(value)).value


def _step_module(name: str, calls: Sequence[HostCall], threads: int) -> ir.Module:
    module = ir.Module(name)
    module.triple = HOST.triple
    fn = ir.Function(module, ir.FunctionType(VOID, [I32, I64, I64]), name)
    tid, state, table_addr = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    barrier = _barrier_function(module, threads)
    table = b.inttoptr(table_addr, I64.as_pointer())
    tid64 = b.sext(tid, I64)
    at = 0
    for call in calls:
        word = lambda i: b.load(b.gep(table, [ir.Constant(I64, at + i)]))  # noqa: E731
        with b.if_then(b.icmp_signed("!=", word(0), ir.Constant(I64, 0))):
            b.call(barrier, [state])
        parts, total = word(1), word(3)
        with b.if_then(b.icmp_signed("<", tid64, parts)):
            # this thread's blocks: [total * t / parts, total * (t + 1) / parts)
            lo = b.sdiv(b.mul(tid64, total), parts)
            hi = b.sdiv(b.mul(b.add(tid64, ir.Constant(I64, 1)), total), parts)
            args = [_arg(b, kind, word(_HEADER + i)) for i, kind in enumerate(call.kinds)]
            b.call(_kernel_symbol(module, call), args + [b.trunc(word(2), I32), b.trunc(lo, I32), b.trunc(hi, I32)])
        at += _HEADER + len(call.kinds)
    b.ret_void()
    return module


def _arg(b: ir.IRBuilder, kind: str, word: ir.Value) -> ir.Value:
    if kind == "ptr":
        return word
    narrow = b.trunc(word, I32)
    return narrow if kind == "i32" else b.bitcast(narrow, F32)


def _kernel_symbol(module: ir.Module, call: HostCall) -> ir.Function:
    """The kernel as an external function of the step module, named by its address (the
    JIT resolves the name through LLVM's symbol table)."""
    addr = call.address()
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
