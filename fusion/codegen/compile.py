"""LLVM IR text -> optimized module -> PTX text (GPU) or an object file (host)."""
from __future__ import annotations

import llvmlite.binding as llvm

from fusec.fusion.codegen.target import Target, init_llvm


def optimize(ir_text: str, target: Target) -> llvm.ModuleRef:
    init_llvm()
    mod = llvm.parse_assembly(ir_text)
    mod.verify()
    tm = target.machine()
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    pto.loop_unrolling = True
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)
    return mod


def compile_ir(ir_text: str, target: Target) -> bytes:
    """The artifact: PTX (as UTF-8 bytes) for a GPU target, an object file for the host."""
    mod = optimize(ir_text, target)
    if target.is_gpu:
        return target.machine().emit_assembly(mod).encode()
    return target.machine().emit_object(mod)
