"""Attribution heatmaps of single images (Captum): which pixels speak for or against a class,
and how faithful each method is (removing its top pixels against random ones). No matplotlib
here: the service imports this module.

    from fmnist.explain import attribute
    heatmaps = attribute(load_model("runs/post"), images)   # (N, 28, 28) float32, occlusion

Needs the `explain` extra (captum): pip install 'fmnist[explain]'. Attributions are for the
network as `predict` runs it: a model trained with mirror images is explained through the mean
of the image's and its mirror's logits (see `attribute`).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fmnist import FmnistError
from fmnist.config import Attribution, Embedding
from fmnist.data import IMAGE_SIZE, to_tensor
from fmnist.inference.photo import prepare_batch
from fmnist.inference.predictor import Predictor
from fmnist.models import MirrorAverage

METHODS: tuple[str, ...] = get_args(Attribution)
# The default: the method whose top pixels, removed, lower the probability most against random
# ones on both the post's network and cpu-fast (docs/explain.md; bench/explain_faithfulness.py).
DEFAULT_METHOD = "occlusion"
EMBEDDINGS: tuple[str, ...] = get_args(Embedding)
IG_STEPS = 50  # integration steps from the black image: enough for the attributions to sum to the logit change
IG_BATCH = 256  # images per forward and backward pass while integrating: bounds memory (wide ResNets)
OCCLUSION_WINDOW = 3  # pixels: a 3x3 patch set to the background, slid one pixel at a time
OCCLUSION_BATCH = 8  # occluded copies of each image per forward pass (x ATTRIBUTE_CHUNK images)
ATTRIBUTE_CHUNK = 64  # images attributed together
REMOVED_FRACTION = 0.05  # of the 784 pixels, removed by the faithfulness check


# ----------------------------------------------------------------------------- optional libraries


def _captum_attr():
    try:
        import captum.attr
    except ImportError:
        raise FmnistError("explanations need captum: pip install 'fmnist[explain]'") from None
    return captum.attr



def check_captum() -> None:
    """Raise the one-line FmnistError when captum is missing (the service answers 501 with it)."""
    _captum_attr()


# ----------------------------------------------------------------------------- the network's parts


def modules_of(model: nn.Module, kind: type) -> list[tuple[str, nn.Module]]:
    """The named submodules of a type, in the order they were defined (for these networks, the
    order data flows through them)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kind)]


def _layer(model: nn.Module, kind: type, index: int) -> nn.Module:
    """The first (index 0) or last (-1) layer of a type."""
    found = modules_of(model, kind)
    if not found:
        raise FmnistError(f"{type(model).__name__} has no {kind.__name__} layer to explain")
    return found[index][1]


def scored_network(predictor: Predictor) -> nn.Module:
    """The network whose logits `predict` turns into probabilities: the model, or for a model
    trained with mirror images the mean of the image's and its mirror's logits."""
    return MirrorAverage(predictor.model) if predictor.meta.tta else predictor.model


def class_index(predictor: Predictor, target: int | str) -> int:
    """A class given by index or by name (any case)."""
    names = predictor.class_names
    if isinstance(target, str) and not target.strip().lstrip("-").isdigit():
        lowered = [n.lower() for n in names]
        if target.strip().lower() not in lowered:
            raise FmnistError(f"--target: unknown class {target!r}; one of {', '.join(names)} or 0..{len(names) - 1}")
        return lowered.index(target.strip().lower())
    index = int(target)
    if not 0 <= index < len(names):
        raise FmnistError(f"--target: class index {index} is outside 0..{len(names) - 1}")
    return index


def targets_for(predictor: Predictor, images: np.ndarray, target=None) -> np.ndarray:
    """The class explained for each image: its predicted class, one class for all (index or
    name) or one per image."""
    if target is None:
        return predictor.probabilities(images).argmax(1)
    if isinstance(target, int | str | np.integer):
        return np.full(len(images), class_index(predictor, target))
    targets = [class_index(predictor, t) for t in target]
    if len(targets) != len(images):
        raise FmnistError(f"{len(targets)} targets for {len(images)} images")
    return np.asarray(targets)


# ----------------------------------------------------------------------------- attributions


