"""Warming the service up before its first request: a prediction's every step run once, and the
model at each batch size (oneDNN sets up its kernels per input shape)."""


import asyncio
import gc
import logging
import time

import numpy as np

from fmnist.inference.inputs import input_png
from fmnist.inference.predictor import Predictor
from fmnist.serve.batching import Batcher
from fmnist.serve.errors import HTTPError
from fmnist.serve.uploads import Uploads, open_upload

log = logging.getLogger("fmnist.serve")

WARMUP_SECONDS = 20.0  # most start-up time spent running the model at each batch size




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
