"""`python -m minigpt4 bench replicas`: N `serve` processes behind a round-robin against one.

The HTTP API keeps no state between requests (a request carries its whole history), so replicas
behind any load balancer serve as many more users as they have cores or GPUs. This bench measures
it on this machine: it starts 1, then N `serve` processes of a preset (loopback only), puts a
connection-level round-robin proxy in front of them (what an L4 load balancer does), lets
`--clients` concurrent clients send `--requests` chat completions each, and prints the aggregate
completion tokens per second of each setup and their ratio, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx

from minigpt4.commands.common import HelpFormatter

LOOPBACK = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


@contextmanager
def serve_processes(preset: str, n: int, threads: int) -> Iterator[list[int]]:
    """`n` `python -m minigpt4 serve` processes on loopback ports; yields the ports once all answer."""
    ports = [_free_port() for _ in range(n)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "minigpt4",
                "serve",
                "--cfg-path",
                preset,
                "--threads",
                str(threads),
                "--host",
                LOOPBACK,
                "--port",
                str(port),
                "--max-queue",
                "64",
            ],  # fmt: skip
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        deadline = time.monotonic() + 300
        for port, proc in zip(ports, procs, strict=True):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"a serve process exited with status {proc.returncode}")
                try:
                    httpx.get(f"http://{LOOPBACK}:{port}/health", timeout=1).raise_for_status()
                    break
                except httpx.HTTPError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("a serve process did not start within 300 s") from None
                    time.sleep(0.2)
        yield ports
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def round_robin(ports: Sequence[int]) -> Iterator[int]:
    """A TCP proxy on a loopback port that hands each new connection to the next backend in turn."""
    backends = itertools.cycle(ports)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict = {}

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(LOOPBACK, next(backends))
        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

    async def start() -> None:
        state["server"] = await asyncio.start_server(handle, LOOPBACK, 0)
        state["port"] = state["server"].sockets[0].getsockname()[1]
        ready.set()

    thread = threading.Thread(
        target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True
    )
    thread.start()
    ready.wait(10)
    try:
        yield state["port"]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def load(port: int, model: str, clients: int, requests: int, max_tokens: int) -> dict[str, float]:
    """`clients` threads, each with its own connection, sending `requests` greedy completions."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }

    def client(_: int) -> int:
        tokens = 0
        with httpx.Client(base_url=f"http://{LOOPBACK}:{port}", timeout=600) as http:
            for _ in range(requests):
                reply = http.post("/v1/chat/completions", json=body)
                reply.raise_for_status()
                tokens += reply.json()["usage"]["completion_tokens"]
        return tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(client, range(clients)))
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        prog="python -m minigpt4 bench replicas",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--cfg-path", default="minigpt4_tiny_random", help="preset (default: %(default)s)")
    p.add_argument(
        "--replicas", type=int, default=2, help="serve processes of the second setup (%(default)s)"
    )
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (%(default)s)")
    p.add_argument("--requests", type=int, default=20, help="requests per client (%(default)s)")
    p.add_argument("--max-tokens", type=int, default=48, help="answer length (%(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per serve process (%(default)s)")
    args = p.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would bury the figures
    for name in ("replicas", "clients", "requests", "max_tokens", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    model = os.path.splitext(os.path.basename(args.cfg_path))[0]
    results = {}
    for n in (1, args.replicas):
        with serve_processes(args.cfg_path, n, args.threads) as ports, round_robin(ports) as port:
            load(port, model, args.clients, 1, args.max_tokens)  # warm-up: first requests build caches
            results[n] = load(port, model, args.clients, args.requests, args.max_tokens)
        print(f"{n} serve process(es): {results[n]}", flush=True)
    ratio = results[args.replicas]["tokens_per_s"] / results[1]["tokens_per_s"]
    print(f"aggregate tokens/s, {args.replicas} replicas over 1: {ratio:.2f}× ({args.clients} clients, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at the end)")  # fmt: skip
    return 0
