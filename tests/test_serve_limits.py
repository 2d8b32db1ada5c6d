"""`fmnist serve` as an attacker meets it: idle and slow connections, crafted uploads, overload,
requests from other sites, API keys. Real server processes of an untrained model on loopback
(no data needed); every hostile load is bounded in count and time."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    bmp_rle_noops,
    jpeg_of_empty_segments,
    multipart_of_parts,
    picture_bytes,
    png,
    png_of_private_chunks,
    running_server,
    untrained_run,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from fmnist.serve.app import create_app, query_options  # noqa: E402
from fmnist.serve.config import ServeConfig  # noqa: E402

BOUNDARY = "limitsboundary"
UPLOAD_LIMIT = 10 * 1024 * 1024  # the default --max-upload-bytes
API_KEY = "test-key-0123456789abcdef"
HEADER_TIMEOUT = 2.0  # seconds, the test servers' --header-timeout


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    return untrained_run(tmp_path_factory.mktemp("serve") / "untrained").path


@pytest.fixture(scope="module")
def server(model_run):
    with running_server(model_run, "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", "4") as s:
        yield s


@pytest.fixture(scope="module")
def keyed_server(model_run):
    with running_server(model_run, "--api-key", API_KEY, "--docs") as s:
        yield s


def multipart(data: bytes, filename: str = "image.png") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def request(address, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 60) -> tuple[int, dict, bytes]:
    """One request on its own connection: status, headers (lower-case names), body."""
    connection = http.client.HTTPConnection(*address[:2], timeout=timeout)
    try:
        headers = dict(headers or {})
        if body is not None:
            headers.setdefault("Content-Type", f"multipart/form-data; boundary={BOUNDARY}")
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


SMALL = multipart(png(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)))


def small_prediction(address, **headers) -> tuple[int, dict, bytes]:
    return request(address, "POST", "/v1/predict", SMALL, headers)


def timed(call, *args, **kwargs):
    start = time.perf_counter()
    result = call(*args, **kwargs)
    return result, time.perf_counter() - start


def server_rss_mb(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {key} in /proc")


def read_until_closed(s: socket.socket, timeout: float = 10) -> bytes:
    s.settimeout(timeout)
    reply = b""
    while data := s.recv(65536):
        reply += data
    return reply


def closed_by_server(s: socket.socket, wait: float) -> bool:
    """Whether the server closed this connection within `wait` seconds (EOF or reset)."""
    s.settimeout(wait)
    try:
        return s.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


# ----------------------------------------------------------------------------- connections


def test_idle_and_slow_connections_do_not_shut_the_service_out(server):
    """600 idle sockets and 20 slow uploads just under the size limit: new requests are
    answered within a second throughout, the idle sockets are closed within the header
    timeout and the slow uploads get 408 at the body deadline."""
    idle = [socket.create_connection(server[:2]) for _ in range(600)]
    slow = []
    for _ in range(20):
        s = socket.create_connection(server[:2])
        s.sendall((f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {UPLOAD_LIMIT - 100}\r\n"
                   f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode())
        slow.append(s)
    opened = time.monotonic()
    try:
        while time.monotonic() - opened < HEADER_TIMEOUT + 1:
            for s in slow:
                s.send(b"x" * 100)
            (status, _, _), took = timed(request, server, "GET", "/healthz")
            assert status == 200 and took < 1.0, (status, took)
            (status, _, _), took = timed(small_prediction, server)
            assert status == 200 and took < 1.0, (status, took)
            time.sleep(0.1)
        assert all(closed_by_server(s, max(0.01, HEADER_TIMEOUT + 2 - (time.monotonic() - opened))) for s in idle)
        for s in slow:  # the body deadline, 4 s after their headers
            reply = read_until_closed(s)
            assert reply.startswith(b"HTTP/1.1 408") and b"not received within 4 s" in reply, reply
    finally:
        for s in idle + slow:
            s.close()


def test_a_slow_request_head_is_cut_off(server):
    with socket.create_connection(server[:2]) as s:
        start = time.monotonic()
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        s.settimeout(0.5)
        while time.monotonic() - start < HEADER_TIMEOUT + 3:  # a header line every half second
            try:
                s.sendall(b"X-Slow: 1\r\n")
                if s.recv(1) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        assert HEADER_TIMEOUT - 0.1 < time.monotonic() - start < HEADER_TIMEOUT + 2


def test_keep_alive_connections_serve_many_requests(server):
    connection = http.client.HTTPConnection(*server[:2], timeout=10)
    for _ in range(3):
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["status"] == "ok"
    connection.close()


def test_oversized_request_head_gets_431(server):
    status, headers, body = request(server, "GET", "/healthz", headers={"X-Big": "x" * 40_000})
    assert status == 431 and b"over 32,768 bytes" in body
    assert "frame-ancestors 'none'" in headers["content-security-policy"]


def test_a_request_that_is_not_http_gets_a_json_400(server):
    with socket.create_connection(server[:2]) as s:
        s.sendall(b"\x16\x03\x01 not HTTP at all\r\n\r\n")  # e.g. TLS spoken to a plain-HTTP port
        reply = read_until_closed(s)
    assert reply.startswith(b"HTTP/1.1 400") and b'{"detail": "Invalid HTTP request received."}' in reply


def test_at_the_connection_limit_the_longest_idle_connection_makes_room(model_run):
    with running_server(model_run, "--max-connections", "8") as address:
        idle = [socket.create_connection(address[:2]) for _ in range(8)]
        time.sleep(0.2)
        for _ in range(3):
            assert request(address, "GET", "/healthz")[0] == 200
        # The first request made room by closing the longest idle socket; then there was room.
        assert closed_by_server(idle[0], 2) and not closed_by_server(idle[1], 0.2)
        for s in idle:
            s.close()


# ----------------------------------------------------------------------------- crafted uploads


def healthz_latencies(address, stop: threading.Event, out: list) -> None:
    while not stop.is_set():
        out.append(timed(request, address, "GET", "/healthz")[1])
        time.sleep(0.005)


CRAFTED = {  # each just under the upload limit; what it costs Pillow or python-multipart per byte
    "png-private-chunks": lambda size: multipart(png_of_private_chunks(size)),
    "jpeg-empty-segments": lambda size: multipart(jpeg_of_empty_segments(size)),
    "bmp-rle-no-ops": lambda size: multipart(bmp_rle_noops(size)),
    "tiny-parts": lambda size: multipart_of_parts(size, BOUNDARY),
}


@pytest.mark.parametrize("kind", list(CRAFTED))
def test_crafted_uploads_get_a_4xx_while_healthz_stays_fast(server, kind):
    body = CRAFTED[kind](UPLOAD_LIMIT - 1000)
    assert UPLOAD_LIMIT - 100_000 < len(body) <= UPLOAD_LIMIT
    stop, latencies = threading.Event(), []
    probe = threading.Thread(target=healthz_latencies, args=(server, stop, latencies))
    probe.start()
    try:
        time.sleep(0.05)
        status, _, answer = request(server, "POST", "/v1/predict", body)
    finally:
        stop.set()
        probe.join()
    assert 400 <= status < 500, answer
    assert "detail" in json.loads(answer)
    # The bound is 100 ms; a shared 2-core machine gets the median there and a margin for the worst.
    assert np.median(latencies) < 0.1 and max(latencies) < 1.0, sorted(latencies)[-5:]


@pytest.mark.slow  # ~20 s of two cores decoding
def test_256_large_pngs_at_once_leave_small_predictions_answered(model_run):
    picture = np.full((5000, 5000, 3), 230, np.uint8)
    picture[1000:4000, 1500:3500] = (30, 30, 60)
    body = multipart(png(picture))
    with running_server(model_run) as address:
        pid = address[2].pid
        base = server_rss_mb(pid)
        stop, small, peak = threading.Event(), [], [base]

        def small_ones():
            while not stop.is_set():
                (status, headers, _), took = timed(small_prediction, address)
                small.append((status, took, headers.get("retry-after")))
                peak.append(server_rss_mb(pid))
                time.sleep(0.05)

        watcher = threading.Thread(target=small_ones)
        watcher.start()
        try:
            with ThreadPoolExecutor(256) as pool:
                large = list(pool.map(lambda _: request(address, "POST", "/v1/predict", body, timeout=120)[:2],
                                      range(256)))
        finally:
            stop.set()
            watcher.join()
        assert all(status in (200, 503) for status, _ in large)
        assert all(headers.get("retry-after") for status, headers in large if status == 503)
        assert sum(status == 200 for status, _ in large) >= 10
        assert small and all(took < 2.0 and (status == 200 or (status == 503 and retry))
                             for status, took, retry in small), small
        assert max(peak) < 1536, (base, max(peak))
        assert small_prediction(address)[0] == 200


# ----------------------------------------------------------------------------- browsers and keys


def test_api_key_guards_v1_only(keyed_server):
    assert small_prediction(keyed_server)[0] == 401
    status, headers, body = small_prediction(keyed_server, Authorization="Bearer wrong-key-0123456789")
    assert status == 401 and headers["www-authenticate"].startswith("Bearer") and b"API key" in body
    assert request(keyed_server, "GET", "/v1/classes")[0] == 401
    assert small_prediction(keyed_server, Authorization=f"Bearer {API_KEY}")[0] == 200
    assert request(keyed_server, "GET", "/v1/classes", headers={"Authorization": f"Bearer {API_KEY}"})[0] == 200
    for open_path in ("/healthz", "/", "/openapi.json"):
        assert request(keyed_server, "GET", open_path)[0] == 200


def test_docs_only_when_asked_for(server, keyed_server):
    assert request(server, "GET", "/docs")[0] == 404
    status, headers, _ = request(keyed_server, "GET", "/docs")
    assert status == 200 and "cdn.jsdelivr.net" in headers["content-security-policy"]


def test_foreign_host_names_are_refused(server):
    """A page on evil.example whose name was rebound to 127.0.0.1 sends Host: evil.example."""
    assert request(server, "GET", "/healthz", headers={"Host": "evil.example"})[0] == 400
    assert small_prediction(server, Host="evil.example")[0] == 400
    for host in ("localhost", f"127.0.0.1:{server[1]}", f"localhost:{server[1]}", "[::1]"):
        assert request(server, "GET", "/healthz", headers={"Host": host})[0] == 200


def test_cross_origin_posts_are_refused(server):
    assert small_prediction(server, Origin="http://evil.example")[0] == 403
    assert small_prediction(server, Origin="null")[0] == 403
    own = f"http://127.0.0.1:{server[1]}"
    assert small_prediction(server, Origin=own)[0] == 200


def test_every_answer_has_security_headers(server):
    for method, path, body in (("GET", "/", None), ("GET", "/static/app.js", None), ("GET", "/healthz", None),
                               ("GET", "/nowhere", None), ("POST", "/v1/predict", b"garbage")):
        status, headers, _ = request(server, method, path, body)
        assert headers["x-content-type-options"] == "nosniff", path
        csp = headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp and "data:" in csp, path
    assert "server" not in headers


def test_no_paths_of_the_machine_in_answers(server, model_run):
    _, _, spec = request(server, "GET", "/openapi.json")
    assert str(model_run) not in spec.decode() and str(Path(model_run).parent) not in spec.decode()


def test_superscript_digits_are_a_422_not_a_500(server):
    status, _, body = request(server, "POST", "/v1/predict?top_k=%C2%B2", SMALL)
    assert status == 422 and b"top_k must be" in body
    with pytest.raises(Exception, match="top_k"):
        query_options({"top_k": "\u00b2"}, 10)


def test_queue_full_answers_503_with_retry_after(model_run):
    with running_server(model_run, "--max-queue", "1", "--body-timeout", "5") as address:
        with socket.create_connection(address[:2]) as s:  # holds the one small-upload slot
            s.sendall((f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(SMALL)}\r\n"
                       f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode() + SMALL[:10])
            time.sleep(0.3)
            status, headers, body = small_prediction(address)
            assert status == 503 and headers["retry-after"] == "1" and b"busy" in body
            s.sendall(SMALL[10:])
            s.settimeout(10)
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
        assert small_prediction(address)[0] == 200


def test_exposed_without_a_key_warns_and_bad_keys_are_refused(tmp_path, capsys, monkeypatch):
    from fmnist.cli import main

    monkeypatch.delenv("FMNIST_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "warning: serving on 0.0.0.0 without an API key" in err and "no such run folder" in err
    assert main(["serve", "--api-key", "short", "--model", str(tmp_path / "missing")]) == 2
    assert "--api-key must be at least 16 printable ASCII characters" in capsys.readouterr().err
    monkeypatch.setenv("FMNIST_API_KEY", API_KEY)
    assert main(["serve", "--host", "0.0.0.0", "--model", str(tmp_path / "missing")]) == 2
    assert "warning" not in capsys.readouterr().err


def test_allowed_host_names():
    assert ServeConfig().host_names() == ["127.0.0.1", "[::1]", "localhost"]
    assert socket.gethostname().lower() in ServeConfig(host="0.0.0.0").host_names()
    assert ServeConfig(host="::1").host_names() == ["127.0.0.1", "[::1]", "localhost"]
    assert ServeConfig(allowed_hosts="api.example.com, *.example.org").host_names() == ["api.example.com",
                                                                                        "*.example.org"]
    with pytest.raises(Exception, match="not a host name"):
        ServeConfig(allowed_hosts="ex*ample.com").validate()


# ----------------------------------------------------------------------------- in-process


def test_healthz_reports_a_dead_batcher(model_run):
    from fmnist.inference.predictor import load_model

    app = create_app(load_model(model_run), ServeConfig())

    async def scenario():
        async with app.router.lifespan_context(app):
            before = await asgi_get(app, "/healthz")
            app.state.batcher.task.cancel()
            await asyncio.sleep(0)
            return before, await asgi_get(app, "/healthz")

    (status_before, before), (status_after, after) = asyncio.run(scenario())
    assert status_before == 200 and before["status"] == "ok"
    assert status_after == 503 and after["status"] == "unavailable"


async def asgi_get(app, path: str) -> tuple[int, dict]:
    """GET `path` from an ASGI app in this process: its status and JSON body."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"host", b"127.0.0.1")], "scheme": "http", "http_version": "1.1",
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "root_path": "", "asgi": {"version": "3.0"}}
    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


