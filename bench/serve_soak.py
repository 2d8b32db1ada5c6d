"""Soak test of `fmnist serve`: 100,000 requests, good ones mixed with hostile ones, over
concurrent connections; reports the answers per kind of request, unexpected answers and
transport errors, and the server's memory over the run.

    python bench/serve_soak.py --model runs/post                  # starts its own server
    python bench/serve_soak.py --model runs/post --requests 20000

The mix (weights per 1,000 requests): dataset images as PNG (900), photos as JPEG (40), and
hostile uploads: not an image, a truncated PNG, a malformed multipart body, a bad top_k, a
foreign Host header, a cross-origin POST, a declared 1 GB body, a 900-megapixel PNG bomb, a
request head over the size limit (5 each), and per 10,000: files of ~9 MiB crafted to cost
time per byte (PNG chunks, JPEG segments, BMP no-ops, tiny multipart parts; 1 each). Every
request has the answers it may get (503 with Retry-After is counted as shed load, not an
error). Traffic goes to 127.0.0.1 only and stops after --requests or --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
from serve_load import png_bodies, start_server, wait_healthy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import (  # noqa: E402  (the hostile files the tests use)
    bmp_rle_noops,
    bomb_png,
    jpeg_of_empty_segments,
    multipart_of_parts,
    png,
    png_of_private_chunks,
)

BOUNDARY = "fmnistbenchboundary"  # png_bodies' boundary
CRAFTED_BYTES = 9 * 1024 * 1024


def multipart(data: bytes, name: str = "x.png") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def post(host: str, body: bytes, path: str = "/v1/predict", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def photo_jpegs(count: int) -> list[bytes]:
    """Photo-like pictures: a dark garment shape on a light ground, as JPEG."""
    import io

    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(count):
        w, h = int(rng.integers(200, 900)), int(rng.integers(200, 900))
        image = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(180, 250, 3)))
        ImageDraw.Draw(image).rectangle([w // 4, h // 5, 3 * w // 4, 4 * h // 5], fill=(40, 50, 70))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        bodies.append(multipart(buffer.getvalue(), "photo.jpg"))
    return bodies


def request_kinds(host: str) -> dict[str, tuple[float, list[bytes], set[int]]]:
    """kind -> (weight, raw requests to choose from, answers allowed besides 503)."""
    good = png_bodies(200)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    truncated = multipart(png(noise)[:2000], "cut.png")
    crafted = [png_of_private_chunks(CRAFTED_BYTES), jpeg_of_empty_segments(CRAFTED_BYTES), bmp_rle_noops(CRAFTED_BYTES)]
    return {
        "good png": (900, [post(host, b) for b in good], {200}),
        "photo jpeg": (40, [post(host, b) for b in photo_jpegs(20)], {200, 422}),
        "not an image": (5, [post(host, multipart(b"%PDF-1.4 not a picture" * 50, "doc.pdf"))], {415}),
        "truncated png": (5, [post(host, truncated)], {400}),
        "malformed multipart": (5, [post(host, b"--nonsense\r\n\r\n")], {400}),
        "bad top_k": (5, [post(host, good[0], "/v1/predict?top_k=%C2%B2")], {422}),
        "foreign host": (5, [post("evil.example", good[0])], {400}),
        "cross-origin": (5, [post(host, good[0], extra="Origin: http://evil.example\r\n")], {403}),
        "declared 1 GB": (5, [post(host, b"", extra="").replace(b"Content-Length: 0", b"Content-Length: 1073741824")],
                          {413}),
        "png bomb": (5, [post(host, multipart(bomb_png(30_000), "bomb.png"))], {413}),
        "huge head": (5, [f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nX-Big: {'x' * 40_000}\r\n\r\n".encode()], {431}),
        "crafted 9 MiB": (0.3, [post(host, multipart(c)) for c in crafted], {413}),
        "tiny parts 9 MiB": (0.1, [post(host, multipart_of_parts(CRAFTED_BYTES, BOUNDARY))], {400}),
    }


async def read_response(reader) -> tuple[int, dict[bytes, bytes], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if b":" in line:
            name, value = line.split(b":", 1)
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return status, headers, body


async def worker(host, port, plan, answers, errors, counter):
    """One client: keep-alive while the server keeps the connection, a new one when it closes."""
    reader = writer = None
    while counter[0] > 0 and time.monotonic() < counter[1]:
        counter[0] -= 1
        kind, raw, allowed = plan()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(raw)
            status, headers, _ = await asyncio.wait_for(read_response(reader), 120)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError) as e:
            errors[kind][type(e).__name__] += 1
            if writer is not None:
                writer.close()
            reader = writer = None
            continue
        answers[kind][status] += 1
        if status not in allowed and not (status == 503 and headers.get(b"retry-after")):
            errors[kind][f"HTTP {status}"] += 1
        if headers.get(b"connection") == b"close":
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


def rss_mb(pid: int | None) -> float:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, TypeError):
        pass
    return float("nan")


async def soak(host, port, kinds, requests, concurrency, max_seconds, pid):
    names = list(kinds)
    weights = [kinds[k][0] for k in names]
    rng = random.Random(0)

    def plan():
        kind = rng.choices(names, weights)[0]
        return kind, rng.choice(kinds[kind][1]), kinds[kind][2]

    answers = collections.defaultdict(collections.Counter)
    errors = collections.defaultdict(collections.Counter)
    counter = [requests, time.monotonic() + max_seconds]
    memory = [(0.0, rss_mb(pid))]
    start = time.monotonic()

    async def sample_memory():
        while True:
            await asyncio.sleep(1)
            memory.append((time.monotonic() - start, rss_mb(pid)))

    sampler = asyncio.create_task(sample_memory())
    await asyncio.gather(*(worker(host, port, plan, answers, errors, counter) for _ in range(concurrency)))
    sampler.cancel()
    memory.append((time.monotonic() - start, rss_mb(pid)))
    return answers, errors, memory, time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="run folder: start `fmnist serve` on a free loopback port")
    parser.add_argument("--url", help="an already running server (loopback only), instead of --model")
    parser.add_argument("--requests", type=int, default=100_000, help="requests in all (default: 100,000)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent connections (default: 32)")
    parser.add_argument("--max-seconds", type=float, default=1800, help="time limit (default: 1800)")
    parser.add_argument("--serve-args", default="", help="extra flags for `fmnist serve`")
    args = parser.parse_args()
    if bool(args.model) == bool(args.url):
        parser.error("give exactly one of --model and --url")
    server = None
    if args.model:
        server, url, log = start_server(args.model, args.serve_args)
    else:
        url = args.url.rstrip("/")
    host, _, port_text = url.removeprefix("http://").partition(":")
    if host not in ("127.0.0.1", "localhost"):
        parser.error("load is only sent to this machine's loopback address")
    port = int(port_text or 80)
    try:
        wait_healthy(url, 120)
        kinds = request_kinds(f"{host}:{port}")
        answers, errors, memory, seconds = asyncio.run(soak(host, port, kinds, args.requests, args.concurrency,
                                                            args.max_seconds, server.pid if server else None))
        alive = server is None or server.poll() is None
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
            log.seek(0)
            server_log = log.read().decode(errors="replace")
    total = sum(sum(c.values()) for c in answers.values()) + sum(sum(c.values()) for c in errors.values()
                                                                  if not any(k.startswith("HTTP") for k in c))
    print(f"{total:,} requests in {seconds:.0f} s ({total / seconds:.0f}/s), {args.concurrency} connections, "
          f"{os.cpu_count()} CPU cores shared by server and client")
    print(f"{'kind':<20} {'sent':>8}  answers")
    for kind in kinds:
        sent = sum(answers[kind].values()) + sum(v for k, v in errors[kind].items() if not k.startswith("HTTP"))
        shown = ", ".join(f"{status}: {n:,}" for status, n in sorted(answers[kind].items()))
        bad = ", ".join(f"{k}: {n}" for k, n in errors[kind].items())
        print(f"{kind:<20} {sent:>8,}  {shown}{'   ERRORS ' + bad if bad else ''}")
    error_count = sum(sum(c.values()) for c in errors.values())
    rss = [m for _, m in memory]
    settled = [m for t, m in memory if t >= min(10.0, seconds / 10)] or rss
    print(f"errors (unexpected answers and transport errors): {error_count}")
    print(f"server memory (RSS): {rss[0]:.0f} MiB at start, {settled[0]:.0f} MiB after {min(10.0, seconds / 10):.0f} s, "
          f"peak {max(rss):.0f} MiB, {rss[-1]:.0f} MiB at the end: growth {rss[-1] - settled[0]:+.0f} MiB")
    print(f"server still running at the end: {'yes' if alive else 'NO'}")
    if server is not None and "Traceback" in server_log:
        print(f"server log holds {server_log.count('Traceback')} traceback(s)")


if __name__ == "__main__":
    main()
