"""Load benchmark of `fmnist serve`: single-image predictions over loopback at a fixed number of
concurrent keep-alive connections; prints requests/s, p50/p99 latency and errors per round and
the median of the rounds.

    python bench/serve_load.py --model runs/my-run                 # starts its own server
    python bench/serve_load.py --url http://127.0.0.1:8000 --requests 3000

Each request posts one 28x28 PNG test image as multipart field `file`. The load generator is
asyncio on raw sockets (no HTTP library): a few microseconds per request of client CPU, on the
same machine as the server. Traffic goes to 127.0.0.1 only, bounded by --requests and
--max-seconds per round.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

BOUNDARY = "fmnistbenchboundary"


def png_bodies(count: int) -> list[bytes]:
    """Multipart bodies, each one 28x28 PNG test image."""
    from fmnist.data import load_split

    images, _ = load_split("test")
    bodies = []
    for image in images[:count]:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        bodies.append(
            (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
             f"Content-Type: image/png\r\n\r\n").encode() + buffer.getvalue() + f"\r\n--{BOUNDARY}--\r\n".encode()
        )
    return bodies


def raw_requests(host: str, port: int, bodies: list[bytes]) -> list[bytes]:
    return [
        (f"POST /v1/predict HTTP/1.1\r\nHost: {host}:{port}\r\n"
         f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
         f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        for body in bodies
    ]


async def connection(host, port, requests, counter, stop_at, latencies, errors):
    """One keep-alive connection sending requests back to back until the shared count or the
    deadline runs out."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while counter[0] > 0 and time.perf_counter() < stop_at:
            counter[0] -= 1
            request = requests[counter[0] % len(requests)]
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            if status != 200 or b'"top"' not in body:
                errors.append(status)
    except (OSError, asyncio.IncompleteReadError) as e:
        errors.append(repr(e))
    finally:
        writer.close()


def cpu_seconds(pid: int | None) -> float:
    """User plus system CPU time of a process and its threads (Linux), 0 when unknown."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_round(host, port, requests, total, concurrency, max_seconds, server_pid=None) -> dict:
    latencies, errors, counter = [], [], [total]
    server_cpu = cpu_seconds(server_pid)
    client_cpu = time.process_time()
    start = time.perf_counter()
    stop_at = start + max_seconds
    await asyncio.gather(*(connection(host, port, requests, counter, stop_at, latencies, errors)
                           for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    client_cpu = time.process_time() - client_cpu
    server_cpu = cpu_seconds(server_pid) - server_cpu
    ms = np.asarray(latencies) * 1e3
    done = max(1, len(latencies))
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)) if ms.size else float("nan"),
        "p99_ms": float(np.percentile(ms, 99)) if ms.size else float("nan"),
        "errors": len(errors),
        "server_cpu_ms_per_request": server_cpu * 1e3 / done,
        "client_cpu_ms_per_request": client_cpu * 1e3 / done,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, serve_args: str = "") -> tuple[subprocess.Popen, str, object]:
    """`fmnist serve` of a run folder on a free loopback port: the process, its URL and the
    temporary file its output goes to."""
    port = free_port()
    log = tempfile.TemporaryFile()
    server = subprocess.Popen([sys.executable, "-m", "fmnist", "serve", "--model", model, "--port", str(port),
                               "--no-access-log", *serve_args.split()], stdout=log, stderr=subprocess.STDOUT)
    return server, f"http://127.0.0.1:{port}", log


def wait_healthy(url: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"server at {url} did not become healthy in {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="run folder: start `fmnist serve` on a free loopback port")
    parser.add_argument("--url", help="an already running server (loopback only), instead of --model")
    parser.add_argument("--requests", type=int, default=5000, help="requests per round (default: 5000)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent connections (default: 32)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds; the median is reported (default: 3)")
    parser.add_argument("--warmup", type=int, default=500, help="requests before measuring (default: 500)")
    parser.add_argument("--max-seconds", type=float, default=60, help="time limit of a round (default: 60)")
    parser.add_argument("--images", type=int, default=1000, help="distinct test images to cycle through")
    parser.add_argument("--serve-args", default="", help="extra flags for `fmnist serve`, e.g. '--threads 2'")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if bool(args.model) == bool(args.url):
        parser.error("give exactly one of --model and --url")

    server = None
    if args.model:
        server, url, server_log = start_server(args.model, args.serve_args)
    else:
        url = args.url.rstrip("/")
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        parser.error("load is only sent to this machine's loopback address")
    host, port = parts.hostname, parts.port or 80
    try:
        wait_healthy(url)
        requests = raw_requests(host, port, png_bodies(args.images))
        if args.warmup:
            asyncio.run(run_round(host, port, requests, args.warmup, args.concurrency, args.max_seconds))
        pid = server.pid if server is not None else None
        rounds = [asyncio.run(run_round(host, port, requests, args.requests, args.concurrency,
                                        args.max_seconds, pid)) for _ in range(args.rounds)]
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
            server_log.seek(0)
            if server.returncode not in (0, -15):
                sys.stderr.write(server_log.read().decode(errors="replace"))
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    if args.json:
        print(json.dumps({"rounds": rounds, "median": median, "concurrency": args.concurrency}))
        return
    print(f"POST /v1/predict, one 28x28 PNG each, {args.concurrency} connections, "
          f"{os.cpu_count()} CPU cores shared by server and load generator")
    print(f"{'round':>6} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"
          f" {'server CPU ms/req':>18} {'client CPU ms/req':>18}")
    for label, r in [*enumerate(rounds, 1), ("median", median)]:
        print(f"{label:>6} {r['requests']:>9.0f} {r['requests_per_s']:>8.0f} {r['p50_ms']:>8.1f} "
              f"{r['p99_ms']:>8.1f} {r['errors']:>7.0f} {r['server_cpu_ms_per_request']:>18.2f} "
              f"{r['client_cpu_ms_per_request']:>18.2f}")


if __name__ == "__main__":
    main()