@st.composite
def uploads(draw) -> tuple[bytes, str]:
    """A request body and its Content-Type: a picture (honest or spoiled) in a multipart body,
    itself sometimes spoiled, or anything at all."""
    picture = draw(picture_bytes())
    body = draw(st.sampled_from([multipart(picture), multipart(picture)[:draw(st.integers(0, 200))],
                                 multipart(picture).replace(b"file", b"fil"), picture, draw(st.binary(max_size=300))]))
    content_type = draw(st.sampled_from([f"multipart/form-data; boundary={BOUNDARY}", "multipart/form-data",
                                         "image/png", "", f"multipart/form-data; boundary={BOUNDARY[:-1]}",
                                         "multipart/form-data; boundary=\"\""]))
    return body, content_type


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(upload=uploads())
def test_any_upload_is_prepared_or_gets_a_4xx(upload):
    """The upload path in this process: a 28x28 image or an HTTPError with a 4xx status."""
    from fmnist.serve.errors import HTTPError
    from fmnist.serve.uploads import Uploads

    body, content_type = upload
    pool = Uploads(ServeConfig())
    try:
        image = asyncio.run(pool.prepare(body, content_type))
        assert image.dtype == np.uint8 and image.shape == (28, 28)
    except HTTPError as e:
        assert 400 <= e.status < 500 and "\n" not in e.message, e.message
    finally:
        pool.shutdown()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(upload=uploads(), query=st.sampled_from(["", "?top_k=10", "?input=true", "?top_k=%C2%B2", "?top_k=-1&input=x"]))