def attribute(predictor: Predictor, images, method: str = DEFAULT_METHOD, target=None) -> np.ndarray:
    """Attribution heatmaps (N, 28, 28) float32 of uint8 images (N, 28, 28) (or anything
    `prepare_batch` takes) for the predicted class, or `target`: a class index or name for all
    images, or one per image. Positive: the pixel's brightness speaks for the class.

    - "occlusion" (the default): how much the class's logit falls when a 3x3 patch around the
      pixel is set to black (the dataset's background).
    - "ig": integrated gradients from the black image to the image; the attributions of an
      image add up to its logit minus the black image's.
    - "gradcam": Grad-CAM on the last convolution, upsampled to 28x28 (bilinear); non-negative.

    A model trained with mirror images is scored, as `predict` does, on the mean of the image's
    and its mirror's logits: integrated gradients and occlusion run through exactly that mean.
    Grad-CAM, which reads one layer's activations, is taken on each of the two passes, the
    mirror's map flipped back, and averaged: the gradient of the mean logits reaches each pass's
    activations halved, so this is the Grad-CAM of the averaged logits, ReLU taken per pass.
    """
    if method not in METHODS:
        raise FmnistError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")
    attr = _captum_attr()
    batch = prepare_batch(images)
    targets = targets_for(predictor, batch, target)
    black = predictor.meta.normalization.black
    maps = []
    with torch.enable_grad():
        for start in range(0, len(batch), ATTRIBUTE_CHUNK):
            x = to_tensor(batch[start : start + ATTRIBUTE_CHUNK], predictor.mean, predictor.std)
            t = torch.as_tensor(targets[start : start + ATTRIBUTE_CHUNK], dtype=torch.long)
            if method == "ig":
                a = attr.IntegratedGradients(scored_network(predictor)).attribute(
                    x, baselines=black, target=t, n_steps=IG_STEPS, internal_batch_size=IG_BATCH)
            elif method == "occlusion":
                window = (1, OCCLUSION_WINDOW, OCCLUSION_WINDOW)
                a = attr.Occlusion(scored_network(predictor)).attribute(
                    x, sliding_window_shapes=window, strides=(1, 1, 1), baselines=black, target=t,
                    perturbations_per_eval=OCCLUSION_BATCH)
                # Where every patch over a pixel was black already, nothing changed: exactly 0, not
                # the rounding noise of another batch's arithmetic. (Those patches reach up to
                # 2 * (window - 1) pixels across.)
                reach = 2 * OCCLUSION_WINDOW - 1
                changed = F.max_pool2d((x != black).float(), reach, stride=1, padding=reach // 2)
                a = a * changed
            else:
                a = _gradcam(attr, predictor, x, t)
            maps.append(a.detach()[:, 0].float().numpy())
    if not maps:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    return np.concatenate(maps).astype(np.float32)


def _gradcam(attr, predictor: Predictor, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    model = predictor.model
    cam = attr.LayerGradCam(model, _layer(model, nn.Conv2d, -1))

    def upsampled(images: torch.Tensor) -> torch.Tensor:
        maps = cam.attribute(images, target=targets, relu_attributions=True)  # (B, 1, h, w)
        return attr.LayerAttribution.interpolate(maps, (IMAGE_SIZE, IMAGE_SIZE), "bilinear")

    if not predictor.meta.tta:
        return upsampled(x)
    return (upsampled(x) + upsampled(x.flip(3)).flip(3)) / 2


# ----------------------------------------------------------------------------- faithfulness


def remove_top(images: np.ndarray, scores: np.ndarray, fraction: float = REMOVED_FRACTION) -> np.ndarray:
    """The images with the `fraction` of their pixels that score highest set to black (the
    background); ties go to the earlier pixel."""
    n = len(images)
    k = round(fraction * IMAGE_SIZE * IMAGE_SIZE)
    flat = images.reshape(n, -1).copy()
    order = np.argsort(-scores.reshape(n, -1), axis=1, kind="stable")[:, :k]
    np.put_along_axis(flat, order, 0, axis=1)
    return flat.reshape(images.shape)


@dataclass
class Faithfulness:
    """How much the predicted class's probability falls, on average, when the pixels with the
    highest attribution are removed, against as many of the object's pixels at random."""

    method: str
    images: int
    fraction: float  # of the pixels removed
    attributed_drop: float  # mean fall of the probability, top-attributed pixels removed
    random_drop: float  # the same, random object pixels (> 0) removed; mean of `repeats` draws

    @property
    def ratio(self) -> float:
        return self.attributed_drop / max(self.random_drop, 1e-12)


def faithfulness(predictor: Predictor, images: np.ndarray, method: str = DEFAULT_METHOD,
                 fraction: float = REMOVED_FRACTION, repeats: int = 3, seed: int = 0) -> Faithfulness:
    """The deletion check of `attribute` on uint8 images (N, 28, 28), for the predicted class."""
    images = prepare_batch(images)
    probabilities = predictor.probabilities(images)
    predicted = probabilities.argmax(1)
    rows = np.arange(len(images))
    before = probabilities[rows, predicted]

    def drop(scores: np.ndarray) -> float:
        after = predictor.probabilities(remove_top(images, scores, fraction))[rows, predicted]
        return float((before - after).mean())

    attributed = drop(attribute(predictor, images, method, target=predicted))
    rng = np.random.default_rng(seed)
    random = [drop(np.where(images > 0, rng.random(images.shape), -np.inf)) for _ in range(repeats)]
    return Faithfulness(method, len(images), fraction, attributed, float(np.mean(random)))


# ----------------------------------------------------------------------------- heatmaps as pictures


POSITIVE = np.array([1.0, 0.2, 0.1])  # red-orange: brightness here speaks for the class
NEGATIVE = np.array([0.15, 0.5, 1.0])  # blue: brightness here speaks against it


def overlay_rgb(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """uint8 (28, 28, 3): the image in grey (light on black, as the model sees it), dimmed, with
    the heatmap over it, red where positive and blue where negative, opaque at the 99th
    percentile of its magnitude."""
    grey = np.repeat((image.astype(np.float64) / 255 * 0.6)[..., None], 3, axis=2)
    scale = np.percentile(np.abs(heatmap), 99)
    alpha = np.clip(np.abs(heatmap) / scale, 0, 1)[..., None] if scale > 0 else np.zeros((*heatmap.shape, 1))
    colour = np.where((heatmap >= 0)[..., None], POSITIVE, NEGATIVE)
    return np.round(255 * (grey * (1 - alpha) + colour * alpha)).astype(np.uint8)


def overlay_png(image: np.ndarray, heatmap: np.ndarray) -> bytes:
    """`overlay_rgb` as 28x28 PNG bytes (the service's data URL)."""
    buffer = io.BytesIO()
    Image.fromarray(overlay_rgb(image, heatmap), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def heatmap_json(heatmap: np.ndarray) -> list[list[float]]:
    """28 rows of 28 numbers, 4 significant digits."""
    return [[float(f"{v:.4g}") + 0.0 for v in row] for row in heatmap.tolist()]  # + 0.0: no -0.0


