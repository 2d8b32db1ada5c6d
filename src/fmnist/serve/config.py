"""What `fmnist serve` does, besides which model it serves: one flag a field."""

from __future__ import annotations

from dataclasses import dataclass

from fmnist import FmnistError
from fmnist.config import MAX_PIXELS, LogLevel, check_choices, check_ranges, opt


@dataclass
class ServeConfig:
    """What `fmnist serve` does, besides which model it serves."""

    host: str = opt("127.0.0.1", "address to bind (127.0.0.1: this machine only; any other address wants --api-key or an authenticating proxy)")
    port: int = opt(8000, "TCP port (0: any free one)", within="[0, 65535]")
    max_upload_bytes: int = opt(10 * 1024 * 1024, "largest request body accepted, in bytes", within="[1, inf)")
    max_pixels: int = opt(MAX_PIXELS, "largest decoded image, in pixels, checked from its header before decoding",
                          within="[1, inf)")
    max_batch: int = opt(64, "most concurrent requests run through the model as one batch", within="[1, inf)")
    threads: int = opt(1, "PyTorch intra-op threads of the model (the event loop needs a core; 0: PyTorch's default)",
                       within="[0, inf)")
    decode_workers: int = opt(2, "threads decoding large uploads and images (bounds their memory)", within="[1, inf)")
    max_connections: int = opt(512, "open connections; at the limit the longest idle one is closed to make room, and with none idle a new one gets 503",
                               within="[1, inf)")
    access_log: bool = opt(True, "log one line per request")
    log_level: LogLevel = opt("info", "uvicorn's log level")
    api_key: str | None = opt(None, "require `Authorization: Bearer KEY` on /v1/*; unset, $FMNIST_API_KEY is used (other users cannot read it from the process list)")
    allowed_hosts: str | None = opt(None, "comma-separated Host names the service answers, '*' for any; unset: --host, localhost, 127.0.0.1, [::1], and this machine's names for 0.0.0.0 or ::")
    docs: bool = opt(False, "serve the OpenAPI page at /docs (FastAPI's Swagger UI, which the browser fetches from a CDN); /openapi.json is always served")
    max_queue: int = opt(256, "uploads in progress at once, small (<= 64 KiB) and large ones counted apart; more get 503 with Retry-After",
                         within="[1, inf)")
    max_queue_bytes: int = opt(256 * 1024 * 1024, "declared bytes of the large uploads in progress at once; more get 503 with Retry-After",
                               within="[1, inf)")
    queue_timeout: float = opt(10.0, "seconds an upload may wait for a decoder, then 503 with Retry-After", within="(0, inf)")
    header_timeout: float = opt(10.0, "seconds a client has to send a request's line and headers, from connecting or from its previous response; idle and slower connections are closed",
                                within="(0, inf)")
    body_timeout: float = opt(30.0, "seconds a client has to send a request's body once its headers are in; slower ones get 408",
                              within="(0, inf)")
    max_header_bytes: int = opt(32 * 1024, "largest request line plus headers, in bytes; larger get 431", within="[1, inf)")

    def validate(self) -> None:
        check_choices(self)
        check_ranges(self)
        for pattern in self.host_names() if self.allowed_hosts is not None else []:
            if "*" in pattern[1:] or (pattern.startswith("*") and pattern != "*" and not pattern.startswith("*.")):
                raise FmnistError(f"--allowed-hosts: {pattern!r} is not a host name, '*.domain' or '*'")
        if self.api_key is not None and (len(self.api_key) < 16 or not self.api_key.isascii()
                                         or not self.api_key.isprintable() or " " in self.api_key):
            raise FmnistError("--api-key must be at least 16 printable ASCII characters without spaces "
                              "(e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")

    def host_names(self) -> list[str]:
        """The Host header names the service answers: --allowed-hosts, or the bound address,
        the loopback names and, bound to every interface, this machine's names."""
        if self.allowed_hosts is not None:
            return [h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip()]
        import socket

        names = {"localhost", "127.0.0.1", "[::1]"}
        names.add(f"[{self.host}]" if ":" in self.host else self.host.lower())
        if self.host in ("0.0.0.0", "::", ""):
            for name in {socket.gethostname(), socket.getfqdn()}:
                names.add(name.lower())
                try:
                    names.update(str(info[4][0]).split("%")[0] for info in socket.getaddrinfo(name, None))
                except OSError:
                    pass
        return sorted(n if ":" not in n or n.startswith("[") else f"[{n}]" for n in names)
