"""An HTTP service for a trained model, with a web page to try it.

    fmnist serve --model runs/my-run                  # http://127.0.0.1:8000/
    FMNIST_API_KEY=... fmnist serve --model runs/my-run --host 0.0.0.0 --port 8080
    curl -F file=@shoe.jpg http://127.0.0.1:8000/v1/predict

Endpoints: POST /v1/predict (one image in the multipart field `file`; `?top_k=3`,
`?input=true` adds the 28x28 image the model saw as a PNG data URL), POST /v1/explain (the same
upload; the prediction plus an attribution heatmap, with the `explain` extra), GET /v1/classes,
GET /healthz, the OpenAPI schema at /openapi.json (and its page at /docs with --docs), the web
page at /. Needs the `serve` extra.

Requests that arrive together are run through the model as one batch: the model runs in its
own thread while the event loop reads the next requests, so under load each forward pass serves
many requests. The event loop only moves bytes: parsing the upload, reading the image header,
decoding and preparing it run in bounded thread pools (`Uploads`), small uploads apart from
large ones, so a queue of large images never delays a small one.

Safe to expose: every input is bounded in size and time. uvicorn closes nothing on its own
before a request arrives, so `guarded_protocol` adds deadlines for a request's head (idle and
slowloris connections are closed), a cap on its size, and a connection limit that closes the
longest idle connection rather than refusing new ones; the body has its own deadline; uploads
wait in a bounded queue with a deadline (503 with Retry-After when full); files far larger than
their pixels need are refused before they cost time. `--api-key` guards /v1/*; Host headers
are checked (DNS rebinding), cross-origin POSTs refused, and every response carries CSP and
nosniff headers. docs/USING_A_MODEL.md describes the limits and running behind a proxy.
"""

import asyncio
import base64
import gc
import hmac
import ipaddress
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

import numpy as np

from fmnist import FmnistError
from fmnist.config import ServeConfig
from fmnist.explain import DEFAULT_METHOD, attribute, check_captum, heatmap_json, overlay_png
from fmnist.images import ImageError, input_png, load_pixels, open_image, prepare_image
from fmnist.predict import Predictor, load_model

log = logging.getLogger("fmnist.serve")

SMALL_UPLOAD_BYTES = 64 * 1024  # bodies up to this go to the small lane (a 28x28 PNG is ~1 KB)
INLINE_DECODE_PIXELS = 256 * 256  # a small upload's image decodes in the small lane up to this size
MAX_PARTS = 4  # multipart parts in an upload: one file, perhaps a field or two
MAX_PART_HEADER_BYTES = 8 * 1024  # header bytes of one multipart part
RETRY_AFTER = "1"  # seconds, told to clients refused for overload
WARMUP_SECONDS = 20.0  # most start-up time spent running the model at each batch size
EXPLAIN_QUEUE = 16  # explanations admitted at once (each ~50-100 ms of CPU); more get 503


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def overloaded(message: str) -> HTTPError:
    """A 503 that tells the client when to try again; the connection is closed, since its body
    may not have been read."""
    return HTTPError(503, message, {"retry-after": RETRY_AFTER, "connection": "close"})


