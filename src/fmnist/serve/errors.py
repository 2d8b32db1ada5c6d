"""The errors a request can end in, as status, message and headers."""

RETRY_AFTER = "1"  # seconds, told to clients refused for overload


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def overloaded(message: str) -> HTTPError:
    """A 503 that tells the client when to try again; the connection is closed, since its body
    may not have been read."""
    return HTTPError(503, message, {"retry-after": RETRY_AFTER, "connection": "close"})

