"""An SPMD kernel builder over llvmlite.ir, with one body for two targets.

A kernel runs as a grid of blocks, each with `lanes()` lanes. On NVPTX lanes are
threads (a multiple of 32), reductions are warp shuffles plus shared memory, shared
arrays live in shared memory. On the host a block has one lane, reductions are the
identity, and an exported launcher loops over a range of blocks so the backend can
split the grid across CPU threads. Write every kernel to be correct for any lane
count: that is what lets the host target check GPU kernels' arithmetic and indexing.

Values are llvmlite values: i32 for indices, float for data (loads convert f16/bf16
to float, stores convert back), i64 for large offsets.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

from llvmlite import ir

from fusec.fusion.codegen.target import Target
from fusec.fusion.dtypes import DType

F32, F16, I16, I32, I64, I1 = ir.FloatType(), ir.HalfType(), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.IntType(1)
PTR = ir.PointerType()
FAST = ("reassoc", "contract")  # lets LLVM vectorize and reorder reductions
WARP = 32
PARAM_TYPES = {"ptr": PTR, "i32": I32, "f32": F32}


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "ptr" | "i32" | "f32"


class Var:
    """A mutable scalar (an alloca that LLVM promotes to a register)."""

    def __init__(self, kb: "KernelBuilder", typ: ir.Type, init: ir.Value) -> None:
        self.kb, self.typ = kb, typ
        self.ptr = kb._alloca(typ)
        kb.b.store(init, self.ptr)

    def get(self) -> ir.Value:
        return self.kb.b.load(self.ptr, typ=self.typ)

    def set(self, value: ir.Value) -> None:
        self.kb.b.store(value, self.ptr)


class KernelBuilder:
    def __init__(self, name: str, target: Target, params: Sequence[Param]) -> None:
        self.name, self.target, self.params = name, target, tuple(params)
        self.module = ir.Module(name=name)
        self.module.triple = target.triple
        self.module.data_layout = str(target.machine().target_data)
        types = [PARAM_TYPES[p.kind] for p in params]
        if target.is_gpu:
            self.fn = ir.Function(self.module, ir.FunctionType(ir.VoidType(), types), name=name)
            self.fn.calling_convention = "ptx_kernel"
        else:
            # block x, block y, and the launch's state (`launch_local`)
            self.fn = ir.Function(self.module, ir.FunctionType(ir.VoidType(), types + [I32, I32, PTR]),
                                  name=f"{name}_block")
            self.fn.linkage = "internal"
            self.fn.attributes.add("alwaysinline")
        for arg, p in zip(self.fn.args, params):
            arg.name = p.name
            if p.kind == "ptr":
                arg.add_attribute("noalias")
        self.args = {p.name: a for p, a in zip(params, self.fn.args)}
        self._alloca_block = self.fn.append_basic_block("allocas")
        self._allocas = ir.IRBuilder(self._alloca_block)
        self.b = ir.IRBuilder(self.fn.append_basic_block("start"))
        self._reduce_scratch: ir.Value | None = None
        self._launch_state: list[tuple[int, ir.Type, ir.Constant | None]] = []  # (byte offset, type, initial)
        self._launch_bytes = 0

    def __getitem__(self, name: str) -> ir.Value:
        return self.args[name]

    # -- constants and conversions ------------------------------------------------
    @staticmethod
    def i32(v: int) -> ir.Constant:
        return ir.Constant(I32, int(v))

    @staticmethod
    def i64(v: int) -> ir.Constant:
        return ir.Constant(I64, int(v))

    @staticmethod
    def f32(v: float) -> ir.Constant:
        return ir.Constant(F32, float(v))

    def wide(self, v: ir.Value) -> ir.Value:
        """An index as i64 (sign-extended), for offsets that may pass 2**31."""
        return v if v.type == I64 else self.b.sext(v, I64)

    def to_f32(self, v: ir.Value) -> ir.Value:
        return v if v.type == F32 else self.b.sitofp(v, F32)

    def var(self, init: ir.Value) -> Var:
        return Var(self, init.type, init)

    def _alloca(self, typ: ir.Type, count: int | None = None) -> ir.Value:
        return self._allocas.alloca(typ, size=None if count is None else ir.Constant(I32, count))

    def launch_local(self, dtype: DType, count: int = 1, init: ir.Constant | None = None) -> ir.Value:
        """Host only: `count` elements that live for the whole launch call, so a block can
        leave work for the next block the same thread runs (a CPU thread runs a contiguous
        range of blocks). `init` (one element) is stored once, before the first block."""
        if self.target.is_gpu:
            raise ValueError("launch-scoped memory is host-only")
        typ = self._elem(dtype)
        size = ir.ArrayType(typ, count).get_abi_size(self.target.machine().target_data)
        offset = -(-self._launch_bytes // 64) * 64  # each piece 64-byte aligned
        self._launch_bytes = offset + size
        self._launch_state.append((offset, typ, init))
        state = self.fn.args[len(self.params) + 2]
        at = self._allocas.gep(state, [ir.Constant(I64, offset)], inbounds=True, source_etype=ir.IntType(8))
        return self._allocas.bitcast(at, PTR)

    # -- grid -----------------------------------------------------------------------
    def _sreg(self, name: str) -> ir.Value:
        fn = self.module.globals.get(f"llvm.nvvm.read.ptx.sreg.{name}")
        if fn is None:
            fn = ir.Function(self.module, ir.FunctionType(I32, []), f"llvm.nvvm.read.ptx.sreg.{name}")
        return self.b.call(fn, [])

    def block_id(self, axis: int = 0) -> ir.Value:
        if self.target.is_gpu:
            return self._sreg("ctaid." + "xyz"[axis])
        return self.fn.args[len(self.params) + axis]

    def lane(self) -> ir.Value:
        return self._sreg("tid.x") if self.target.is_gpu else self.i32(0)

    def lanes(self) -> ir.Value:
        return self._sreg("ntid.x") if self.target.is_gpu else self.i32(1)

    # -- control flow ---------------------------------------------------------------
    @contextmanager
    def loop(self, start: ir.Value | int, stop: ir.Value | int, step: ir.Value | int = 1) -> Iterator[ir.Value]:
        """for i in range(start, stop, step) with step > 0."""
        b = self.b
        start = self.i32(start) if isinstance(start, int) else start
        stop = self.i32(stop) if isinstance(stop, int) else stop
        step = self.i32(step) if isinstance(step, int) else step
        pre = b.block
        header = self.fn.append_basic_block("loop")
        body = self.fn.append_basic_block("body")
        after = self.fn.append_basic_block("after")
        b.branch(header)
        b.position_at_end(header)
        i = b.phi(I32, name="i")
        i.add_incoming(start, pre)
        b.cbranch(b.icmp_signed("<", i, stop), body, after)
        b.position_at_end(body)
        yield i
        nxt = b.add(i, step, flags=["nsw"])
        i.add_incoming(nxt, b.block)
        b.branch(header)
        b.position_at_end(after)

    def lane_loop(self, stop: ir.Value | int) -> contextmanager:
        """for i in range(lane, stop, lanes): the lane-strided loop."""
        return self.loop(self.lane(), stop, self.lanes())

    @contextmanager
    def when(self, cond: ir.Value) -> Iterator[None]:
        with self.b.if_then(cond):
            yield

    # -- memory ---------------------------------------------------------------------
    @staticmethod
    def _elem(dtype: DType) -> ir.Type:
        return {DType.F32: F32, DType.F16: F16, DType.BF16: I16, DType.I32: I32}[dtype]

    def addr(self, ptr: ir.Value, index: ir.Value, dtype: DType) -> ir.Value:
        return self.b.gep(ptr, [self.wide(index)], inbounds=True, source_etype=self._elem(dtype))

    def load(self, ptr: ir.Value, index: ir.Value, dtype: DType) -> ir.Value:
        """Element `index` of `ptr` as float (int32 stays i32)."""
        return self._widen(self.b.load(self.addr(ptr, index, dtype), typ=self._elem(dtype)), dtype)

    def load_packed(self, ptr: ir.Value, index: ir.Value, dtype: DType, count: int) -> ir.Value:
        """Elements index..index+count-1 of `ptr` in one vector load, as a vector of
        floats. index must be a multiple of count and the row start aligned to count
        elements (GPUs need the alignment for a 16-byte load; on the host it is not assumed)."""
        size = dtype.itemsize * count
        align = min(size, 16) if self.target.is_gpu else dtype.itemsize
        raw = self.b.load(self.addr(ptr, index, dtype), typ=ir.VectorType(self._elem(dtype), count), align=align)
        return self._widen(raw, dtype)

    def load_vector(self, ptr: ir.Value, index: ir.Value, dtype: DType, count: int) -> list[ir.Value]:
        """`load_packed`'s elements as a list of floats."""
        packed = self.load_packed(ptr, index, dtype, count)
        return [self.b.extract_element(packed, self.i32(j)) for j in range(count)]

    def _widen(self, raw: ir.Value, dtype: DType) -> ir.Value:
        """Loaded f16 / bf16 storage (a scalar or a vector) as float32."""
        b = self.b
        vector = isinstance(raw.type, ir.VectorType)

        def like(typ: ir.Type) -> ir.Type:
            return ir.VectorType(typ, raw.type.count) if vector else typ
        if dtype is DType.F16:
            return b.fpext(raw, like(F32))
        if dtype is DType.BF16:
            sixteen = ir.Constant(like(I32), [16] * raw.type.count if vector else 16)
            return b.bitcast(b.shl(b.zext(raw, like(I32)), sixteen), like(F32))
        return raw

    def store(self, ptr: ir.Value, index: ir.Value, value: ir.Value, dtype: DType) -> None:
        b = self.b
        if dtype is DType.F16:
            value = b.fptrunc(value, F16)
        elif dtype is DType.BF16:
            value = self._f32_to_bf16(value)
        b.store(value, self.addr(ptr, index, dtype))

    def _f32_to_bf16(self, v: ir.Value) -> ir.Value:
        """Round to nearest even, NaN kept NaN (same as fusion.dtypes.f32_to_bf16_bits)."""
        b = self.b
        bits = b.bitcast(v, I32)
        lsb = b.and_(b.lshr(bits, self.i32(16)), self.i32(1))
        rounded = b.lshr(b.add(bits, b.add(lsb, self.i32(0x7FFF))), self.i32(16))
        is_nan = b.fcmp_unordered("uno", v, v)
        return b.trunc(b.select(is_nan, self.i32(0x7FC0), rounded), I16)

    def prefetch(self, ptr: ir.Value, byte_offset: ir.Value) -> None:
        """Host only: ask for the cache line at byte `byte_offset` of ptr ahead of its use
        (a hint: never faults, so it may point past the end)."""
        if self.target.is_gpu:
            return
        at = self.b.gep(ptr, [self.wide(byte_offset)], source_etype=ir.IntType(8))
        self.intrinsic("llvm.prefetch.p0", [at, self.i32(0), self.i32(3), self.i32(1)], ir.VoidType())

    def shared(self, n: int, name: str) -> ir.Value:
        """A per-block float array of n elements (shared memory on the GPU)."""
        if not self.target.is_gpu:
            return self._alloca(F32, n)
        gv = ir.GlobalVariable(self.module, ir.ArrayType(F32, n), f"{self.name}_{name}", addrspace=3)
        gv.linkage = "internal"
        gv.initializer = ir.Constant(ir.ArrayType(F32, n), ir.Undefined)
        gv.align = 16
        # cast once at the top so the pointer dominates every use, wherever it is made
        return self._allocas.addrspacecast(gv, PTR)

    def barrier(self) -> None:
        if self.target.is_gpu:
            fn = self.module.globals.get("llvm.nvvm.barrier.cta.sync.aligned.all")
            if fn is None:
                fn = ir.Function(self.module, ir.FunctionType(ir.VoidType(), [I32]),
                                 "llvm.nvvm.barrier.cta.sync.aligned.all")
            self.b.call(fn, [self.i32(0)])

    # -- arithmetic -----------------------------------------------------------------
    def fadd(self, a: ir.Value, c: ir.Value) -> ir.Value:
        return self.b.fadd(a, c, flags=FAST)

    def fmul(self, a: ir.Value, c: ir.Value) -> ir.Value:
        return self.b.fmul(a, c, flags=FAST)

    def intrinsic(self, name: str, args: Sequence[ir.Value], ret: ir.Type = F32) -> ir.Value:
        """A call of the LLVM intrinsic `name` (declared on first use) returning `ret`."""
        fn = self.module.globals.get(name)
        if fn is None:
            fn = ir.Function(self.module, ir.FunctionType(ret, [a.type for a in args]), name)
        return self.b.call(fn, list(args))

    def sqrt(self, x: ir.Value) -> ir.Value:
        return self.intrinsic("llvm.sqrt.f32", [x])

    def exp(self, x: ir.Value) -> ir.Value:
        if self.target.is_gpu:  # ex2.approx: about 2 ulp, no libm on the device
            return self.intrinsic("llvm.nvvm.ex2.approx.ftz.f", [self.b.fmul(x, self.f32(math.log2(math.e)))])
        return self._host_exp(x)

    def _host_exp(self, x: ir.Value) -> ir.Value:
        """exp(x) in straight-line arithmetic (Cephes' expf polynomial, about 1 ulp), so
        loops calling it vectorise: a call to libm's expf keeps them scalar. Results
        below float's normal range flush to 0 (as the GPU's ftz), past its top are inf,
        NaN stays NaN."""
        b = self.b
        lo, hi = -87.33654, 88.72284  # exp(lo) is the smallest normal float, exp(hi) near the largest
        xc = self.fmin(self.fmax(x, self.f32(lo)), self.f32(hi))
        n = self.intrinsic("llvm.rint.f32", [b.fmul(xc, self.f32(math.log2(math.e)))])
        # r = xc - n ln2, ln2 in two parts so r keeps its low bits
        r = b.fsub(b.fsub(xc, b.fmul(n, self.f32(0.693359375))), b.fmul(n, self.f32(-2.12194440e-4)))
        p = self.f32(1.9875691500e-4)
        for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            p = b.fadd(b.fmul(p, r), self.f32(c))
        y = b.fadd(b.fadd(b.fmul(p, b.fmul(r, r)), r), self.f32(1.0))
        # times 2**n as two powers of two: 2**128 alone is past float's range
        ni = b.fptosi(n, I32)
        half = b.ashr(ni, self.i32(1))
        for e in (half, b.sub(ni, half)):
            y = b.fmul(y, b.bitcast(b.shl(b.add(e, self.i32(127)), self.i32(23)), F32))
        y = b.select(b.fcmp_ordered("<", x, self.f32(lo)), self.f32(0.0), y)
        y = b.select(b.fcmp_ordered(">", x, self.f32(hi)), self.f32(math.inf), y)
        return b.select(b.fcmp_unordered("uno", x, x), x, y)

    def log(self, x: ir.Value) -> ir.Value:
        if self.target.is_gpu:  # lg2.approx: about 2 ulp
            return self.b.fmul(self.intrinsic("llvm.nvvm.lg2.approx.f", [x]), self.f32(math.log(2.0)))
        return self.intrinsic("llvm.log.f32", [x])

    def fmax(self, a: ir.Value, c: ir.Value) -> ir.Value:
        return self.intrinsic("llvm.maxnum.f32", [a, c])

    def fmin(self, a: ir.Value, c: ir.Value) -> ir.Value:
        return self.intrinsic("llvm.minnum.f32", [a, c])

    def imin(self, a: ir.Value, c: ir.Value) -> ir.Value:
        return self.b.select(self.b.icmp_signed("<", a, c), a, c)

    def imax(self, a: ir.Value, c: ir.Value) -> ir.Value:
        return self.b.select(self.b.icmp_signed(">", a, c), a, c)

    # -- cross-lane -----------------------------------------------------------------
    def _shfl(self, v: ir.Value, offset: int) -> ir.Value:
        return self.intrinsic("llvm.nvvm.shfl.sync.bfly.f32",
                               [self.i32(-1), v, self.i32(offset), self.i32(WARP - 1)])

    def reduce(self, v: ir.Value, op: str = "add") -> ir.Value:
        """The sum (op "add"), "max" or "min" of v over the block's lanes; every lane gets
        it. Call it from all lanes (it holds barriers); on the GPU the lane count is a
        multiple of 32."""
        if not self.target.is_gpu:
            return v
        combine = {"add": self.fadd, "max": self.fmax, "min": self.fmin}[op]
        identity = self.f32({"add": 0.0, "max": -math.inf, "min": math.inf}[op])

        def warp_reduce(x: ir.Value) -> ir.Value:
            for off in (16, 8, 4, 2, 1):
                x = combine(x, self._shfl(x, off))
            return x

        if self._reduce_scratch is None:
            self._reduce_scratch = self.shared(WARP, "reduce")
        scratch, b = self._reduce_scratch, self.b
        v = warp_reduce(v)
        lane = self.lane()
        self.barrier()  # earlier reads of the scratch are done
        with self.when(b.icmp_unsigned("==", b.and_(lane, self.i32(WARP - 1)), self.i32(0))):
            b.store(v, self.addr(scratch, b.lshr(lane, self.i32(5)), DType.F32))
        self.barrier()
        # every warp reduces the per-warp partials again, so every lane gets the total
        warps = b.lshr(self.lanes(), self.i32(5))
        in_warp = b.and_(lane, self.i32(WARP - 1))
        mine = self.var(identity)
        with self.when(b.icmp_unsigned("<", in_warp, warps)):
            mine.set(b.load(self.addr(scratch, in_warp, DType.F32), typ=F32))
        return warp_reduce(mine.get())

    # -- finishing ------------------------------------------------------------------
    def finish(self) -> ir.Module:
        self.b.ret_void()
        self._allocas.branch(self.fn.blocks[1])
        if not self.target.is_gpu:
            self._host_launcher()
        return self.module

    def _host_launcher(self) -> None:
        """void name(params..., i32 grid_x, i32 begin, i32 end): blocks begin..end-1, with
        the launch-scoped memory on this call's stack, initialised once."""
        types = [PARAM_TYPES[p.kind] for p in self.params]
        fn = ir.Function(self.module, ir.FunctionType(ir.VoidType(), types + [I32, I32, I32]), name=self.name)
        *args, grid_x, begin, end = fn.args
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        raw = b.alloca(ir.IntType(8), size=ir.Constant(I64, max(self._launch_bytes, 1)))
        raw.align = 64
        state = b.bitcast(raw, PTR)
        for offset, typ, init in self._launch_state:
            if init is not None:
                at = b.gep(state, [ir.Constant(I64, offset)], inbounds=True, source_etype=ir.IntType(8))
                b.store(init, b.bitcast(at, init.type.as_pointer()))
        header, body, done = (fn.append_basic_block(n) for n in ("loop", "body", "done"))
        entry = b.block
        b.branch(header)
        b.position_at_end(header)
        i = b.phi(I32)
        i.add_incoming(begin, entry)
        b.cbranch(b.icmp_signed("<", i, end), body, done)
        b.position_at_end(body)
        b.call(self.fn, [*args, b.srem(i, grid_x), b.sdiv(i, grid_x), state])
        i.add_incoming(b.add(i, ir.Constant(I32, 1)), b.block)
        b.branch(header)
        b.position_at_end(done)
        b.ret_void()