class Batcher:
    """Collects the images of concurrent requests and runs them through the model together,
    in one dedicated thread, so the event loop keeps accepting requests meanwhile. At most
    `max_waiting` images wait; more get 503."""

    def __init__(self, predictor: Predictor, max_batch: int, max_waiting: int = 1024):
        self.predictor = predictor
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="fmnist-model")
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batches = 0  # forward passes run, for /healthz
        self.images = 0  # images classified

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    @property
    def running(self) -> bool:
        """Whether the batching task is alive: /healthz answers 503 when it is not."""
        return self.task is not None and not self.task.done()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            except Exception:  # it died earlier; /healthz said so
                pass
        self.executor.shutdown(wait=True)

    async def assess(self, image: np.ndarray) -> tuple[np.ndarray, float | None]:
        """Class probabilities and out-of-distribution score (None for a run not calibrated) of
        one prepared uint8 (28, 28) image."""
        if not self.running:
            raise HTTPError(503, "the model is not running", {"retry-after": RETRY_AFTER})
        if self.queue.qsize() >= self.max_waiting:
            raise overloaded(f"more than {self.max_waiting} images are waiting for the model")
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((image, future))
        return await future

    async def probabilities(self, image: np.ndarray) -> np.ndarray:
        """Class probabilities of one prepared uint8 (28, 28) image."""
        return (await self.assess(image))[0]

    async def run_batch(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and out-of-distribution scores of a batch, in the model's thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.predictor.assess, batch)

    async def _run(self) -> None:
        while True:
            items = [await self.queue.get()]
            while len(items) < self.max_batch and not self.queue.empty():
                items.append(self.queue.get_nowait())
            try:
                rows, scores = await self.run_batch(np.stack([image for image, _ in items]))
            except Exception as e:  # the model failing fails its requests, not the service
                log.exception("model failed on a batch of %d", len(items))
                for _, future in items:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.batches += 1
            self.images += len(items)
            scores = [None] * len(items) if scores is None else scores
            for (_, future), row, score in zip(items, rows, scores, strict=True):
                if not future.done():  # its client may have gone
                    future.set_result((row, score))


# ----------------------------------------------------------------------------- request bodies


async def read_body(receive, limit: int, timeout: float | None = None) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes and with 408 when
    it is not all in within `timeout` seconds."""
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise HTTPError(400, "client disconnected before sending the whole body")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise HTTPError(413, f"request body is larger than the limit of {limit:,} bytes",
                                    {"connection": "close"})
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise HTTPError(408, f"request body not received within {timeout:g} s",
                        {"connection": "close"}) from None


class TooManyParts(Exception):
    pass


def multipart_file(body: bytes, content_type: str, field_name: str = "file") -> tuple[bytes, str]:
    """The bytes and file name of one field of a multipart/form-data body of at most MAX_PARTS
    parts, each with at most MAX_PART_HEADER_BYTES of headers."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or b"boundary" not in options:
        raise HTTPError(415, f"expected a multipart/form-data upload with the image in field "
                        f"'{field_name}', got Content-Type {content_type or 'none'!r}")
    parts: list[dict] = []
    header: dict = {}

    def on_part_begin():
        if len(parts) == MAX_PARTS:
            raise TooManyParts(f"more than {MAX_PARTS} parts in the upload: send one file in field '{field_name}'")
        parts.append({"headers": {}, "data": [], "header_bytes": 0})

    def add_header_bytes(key, data, start, end):
        parts[-1]["header_bytes"] += end - start
        if parts[-1]["header_bytes"] > MAX_PART_HEADER_BYTES:
            raise TooManyParts(f"a part of the upload has more than {MAX_PART_HEADER_BYTES:,} bytes of headers")
        header[key] = header.get(key, b"") + data[start:end]

    def on_header_field(data, start, end):
        add_header_bytes("field", data, start, end)

    def on_header_value(data, start, end):
        add_header_bytes("value", data, start, end)

    def on_header_end():
        parts[-1]["headers"][header.pop("field", b"").lower()] = header.pop("value", b"")

    def on_part_data(data, start, end):
        parts[-1]["data"].append(data[start:end])

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                 "on_header_value": on_header_value, "on_header_end": on_header_end,
                 "on_part_data": on_part_data}
    try:
        parser = MultipartParser(options[b"boundary"], callbacks)
        parser.write(body)
        parser.finalize()
    except TooManyParts as e:
        raise HTTPError(400, str(e)) from None
    except Exception as e:  # python-multipart raises several error types for malformed bodies
        raise HTTPError(400, f"malformed multipart body ({e})") from None
    for part in parts:
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        if disposition.get(b"name") == field_name.encode():
            filename = disposition.get(b"filename", b"upload").decode("utf-8", "replace")
            return b"".join(part["data"]), filename
    raise HTTPError(400, f"no field '{field_name}' in the upload: send the image as "
                    f"multipart field '{field_name}'")


