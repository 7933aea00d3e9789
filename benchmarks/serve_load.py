"""Load on loopback against `blockrag serve`: C concurrent clients x R requests each, bounded in count and time.

Starts the server as a subprocess on a free 127.0.0.1 port (optionally with a private redis-server as its store),
then every client sends R chat completions over its own connection: two documents drawn from a pool (so later
requests hit cached blocks), every ``--stream-every``-th request streamed. Optionally a fault is injected
mid-run: ``--fault redis`` kills Redis and restarts it, ``--fault worker`` SIGKILLs one worker.

    python benchmarks/serve_load.py --clients 16 --requests 50                       # tiny model
    python benchmarks/serve_load.py --model smollm2-135m --clients 4 --requests 10   # the embedded real model
    python benchmarks/serve_load.py --workers 2 --redis --fault worker

Prints a table and ends with one JSON line (latency p50/p99, requests/s, errors, cached-token share).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["lamp", "bridge", "river", "tower", "garden", "harbour", "library", "market", "orchard", "station"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                return f"{name} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def commit() -> str:
    if os.environ.get("BLOCKRAG_COMMIT"):
        return os.environ["BLOCKRAG_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def document_pool(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        facts = " ".join(f"The {topic} number {i} has {rng.randint(2, 99)} {rng.choice(['red', 'blue', 'green'])} "
                         f"windows." for _ in range(4))
        docs.append({"title": f"{topic.title()} {i}", "text": facts})
    return docs


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def _one(http: httpx.AsyncClient, body: dict, record: dict) -> None:
    start = time.perf_counter()
    if not body.get("stream"):
        r = await http.post("/v1/chat/completions", json=body)
        record["status"] = r.status_code
        if r.status_code == 200:
            data = r.json()
            record["cached"] = data["usage"]["prompt_tokens_details"]["cached_tokens"]
            record["prompt"] = data["usage"]["prompt_tokens"]
            record["server_ttft_ms"] = data["blockrag"]["ttft_ms"]
        record["latency_s"] = time.perf_counter() - start
        return
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        record["status"] = r.status_code
        done = False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[6:]
            if payload == "[DONE]":
                done = True
                continue
            chunk = json.loads(payload)
            if "error" in chunk:
                record["status"] = 500
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and "ttft_ms" not in record:
                record["ttft_ms"] = (time.perf_counter() - start) * 1000
            if chunk.get("usage"):
                record["cached"] = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
                record["prompt"] = chunk["usage"]["prompt_tokens"]
            if chunk.get("blockrag"):
                record["server_ttft_ms"] = chunk["blockrag"]["ttft_ms"]
        if not done and record["status"] == 200:
            record["status"] = 599  # the stream ended without [DONE]
    record["latency_s"] = time.perf_counter() - start


async def run_load(url: str, model: str, clients: int, requests: int, *, max_tokens: int = 16, pool: int = 20,
                   stream_every: int = 4, time_limit_s: float = 300.0, api_key: str | None = None,
                   on_progress=None) -> list[dict]:
    """Run the load; returns one record per request (status, latency_s, cached, prompt, ttft_ms if streamed)."""
    docs = document_pool(pool)
    deadline = time.monotonic() + time_limit_s
    records: list[dict] = []
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def client(index: int) -> None:
        rng = random.Random(1000 + index)
        async with httpx.AsyncClient(base_url=url, timeout=120, headers=headers) as http:
            for i in range(requests):
                if time.monotonic() > deadline:
                    return
                body = {"model": model, "max_tokens": max_tokens, "documents": rng.sample(docs, 2),
                        "messages": [{"role": "user", "content": f"How many windows? (client {index}, {i})"}]}
                if stream_every and (i % stream_every == stream_every - 1):
                    body["stream"], body["stream_options"] = True, {"include_usage": True}
                record = {"client": index, "i": i, "stream": bool(body.get("stream")), "t": time.monotonic()}
                try:
                    await _one(http, body, record)
                except (httpx.HTTPError, OSError, json.JSONDecodeError) as e:
                    record.update(status=0, error=f"{type(e).__name__}: {e}")
                records.append(record)
                if on_progress is not None:
                    on_progress(len(records))

    await asyncio.gather(*[client(i) for i in range(clients)])
    return records


def summarize(records: list[dict], wall_s: float) -> dict:
    ok = [r for r in records if r.get("status") == 200]
    latencies = [r["latency_s"] for r in ok]
    ttfts = [r["ttft_ms"] for r in ok if "ttft_ms" in r]
    server_ttfts = [r["server_ttft_ms"] for r in ok if "server_ttft_ms" in r]
    prompt = sum(r.get("prompt", 0) for r in ok)
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r.get("status"))] = statuses.get(str(r.get("status")), 0) + 1
    return {
        "requests": len(records), "ok": len(ok), "errors": len(records) - len(ok), "statuses": statuses,
        "wall_s": round(wall_s, 3), "requests_per_s": round(len(ok) / wall_s, 3) if wall_s else 0.0,
        "latency_p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "latency_p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "latency_max_ms": round(max(latencies, default=float("nan")) * 1000, 1),
        "stream_ttft_p50_ms": round(percentile(ttfts, 50), 1), "stream_ttft_p99_ms": round(percentile(ttfts, 99), 1),
        "server_ttft_p50_ms": round(percentile(server_ttfts, 50), 2),
        "cached_token_share": round(sum(r.get("cached", 0) for r in ok) / prompt, 4) if prompt else 0.0,
        "error_samples": [r.get("error", r.get("status")) for r in records if r.get("status") != 200][:5],
    }


class Redis:
    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            sys.exit("error: --redis needs a redis-server binary (apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        sys.exit("error: redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_server(args, store: str | None, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "blockrag.cli", "serve", "--model", args.model, "--port", str(port), "--workers",
           str(args.workers), "--max-queue", str(max(64, args.clients * 2))]
    if store:
        cmd += ["--store", store]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"error: the server exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    sys.exit("error: the server did not become healthy in 300 s")


def worker_pids(proc: subprocess.Popen) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "spawn_main" in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=50, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--pool", type=int, default=20, help="distinct documents requests draw from (2 each)")
    parser.add_argument("--stream-every", type=int, default=4, help="every N-th request of a client streams (0: none)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--redis", action="store_true", help="start a private redis-server as the server's store")
    parser.add_argument("--fault", choices=("none", "redis", "worker"), default="none",
                        help="mid-run: kill Redis (then restart it) or SIGKILL one worker")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (OMP_NUM_THREADS)")
    parser.add_argument("--time-limit", type=float, default=600.0, help="clients stop sending after this many s")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    args = parser.parse_args()
    if args.fault == "redis" and not args.redis:
        parser.error("--fault redis needs --redis")
    if args.fault == "worker" and args.workers < 2:
        parser.error("--fault worker needs --workers >= 2")

    redis = Redis() if args.redis else None
    if redis:
        redis.start()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve_load_{os.getpid()}.log"
    proc, url = start_server(args, f"{redis.url}?prefix=load:" if redis else None, log_path)
    total = args.clients * args.requests
    faults: list[dict] = []

    def on_progress(done: int) -> None:
        if args.fault == "none" or faults:
            return
        if done >= total // 3:
            if args.fault == "redis":
                redis.kill()
                faults.append({"fault": "redis killed", "after_requests": done, "t": time.monotonic()})
            else:
                pids = worker_pids(proc)
                os.kill(pids[0], signal.SIGKILL)
                faults.append({"fault": f"worker {pids[0]} SIGKILLed", "after_requests": done, "t": time.monotonic()})

    async def run() -> list[dict]:
        load = asyncio.create_task(run_load(url, args.model, args.clients, args.requests, max_tokens=args.max_tokens,
                                            pool=args.pool, stream_every=args.stream_every,
                                            time_limit_s=args.time_limit, on_progress=on_progress))
        if args.fault == "redis":
            while not faults and not load.done():
                await asyncio.sleep(0.05)
            await asyncio.sleep(3.0)
            if not load.done():
                redis.start()
                faults.append({"fault": "redis restarted", "t": time.monotonic()})
        return await load

    load_before = os.getloadavg()
    start = time.monotonic()
    try:
        records = asyncio.run(run())
    finally:
        wall = time.monotonic() - start
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        if redis:
            redis.kill()
    load_after = os.getloadavg()
    summary = summarize(records, wall)
    log_text = log_path.read_text()
    warnings = [line for line in log_text.splitlines() if line.startswith("WARNING")]
    summary["server_warnings"] = len(warnings)
    summary["server_warning_samples"] = [w[:200] for w in warnings[:4]]
    if faults:
        t0 = faults[0]["t"]
        after = [r for r in records if r["t"] >= t0]
        summary["after_fault"] = {"requests": len(after), "ok": sum(r.get("status") == 200 for r in after)}
        for f in faults:
            f["t"] = round(f["t"] - start, 2)

    print(f"device: {device_name()} | model {args.model} | {args.workers} worker(s) | store "
          f"{'redis' if redis else 'memory'} | fault {args.fault} | load average {load_before[0]:.1f} -> "
          f"{load_after[0]:.1f}")
    print(f"{'clients':>8} {'req':>6} {'ok':>6} {'err':>4} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'TTFT p50':>9} {'cached':>7}")
    print(f"{args.clients:>8} {summary['requests']:>6} {summary['ok']:>6} {summary['errors']:>4} "
          f"{summary['requests_per_s']:>7.2f} {summary['latency_p50_ms']:>8.1f} {summary['latency_p99_ms']:>8.1f} "
          f"{summary['latency_max_ms']:>8.1f} {summary['stream_ttft_p50_ms']:>9.1f} "
          f"{summary['cached_token_share']:>7.1%}")
    for f in faults:
        print(f"fault: {f}")
    result = {"benchmark": "serve_load", "device": device_name(), "model": args.model, "workers": args.workers,
              "store": "redis" if redis else "memory", "fault": args.fault, "faults": faults,
              "clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
              "documents_per_request": 2, "pool": args.pool, "stream_every": args.stream_every,
              "torch_threads_per_worker": args.threads, "dtype": "float32", "commit": commit(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "load_average": [round(load_before[0], 2), round(load_after[0], 2)], **summary}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
