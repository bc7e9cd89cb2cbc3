"""Latency through the real HTTP server, for benchmarks/speed.py: start
`python -m aurora_sgl.launch_server` as a subprocess on a free port and stream greedy requests to its
SGLang-native `/generate` route (which returns the token ids, so outputs can be checked exactly)
from a closed loop of `concurrency` clients.

TTFT: request sent -> first streamed chunk carrying a token. TPOT (time per output token): (last
chunk - first chunk) / (tokens - 1), per request. Percentiles are over requests.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common.server import ServerProcess  # noqa: E402


def Server(k: int, head: str | None, threads: int, max_running: int = 16) -> ServerProcess:  # noqa: N802
    """One launch_server process with a fixed head (`--no-online`), started without waiting:
    `wait_ready()` blocks until /health answers (so several can start at once), `stop()` ends it."""
    args = ["--speculative-num-steps", str(k), "--max-running-requests", str(max_running), "--no-online"]
    if k and head:
        args += ["--speculative-draft-model-path", str(head)]
    return ServerProcess(*args, threads=threads, wait=False)


async def _stream_one(client: httpx.AsyncClient, url: str, prompt: str, max_new: int) -> dict:
    body = {"text": prompt, "stream": True, "sampling_params": {"max_new_tokens": max_new, "temperature": 0}}
    t0 = time.perf_counter()
    first = last = None
    ids: list[int] = []
    meta: dict = {}
    async with client.stream("POST", url + "/generate", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"/generate returned {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk["output_ids"]:
                first = first or now
                last = now
                ids, meta = chunk["output_ids"], chunk["meta_info"]
    n = len(ids)
    return {
        "ids": ids,
        "tau": meta.get("spec_accept_length") if meta.get("spec_verify_ct") else None,
        "ttft": (first - t0) if first else float("nan"),
        "tpot": (last - first) / (n - 1) if n > 1 else float("nan"),
        "tokens": n,
    }


async def _closed_loop(url: str, prompts: list[str], max_new: int, concurrency: int) -> tuple[list[dict], float]:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def one(p):
            async with gate:
                return await _stream_one(client, url, p, max_new)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        return list(results), time.perf_counter() - t0


def _ms(values, q) -> float:
    vals = [v for v in values if v == v]  # drop NaN (a one-token request has no TPOT)
    return round(float(np.percentile(vals, q)) * 1e3, 2) if vals else float("nan")


def measure(url: str, prompts: list[str], max_new: int, concurrency: int) -> dict:
    """All prompts through the server with at most `concurrency` in flight."""
    results, wall = asyncio.run(_closed_loop(url, prompts, max_new, concurrency))
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results]
    taus = [r["tau"] for r in results if r["tau"] is not None]
    return {
        "outputs": [r["ids"] for r in results],
        "tok_s": sum(r["tokens"] for r in results) / wall,
        "tau": sum(taus) / len(taus) if taus else 1.0,
        "ttft_p50_ms": _ms(ttft, 50),
        "ttft_p99_ms": _ms(ttft, 99),
        "tpot_p50_ms": _ms(tpot, 50),
        "tpot_p99_ms": _ms(tpot, 99),
    }