# ----------------------------------------------------------------------------- uploads, off the loop


def _prepare(image, name: str) -> np.ndarray:
    return prepare_image(load_pixels(image, name), name=name)


def open_upload(body: bytes, content_type: str, max_pixels: int, decode: bool):
    """The prepared 28x28 image of a multipart upload's field `file`; with `decode` False and
    an image of more than INLINE_DECODE_PIXELS, the opened image and its name instead, to be
    decoded by `_prepare` in the large lane. Runs in a worker thread: its cost grows with the
    upload."""
    data, filename = multipart_file(body, content_type)
    image = open_image(data, filename, max_pixels, load=False)
    if decode or image.width * image.height <= INLINE_DECODE_PIXELS:
        return _prepare(image, filename)
    return image, filename


def _in_worker(deadline: float, work, *args):
    """Run `work` unless the upload waited past its deadline; errors become HTTP errors."""
    if time.monotonic() > deadline:
        raise overloaded("the service is busy: the upload waited too long for a decoder")
    try:
        return work(*args)
    except HTTPError:
        raise
    except ImageError as e:
        raise HTTPError(e.status, str(e)) from None
    except Exception as e:  # a decoder failing on a crafted file: the upload's fault, not the service's
        log.warning("upload refused, the decoder failed: %s: %s", type(e).__name__, e)
        raise HTTPError(400, f"cannot decode the image ({type(e).__name__})") from None


class Uploads:
    """Turns a request into the prepared 28x28 image of its multipart field `file`, doing the
    work that grows with the upload (parsing, reading the header, decoding, preparing) off the
    event loop, in two lanes. Small uploads (a body of at most SMALL_UPLOAD_BYTES declaring at
    most INLINE_DECODE_PIXELS) run in their own thread, so a queue of large ones never delays
    them; the rest in `decode_workers` threads, which bounds their memory. Each lane admits
    `max_queue` uploads at once (the large lane also `max_queue_bytes` of declared bodies),
    more get 503 with Retry-After, before their body is read when they declare its size; an
    upload that waited `queue_timeout` for its worker gets 503 too. Every endpoint that takes
    an image calls `image(request)`."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.lanes = {"small": ThreadPoolExecutor(1, thread_name_prefix="fmnist-small"),
                      "large": ThreadPoolExecutor(config.decode_workers, thread_name_prefix="fmnist-decode")}
        self.admitted = {"small": 0, "large": 0}
        self.large_bytes = 0  # declared bodies of the large uploads admitted

    async def image(self, request) -> np.ndarray:
        """The request's picture, prepared; its 4xx (or 503) as an HTTPError."""
        declared = request.headers.get("content-length", "")
        size = int(declared) if declared.isdigit() else self.config.max_upload_bytes  # chunked: the most
        slot = self._admit("small" if size <= SMALL_UPLOAD_BYTES else "large", size)
        try:
            body = await read_body(request.receive, self.config.max_upload_bytes, self.config.body_timeout)
            if not body:
                raise HTTPError(400, "empty request body: send the image as multipart field 'file'")
            return await self.prepare(body, request.headers.get("content-type", ""), slot)
        finally:
            self._release(slot)

    async def prepare(self, body: bytes, content_type: str, slot: list | None = None) -> np.ndarray:
        """The prepared image of a multipart body, from the lane its size calls for; a small
        file of a large image moves its `slot` to the large lane for decoding."""
        small = len(body) <= SMALL_UPLOAD_BYTES
        result = await self.run("small" if small else "large", open_upload, body, content_type,
                                self.config.max_pixels, not small)
        if isinstance(result, np.ndarray):
            return result
        if slot is not None and slot[0] == "small":
            self._release(slot)
            slot[:] = self._admit("large", len(body))
        return await self.run("large", _prepare, *result)

    def _admit(self, lane: str, size: int) -> list:
        """A slot [lane, size] in the lane, or 503 when it is full."""
        if self.admitted[lane] >= self.config.max_queue:
            raise overloaded(f"the service is busy: {self.config.max_queue} {lane} uploads in progress")
        if lane == "large" and self.admitted[lane] and self.large_bytes + size > self.config.max_queue_bytes:
            raise overloaded(f"the service is busy: {self.large_bytes:,} bytes of uploads in progress")
        self.admitted[lane] += 1
        self.large_bytes += size if lane == "large" else 0
        return [lane, size]

    def _release(self, slot: list) -> None:
        lane, size = slot
        if lane is not None:
            self.admitted[lane] -= 1
            self.large_bytes -= size if lane == "large" else 0
            slot[:] = [None, 0]

    async def run(self, lane: str, work, *args):
        deadline = time.monotonic() + self.config.queue_timeout
        return await asyncio.get_running_loop().run_in_executor(self.lanes[lane], _in_worker, deadline, work, *args)

    def shutdown(self) -> None:
        for pool in self.lanes.values():
            pool.shutdown(wait=False, cancel_futures=True)


