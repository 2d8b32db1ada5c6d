"""`fmnist serve`: the real server process on a free loopback port, spoken to over HTTP."""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers import bomb_png, fmnist_cli, get, png, running_server
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from fmnist.cli import build_parser, config_from_args  # noqa: E402
from fmnist.data import CLASS_NAMES, load_split  # noqa: E402
from fmnist.inference.decode import open_image  # noqa: E402
from fmnist.inference.photo import prepare_image  # noqa: E402
from fmnist.inference.predictor import load_model  # noqa: E402
from fmnist.serve.config import ServeConfig  # noqa: E402

UPLOAD_LIMIT = 2_000_000  # bytes, the test server's --max-upload-bytes
BOUNDARY = "testboundary1234"


@pytest.fixture(scope="module")
def server(trained_run):
    with running_server(trained_run, "--max-upload-bytes", str(UPLOAD_LIMIT)) as s:
        yield s


def multipart(data: bytes, filename: str = "image.png", field: str = "file") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def post(address, body: bytes, path: str = "/v1/predict",
         content_type: str | None = f"multipart/form-data; boundary={BOUNDARY}") -> tuple[int, dict]:
    connection = http.client.HTTPConnection(*address[:2], timeout=60)
    try:
        headers = {"Content-Type": content_type} if content_type else {}
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        assert response.getheader("content-type") == "application/json"
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc")


# ----------------------------------------------------------------------------- happy paths


def test_health_classes_and_openapi(server):
    status, _, body = get(server, "/healthz")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok"
    assert health["trained_on_photos"] is False  # the post's network on the scans alone
    status, _, body = get(server, "/v1/classes")
    assert status == 200 and [c["label"] for c in json.loads(body)["classes"]] == list(CLASS_NAMES)
    status, _, body = get(server, "/openapi.json")
    spec = json.loads(body)
    assert "multipart/form-data" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert get(server, "/docs")[0] == 404  # only with --docs: its page loads its script from a CDN


def test_predict_matches_the_library(server, trained_run, data_dir):
    images, _ = load_split("test", data_dir)
    predictor = load_model(trained_run)
    for image in images[:5]:
        status, result = post(server, multipart(png(image)) , "/v1/predict?top_k=4&input=true")
        assert status == 200
        expected = predictor.predict(prepare_image(open_image(png(image))), top_k=4)["predictions"][0]
        assert [t["index"] for t in result["top"]] == [t["index"] for t in expected["top"]]
        np.testing.assert_allclose([t["probability"] for t in result["top"]],
                                   [t["probability"] for t in expected["top"]], atol=1e-5)
        seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["input"].split(",", 1)[1]))))
        assert np.array_equal(seen, prepare_image(open_image(png(image))))


def test_concurrent_requests_all_answered(server, trained_run, data_dir):
    images, _ = load_split("test", data_dir)
    expected = load_model(trained_run).probabilities(
        np.stack([prepare_image(open_image(png(im))) for im in images[:64]])).argmax(1)
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda im: post(server, multipart(png(im))), images[:64]))
    assert all(status == 200 for status, _ in results)
    assert [r["top"][0]["index"] for _, r in results] == expected.tolist()
    assert all(len(r["top"]) == 3 for _, r in results)


@pytest.mark.parametrize("query, status", [("top_k=10", 200), ("top_k=0", 422), ("top_k=11", 422),
                                           ("top_k=x", 422), ("input=maybe", 422)])
def test_query_parameters_are_checked(server, data_dir, query, status):
    images, _ = load_split("test", data_dir)
    got, result = post(server, multipart(png(images[0])), f"/v1/predict?{query}")
    assert got == status
    assert len(result["top"]) == 10 if status == 200 else "must be" in result["detail"]


def test_web_page_has_no_external_assets(server):
    status, headers, page = get(server, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'<script src="/static/app.js">' in page and b'href="/static/style.css"' in page
    for name in ("app.js", "style.css"):
        status, _, body = get(server, f"/static/{name}")
        assert status == 200 and len(body) > 500
        assert b"http://" not in body and b"https://" not in body
    # The favicon's SVG names its XML namespace, a name and not an address that is fetched.
    page = page.replace(b"http://www.w3.org/2000/svg", b"")
    assert b"http://" not in page and b"https://" not in page
    assert get(server, "/static/..%2Fserve.py")[0] == 404


def test_binds_loopback_by_default():
    # The flags default to None and the config fills in what is not given, as `fmnist serve` does.
    assert config_from_args(ServeConfig, build_parser().parse_args(["serve"])).host == "127.0.0.1"


# ----------------------------------------------------------------------------- hostile input


def tiff() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (16, 16)).save(buffer, format="TIFF")
    return buffer.getvalue()


def truncated_png() -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    return png(noise)[:2000]


