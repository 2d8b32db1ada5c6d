"""An HTTP service for a trained model, with a web page to try it.

    fmnist serve --model runs/my-run                  # http://127.0.0.1:8000/
    fmnist serve --model runs/my-run --host 0.0.0.0 --port 8080
    curl -F file=@shoe.jpg http://127.0.0.1:8000/v1/predict

Endpoints: POST /v1/predict (one image in the multipart field `file`; `?top_k=3`,
`?input=true` adds the 28x28 image the model saw as a PNG data URL), POST /v1/explain (the same
upload; the prediction plus an attribution heatmap, with the `explain` extra), GET /v1/classes,
GET /healthz, the OpenAPI page at /docs, the web page at /. Needs the `serve` extra.

Requests that arrive together are run through the model as one batch: the model runs in its
own thread while the event loop reads and decodes the next requests, so under load each forward
pass serves many requests. Bodies over the size limit are refused from their Content-Length (or
as soon as a chunked body passes it), images over the pixel limit from their header, and large
images decode in a small thread pool, so memory stays bounded.
"""

import asyncio
import base64
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

import numpy as np

from fmnist import FmnistError
from fmnist.config import ServeConfig
from fmnist.explain import attribute, check_captum, heatmap_json, overlay_png
from fmnist.images import ImageError, input_png, load_pixels, open_image, prepare_image
from fmnist.predict import Predictor, load_model

log = logging.getLogger("fmnist.serve")

INLINE_DECODE_PIXELS = 256 * 256  # smaller images decode on the event loop (cheaper than a thread hop)


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Batcher:
    """Collects the images of concurrent requests and runs them through the model together,
    in one dedicated thread, so the event loop keeps accepting requests meanwhile."""

    def __init__(self, predictor: Predictor, max_batch: int):
        self.predictor = predictor
        self.max_batch = max_batch
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="fmnist-model")
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batches = 0  # forward passes run, for /healthz
        self.images = 0  # images classified

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    async def assess(self, image: np.ndarray) -> tuple[np.ndarray, float | None]:
        """Class probabilities and out-of-distribution score (None for a run not calibrated) of
        one prepared uint8 (28, 28) image."""
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((image, future))
        return await future

    async def probabilities(self, image: np.ndarray) -> np.ndarray:
        """Class probabilities of one prepared uint8 (28, 28) image."""
        return (await self.assess(image))[0]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            while len(items) < self.max_batch and not self.queue.empty():
                items.append(self.queue.get_nowait())
            batch = np.stack([image for image, _ in items])
            try:
                rows, scores = await loop.run_in_executor(self.executor, self.predictor.assess, batch)
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