def query_options(params, num_classes: int) -> tuple[int, bool]:
    """`top_k` (1..num_classes, default 3) and `input` (a boolean, default false)."""
    raw = params.get("top_k", "3")
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 4) or not 1 <= int(raw) <= num_classes:
        raise HTTPError(422, f"top_k must be an integer in 1..{num_classes}, got {raw[:20]!r}")
    flag = params.get("input", "false").lower()
    if flag not in ("true", "1", "yes", "false", "0", "no"):
        raise HTTPError(422, f"input must be true or false, got {flag[:20]!r}")
    return int(raw), flag in ("true", "1", "yes")


def explanation(predictor: Predictor, image: np.ndarray, target: int) -> dict[str, Any]:
    """The heatmap (the default method's, occlusion) of a prepared image for class `target`:
    28x28 numbers and the overlay as a PNG data URL. Raises HTTPError 501 without captum."""
    try:
        check_captum()
    except FmnistError as e:
        raise HTTPError(501, str(e)) from None
    heatmap = attribute(predictor, image[None], DEFAULT_METHOD, target=[target])[0]
    png = base64.b64encode(overlay_png(image, heatmap)).decode()
    return {"method": DEFAULT_METHOD, "target": predictor.class_names[target], "heatmap": heatmap_json(heatmap),
            "png": "data:image/png;base64," + png}


class Explainer:
    """Attributions for /v1/explain: one at a time in their own thread beside the batcher, so
    predictions never wait behind them; at most EXPLAIN_QUEUE at once, more get 503."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="fmnist-explain")
        self.admitted = 0

    def start(self) -> None:
        self.executor.submit(check_captum)  # import captum (seconds) before the first request needs it

    async def explain(self, image: np.ndarray, target: int) -> dict[str, Any]:
        if self.admitted >= EXPLAIN_QUEUE:
            raise overloaded(f"the service is busy: {self.admitted} explanations in progress")
        self.admitted += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.executor, explanation, self.predictor, image, target)
        finally:
            self.admitted -= 1

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------- the app


def upload_openapi(num_classes: int) -> dict:
    """The OpenAPI description of POST /v1/predict's upload, query options and answers."""
    return {
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary",
                                        "description": "PNG, JPEG, WebP, BMP or GIF"}},
            }}},
        },
        "parameters": [
            {"name": "top_k", "in": "query", "description": "classes to return (default 3)",
             "schema": {"type": "integer", "minimum": 1, "maximum": num_classes}},
            {"name": "input", "in": "query", "description": "also return the 28x28 input the "
             "model saw, as a PNG data URL (default false)", "schema": {"type": "boolean"}},
        ],
        "responses": {
            "200": {"description": "the most probable classes, most probable first (probabilities "
                    "tempered by the run's calibration); `ood_score` (higher: less like Fashion-MNIST) "
                    "and `in_distribution` (false: this does not look like clothing), null for a run "
                    "not calibrated"},
            "400": {"description": "empty, truncated or corrupt image, malformed upload"},
            "401": {"description": "no or a wrong API key, when the service has one"},
            "408": {"description": "the body was not sent within the body timeout"},
            "413": {"description": "body over the size limit, image over the pixel limit, or a file far "
                    "larger than its pixels need"},
            "415": {"description": "not an image, or a format other than PNG/JPEG/WebP/BMP/GIF"},
            "422": {"description": "a bad query parameter, or a picture with no object on it (blank or uniform)"},
            "503": {"description": "overloaded: try again after Retry-After seconds"},
        },
    }


