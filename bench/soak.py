"""Soak `fusec serve`: N concurrent streaming clients for T seconds, with random
disconnects and random bad requests mixed in. Reports unexpected errors (anything but
the 4xx a bad request is due), p50/p95 latency of completed streams, the server's RSS
over time, and the KV blocks still in use once the load stops.

  python bench/soak.py --clients 256 --duration 600 [--out bench/results/soak-DATE.md] [-- serve flags]

It starts `fusec serve` itself (default model, CPU unless serve flags say otherwise).
Pass: 0 unexpected errors, RSS after warm-up within 10% (last minute vs the first
minute after warm-up), 0 KV blocks in use at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

FUSEC = [str(Path(sys.executable).with_name("fusec"))] if Path(sys.executable).with_name("fusec").exists() else \
    [sys.executable, "-m", "fusec.cli.main"]
WORDS = "the a ocean red fox runs over quiet hills while seven bright stars fall into deep cold water".split()
# bodies the server must refuse with a 4xx, never a 5xx or a hang
BAD_REQUESTS = [
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": -3}'),
    ("/v1/completions", b'{"prompt": "a\\ud800b"}'),
    ("/v1/completions", b'{"prompt": [true, false]}'),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}'),
    ("/v1/completions", b'{"prompt": '),
    ("/v1/chat/completions", b'{"messages": []}'),
    ("/v1/chat/completions", b'{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "n": 1000}'),
    ("/v1/embeddings", b'{"input": []}'),
    ("/tokenize", b'{"prompt": 5}'),
]


@dataclass
class Tally:
    ok: int = 0
    disconnected: int = 0
    bad_refused: int = 0
    unexpected: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    first_chunk: list[float] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def gauges(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting")):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


async def stream_once(http: httpx.AsyncClient, rng: random.Random, tally: Tally, disconnect: float) -> None:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 64)))
    if rng.random() < 0.5:
        url, body = "/v1/completions", {"prompt": prompt}
    else:
        url, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
    body.update(stream=True, max_tokens=rng.randint(8, 64), temperature=rng.choice([0.0, 0.7]))
    leave_after = rng.randint(1, 6) if rng.random() < disconnect else None
    start = time.monotonic()
    chunks = 0
    async with http.stream("POST", url, json=body) as res:
        if res.status_code != 200:
            tally.unexpected.append(f"{url} {res.status_code}: {(await res.aread())[:200]!r}")
            return
        done = False
        async for line in res.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                tally.unexpected.append(f"{url} stream error: {chunk['error']}")
                return
            chunks += 1
            if chunks == 1:
                tally.first_chunk.append(time.monotonic() - start)
            if leave_after is not None and chunks >= leave_after:
                tally.disconnected += 1
                return  # closing the stream here is the disconnect
        if not done:
            tally.unexpected.append(f"{url}: stream ended without [DONE]")
            return
    tally.ok += 1
    tally.latencies.append(time.monotonic() - start)


async def bad_once(http: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    url, body = rng.choice(BAD_REQUESTS)
    res = await http.post(url, content=body, headers={"content-type": "application/json"})
    try:
        error = res.json().get("error")
    except ValueError:
        error = None
    if 400 <= res.status_code < 500 and isinstance(error, dict):
        tally.bad_refused += 1
    else:
        tally.unexpected.append(f"bad {url} {body[:60]!r} -> {res.status_code} {res.text[:200]!r}")


async def client(base: str, seed: int, deadline: float, tally: Tally, bad: float, disconnect: float) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(600.0)) as http:
        while time.monotonic() < deadline:
            try:
                if rng.random() < bad:
                    await bad_once(http, rng, tally)
                else:
                    await stream_once(http, rng, tally, disconnect)
            except (httpx.HTTPError, json.JSONDecodeError) as e:
                tally.unexpected.append(f"{type(e).__name__}: {e}")


async def sample(base: str, pid: int, stop: asyncio.Event, every: float, out: list[dict]) -> None:
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        while not stop.is_set():
            try:
                g = gauges((await http.get("/metrics")).text)
            except httpx.HTTPError:
                g = {}
            out.append({"t": round(time.monotonic() - start, 1), "rss_mb": round(rss_mb(pid), 1), **g})
            try:
                await asyncio.wait_for(stop.wait(), every)
            except asyncio.TimeoutError:
                pass


async def soak(base: str, pid: int, clients: int, duration: float, bad: float, disconnect: float) -> dict:
    tally, samples, stop = Tally(), [], asyncio.Event()
    sampler = asyncio.create_task(sample(base, pid, stop, 5.0, samples))
    deadline = time.monotonic() + duration
    await asyncio.gather(*(client(base, i, deadline, tally, bad, disconnect) for i in range(clients)))
    # the load is gone: every request finished or was aborted, so every KV block should be free
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        for _ in range(120):
            end = gauges((await http.get("/metrics")).text)
            if end.get("vllm:num_requests_running", 1) == 0 and end.get("vllm:num_requests_waiting", 1) == 0:
                break
            await asyncio.sleep(0.5)
    stop.set()
    await sampler
    return {"tally": tally, "samples": samples, "end": end}


def rss_drift(samples: list[dict], warmup: float) -> tuple[float, float]:
    """Mean RSS over the first minute after warm-up, and over the last minute."""
    after = [s for s in samples if s["t"] >= warmup]
    if not after:
        return float("nan"), float("nan")
    first = [s["rss_mb"] for s in after if s["t"] < warmup + 60] or [after[0]["rss_mb"]]
    last_t = after[-1]["t"]
    last = [s["rss_mb"] for s in after if s["t"] > last_t - 60]
    return statistics.mean(first), statistics.mean(last)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=256)
    ap.add_argument("--duration", type=float, default=600, help="seconds of load")
    ap.add_argument("--warmup", type=float, default=60, help="seconds before RSS must stay flat")
    ap.add_argument("--bad", type=float, default=0.05, help="share of requests that are malformed")
    ap.add_argument("--disconnect", type=float, default=0.1, help="share of streams the client leaves early")
    ap.add_argument("--out", type=Path, help="append a markdown report here")
    ap.add_argument("serve_args", nargs="*", help="extra `fusec serve` flags (after --)")
    args = ap.parse_args()

    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="soak-serve-", suffix=".log", delete=False)
    cmd = [*FUSEC, "serve", "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", "256",
           "--disable-log-requests", *args.serve_args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            print(Path(log.name).read_text()[-3000:], file=sys.stderr)
            return 1
        print(f"soak: {args.clients} clients for {args.duration:.0f}s against {' '.join(cmd[len(FUSEC):])}",
              file=sys.stderr)
        result = asyncio.run(soak(base, proc.pid, args.clients, args.duration, args.bad, args.disconnect))
    finally:
        proc.terminate()
        code = proc.wait(timeout=120)
    tally, samples, end = result["tally"], result["samples"], result["end"]
    lat = sorted(tally.latencies)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")
    first_mb, last_mb = rss_drift(samples, args.warmup)
    drift = (last_mb - first_mb) / first_mb if first_mb == first_mb and first_mb else float("nan")
    kv_end = end.get("vllm:kv_cache_usage_perc", float("nan"))
    tracebacks = Path(log.name).read_text().count("Traceback")
    passed = not tally.unexpected and abs(drift) <= 0.10 and kv_end == 0 and code == 0 and not tracebacks
    report = "\n".join([
        f"## soak: {args.clients} clients, {args.duration:.0f} s ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"- machine: {platform.machine()}, {platform.processor() or platform.platform()}, "
        f"{os.cpu_count()} CPUs; command: `python bench/soak.py {' '.join(sys.argv[1:])}`",
        f"- streams completed {tally.ok}, left early by the client {tally.disconnected}, bad requests refused "
        f"with a 4xx {tally.bad_refused}, unexpected errors {len(tally.unexpected)}",
        f"- completed stream latency p50 {pct(lat, 0.5):.2f} s, p95 {pct(lat, 0.95):.2f} s; first chunk p50 "
        f"{pct(sorted(tally.first_chunk), 0.5):.2f} s, p95 {pct(sorted(tally.first_chunk), 0.95):.2f} s",
        f"- server RSS: first minute after {args.warmup:.0f} s warm-up {first_mb:.0f} MB, last minute "
        f"{last_mb:.0f} MB ({drift:+.1%}); peak {max((s['rss_mb'] for s in samples), default=float('nan')):.0f} MB",
        f"- at the end: KV cache usage {kv_end:.3f}, running {end.get('vllm:num_requests_running')}, waiting "
        f"{end.get('vllm:num_requests_waiting')}; server exit code {code}, tracebacks in its log {tracebacks}",
        f"- result: {'PASS' if passed else 'FAIL'}",
        "",
        "RSS (MB) every 5 s: " + " ".join(f"{s['rss_mb']:.0f}" for s in samples),
        "",
    ] + [f"- unexpected: {u}" for u in tally.unexpected[:20]])
    print(report)
    if args.out:
        with args.out.open("a") as f:
            f.write(report + "\n")
    os.unlink(log.name)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
