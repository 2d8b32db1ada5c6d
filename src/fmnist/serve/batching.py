"""Concurrent requests' images run through the model as one batch: the model runs in its own
thread while the event loop reads the next requests, so under load each forward pass serves
many requests."""

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fmnist.inference.predictor import Predictor
from fmnist.serve.errors import RETRY_AFTER, HTTPError, overloaded

log = logging.getLogger("fmnist.serve")


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


