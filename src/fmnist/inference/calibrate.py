"""Probabilities that mean what they say, and a flag for inputs that are not like Fashion-MNIST.

    fmnist calibrate --model runs/my-run  # for a run trained before this existed; training does it

Two things are fitted after training, on data the weights never saw:

- a **temperature** T (Guo et al., 2017): probabilities are softmax(logits / T), with T the one
  that minimises the negative log-likelihood of the validation split. It changes no prediction,
  only how sure each one says it is;
- an **out-of-distribution score**: how far an image is from the training images, in three
  spaces at once, by the distance (cosine, to the k-th closest) to a bank of training images.
  In pixel space it catches pictures whose shapes no garment has (text, line drawings, faces);
  in the pooled activations of the first convolution, strokes, edges and textures no garment
  has (digits, noise, blank canvases, scenes, dark-on-light pictures); in those of the last
  convolution, what the network makes of them. Each distance is put on the scale of the
  validation split's (0 at its median, 1 at its 95th percentile) and the score is the largest of
  the three; the threshold is the score 95% of validation images stay under, so 95% of
  Fashion-MNIST passes by construction. The maximum softmax probability and the energy score,
  measured side by side in bench/ood.py, miss most of these inputs (see docs/calibration.md).

The temperature and the threshold live in model.json ("calibration"); the two banks of training
examples in ood.safetensors beside it.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from fmnist import FmnistError
from fmnist.config import TrainConfig
from fmnist.data import Split, load_splits, to_tensor
from fmnist.data.photos import find_photos_dir
from fmnist.device import autocast_dtype
from fmnist.inference.photo_sets import load_photo_set
from fmnist.io import atomic_open
from fmnist.run import ModelMeta, RunDir, load_network

ECE_BINS = 15  # equal-width confidence bins of the expected calibration error
PASS_RATE = 0.95  # share of validation images under the out-of-distribution threshold
BANK_SIZE = 10_000  # training images kept as neighbours (7.8 MB of pixels)
K_PIXELS = 5  # the k-th nearest training image in pixel space
K_FEATURES = 20  # the k-th nearest in the last convolution's pooled activations
PHOTO_BANK = 0.8  # of a run's training photos in the bank; the rest set the threshold for photos


# ----------------------------------------------------------------------------- calibration error


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """The mean gap between confidence and accuracy over equal-width confidence bins, weighted
    by the share of predictions in each bin (0: a 70%-sure prediction is right 70% of the time)."""
    confidence, predicted = probabilities.max(1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    which = torch.bucketize(confidence, edges[1:-1], right=True)  # bin i holds (edge i, edge i+1]
    gap = torch.zeros(bins).index_add_(0, which, confidence - correct)
    return (gap.abs().sum() / len(labels)).item()


def reliability(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> dict[str, list]:
    """Per confidence bin: its centre, the number of predictions, their mean confidence and
    accuracy (None for an empty bin): what a reliability diagram draws."""
    confidence, predicted = probabilities.max(1)
    correct = (predicted == labels).float()
    which = torch.bucketize(confidence, torch.linspace(0, 1, bins + 1)[1:-1], right=True)
    count = torch.bincount(which, minlength=bins)
    conf_sum = torch.zeros(bins).index_add_(0, which, confidence)
    acc_sum = torch.zeros(bins).index_add_(0, which, correct)
    mean = lambda s: [float(v / n) if n else None for v, n in zip(s, count, strict=True)]  # noqa: E731
    return {"centers": [(i + 0.5) / bins for i in range(bins)], "count": count.tolist(),
            "confidence": mean(conf_sum), "accuracy": mean(acc_sum)}


def calibration_figures(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict[str, float]:
    """ECE and NLL of the raw probabilities and of the tempered ones."""
    logits, labels = logits.float().cpu(), labels.cpu()
    raw, tempered = logits.softmax(1), (logits / temperature).softmax(1)
    return {"temperature": temperature,
            "ece": expected_calibration_error(raw, labels), "nll": F.cross_entropy(logits, labels).item(),
            "ece_calibrated": expected_calibration_error(tempered, labels),
            "nll_calibrated": F.cross_entropy(logits / temperature, labels).item()}


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature that minimises the negative log-likelihood of `labels` (convex in 1/T)."""
    logits, labels = logits.detach().float().cpu().clone(), labels.cpu().clone()  # not inference tensors
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    t = float(log_t.detach().exp())
    return min(max(t, 0.05), 20.0) if math.isfinite(t) else 1.0


