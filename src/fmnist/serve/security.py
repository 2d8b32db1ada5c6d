"""What makes the service safe to expose, as ASGI middlewares: the body's size cap, the API key
and Host check (DNS rebinding), cross-origin POSTs refused, and CSP and nosniff headers on every
response."""


import hmac
import json


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