def _static_file(name: str) -> bytes:
    return resources.files("fmnist").joinpath("static", name).read_bytes()


STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}


def static_file(name: str) -> tuple[bytes, str]:
    """The bytes and media type of a file of the web page; 404 for anything else."""
    suffix = os.path.splitext(name)[1]
    if "/" in name or suffix not in STATIC_TYPES:
        raise HTTPError(404, f"no static file {name!r}")
    try:
        return _static_file(name), f"{STATIC_TYPES[suffix]}; charset=utf-8"
    except FileNotFoundError:
        raise HTTPError(404, f"no static file {name!r}") from None


def create_app(predictor: Predictor, config: ServeConfig | None = None):
    """The FastAPI application serving `predictor`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    config = config or ServeConfig()
    batcher = Batcher(predictor, config.max_batch, max_waiting=2 * config.max_queue)
    uploads = Uploads(config)
    explainer = Explainer(predictor)

    async def lifespan(app):
        batcher.start()
        explainer.start()
        await warm_up(predictor, batcher, uploads)
        yield
        await batcher.stop()
        uploads.shutdown()
        explainer.shutdown()

    run_name = predictor.run_dir.name if predictor.run_dir is not None else "memory"
    app = FastAPI(
        title="fmnist",
        summary="Fashion-MNIST classifier",
        description=f"Model `{predictor.meta.model}` of run `{run_name}`.",  # no paths of this machine
        lifespan=lifespan,
        docs_url="/docs" if config.docs else None,
        redoc_url=None,
    )
    app.state.batcher = batcher
    app.state.uploads = uploads

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"detail": message}, status_code=status, headers=headers)

    @app.exception_handler(HTTPError)
    async def on_http_error(request, exc: HTTPError):
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_starlette_error(request, exc):
        return error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def on_unexpected(request, exc):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error(500, "internal error")

    upload_schema = upload_openapi(len(predictor.class_names))
    explain_schema = {**upload_schema, "responses": {
        **upload_schema["responses"],
        "200": {"description": "the prediction, as /v1/predict answers it, plus `explanation`: "
                "method, target (the top class), heatmap (28x28 occlusion attributions) and png "
                "(the heatmap over the input, a PNG data URL)"},
        "501": {"description": "the service runs without the explain extra (captum)"},
    }}

    async def prediction(request: Request) -> tuple[np.ndarray, dict[str, Any]]:
        """The prepared upload and the answer of /v1/predict for it."""
        # Query parameters parsed here rather than declared: FastAPI's dependency solving
        # costs about a tenth of a request's CPU time. They are documented in upload_schema.
        top_k, want_input = query_options(request.query_params, len(predictor.class_names))
        prepared = await uploads.image(request)
        row, score = await batcher.assess(prepared)
        scores = None if score is None else np.asarray([score])
        result: dict[str, Any] = predictor.describe(row[None], scores, top_k)[0]
        if want_input:
            result["input"] = "data:image/png;base64," + base64.b64encode(input_png(prepared)).decode()
        return prepared, result

    @app.post("/v1/predict", openapi_extra=upload_schema)
    async def predict(request: Request):
        _, result = await prediction(request)
        return JSONResponse(result)

    @app.post("/v1/explain", openapi_extra=explain_schema)
    async def explain(request: Request):
        """What the model looked at: the prediction plus a heatmap for its top class."""
        prepared, result = await prediction(request)
        result["explanation"] = await explainer.explain(prepared, result["top"][0]["index"])
        return JSONResponse(result)

    @app.get("/v1/classes")
    async def classes():
        """The class names, in the order of the model's outputs."""
        return {"classes": [{"index": i, "label": n} for i, n in enumerate(predictor.class_names)]}

    @app.get("/healthz")
    async def healthz():
        """Liveness: the model is loaded and the batcher running (503 when it is not)."""
        return JSONResponse({
            "status": "ok" if batcher.running else "unavailable",
            "model": predictor.meta.model,
            "test_accuracy": predictor.meta.test_accuracy,
            "batches": batcher.batches,
            "images": batcher.images,
        }, status_code=200 if batcher.running else 503)

    @app.get("/", include_in_schema=False)
    async def index():
        return Response(_static_file("index.html"), media_type="text/html; charset=utf-8")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        content, media_type = static_file(name)
        return Response(content, media_type=media_type)

    # The last added runs first: headers on every answer, then the Host check, then the rest.
    app.add_middleware(ContentLengthLimit, limit=config.max_upload_bytes)
    app.add_middleware(AccessCheck, api_key=config.api_key)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=config.host_names())
    app.add_middleware(SecurityHeaders, docs=config.docs)
    return app


