"""vLLM's periodic stats line: throughput since the last line, the scheduler's load, KV-cache
use and the prefix-cache hit rate, every interval while the engine works."""
from __future__ import annotations

import asyncio
import logging
import time

from fusec.runtime.async_engine import AsyncEngine

log = logging.getLogger("fusec.server")


class StatsLogger:
    def __init__(self, engine: AsyncEngine, interval: float) -> None:
        self.engine = engine
        self.interval = interval
        self.last = engine.load()
        self.last_time = time.monotonic()

    async def run(self) -> None:
        """Report every interval until cancelled. It reads only the engine's published
        snapshot, so it never waits for a step."""
        while True:
            await asyncio.sleep(self.interval)
            self.report()

    def report(self) -> None:
        """One line about the time since the last report, unless the engine ran no step."""
        now, load, last = time.monotonic(), self.engine.load(), self.last
        elapsed = now - self.last_time
        self.last, self.last_time = load, now
        if load.steps == last.steps or elapsed <= 0:
            return
        # prompt throughput counts the prompt tokens computed, not those read from the cache (vLLM's)
        computed = (load.prompt_tokens - load.cached_prompt_tokens) - (last.prompt_tokens - last.cached_prompt_tokens)
        parts = ["Avg prompt throughput: %.1f tokens/s", "Avg generation throughput: %.1f tokens/s",
                 "Running: %d reqs", "Waiting: %d reqs"]
        args: list[float] = [computed / elapsed, (load.generation_tokens - last.generation_tokens) / elapsed,
                             load.running, load.waiting]
        if preempted := load.preemptions - last.preemptions:
            parts.append("Preemptions: %d")
            args.append(preempted)
        parts += ["KV cache usage: %.1f%%", "Prefix cache hit rate: %.1f%%"]
        queries = load.prefix_cache_queries  # the hit rate is since start
        args += [load.kv_usage * 100, 100 * load.prefix_cache_hits / queries if queries else 0.0]
        log.info("Engine 000: " + ", ".join(parts), *args)