# ----------------------------------------------------------------------------- network probe


def probed_layers(model: nn.Module) -> dict[str, nn.Conv2d]:
    """The first and the last convolution of a network (one entry for a single convolution)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise FmnistError(f"{type(model).__name__} has no convolution to take features from")
    return {"first_conv": convs[0]} | ({"last_conv": convs[-1]} if len(convs) > 1 else {})


@torch.inference_mode()
def logits_and_features(model: nn.Module, images: torch.Tensor, tta: bool = False,
                        batch_size: int = 500) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits (N, classes) of normalised images and the activations of the first and the last
    convolution pooled over the image, mean of the rectified ones and maximum per channel
    ({layer: (N, 2 x channels)}); with `tta`, all averaged over each image and its mirror
    image, as predictions are."""
    layers, pooled = probed_layers(model), {}
    # The service runs explanations through the same network in another thread: only this
    # thread's passes are kept.
    caller = threading.get_ident()

    def keeper(name):
        def keep(module, inputs, output):
            if threading.get_ident() != caller:
                return
            output = output.float()
            pooled.setdefault(name, []).append(torch.cat([output.relu().mean((2, 3)), output.amax((2, 3))], 1))
        return keep

    model.eval()
    hooks = [layer.register_forward_hook(keeper(name)) for name, layer in layers.items()]
    logits = []
    try:
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size].contiguous(memory_format=torch.channels_last)
            out = model(x).float()
            if tta:
                out = (out + model(x.flip(3)).float()) / 2
                for kept in pooled.values():
                    kept[-2:] = [(kept[-2] + kept[-1]) / 2]
            logits.append(out)
    finally:
        for hook in hooks:
            hook.remove()
    if not logits:
        return images.new_zeros((0, 0)).cpu(), {}
    return torch.cat(logits).cpu(), {name: torch.cat(kept).cpu() for name, kept in pooled.items()}


# ----------------------------------------------------------------------------- out of distribution


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float().flatten(1), dim=1, eps=1e-6)


def kth_distance(queries: torch.Tensor, bank: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """1 - the cosine similarity of each query to its k-th most similar bank row (unit rows,
    in the bank's dtype)."""
    out = []
    for start in range(0, len(queries), chunk):
        sims = (_unit(queries[start : start + chunk]).to(bank.dtype) @ bank.T).float()
        out.append(1 - sims.topk(k, dim=1).values[:, -1])
    return torch.cat(out) if out else queries.new_zeros(0)


# The pixel bank's similarities are four times faster in bf16 where the CPU computes it natively
# (they differ from fp32 by about 0.001, a hundredth of the score's scale); the activations'
# banks are small and their distances finer, so they stay in fp32.
PIXEL_DTYPE = autocast_dtype("auto", torch.device("cpu")) or torch.float32


@dataclass
class Detector:
    """One nearest-neighbour distance, on the validation split's scale."""

    name: str  # "pixels", "first_conv" or "last_conv"
    k: int
    median: float = 0.0  # of the validation split's distances
    scale: float = 1.0  # their 95th percentile minus their median

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "k": self.k, "median": self.median, "scale": self.scale}


