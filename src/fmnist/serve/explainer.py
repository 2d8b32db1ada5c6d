"""Attributions for the service (POST /v1/explain): run in their own thread, a bounded number
admitted at once, so explanations never hold up predictions."""

import asyncio
import base64
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from fmnist import FmnistError
from fmnist.explain.attribution import (
    DEFAULT_METHOD,
    attribute,
    check_captum,
    heatmap_json,
    overlay_png,
)
from fmnist.inference.predictor import Predictor
from fmnist.serve.errors import HTTPError, overloaded

log = logging.getLogger("fmnist.serve")

EXPLAIN_QUEUE = 16  # explanations admitted at once (each ~50-100 ms of CPU); more get 503


def explanation(predictor: Predictor, image: np.ndarray, target: int) -> dict[str, Any]:
    """The heatmap (the default method's, occlusion) of a prepared image for class `target`:
    28x28 numbers and the overlay as a PNG data URL. Raises HTTPError 501 without captum."""
    try:
        check_captum()
    except FmnistError as e:
        raise HTTPError(501, str(e)) from None
    heatmap = attribute(predictor, image[None], DEFAULT_METHOD, target=[target])[0]
    png = base64.b64encode(overlay_png(image, heatmap)).decode()
    return {"method": DEFAULT_METHOD, "target": predictor.class_names[target], "heatmap": heatmap_json(heatmap),
            "png": "data:image/png;base64," + png}


class Explainer:
    """Attributions for /v1/explain: one at a time in their own thread beside the batcher, so
    predictions never wait behind them; at most EXPLAIN_QUEUE at once, more get 503."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="fmnist-explain")
        self.admitted = 0

    def start(self) -> None:
        self.executor.submit(check_captum)  # import captum (seconds) before the first request needs it

    async def explain(self, image: np.ndarray, target: int) -> dict[str, Any]:
        if self.admitted >= EXPLAIN_QUEUE:
            raise overloaded(f"the service is busy: {self.admitted} explanations in progress")
        self.admitted += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.executor, explanation, self.predictor, image, target)
        finally:
            self.admitted -= 1

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


