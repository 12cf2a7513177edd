"""Where an engine step's time goes, phase by phase (`fusec bench --profile`).

Phases: schedule (the scheduler), prepare (batch metadata and sampling tensors),
stage (the executor's host work before launching: dims, the bound plan, input
copies), forward (the launches: computed on the CPU, enqueued on a GPU, or a graph
replay), sample (the sampling kernels and the wait for the token ids: on a GPU this
is where the forward's device time shows), postprocess (appending tokens,
detokenizing, stop checks, outputs). Host overhead is schedule + prepare + stage +
postprocess; on a GPU, eager forward is host time too (launch calls).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

PHASES = ("schedule", "prepare", "stage", "forward", "sample", "postprocess")
HOST_PHASES = ("schedule", "prepare", "stage", "postprocess")


@dataclass
class StepProfile:
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    steps: int = 0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.steps = 0

    def summary(self) -> dict[str, float]:
        """Milliseconds per step by phase, the step total, host time, and the host share (0..1)."""
        steps = max(self.steps, 1)
        total = sum(self.seconds.values())
        out = {f"{p}_ms": 1000 * self.seconds[p] / steps for p in PHASES}
        out["step_ms"] = 1000 * total / steps
        out["host_ms"] = 1000 * sum(self.seconds[p] for p in HOST_PHASES) / steps
        out["host_share"] = sum(self.seconds[p] for p in HOST_PHASES) / total if total else 0.0
        return out