class OodDetector:
    """Scores images by their distance to the training set; see the module's description."""

    def __init__(self, banks: dict[str, torch.Tensor], detectors: list[Detector], threshold: float):
        self.banks = banks  # "pixels": uint8 (bank, 28, 28); a layer's name: its pooled activations
        self.units = {name: _unit(bank).to(PIXEL_DTYPE if name == "pixels" else torch.float32)
                      for name, bank in banks.items()}
        self.detectors = {d.name: d for d in detectors}
        self.threshold = threshold

    def distances(self, raw: torch.Tensor, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each detector's distance for uint8 images (N, 28, 28) and their pooled activations."""
        inputs = features | {"pixels": raw}
        return {name: kth_distance(inputs[name], self.units[name], d.k) for name, d in self.detectors.items()}

    def score(self, raw: torch.Tensor, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The out-of-distribution score (N,): higher is less like Fashion-MNIST; above
        `threshold` an image is flagged."""
        d = self.distances(raw, features)
        return torch.stack([(d[name] - det.median) / det.scale for name, det in self.detectors.items()]).amax(0)

    @classmethod
    def fit(cls, bank_raw: torch.Tensor, bank_features: dict[str, torch.Tensor], val_raw: torch.Tensor,
            val_features: dict[str, torch.Tensor], photos_raw: torch.Tensor | None = None,
            photos_features: dict[str, torch.Tensor] | None = None) -> OodDetector:
        """Distances put on the validation split's scale; the threshold the one PASS_RATE of the
        validation images stay under, raised, with held-out real photos, to the one PASS_RATE
        of those stay under."""
        n = len(bank_raw)
        detectors = [Detector("pixels", min(K_PIXELS, n))] + [Detector(name, min(K_FEATURES, n)) for name in bank_features]
        detector = cls(bank_features | {"pixels": bank_raw}, detectors, threshold=0.0)
        for name, d in detector.distances(val_raw, val_features).items():
            median = d.median().item()
            detector.detectors[name].median = median
            detector.detectors[name].scale = max(d.quantile(PASS_RATE).item() - median, 1e-6)
        detector.threshold = detector.score(val_raw, val_features).quantile(PASS_RATE).item()
        if photos_raw is not None and len(photos_raw):
            photos_pass = detector.score(photos_raw, photos_features).quantile(PASS_RATE).item()
            detector.threshold = max(detector.threshold, photos_pass)
        return detector

    def to_json(self) -> dict[str, Any]:
        return {"method": "knn", "threshold": self.threshold, "pass_rate": PASS_RATE,
                "detectors": [d.to_json() for d in self.detectors.values()]}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: (bank if name == "pixels" else bank.half()).contiguous() for name, bank in self.banks.items()}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], obj: Any, where: str) -> OodDetector:
        try:
            detectors = [Detector(d["name"], int(d["k"]), float(d["median"]), float(d["scale"]))
                         for d in obj["detectors"]]
            threshold = float(obj["threshold"])
            banks = {d.name: tensors[d.name] if d.name == "pixels" else tensors[d.name].float() for d in detectors}
        except (KeyError, TypeError, ValueError) as e:
            raise FmnistError(f"{where}: malformed out-of-distribution calibration ({e})") from None
        pixels = banks.get("pixels")
        if pixels is None or pixels.dtype != torch.uint8 or pixels.shape[1:] != (28, 28) \
                or not all(len(bank) == len(pixels) and bank.ndim in (2, 3) for bank in banks.values()) \
                or not all(0 < d.k <= len(pixels) and d.scale > 0 for d in detectors):
            raise FmnistError(f"{where}: malformed out-of-distribution calibration")
        return cls(banks, detectors, threshold)


# ----------------------------------------------------------------------------- a run


def bank_indices(n: int, size: int = BANK_SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(size, n)]


def calibrate(model: nn.Module, meta: ModelMeta, train: Split, val: Split,
              photos: torch.Tensor | None = None) -> tuple[dict[str, Any], OodDetector]:
    """Fit the temperature and the out-of-distribution detector of a trained model; the
    "calibration" entry of its model.json and the detector (whose banks go in ood.safetensors).
    `photos`, uint8 (P, 28, 28): prepared real photos the model trained on; PHOTO_BANK of them
    join the bank, so photos like them pass, and the rest set the threshold with the validation
    split."""
    if len(val) == 0:
        raise FmnistError("calibration needs a validation split (--val-size > 0)")
    val_logits, val_features = logits_and_features(model, val.images, meta.tta)
    temperature = fit_temperature(val_logits, val.labels)
    bank = bank_indices(len(train))
    bank_raw, bank_images = train.raw[bank], train.images[bank.to(train.images.device)]
    held_raw = held_features = None
    if photos is not None and len(photos):
        order = bank_indices(len(photos), len(photos), seed=1)
        cut = round(len(photos) * PHOTO_BANK)
        norm = meta.normalization
        photo_images = to_tensor(photos, norm.mean, norm.std, device=bank_images.device)
        bank_raw = torch.cat([bank_raw, photos[order[:cut]]])
        bank_images = torch.cat([bank_images, photo_images[order[:cut].to(bank_images.device)]])
        held_raw = photos[order[cut:]]
        _, held_features = logits_and_features(model, photo_images[order[cut:].to(bank_images.device)], meta.tta)
    _, bank_features = logits_and_features(model, bank_images, meta.tta)
    detector = OodDetector.fit(bank_raw, bank_features, val.raw, val_features, held_raw, held_features)
    figures = calibration_figures(val_logits, val.labels, temperature)
    entry = {"temperature": temperature, "ood": detector.to_json(),
             "validation": {k: v for k, v in figures.items() if k != "temperature"}}
    return entry, detector


def save_calibration(run: RunDir, meta: ModelMeta, entry: dict[str, Any], detector: OodDetector) -> None:
    """ood.safetensors, then model.json with its "calibration" entry."""
    with atomic_open(run.ood_path) as f:
        f.write(safetensors_save(detector.tensors()))
    meta.calibration = entry
    run.write_meta(meta)


def load_detector(run: RunDir, meta: ModelMeta) -> OodDetector | None:
    """The out-of-distribution detector of a calibrated run; None for a run not calibrated."""
    if "ood" not in meta.calibration:
        return None
    try:
        tensors = safetensors_load(run.ood_path.read_bytes())
    except FileNotFoundError:
        raise FmnistError(f"{run.ood_path}: not found; recalibrate with: fmnist calibrate --model {run}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise FmnistError(f"{run.ood_path}: not a valid safetensors file ({e})") from None
    return OodDetector.from_saved(tensors, meta.calibration["ood"], str(run.ood_path))


def calibrate_run(run_dir, data_dir=None, device="cpu") -> dict[str, Any]:
    """Calibrate a run folder's model in place (`fmnist calibrate`); its "calibration" entry."""
    run = RunDir.existing(run_dir)
    model, meta = load_network(run, device)
    val_size = meta.config.get("val_size", TrainConfig.val_size)
    if not isinstance(val_size, int) or val_size <= 0:
        raise FmnistError(f"{run}: trained without a validation split (val_size {val_size!r}); "
                          "calibration needs images the model did not train on")
    splits = load_splits(val_size, meta.normalization, data_dir, device)
    photos = None
    if meta.config.get("photo_share"):  # a run trained on photos: they join its bank again
        photos = torch.as_tensor(load_photo_set(find_photos_dir(meta.config.get("photos"))).images)
    entry, detector = calibrate(model, meta, splits["train"], splits["val"], photos)
    save_calibration(run, meta, entry, detector)
    return entry


def format_calibration(entry: dict[str, Any]) -> str:
    """One line: the temperature and what it did to the validation figures, and the
    out-of-distribution threshold."""
    figures, ood = entry["validation"], entry["ood"]
    return (f"temperature {entry['temperature']:.3f} "
            f"(validation ECE {figures['ece']:.2%} -> {figures['ece_calibrated']:.2%}, "
            f"NLL {figures['nll']:.4f} -> {figures['nll_calibrated']:.4f}); "
            f"out-of-distribution threshold {ood['threshold']:.3f} ({ood['pass_rate']:.0%} of validation images pass)")
