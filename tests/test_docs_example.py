"""docs/adding-a-pattern.md's worked example, executed from the document itself."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from fusec.fusion.cache import KernelCache
from fusec.fusion.codegen.target import parse_arch
from fusec.fusion.compiler import compile_kernel
from fusec.fusion.dtypes import DType
from fusec.fusion.plan import PlanOptions, build_plan
from fusec.kernels.registry import default_registry
from fusec.kernels.testing import check_pattern

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding-a-pattern.md"


@pytest.fixture(scope="module")
def example():
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    module = types.ModuleType("add3_doc_example")
    module.__file__ = str(DOC)  # the generator's source, for the kernel cache key
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    yield module
    del sys.modules[module.__name__]


@pytest.mark.parametrize("dtype", [DType.F32, DType.F16, DType.BF16], ids=lambda d: d.value)
@pytest.mark.parametrize("size", [0, 1, 2])
def test_doc_pattern_matches_reference(example, size, dtype, tmp_path):
    registry = default_registry()
    registry.register(example.ADD3)
    ex = example.add3_example(np.random.default_rng(size), size, dtype)
    check_pattern(registry, "add3", ex, dtype, KernelCache(tmp_path))


def test_doc_pattern_ptx_assembles(example, tmp_path):
    tool = shutil.which("ptxas")
    if tool is None:
        pytest.skip("ptxas not found")  # test_patterns.py fails the run under CI instead
    registry = default_registry()
    registry.register(example.ADD3)
    ex = example.add3_example(np.random.default_rng(0), 2, DType.BF16)
    plan = build_plan(ex.graph, registry, PlanOptions(parse_arch("sm_90"), 64), "gemv")
    (kernel,) = plan.kernels()
    path = tmp_path / "add3.ptx"
    path.write_bytes(compile_kernel(kernel, parse_arch("sm_90"), KernelCache(tmp_path)).data)
    assert subprocess.run([tool, "-arch=sm_90", str(path), "-o", str(tmp_path / "a.cubin")]).returncode == 0


def test_adding_a_model_check_runs():
    """docs/adding-a-model.md's end-to-end check: a tiny Gemma 2 from transformers, served
    by the fused plans, gives transformers' greedy tokens (its code asserts it)."""
    doc = DOC.with_name("adding-a-model.md")
    (code,) = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    exec(compile(code, str(doc), "exec"), {"__name__": "adding_a_model_doc"})