async def read_body(receive, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HTTPError(400, "client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"request body is larger than the limit of {limit:,} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def multipart_file(body: bytes, content_type: str, field_name: str = "file") -> tuple[bytes, str]:
    """The bytes and file name of one field of a multipart/form-data body."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or b"boundary" not in options:
        raise HTTPError(415, f"expected a multipart/form-data upload with the image in field "
                        f"'{field_name}', got Content-Type {content_type or 'none'!r}")
    parts: list[dict] = []
    header: dict = {}

    def on_part_begin():
        parts.append({"headers": {}, "data": []})

    def on_header_field(data, start, end):
        header["field"] = header.get("field", b"") + data[start:end]

    def on_header_value(data, start, end):
        header["value"] = header.get("value", b"") + data[start:end]

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
    except Exception as e:  # python-multipart raises several error types for malformed bodies
        raise HTTPError(400, f"malformed multipart body ({e})") from None
    for part in parts:
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        if disposition.get(b"name") == field_name.encode():
            filename = disposition.get(b"filename", b"upload").decode("utf-8", "replace")
            return b"".join(part["data"]), filename
    raise HTTPError(400, f"no field '{field_name}' in the upload: send the image as "
                    f"multipart field '{field_name}'")


def _prepare(image, name: str) -> np.ndarray:
    return prepare_image(load_pixels(image, name), name=name)


async def prepare_upload(data: bytes, filename: str, max_pixels: int, decoder: ThreadPoolExecutor) -> np.ndarray:
    """The uploaded picture as a prepared 28x28 image: small ones decoded on the event loop
    (cheaper than a thread hop), large ones in the decoder pool; bad images give their 4xx."""
    try:
        image = open_image(data, filename, max_pixels, load=False)
        if image.width * image.height <= INLINE_DECODE_PIXELS:
            return _prepare(image, filename)
        return await asyncio.get_running_loop().run_in_executor(decoder, _prepare, image, filename)
    except ImageError as e:
        raise HTTPError(e.status, str(e)) from None


async def read_upload(request, config: ServeConfig, decoder: ThreadPoolExecutor,
                      num_classes: int) -> tuple[np.ndarray, int, bool]:
    """The prepared image of an upload to /v1/predict or /v1/explain, and its query options
    (top_k, input)."""
    # Query parameters parsed here rather than declared: FastAPI's dependency solving costs
    # about a tenth of a request's CPU time. They are documented in upload_openapi.
    top_k, want_input = query_options(request.query_params, num_classes)
    body = await read_body(request.receive, config.max_upload_bytes)
    if not body:
        raise HTTPError(400, "empty request body: send the image as multipart field 'file'")
    data, filename = multipart_file(body, request.headers.get("content-type", ""))
    return await prepare_upload(data, filename, config.max_pixels, decoder), top_k, want_input


def query_options(params, num_classes: int) -> tuple[int, bool]:
    """`top_k` (1..num_classes, default 3) and `input` (a boolean, default false)."""
    raw = params.get("top_k", "3")
    if not raw.isdigit() or not 1 <= int(raw) <= num_classes:
        raise HTTPError(422, f"top_k must be an integer in 1..{num_classes}, got {raw!r}")
    flag = params.get("input", "false").lower()
    if flag not in ("true", "1", "yes", "false", "0", "no"):
        raise HTTPError(422, f"input must be true or false, got {flag!r}")
    return int(raw), flag in ("true", "1", "yes")


def explanation(predictor: Predictor, image: np.ndarray, target: int) -> dict[str, Any]:
    """The integrated-gradients heatmap of a prepared image for class `target`: 28x28 numbers
    and the overlay as a PNG data URL. Raises HTTPError 501 without captum."""
    try:
        check_captum()
    except FmnistError as e:
        raise HTTPError(501, str(e)) from None
    heatmap = attribute(predictor, image[None], "ig", target=[target])[0]
    png = base64.b64encode(overlay_png(image, heatmap)).decode()
    return {"method": "ig", "target": predictor.class_names[target], "heatmap": heatmap_json(heatmap),
            "png": "data:image/png;base64," + png}


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
            "413": {"description": "body over the size limit or image over the pixel limit"},
            "415": {"description": "not an image, or a format other than PNG/JPEG/WebP/BMP/GIF"},
            "422": {"description": "a bad query parameter, or a picture with no object on it (blank or uniform)"},
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

    config = config or ServeConfig()
    batcher = Batcher(predictor, config.max_batch)
    decoder = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="fmnist-decode")
    # Attributions (dozens of forward and backward passes each) run one at a time beside the
    # batcher, so predictions never wait behind them.
    explainer = ThreadPoolExecutor(1, thread_name_prefix="fmnist-explain")

    async def lifespan(app):
        batcher.start()
        explainer.submit(check_captum)  # import captum (seconds) before the first request needs it
        yield
        await batcher.stop()
        decoder.shutdown(wait=False, cancel_futures=True)
        explainer.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="fmnist",
        summary="Fashion-MNIST classifier",
        description=f"Model `{predictor.meta.model}` from {predictor.run_dir}.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"detail": message}, status_code=status)

    @app.exception_handler(HTTPError)
    async def on_http_error(request, exc: HTTPError):
        return error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def on_starlette_error(request, exc):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def on_unexpected(request, exc):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error(500, "internal error")

    upload_schema = upload_openapi(len(predictor.class_names))
    explain_schema = {**upload_schema, "responses": {
        **upload_schema["responses"],
        "200": {"description": "the prediction, as /v1/predict answers it, plus `explanation`: "
                "method, target (the top class), heatmap (28x28 integrated gradients) and png "
                "(the heatmap over the input, a PNG data URL)"},
        "501": {"description": "the service runs without the explain extra (captum)"},
    }}

    async def upload(request: Request) -> tuple[np.ndarray, int, bool]:
        return await read_upload(request, config, decoder, len(predictor.class_names))

    async def prediction(prepared: np.ndarray, top_k: int, want_input: bool) -> dict[str, Any]:
        row, score = await batcher.assess(prepared)
        scores = None if score is None else np.asarray([score])
        result: dict[str, Any] = predictor.describe(row[None], scores, top_k)[0]
        if want_input:
            result["input"] = "data:image/png;base64," + base64.b64encode(input_png(prepared)).decode()
        return result

    @app.post("/v1/predict", openapi_extra=upload_schema)
    async def predict(request: Request):
        return JSONResponse(await prediction(*await upload(request)))

    @app.post("/v1/explain", openapi_extra=explain_schema)
    async def explain(request: Request):
        """What the model looked at: the prediction plus a heatmap for its top class."""
        prepared, top_k, want_input = await upload(request)
        result = await prediction(prepared, top_k, want_input)
        target = result["top"][0]["index"]
        loop = asyncio.get_running_loop()
        result["explanation"] = await loop.run_in_executor(explainer, explanation, predictor, prepared, target)
        return JSONResponse(result)

    @app.get("/v1/classes")
    async def classes():
        """The class names, in the order of the model's outputs."""
        return {"classes": [{"index": i, "label": n} for i, n in enumerate(predictor.class_names)]}

    @app.get("/healthz")
    async def healthz():
        """Liveness: the model is loaded and the batcher running."""
        return {
            "status": "ok",
            "model": predictor.meta.model,
            "test_accuracy": predictor.meta.test_accuracy,
            "batches": batcher.batches,
            "images": batcher.images,
        }

    @app.get("/", include_in_schema=False)
    async def index():
        return Response(_static_file("index.html"), media_type="text/html; charset=utf-8")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        content, media_type = static_file(name)
        return Response(content, media_type=media_type)

    app.add_middleware(ContentLengthLimit, limit=config.max_upload_bytes)
    return app


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
                from fastapi.responses import JSONResponse

                await JSONResponse({"detail": message}, status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
    config = config or ServeConfig()
    try:
        import uvicorn
    except ImportError as e:
        raise FmnistError(f"serving needs the serve extra ({e.name} is missing): "
                          "pip install 'fmnist[serve]'") from None
    import torch

    config.validate()
    check_address(config.host, config.port)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    predictor = load_model(run_dir)
    app = create_app(predictor, config)
    uvicorn_config = uvicorn.Config(
        app, host=config.host, port=config.port, access_log=config.access_log,
        log_level=config.log_level, limit_concurrency=config.max_connections,
    )
    server = uvicorn.Server(uvicorn_config)
    try:
        server.run()
    except (OSError, SystemExit) as e:  # uvicorn logs a taken port and exits
        if server.started:
            raise
        raise FmnistError(f"cannot serve on {config.host}:{config.port} ({e})") from None