def test_any_upload_over_http_gets_200_or_a_json_4xx(server, upload, query):
    body, content_type = upload
    status, headers, answer = request(server, "POST", "/v1/predict" + query, body, {"Content-Type": content_type})
    assert status == 200 or 400 <= status < 500, (status, answer[:200])
    assert headers["content-type"] == "application/json" and json.loads(answer)
    assert server[2].poll() is None


def test_big_image_in_a_small_file_is_decoded_in_the_large_lane():
    """A 2000x2000 PNG of one colour is a few KB: it is opened in the small lane but decoded in
    the large one."""
    from fmnist.serve.uploads import SMALL_UPLOAD_BYTES, Uploads

    picture = Image.new("RGB", (2000, 2000), (240, 240, 240))
    picture.paste((20, 20, 20), (600, 400, 1400, 1600))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    body = multipart(buffer.getvalue())
    assert len(body) < SMALL_UPLOAD_BYTES
    uploads = Uploads(ServeConfig())
    used = []
    real_run = uploads.run

    async def run(lane, work, *args):
        used.append(lane)
        return await real_run(lane, work, *args)

    uploads.run = run
    image = asyncio.run(uploads.prepare(body, f"multipart/form-data; boundary={BOUNDARY}"))
    uploads.shutdown()
    assert image.shape == (28, 28) and used == ["small", "large"]
