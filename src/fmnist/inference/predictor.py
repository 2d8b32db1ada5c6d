"""Run a trained model on pictures: the predictor of a run folder, for the CLI, the service and
the Python API.

    fmnist predict --model runs/my-run shoe.jpg coat.png
    fmnist predict shoe.jpg --top-k 5 --json        # the most recent run under ./runs
    fmnist predict --model runs/my-run batch.npy t10k-images-idx3-ubyte.gz
    fmnist predict --model runs/my-run shoe.jpg --save-input seen/

    from fmnist.inference.predictor import load_model
    predictor = load_model("runs/my-run")
    predictor.predict([PIL.Image.open("shoe.jpg")])
    # {"predictions": [{"file": None, "top": [...], "ood_score": 0.3, "in_distribution": True}]}

Pictures are made to look like Fashion-MNIST images by `fmnist.inference.photo.prepare_image` first.
Probabilities are tempered by the run's calibration, and every prediction says whether the image
looks like Fashion-MNIST at all (`fmnist.inference.calibrate`); for a run trained before calibration existed
both come from `fmnist calibrate --model RUN_DIR`, and until then `ood_score` and `in_distribution` are None.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmnist import FmnistError
from fmnist.config import PredictConfig
from fmnist.data import to_tensor
from fmnist.inference.calibrate import OodDetector, load_detector, logits_and_features
from fmnist.inference.forward import predict_logits
from fmnist.inference.inputs import answered, read_each, save_inputs
from fmnist.inference.photo import prepare_batch
from fmnist.run import ModelMeta, RunDir, load_network

# ----------------------------------------------------------------------------- the model


class Predictor:
    """A trained model with its class names and normalisation, ready for uint8 images."""

    def __init__(self, model: torch.nn.Module, meta: ModelMeta, run_dir: Path | None = None,
                 detector: OodDetector | None = None):
        # Channels-last convolutions are about 1.5x faster on the CPU; predict_logits follows suit.
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.meta = meta
        self.run_dir = run_dir
        self.detector = detector  # None: the run is not calibrated, nothing is flagged
        self.class_names: list[str] = list(meta.class_names)
        self.mean = meta.normalization.mean
        self.std = meta.normalization.std
        self.temperature = meta.temperature

    @torch.inference_mode()
    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities (N, classes) of prepared uint8 images (N, 28, 28)."""
        if len(images) == 0:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        x = to_tensor(images, self.mean, self.std)
        # A model trained with mirror images averages each image with its mirror, as `evaluate` does.
        return (predict_logits(self.model, x, tta=self.meta.tta) / self.temperature).softmax(1).numpy()

    @torch.inference_mode()
    def assess(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Class probabilities (N, classes) and out-of-distribution scores (N,) of prepared uint8
        images (N, 28, 28), in one pass; the scores are None for a run not calibrated."""
        if self.detector is None or len(images) == 0:
            return self.probabilities(images), None
        x = to_tensor(images, self.mean, self.std)
        logits, features = logits_and_features(self.model, x, self.meta.tta)
        scores = self.detector.score(features)
        return (logits / self.temperature).softmax(1).numpy(), scores.numpy()

    def describe(self, probabilities: np.ndarray, scores: np.ndarray | None, top_k: int = 3) -> list[dict[str, Any]]:
        """Per image: its top classes, `ood_score` (higher: less like Fashion-MNIST) and
        `in_distribution` (the score under the run's threshold), None for both when the run
        is not calibrated."""
        tops = self.top(probabilities, top_k)
        if scores is None:
            return [{"top": t, "ood_score": None, "in_distribution": None} for t in tops]
        threshold = self.detector.threshold
        return [{"top": t, "ood_score": round(float(s), 4), "in_distribution": bool(s <= threshold)}
                for t, s in zip(tops, scores, strict=True)]

    def top(self, probabilities: np.ndarray, k: int = 3) -> list[list[dict[str, Any]]]:
        """The k most probable classes of each row, most probable first."""
        k = max(1, min(k, probabilities.shape[1]))
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return [
            [{"label": self.class_names[i], "index": int(i), "probability": float(row[i])} for i in idx]
            for row, idx in zip(probabilities, order, strict=True)
        ]

    def predict(self, images, top_k: int = 3, names: Sequence[str] | None = None) -> dict[str, Any]:
        """{"predictions": [{"file": name or None, "top": [{"label", "index", "probability"}],
        "ood_score": float, "in_distribution": bool}]} for PIL images or arrays (see `prepare_batch`)."""
        batch = prepare_batch(images)
        if names is not None and len(names) != len(batch):
            raise ValueError(f"{len(names)} names for {len(batch)} images")
        described = self.describe(*self.assess(batch), top_k)
        names = names if names is not None else [None] * len(batch)
        return {"predictions": [{"file": n, **d} for n, d in zip(names, described, strict=True)]}


def load_model(run_dir: str | os.PathLike, device: str = "cpu") -> Predictor:
    """The predictor of a run folder written by `fmnist train`: `.model` (the network in eval
    mode), `.meta` (its model.json), `.predict(images)` and `.probabilities(images)`."""
    run = RunDir(run_dir)
    model, meta = load_network(run, device)
    return Predictor(model, meta, Path(run_dir), load_detector(run, meta))


def predict_files(run_dir: str | os.PathLike, paths: Sequence[str | os.PathLike],
                  config: PredictConfig | None = None) -> dict[str, Any]:
    """Predictions for image, .npy and IDX files, as `Predictor.predict` returns them plus the
    model folder used; with `save_input`, writes the 28x28 image the model saw of each input as
    a PNG into that folder and names it in the prediction's "input_file". Of several files, one
    that cannot be read or shows nothing gets {"file", "error"} in its place and the others their
    answers; a single file's error, or every file's, is raised."""
    config = config or PredictConfig()
    config.validate()
    top_k, save_input = config.top_k, config.save_input
    predictor = load_model(run_dir)
    read = read_each(paths, "answered")
    inputs = answered(read)
    result = predictor.predict(np.stack([image for _, image in inputs]), top_k, names=[name for name, _ in inputs])
    if save_input is not None:  # each prediction says where the image the model saw went
        for entry, path in zip(result["predictions"], save_inputs(save_input, inputs), strict=True):
            entry["input_file"] = str(path)
    answers = iter(result["predictions"])
    entries = []
    for path, got in zip(paths, read, strict=True):
        if isinstance(got, FmnistError):
            entries.append({"file": str(path), "error": str(got)})
        else:
            entries += [next(answers) for _ in got]
    threshold = predictor.detector.threshold if predictor.detector is not None else None
    return {"model": str(run_dir), "trained_on_photos": predictor.meta.trained_on_photos,
            "ood_threshold": threshold, "predictions": entries}


def format_predictions(result: dict[str, Any]) -> str:
    """A small table per image: rank, class, probability and a bar; a plain warning for an
    image that does not look like Fashion-MNIST (and where the 28x28 image the model saw was
    written, with --save-input); after them, where a run trained without photos flagged one,
    a line that says which model to use for photos."""
    lines = []
    for entry in result["predictions"]:
        lines.append(entry["file"] or "<image>")
        if "error" in entry:
            lines.append(f"  not answered: {entry['error']}")
            continue
        if entry.get("input_file"):
            lines.append(f"  (the model saw {entry['input_file']})")
        threshold = result.get("ood_threshold")
        if entry.get("in_distribution") is False:
            lines.append(f"  this does not look like clothing (out-of-distribution score {entry['ood_score']:.2f}, "
                         f"flagged above {threshold:.2f}); the classes below are the model's guess all the same")
        elif entry.get("ood_score") is not None:
            lines.append(f"  looks like clothing (out-of-distribution score {entry['ood_score']:.2f}, flagged above "
                         f"{threshold:.2f}); a confident answer can still be wrong")
        width = max(len(t["label"]) for t in entry["top"])
        for rank, t in enumerate(entry["top"], 1):
            bar = "#" * round(20 * t["probability"])
            lines.append(f"  {rank}. {t['label']:<{width}}  {t['probability']:6.1%}  {bar}")
    flagged = any(entry.get("in_distribution") is False for entry in result["predictions"])
    if flagged and result.get("trained_on_photos") is False:
        lines.append("A model trained on Fashion-MNIST alone flags most real photos: for photos use a photo run "
                     "(`fmnist train --preset photo`, see docs/photos.md).")
    return "\n".join(lines)
