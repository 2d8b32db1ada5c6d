"""Request bodies and uploads, off the event loop: the body read with a size cap and a deadline,
the multipart file parsed with bounded parts, the image header read and the picture decoded and
prepared in bounded thread pools, small uploads apart from large ones, so a queue of large images
never delays a small one."""

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fmnist.inference.decode import ImageError, load_pixels, open_image
from fmnist.inference.photo import prepare_image
from fmnist.serve.config import ServeConfig
from fmnist.serve.errors import HTTPError, overloaded

log = logging.getLogger("fmnist.serve")

SMALL_UPLOAD_BYTES = 64 * 1024  # bodies up to this go to the small lane (a 28x28 PNG is ~1 KB)
INLINE_DECODE_PIXELS = 256 * 256  # a small upload's image decodes in the small lane up to this size
MAX_PARTS = 4  # multipart parts in an upload: one file, perhaps a field or two
MAX_PART_HEADER_BYTES = 8 * 1024  # header bytes of one multipart part




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


