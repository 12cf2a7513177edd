"""The host's exp (straight-line arithmetic so loops that call it vectorise) against
numpy in float64: about 1 ulp over float's normal range, and the edges kept."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pytest

from fusec.fusion.codegen.builder import KernelBuilder, Param
from fusec.fusion.dtypes import DType
from fusec.kernels.base import Kernel
from fusec.runtime.backends.cpu import HostDevice
from test_patterns import cache  # noqa: F401 (the module's kernel cache fixture)


@dataclass(frozen=True)
class ExpKernel(Kernel):
    family = "test_exp"
    n: int

    def params(self) -> list[Param]:
        return [Param("x", "ptr"), Param("y", "ptr")]

    def grid(self, dims: Mapping[str, int]) -> tuple[int, int]:
        return 1, 1

    def body(self, kb: KernelBuilder) -> None:
        with kb.loop(0, self.n) as i:
            kb.store(kb["y"], i, kb.exp(kb.load(kb["x"], i, DType.F32)), DType.F32)


@pytest.fixture(scope="module")
def run_exp(cache):
    dev = HostDevice(cache)

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        y = np.full_like(x, 12345.0)  # poisoned
        spec = ExpKernel(n=x.size)
        dev.launch_kernel(spec, [x, y], spec.grid({}))
        return y
    yield run
    dev.close()


def test_exp_is_within_two_ulp_over_the_normal_range(run_exp):
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.uniform(-87.3, 88.7, 200_000), rng.uniform(-1, 1, 50_000),
                        np.linspace(-87.3, 88.7, 10_001)]).astype(np.float32)
    got = run_exp(x).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    ulp = np.spacing(want.astype(np.float32)).astype(np.float64)
    err = np.abs(got - want) / ulp
    assert err.max() <= 2.0, f"worst {err.max():.2f} ulp at x = {x[err.argmax()]}"


def test_exp_edges(run_exp):
    x = np.array([0.0, -0.0, 1.0, -np.inf, np.inf, np.nan, -88.0, -1000.0, 89.0, 1000.0], np.float32)
    got = run_exp(x)
    assert got[0] == 1.0 and got[1] == 1.0 and abs(got[2] - np.e) < 3e-7
    assert got[3] == 0.0 and got[6] == 0.0 and got[7] == 0.0  # below the normal range: flushed
    assert got[4] == np.inf and got[8] == np.inf and got[9] == np.inf
    assert np.isnan(got[5])
