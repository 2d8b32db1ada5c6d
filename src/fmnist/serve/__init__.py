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
nosniff headers. The docs' "Using a model" page describes the limits and running behind a proxy.

- `app`: the routes, the OpenAPI schema of the upload, the middlewares around them.
- `batching`: concurrent requests run through the model as one batch.
- `uploads`: request bodies, multipart parsing, decoding in bounded thread pools.
- `explainer`: attributions (POST /v1/explain) in their own thread.
- `security`: size cap, API key, Host and origin checks, CSP.
- `protocol`: the connection guard (deadlines, head size, connection limit).
- `server`: start-up (`fmnist serve`); `config`: `ServeConfig`, one flag a field.
"""

from fmnist.serve.app import create_app
from fmnist.serve.config import ServeConfig
from fmnist.serve.server import serve

__all__ = ["ServeConfig", "create_app", "serve"]
