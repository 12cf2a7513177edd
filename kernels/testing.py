"""Checks for kernel developers: a pattern's fused kernel against the unfused reference."""
from __future__ import annotations

import numpy as np

from fusec.fusion.cache import KernelCache
from fusec.fusion.codegen.target import HOST
from fusec.fusion.dtypes import DType, from_storage, to_storage
from fusec.fusion.interpreter import Interpreter
from fusec.fusion.patterns import Registry
from fusec.fusion.plan import PlanOptions
from fusec.kernels.examples import Example
from fusec.kernels.quant import FORMATS, QUANTIZABLE, BlockFormat, quantize

TOLERANCE = {DType.F32: 1e-5, DType.F16: 2e-2, DType.BF16: 2e-2}


def random_weights(ex: Example, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Norm-like vectors near 1, matrices scaled by 1/sqrt(fan-in); never zeros."""
    out = {}
    for node in ex.graph.nodes("weight"):
        shape = node.type.shape
        if node.format:
            out[node.name] = random_blocks(rng, *shape, FORMATS[node.format], std=1 / np.sqrt(shape[-1]))
            continue
        w = 1.0 + 0.3 * rng.standard_normal(shape) if len(shape) == 1 else rng.standard_normal(shape) / np.sqrt(shape[-1])
        out[node.name] = to_storage(w.astype(np.float32), node.type.dtype)
    return out


def random_blocks(rng: np.random.Generator, rows: int, k: int, fmt: BlockFormat, std: float = 1.0) -> np.ndarray:
    """Test weights in `fmt` with roughly standard deviation `std`: gguf's quantizer where
    it has one, else random bytes (every quant and sub-scale value occurs) with the float16
    scales set so that the weights come out near `std`."""
    if fmt.gguf_name in QUANTIZABLE:
        return quantize(rng.standard_normal((rows, k)).astype(np.float32) * std, fmt)
    data = rng.integers(0, 256, (rows, k // fmt.block, fmt.nbytes), dtype=np.uint8)
    # typical |sc * q| is ~ 32 * 8 for q4_k / q5_k (x2 for q5) and ~ 64 * 16 for q6_k
    span = {"q4_k": 250.0, "q5_k": 500.0, "q6_k": 1000.0}[fmt.name]
    for at in fmt.scale_at:
        d = (std / span * (0.5 + rng.random(data.shape[:2]))).astype(np.float16)
        data[:, :, at:at + 2] = d[..., None].view(np.uint8)
    return data.reshape(rows, -1)


def random_state(ex: Example, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {n.name: to_storage(rng.standard_normal(n.type.bind(ex.state_dims)).astype(np.float32), n.type.dtype)
            for n in ex.graph.nodes("state")}


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape or not np.isfinite(got).all():
        return float("inf")  # an unwritten (poisoned) element or a wrong shape
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def check_pattern(registry: Registry, pattern: str, ex: Example, dtype: DType, cache: KernelCache,
                  seed: int = 0, gpu_shapes: bool | None = None) -> dict[str, float]:
    """Run `ex` through the fused host plan (outputs poisoned first) and the reference
    interpreter; assert `pattern` was used and every output (and state) agrees within
    the dtype's tolerance. Returns the relative error per output."""
    from fusec.runtime.backends.cpu import HostDevice
    from fusec.runtime.executor import PlanExecutor

    rng = np.random.default_rng(seed)
    weights, state = random_weights(ex, rng), random_state(ex, rng)
    ref_state = {k: from_storage(v, ex.graph.node(k).type.dtype).copy() for k, v in state.items()}
    want = Interpreter(ex.graph, weights).run(ex.inputs, ref_state)
    # float activations: the reference's arithmetic (the int8 dots have their own tests)
    options = PlanOptions(HOST, max_positions=256, gpu_shapes=gpu_shapes, int8_activations=False)
    device = HostDevice(cache)
    executor = PlanExecutor(device, ex.graph, weights, registry, options, poison=True)
    plan = executor.plan_for(ex.tokens)
    used = [launch.pattern for launch in plan.launches]
    assert pattern in used, f"pattern {pattern} did not match; launches: {used}"
    executor.load_kv(state)
    got = {name: device.to_host(buf) for name, buf in executor.run(ex.inputs).items()}
    errors = {}
    for name, value in want.items():
        node = ex.graph.node(plan.resolve(name))
        errors[name] = relative_error(from_storage(got[name], node.type.dtype), value)
        assert errors[name] < TOLERANCE[dtype], f"{pattern} {dtype.value}: {name} off by {errors[name]:.3g}"
    executor.close()
    device.close()
    return errors
