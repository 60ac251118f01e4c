#!/usr/bin/env python
"""Load test of `dgemma serve` on loopback: throughput and latency at several concurrencies, and correctness.

Starts the server in a subprocess, then sends the same set of requests (completions and chat, streaming
or not, a few infilling; prompts, lengths and seeds all different) at concurrency 1 (each request alone:
the reference), then at each higher concurrency with some streaming clients leaving after their first
chunk. It checks: no server error; every completed response equal to the same request served alone; slots
and queue empty after each phase; the server's RSS back near its level before the load. Bounded in
requests and in time; prints one JSON object.

    python benchmarks/serve_load.py                       # tiny preset, 220 requests, concurrency 1,4,16,32
    python benchmarks/serve_load.py --requests 400 --concurrency 1,8,32 --model path/to/checkpoint
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402

WORDS = "the sea a river stone light code function return value list tree night morning data model".split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="checkpoint directory or preset (default tiny)")
    p.add_argument("--requests", type=int, default=220, help="requests per phase (>= 200 for the load test)")
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated; 1 first: the reference")
    p.add_argument("--disconnect", type=float, default=0.1, help="share of clients leaving mid-stream")
    p.add_argument("--steps", default="4,6,8", help="max_denoising_steps values to draw from")
    p.add_argument("--max-tokens", default="16,32,64,100,128", help="max_tokens values to draw from")
    p.add_argument("--max-slots", type=int, default=32)
    p.add_argument("--server-threads", type=int, default=1, help="OMP_NUM_THREADS of the server (0: torch's choice)")
    p.add_argument("--time-limit", type=float, default=900, help="seconds for the whole run, at most")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.steps = [int(s) for s in args.steps.split(",")]
    args.max_tokens = [int(s) for s in args.max_tokens.split(",")]
    if args.concurrency[0] != 1:
        p.error("--concurrency must start with 1 (the requests served alone are the reference)")
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Spec:
    """One request of the set."""

    path: str
    body: dict[str, Any]
    stream: bool
    leaves: bool = False  # at concurrency > 1: the client disconnects after the first chunk


@dataclass
class Outcome:
    spec: int
    status: int | None  # None: transport error
    latency_s: float
    output: tuple | None = None  # (reasoning, text, finish_reason, completion_tokens)
    left: bool = False
    error: str = ""


@dataclass
class Phase:
    concurrency: int
    wall_s: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)


def make_specs(n: int, args: argparse.Namespace, model: str) -> list[Spec]:
    rng = random.Random(args.seed)
    specs = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40)))
        common = {"model": model, "max_tokens": rng.choice(args.max_tokens), "seed": 1000 + i,
                  "max_denoising_steps": rng.choice(args.steps)}
        stream = i % 2 == 1
        if stream:
            common |= {"stream": True, "stream_options": {"include_usage": True}}
        if i % 3 == 0:
            body = {**common, "messages": [{"role": "user", "content": text}],
                    "enable_thinking": i % 6 == 0}
            specs.append(Spec("/v1/chat/completions", body, stream))
        else:
            body = {**common, "prompt": text}
            if i % 10 == 2:
                body["suffix"] = " " + rng.choice(WORDS)
            specs.append(Spec("/v1/completions", body, stream))
    streaming = [s for s in specs if s.stream]
    for s in rng.sample(streaming, round(args.disconnect * len(specs))):
        s.leaves = True
    return specs


def _output(path: str, message: dict[str, Any]) -> tuple[str, str]:
    if path.endswith("chat/completions"):
        return message.get("reasoning_content") or "", message.get("content") or ""
    return "", message.get("text") or ""


async def run_one(client: httpx.AsyncClient, index: int, spec: Spec, leave: bool) -> Outcome:
    t0 = time.perf_counter()
    try:
        if not spec.stream:
            r = await client.post(spec.path, json=spec.body)
            if r.status_code != 200:
                return Outcome(index, r.status_code, time.perf_counter() - t0, error=r.text[:200])
            doc = r.json()
            choice = doc["choices"][0]
            reasoning, text = _output(spec.path, choice.get("message", choice))
            out = (reasoning, text, choice["finish_reason"], doc["usage"]["completion_tokens"])
            return Outcome(index, 200, time.perf_counter() - t0, out)
        async with client.stream("POST", spec.path, json=spec.body) as r:
            if r.status_code != 200:
                await r.aread()
                return Outcome(index, r.status_code, time.perf_counter() - t0, error=r.text[:200])
            reasoning = text = ""
            finish, tokens, seen = None, None, 0
            first_canvas = 2 if spec.path.endswith("chat/completions") else 1  # chat sends the role first
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                seen += 1
                if leave and seen == first_canvas:
                    return Outcome(index, 200, time.perf_counter() - t0, left=True)
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Outcome(index, 500, time.perf_counter() - t0, error=str(chunk["error"]))
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for c in chunk["choices"]:
                    r_part, t_part = _output(spec.path, c.get("delta", c))
                    reasoning, text = reasoning + r_part, text + t_part
                    finish = c.get("finish_reason") or finish
            return Outcome(index, 200, time.perf_counter() - t0, (reasoning, text, finish, tokens))
    except httpx.HTTPError as e:
        return Outcome(index, None, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")


async def run_phase(url: str, specs: list[Spec], concurrency: int, deadline: float) -> Phase:
    phase = Phase(concurrency)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(specs)):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty() and time.monotonic() < deadline:
            i = queue.get_nowait()
            phase.outcomes.append(await run_one(client, i, specs[i], specs[i].leaves and concurrency > 1))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        phase.wall_s = time.perf_counter() - t0
    return phase


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def gauge(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def wait_idle(url: str, timeout_s: float = 10) -> bool:
    """True once no request holds a slot or waits for one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gauge(url, "dgemma_active_requests") + gauge(url, "dgemma_queue_depth") == 0:
            return True
        time.sleep(0.05)
    return False


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    if args.server_threads:
        env["OMP_NUM_THREADS"] = str(args.server_threads)
    cmd = [sys.executable, "-m", "dgemma", "serve", "--model", args.model, "--host", "127.0.0.1", "--port",
           str(port), "--max-slots", str(args.max_slots), "--max-queue", "256", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not come up")


def summarize(phase: Phase, specs: list[Spec], reference: dict[int, tuple]) -> dict[str, Any]:
    done = [o for o in phase.outcomes if o.status == 200 and not o.left]
    latencies = [o.latency_s for o in done]
    tokens = sum(o.output[3] or 0 for o in done)
    mismatched = [o.spec for o in done if o.spec in reference and o.output != reference[o.spec]]
    return {
        "concurrency": phase.concurrency,
        "requests": len(phase.outcomes),
        "completed": len(done),
        "disconnected": sum(o.left for o in phase.outcomes),
        "server_errors": sum(o.status is not None and o.status >= 500 for o in phase.outcomes),
        "client_errors": sum(o.status is not None and 400 <= o.status < 500 for o in phase.outcomes),
        "transport_errors": sum(o.status is None for o in phase.outcomes),
        "mismatched_vs_alone": len(mismatched),
        "tokens": tokens,
        "wall_s": round(phase.wall_s, 3),
        "tokens_per_s": round(tokens / phase.wall_s, 1) if phase.wall_s else None,
        "requests_per_s": round(len(done) / phase.wall_s, 2) if phase.wall_s else None,
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p99_s": percentile(latencies, 0.99),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.time_limit
    proc, url = start_server(args)
    try:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        specs = make_specs(args.requests, args, model)
        asyncio.run(run_phase(url, specs[:8], 4, deadline))  # warm up: first calls allocate
        wait_idle(url)
        rss_start = rss_bytes(proc.pid)
        phases, reference, idle_after = [], {}, []
        for concurrency in args.concurrency:
            log(f"concurrency {concurrency}: {len(specs)} requests")
            phase = asyncio.run(run_phase(url, specs, concurrency, deadline))
            if concurrency == 1:
                reference = {o.spec: o.output for o in phase.outcomes if o.status == 200}
            idle_after.append(wait_idle(url))
            phases.append(summarize(phase, specs, reference) | {"rss_after_mib": round(rss_bytes(proc.pid) / 2**20, 1)})
            log(json.dumps(phases[-1]))
        time.sleep(2)
        rss_end = rss_bytes(proc.pid)
    finally:
        proc.terminate()
        try:
            _, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
    total_server_errors = sum(p["server_errors"] for p in phases)
    result = {
        "machine": machine_info("cpu"),
        "settings": {"model": args.model, "requests_per_phase": args.requests, "concurrency": args.concurrency,
                     "disconnect_share": args.disconnect, "steps": args.steps, "max_tokens": args.max_tokens,
                     "max_slots": args.max_slots, "server_threads": args.server_threads,
                     "mix": "1/3 chat, 2/3 completions (1 in 10 infilling), half streaming"},
        "phases": phases,
        "checks": {
            "server_errors": total_server_errors,
            "tracebacks_in_server_log": stderr.count("Traceback"),
            "all_completed_equal_alone": all(p["mismatched_vs_alone"] == 0 for p in phases),
            "idle_after_each_phase": all(idle_after),
            "rss_start_mib": round(rss_start / 2**20, 1),
            "rss_end_mib": round(rss_end / 2**20, 1),
            "rss_growth": round(rss_end / rss_start - 1, 4),
            "finished_in_time": time.monotonic() < deadline,
        },
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
