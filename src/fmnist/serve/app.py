"""The application: routes (/v1/predict, /v1/explain, /v1/classes, /healthz, the web page and its
files), the OpenAPI schema of the upload, and the middlewares around them."""

import base64
import logging
import os
from importlib import resources
from typing import Any

import numpy as np

from fmnist.inference.inputs import input_png
from fmnist.inference.predictor import Predictor
from fmnist.serve.batching import Batcher
from fmnist.serve.config import ServeConfig
from fmnist.serve.errors import HTTPError
from fmnist.serve.explainer import Explainer
from fmnist.serve.security import AccessCheck, ContentLengthLimit, SecurityHeaders
from fmnist.serve.uploads import Uploads
from fmnist.serve.warmup import warm_up

log = logging.getLogger("fmnist.serve")


def query_options(params, num_classes: int) -> tuple[int, bool]:
    """`top_k` (1..num_classes, default 3) and `input` (a boolean, default false)."""
    raw = params.get("top_k", "3")
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 4) or not 1 <= int(raw) <= num_classes:
        raise HTTPError(422, f"top_k must be an integer in 1..{num_classes}, got {raw[:20]!r}")
    flag = params.get("input", "false").lower()
    if flag not in ("true", "1", "yes", "false", "0", "no"):
        raise HTTPError(422, f"input must be true or false, got {flag[:20]!r}")
    return int(raw), flag in ("true", "1", "yes")






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
    return resources.files("fmnist.serve").joinpath("static", name).read_bytes()


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
            # Scores above this are flagged "does not look like clothing" (None: not calibrated).
            "ood_threshold": predictor.detector.threshold if predictor.detector is not None else None,
            # False: it learned from Fashion-MNIST alone and flags most real photos (the page says so).
            "trained_on_photos": predictor.meta.trained_on_photos,
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




