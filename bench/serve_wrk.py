"""Latency of a freshly started `fmnist serve`, measured with wrk: each round starts a new server,
waits until it answers /healthz (its warm-up done), then runs wrk for 15 s at 32 connections,
one 28x28 PNG test image per request. Prints each round and the medians, with the hardware.

    python bench/serve_wrk.py --model runs/post
    python bench/serve_wrk.py --model runs/post --rounds 1 --seconds 5

Target (issue 9): p99 <= 50 ms, >= 1,000 requests/s and no errors on two cores, from the first
second. Needs wrk (`apt-get install wrk`): without it the benchmark says so and exits 0. wrk
and the server share this machine's cores; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from serve_load import png_bodies, start_server, wait_healthy

BOUNDARY = "fmnistbenchboundary"  # png_bodies' boundary

LUA = """
local f = io.open(os.getenv("FMNIST_WRK_BODY"), "rb")
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "multipart/form-data; boundary=%s"
"""


def hardware() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    load = ", load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
            f"torch {torch.__version__}{load}")


def parse_wrk(output: str) -> dict:
    """Requests/s, p50/p90/p99 in ms and error counts from wrk --latency's report."""
    def ms(text: str) -> float:
        value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]

    percentiles = {int(p): ms(v) for p, v in re.findall(r"^\s+(\d+)%\s+(\S+)$", output, re.M)}
    errors = sum(map(int, re.findall(r"(?:connect|read|write|timeout) (\d+)", output)))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "requests": int(re.search(r"(\d+) requests in", output)[1]),
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1]),
        "p50_ms": percentiles[50], "p90_ms": percentiles[90], "p99_ms": percentiles[99],
        "errors": errors + (int(non_2xx[1]) if non_2xx else 0),
    }


def one_round(args, body_path: str, lua_path: str) -> dict:
    """A fresh server, wrk against it as soon as it is healthy."""
    server, url, log = start_server(args.model, args.serve_args)
    try:
        started = time.monotonic()
        wait_healthy(url, 120)
        ready = time.monotonic() - started
        result = subprocess.run(["wrk", "-t", str(args.threads), "-c", str(args.connections), "-d", f"{args.seconds}s",
                                 "--latency", "-s", lua_path, url + "/v1/predict"],
                                capture_output=True, text=True, env=os.environ | {"FMNIST_WRK_BODY": body_path},
                                timeout=args.seconds + 60)
        if result.returncode != 0:
            raise SystemExit(f"wrk failed: {result.stderr or result.stdout}")
        return parse_wrk(result.stdout) | {"ready_s": ready}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.seek(0)
        if server.returncode not in (0, -15):
            sys.stderr.write(log.read().decode(errors="replace"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="run folder of the model to serve")
    parser.add_argument("--rounds", type=int, default=3, help="fresh servers measured; medians reported (default: 3)")
    parser.add_argument("--seconds", type=int, default=15, help="wrk duration per round (default: 15)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections (default: 32)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default: 2)")
    parser.add_argument("--serve-args", default="", help="extra flags for `fmnist serve`")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk): nothing measured")
        return
    with tempfile.TemporaryDirectory() as tmp:
        body_path, lua_path = os.path.join(tmp, "body"), os.path.join(tmp, "post.lua")
        with open(body_path, "wb") as f:
            f.write(png_bodies(1)[0])
        with open(lua_path, "w") as f:
            f.write(LUA % BOUNDARY)
        rounds = [one_round(args, body_path, lua_path) for _ in range(args.rounds)]
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    if args.json:
        print(json.dumps({"rounds": rounds, "median": median, "hardware": hardware()}))
        return
    print(f"wrk: fresh server each round, {args.seconds} s at {args.connections} connections, "
          "POST /v1/predict with one 28x28 PNG")
    print(f"hardware: {hardware()}")
    print(f"{'round':>6} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>7}"
          f" {'ready s':>8}")
    for label, r in [*enumerate(rounds, 1), ("median", median)]:
        print(f"{label:>6} {r['requests']:>9.0f} {r['requests_per_s']:>8.0f} {r['p50_ms']:>8.1f} {r['p90_ms']:>8.1f} "
              f"{r['p99_ms']:>8.1f} {r['errors']:>7.0f} {r['ready_s']:>8.1f}")


if __name__ == "__main__":
    main()
