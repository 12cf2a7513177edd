"""Registry-driven kernel tests: for every registered pattern, its fused kernel on the
host target equals the unfused numpy reference, at odd sizes, in each dtype, with
outputs poisoned so an unwritten element fails; and its PTX assembles with ptxas."""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

from fusec.fusion.cache import KernelCache
from fusec.fusion.codegen.target import parse_arch
from fusec.fusion.compiler import compile_kernel
from fusec.fusion.dtypes import DType
from fusec.fusion.plan import PlanOptions, build_plan
from fusec.kernels.examples import EXAMPLES
from fusec.kernels.registry import default_registry
from fusec.kernels.testing import check_pattern

REGISTRY = default_registry()
PATTERNS = [p.name for p in REGISTRY]
DTYPES = [DType.F32, DType.F16, DType.BF16]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> KernelCache:
    return KernelCache(tmp_path_factory.mktemp("kernels"))


def test_every_pattern_has_an_example():
    assert set(PATTERNS) == set(EXAMPLES)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.value)
@pytest.mark.parametrize("size", [0, 1, 2])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_fused_kernel_equals_reference(pattern, size, dtype, cache):
    rng = np.random.default_rng([PATTERNS.index(pattern), size, DTYPES.index(dtype)])
    check_pattern(REGISTRY, pattern, EXAMPLES[pattern](rng, size, dtype), dtype, cache, seed=size)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.value)
@pytest.mark.parametrize("size", [0, 1, 2])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_gpu_shaped_kernels_equal_reference(pattern, size, dtype, cache):
    """The GPU's specialisations (16-byte loads where K divides, as in size 0; grouped
    attention heads, split over two blocks in size 2), run on the host."""
    rng = np.random.default_rng([PATTERNS.index(pattern), size + 9, DTYPES.index(dtype)])
    check_pattern(REGISTRY, pattern, EXAMPLES[pattern](rng, size, dtype), dtype, cache, seed=size, gpu_shapes=True)


def ptxas() -> str | None:
    found = shutil.which("ptxas")
    if found is None and os.environ.get("CI") == "true":
        pytest.fail("ptxas is not on PATH (CI must assemble every generated PTX)")
    return found


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_ptx_assembles(pattern, arch, cache, tmp_path):
    tool = ptxas()
    if tool is None:
        pytest.skip("ptxas not found")
    target = parse_arch(arch)
    for dtype in DTYPES:
        ex = EXAMPLES[pattern](np.random.default_rng(0), 2, dtype)
        for kernel in build_plan(ex.graph, REGISTRY, PlanOptions(target, 256), ex.bucket()).kernels():
            art = compile_kernel(kernel, target, cache)
            path = tmp_path / f"{kernel.name}.ptx"
            path.write_bytes(art.data)
            res = subprocess.run([tool, f"-arch={arch}", str(path), "-o", str(tmp_path / "out.cubin")],
                                 capture_output=True, text=True)
            assert res.returncode == 0, f"{kernel.describe()}: {res.stderr}"
            assert f".target {arch}" in art.data.decode()
