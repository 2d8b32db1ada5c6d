"""The connection guard: uvicorn closes nothing on its own before a request arrives, so this
protocol adds deadlines for a request's head (idle and slowloris connections are closed), a cap
on its size, and a connection limit that closes the longest idle connection rather than refusing
new ones."""

import json

from fmnist.serve.config import ServeConfig
from fmnist.serve.errors import RETRY_AFTER
from fmnist.serve.security import CSP, SECURITY_HEADERS


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