@pytest.mark.parametrize("body, content_type, status, message", [
    (multipart(b"just some text"), None, 415, "not an image"),
    (multipart(tiff(), "x.tiff"), None, 415, "not an image in a supported format"),
    (multipart(truncated_png()), None, 400, "truncated or corrupt"),
    (multipart(b""), None, 400, "empty"),
    (b"", None, 400, "empty request body"),
    (b"--nonsense\r\n\r\n", None, 400, "malformed multipart body"),
    (multipart(b"x", field="picture"), None, 400, "no field 'file'"),
    (b"\x89PNG...", "image/png", 415, "expected a multipart/form-data upload"),
    (multipart(png(np.full((300, 400), 231, np.uint8)), "blank.png"), None, 422,
     "blank.png: no object found"),
], ids=["text", "tiff", "truncated", "empty-file", "empty-body", "garbage-body", "wrong-field", "raw-body",
        "blank-canvas"])
def test_bad_uploads_get_json_errors(server, body, content_type, status, message):
    content_type = content_type or f"multipart/form-data; boundary={BOUNDARY}"
    got, result = post(server, body, content_type=content_type)
    assert got == status and message in result["detail"]


def read_reply(s: socket.socket, reply: bytes = b"") -> bytes:
    """A whole HTTP response (headers and Content-Length bytes of body) from a raw socket."""
    s.settimeout(20)
    while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < int(
            reply.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]):
        try:
            data = s.recv(65536)
        except OSError:
            break
        if not data:
            break
        reply += data
    return reply


def test_oversized_body_is_refused_without_reading_it(server):
    """A declared 1 GB body gets 413 after a few bytes, without the server waiting for the rest."""
    with socket.create_connection(server[:2], timeout=20) as s:
        s.sendall((f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {1 << 30}\r\n"
                   f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode())
        s.sendall(b"x" * 1000)
        reply = read_reply(s)
    assert reply.startswith(b"HTTP/1.1 413") and b"larger than the limit" in reply


def test_oversized_chunked_body_is_refused(server):
    """No Content-Length: the body is counted as it arrives."""
    with socket.create_connection(server[:2], timeout=20) as s:
        s.sendall((f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                   f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode())
        chunk = b"%x\r\n" % 65536 + b"x" * 65536 + b"\r\n"
        reply = b""
        s.settimeout(0.05)
        for _ in range(UPLOAD_LIMIT // 65536 + 10):
            try:
                s.sendall(chunk)
                reply += s.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if reply:
                break
        reply = read_reply(s, reply)
    assert reply.startswith(b"HTTP/1.1 413") and b"larger than the limit" in reply, reply[:200]


def test_decompression_bomb_is_refused_with_bounded_memory(server):
    before = peak_rss_mb(server[2].pid)
    status, result = post(server, multipart(bomb_png(30_000)))  # ~110 KB, 900 megapixels
    assert status == 413 and "more than the limit of 25,000,000 pixels" in result["detail"]
    status, result = post(server, multipart(bomb_png(6_000)))  # 36 megapixels, under Pillow's limit
    assert status == 413 and "6000x6000" in result["detail"]
    assert peak_rss_mb(server[2].pid) - before < 50  # decoding 900 MP would take 100s of MB


def test_server_keeps_serving_after_abuse(server, data_dir):
    images, labels = load_split("test", data_dir)
    status, result = post(server, multipart(png(images[0])))
    assert status == 200 and result["top"][0]["label"] in CLASS_NAMES
    assert get(server, "/healthz")[0] == 200 and server[2].poll() is None


# ----------------------------------------------------------------------------- in-process pieces


def test_batcher_runs_concurrent_images_as_one_batch(trained_run, data_dir):
    from fmnist.serve.batching import Batcher

    images, _ = load_split("test", data_dir)
    predictor = load_model(trained_run)

    async def scenario():
        batcher = Batcher(predictor, max_batch=64)
        batcher.start()
        rows = await asyncio.gather(*(batcher.probabilities(image) for image in images[:10]))
        await batcher.stop()
        return batcher.batches, np.stack(rows)

    batches, rows = asyncio.run(scenario())
    assert batches == 1
    np.testing.assert_allclose(rows, predictor.probabilities(images[:10]), atol=1e-6)


def test_read_body_stops_at_the_limit():
    from fmnist.serve.errors import HTTPError
    from fmnist.serve.uploads import read_body

    sent = []

    async def receive():  # an endless chunked body
        sent.append(1)
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    with pytest.raises(HTTPError) as error:
        asyncio.run(read_body(receive, limit=10_000))
    assert error.value.status == 413 and len(sent) == 11  # stopped right after passing the limit


def test_serve_command_errors_are_one_line(tmp_path, capsys):
    from fmnist.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("fmnist: error: ")


def test_a_port_in_use_is_one_line_before_any_start_up_log(tiny_run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = fmnist_cli("serve", "--model", tiny_run, "--port", port)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"fmnist: error: cannot serve on 127.0.0.1:{port}: address already in use; "
                             "another program listens there: choose another --port\n")
    result = fmnist_cli("serve", "--model", tiny_run, "--host", "no-such-host.invalid")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "cannot serve on no-such-host.invalid:8000: unknown host" in result.stderr