async def _json_answer(send, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """A JSON error answered by a middleware, before the app (and with the connection closed:
    the body was not read)."""
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


class ContentLengthLimit:
    """Refuses a request whose declared Content-Length is over the limit before reading any of
    its body (chunked bodies are counted as they arrive, in `read_body`)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            declared = dict(scope["headers"]).get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
                status, message = (413, f"request body is larger than the limit of {self.limit:,} bytes") \
                    if declared.isdigit() else (400, "invalid Content-Length")
                await _json_answer(send, status, message)
                return
        await self.app(scope, receive, send)


class AccessCheck:
    """Refuses, before any body is read: a POST from another site's page (its Origin is not the
    Host it was sent to: a browser lets any page send a form to a service on this machine),
    with 403; and, with an API key, a request to /v1/* without `Authorization: Bearer KEY`,
    with 401 (compared in constant time)."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            if scope["method"] not in ("GET", "HEAD", "OPTIONS") and not same_origin(headers):
                await _json_answer(send, 403, "cross-origin request refused: this service answers its own page only")
                return
            if self.expected is not None and scope["path"].startswith("/v1/") and not hmac.compare_digest(
                    headers.get(b"authorization", b""), self.expected):
                await _json_answer(send, 401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                   [(b"www-authenticate", b'Bearer realm="fmnist"')])
                return
        await self.app(scope, receive, send)


def same_origin(headers: dict[bytes, bytes]) -> bool:
    """Whether a request comes from no web page (no Origin: curl, scripts) or from a page of
    this service (the Origin's host and port are the Host header's)."""
    origin = headers.get(b"origin")
    if origin is None:
        return headers.get(b"sec-fetch-site", b"same-origin") in (b"same-origin", b"none")
    _, _, authority = origin.partition(b"://")
    return bool(authority) and authority.lower() == headers.get(b"host", b"").lower()


# The web page loads only its own script, style sheet and images, and data: and blob: URLs for
# the pictures it shows; nothing may frame it. FastAPI's /docs page (with --docs) needs its CDN.
CSP = ("default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'self' https://cdn.jsdelivr.net; img-src 'self' data: https://fastapi.tiangolo.com; "
            "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


SECURITY_HEADERS = [("x-content-type-options", "nosniff"), ("x-frame-options", "DENY"),
                    ("referrer-policy", "no-referrer"), ("cross-origin-resource-policy", "same-origin")]


class SecurityHeaders:
    """Adds to every response: a Content-Security-Policy, nosniff, no framing, no referrer."""

    def __init__(self, app, docs: bool = False):
        self.app, self.docs = app, docs
        common = [(name.encode(), value.encode()) for name, value in SECURITY_HEADERS]
        self.headers = [(b"content-security-policy", CSP.encode()), *common]
        self.docs_headers = [(b"content-security-policy", DOCS_CSP.encode()), *common]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        extra = self.docs_headers if self.docs and scope["path"] == "/docs" else self.headers

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


# ----------------------------------------------------------------------------- connections


class HeadTooLarge(Exception):
    pass


def raw_json_response(status: str, message: str, *headers: str) -> bytes:
    """A whole HTTP/1.1 JSON error response, for the protocol to write before any app runs."""
    body = json.dumps({"detail": message}).encode()
    head = [f"HTTP/1.1 {status}", "content-type: application/json", f"content-security-policy: {CSP}",
            *(f"{name}: {value}" for name, value in SECURITY_HEADERS), *headers, "connection: close",
            f"content-length: {len(body)}"]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


BUSY = raw_json_response("503 Service Unavailable", "too many connections, none idle", f"retry-after: {RETRY_AFTER}")


class ConnectionGuard:
    """What an exposed service needs and uvicorn lacks, mixed into its httptools protocol by
    `guarded_protocol`. uvicorn starts no timer before a connection's first request, counts
    idle connections against `limit_concurrency` (four idle sockets at a limit of 4 made
    /healthz answer 503), and httptools caps no header size. Here each connection has
    `header_timeout` seconds, from connecting or from its previous response, to send a
    request's line and headers, or it is closed (idle and slowloris sockets go); they may
    hold `max_header_bytes` (431 beyond); and at `max_connections` the longest idle
    connection is closed to make room: a new one gets 503 only when none is idle."""

    limits: ServeConfig
    idle: dict  # connections waiting for a request, longest waiting first; one per server

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.head_bytes, self.head_too_large, self.deadline = 0, False, None
        self._await_request()
        if len(self.connections) > self.limits.max_connections:
            oldest = next((c for c in self.idle if c is not self), None)
            if oldest is not None:
                oldest._head_timed_out()
            else:
                self._busy()
                transport.write(BUSY)
                transport.close()

    def _await_request(self) -> None:
        self._busy()
        self.idle[self] = None
        self.deadline = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def _busy(self) -> None:
        self.idle.pop(self, None)
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _head_timed_out(self) -> None:
        self._busy()
        if not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self._busy()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_bytes = 0

    def _count(self, n: int) -> None:
        self.head_bytes += n
        if self.head_bytes > self.limits.max_header_bytes:
            self.head_too_large = True
            raise HeadTooLarge  # httptools stops parsing; uvicorn calls send_400_response

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def send_400_response(self, msg: str) -> None:  # uvicorn's answer to what httptools cannot parse
        if self.head_too_large:
            answer = raw_json_response("431 Request Header Fields Too Large",
                                       f"request line and headers over {self.limits.max_header_bytes:,} bytes")
        else:
            answer = raw_json_response("400 Bad Request", msg)
        self.transport.write(answer)
        self.transport.close()

    def on_headers_complete(self) -> None:
        self._busy()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._await_request()  # unless a pipelined request has started


def guarded_protocol(config: ServeConfig) -> type:
    """uvicorn's httptools protocol class with the ConnectionGuard of `config`."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    return type("GuardedProtocol", (ConnectionGuard, HttpToolsProtocol), {"limits": config, "idle": {}})


# ----------------------------------------------------------------------------- start-up


def warm_up_images() -> tuple[bytes, bytes]:
    """Two multipart bodies: a 28x28 dataset-like PNG and a 200x300 photo-like one."""
    import io

    from PIL import Image

    small = np.zeros((28, 28), np.uint8)
    small[4:24, 8:20] = 200
    photo = np.full((300, 200, 3), 235, np.uint8)
    photo[60:240, 50:150] = (40, 60, 90)
    bodies = []
    for array in (small, photo):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        bodies.append(b"--w\r\nContent-Disposition: form-data; name=\"file\"; filename=\"warm-up.png\"\r\n\r\n"
                      + buffer.getvalue() + b"\r\n--w--\r\n")
    return bodies[0], bodies[1]


async def warm_up(predictor: Predictor, batcher: Batcher, uploads: Uploads) -> None:
    """Run a prediction's every step once before the first request, and the model at each
    batch size: oneDNN sets up its kernels per input shape, and a fresh server's first batches
    of each size took tens of milliseconds longer (a p99 of 124-158 ms in its first 15 s under
    load, against under 50 ms after). The first image in each decoder thread imports OpenCV.
    Then the objects of start-up are frozen out of the garbage collector's way."""
    start = time.monotonic()
    small, photo = warm_up_images()
    content_type = "multipart/form-data; boundary=w"
    image = await uploads.prepare(small, content_type)
    max_pixels = uploads.config.max_pixels
    try:
        await uploads.prepare(photo, content_type)
        await asyncio.gather(*(uploads.run("large", open_upload, photo, content_type, max_pixels, True)
                               for _ in range(uploads.config.decode_workers)))
    except HTTPError as e:  # a picture this preparation sees nothing on: warm all the same
        log.warning("warm-up photo refused: %s", e.message)
    input_png(image)
    sizes = 0
    for n in range(1, batcher.max_batch + 1):
        await batcher.run_batch(np.repeat(image[None], n, axis=0))
        sizes = n
        if time.monotonic() - start > WARMUP_SECONDS:
            break
    # What was loaded so far lives as long as the server: out of the garbage collector's full
    # passes, which otherwise walk its ~200,000 objects (~100 ms) in the middle of requests.
    gc.collect()
    gc.freeze()
    log.info("warmed up in %.1f s (batches of 1..%d)", time.monotonic() - start, sizes)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_address(host: str, port: int) -> None:
    """Refuse an address the server cannot listen on (a port in use, a host that is not this
    machine's) in one line, before the model loads and uvicorn logs its start-up."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise FmnistError(f"cannot serve on {host}:{port}: unknown host ({e.strerror}); "
                          "give --host an address of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    hints = {errno.EADDRINUSE: "; another program listens there: choose another --port",
             errno.EACCES: "; ports below 1024 need privileges: choose another --port",
             errno.EADDRNOTAVAIL: "; not an address of this machine: choose another --host"}
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as e:
            reason = (e.strerror or str(e)).lower()
            raise FmnistError(f"cannot serve on {host}:{port}: {reason}{hints.get(e.errno, '')}") from None


def serve(run_dir: str | os.PathLike, config: ServeConfig | None = None) -> None:
    """Load the run's model and serve it until interrupted."""
    import copy
    import dataclasses

    config = config or ServeConfig()
    try:
        import uvicorn
    except ImportError as e:
        raise FmnistError(f"serving needs the serve extra ({e.name} is missing): "
                          "pip install 'fmnist[serve]'") from None
    import torch

    if config.api_key is None and os.environ.get("FMNIST_API_KEY"):
        config = dataclasses.replace(config, api_key=os.environ["FMNIST_API_KEY"])
    config.validate()
    check_address(config.host, config.port)
    if not is_loopback(config.host) and config.api_key is None:
        print(f"fmnist: warning: serving on {config.host} without an API key: anyone who can reach "
              "this address can use the service; set FMNIST_API_KEY (or --api-key), or put an "
              "authenticating proxy in front", file=sys.stderr)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    predictor = load_model(run_dir)
    app = create_app(predictor, config)
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)  # and our own lines, as uvicorn's
    log_config["loggers"]["fmnist"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    log_config["loggers"]["python_multipart"] = {"level": "ERROR"}  # a line per malformed upload: its 400 says it
    uvicorn_config = uvicorn.Config(
        app, host=config.host, port=config.port, access_log=config.access_log, log_config=log_config,
        log_level=config.log_level, http=guarded_protocol(config), server_header=False,
    )
    server = uvicorn.Server(uvicorn_config)
    try:
        server.run()
    except (OSError, SystemExit) as e:  # uvicorn logs a taken port and exits
        if server.started:
            raise
        raise FmnistError(f"cannot serve on {config.host}:{config.port} ({e})") from None
