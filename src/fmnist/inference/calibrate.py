"""Probabilities that mean what they say, and a flag for inputs that are not like Fashion-MNIST.

    fmnist calibrate --model runs/my-run  # for a run trained before this existed; training does it

Two things are fitted after training, on data the weights never saw:

- a **temperature** T (Guo et al., 2017): probabilities are softmax(logits / T), with T the one
  that minimises the negative log-likelihood of the validation split. It changes no prediction,
  only how sure each one says it is;
- an **out-of-distribution score**: how unlike clothing the network's view of an image is. A
  small network (one hidden layer of 64) reads three of the model's layers (the first and the
  last convolution's activations pooled over the image, and the features the classes are read
  from) and is fitted to tell 10,000 training images (and a photo run's real photos) from images
  that are not clothing, drawn from a seed by `fmnist.inference.outliers`. Its logit is put on
  the validation split's scale (0 at its median, 1 at its 95th percentile); the threshold is the
  score 95% of validation images stay under, so 95% of Fashion-MNIST passes by construction (a
  photo run raises it so 98% of its held-out training photos pass too). bench/ood.py measures
  it on drawn kinds it never saw, beside the maximum softmax probability and the energy score,
  which miss most of them (see docs/calibration.md).

The temperature and the threshold live in model.json ("calibration"); the detector's weights in
ood.safetensors beside it.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from fmnist import FmnistError
from fmnist.config import TrainConfig
from fmnist.data import Split, load_splits, to_tensor
from fmnist.data.augment import random_photo
from fmnist.data.photos import find_photos_dir
from fmnist.inference.outliers import draw_outliers
from fmnist.inference.photo_sets import load_photo_set
from fmnist.io import atomic_open
from fmnist.run import ModelMeta, RunDir, load_network

ECE_BINS = 15  # equal-width confidence bins of the expected calibration error
T_MIN, T_MAX = 0.05, 20.0  # the temperatures a fit may give
TIE = 1e-12  # negative log-likelihoods closer than this are equal to the temperature fit
PASS_RATE = 0.95  # share of validation images under the out-of-distribution threshold
BANK_SIZE = 10_000  # training images the detector learns clothing from
PHOTO_BANK = 0.8  # of a run's training photos it learns from; the rest set the threshold for photos
PHOTO_PASS_RATE = 0.98  # of those held-out photos under the threshold (unseen photos pass less often)


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
    """The temperature in [T_MIN, T_MAX] that minimises the negative log-likelihood of `labels`.

    The likelihood is convex in 1/T, so it has one minimum over log T, found by golden-section
    search to a width of 1e-9, in float64: the same answer for logits that differ by float
    rounding (another thread count, weights saved and loaded). Likelihoods within TIE of each
    other count as equal and the search then moves up: where every validation image is right
    with room to spare, the likelihood falls towards 0 as T does, and about the highest temperature
    at which it is within TIE of 0 is taken, no surer than the images show. Non-finite logits
    give 1."""
    logits, labels = logits.detach().double().cpu(), labels.cpu()
    if not torch.isfinite(logits).all():
        return 1.0

    def nll(log_t: float) -> float:
        return F.cross_entropy(logits / math.exp(log_t), labels).item()

    ratio = (math.sqrt(5) - 1) / 2
    low, high = math.log(T_MIN), math.log(T_MAX)
    left, right = high - ratio * (high - low), low + ratio * (high - low)
    at_left, at_right = nll(left), nll(right)
    while high - low > 1e-9:
        if at_left < at_right - TIE:  # the minimum is left of `right`
            high, right, at_right = right, left, at_left
            left = high - ratio * (high - low)
            at_left = nll(left)
        else:  # right of `left` (a tie moves up: the flat stretch's top)
            low, left, at_left = left, right, at_right
            right = low + ratio * (high - low)
            at_right = nll(right)
    return math.exp((low + high) / 2)


# ----------------------------------------------------------------------------- network probe


def probed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The first and the last convolution of a network (one entry for a single convolution)
    and its last linear layer, whose input is what the classes are read from."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise FmnistError(f"{type(model).__name__} has no convolution to take features from")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return ({"first_conv": convs[0]} | ({"last_conv": convs[-1]} if len(convs) > 1 else {})
            | ({"penultimate": linears[-1]} if linears else {}))


@torch.inference_mode()
def logits_and_features(model: nn.Module, images: torch.Tensor, tta: bool = False,
                        batch_size: int = 500) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits (N, classes) of normalised images and features of three layers: the activations
    of the first and the last convolution pooled over the image, mean of the rectified ones and
    maximum per channel ({layer: (N, 2 x channels)}), and the input of the last linear layer
    ("penultimate": (N, its inputs)); with `tta`, all averaged over each image and its mirror
    image, as predictions are."""
    layers, pooled = probed_layers(model), {}
    # The service runs explanations through the same network in another thread: only this
    # thread's passes are kept.
    caller = threading.get_ident()

    def keeper(name):
        def keep(module, inputs, output):
            if threading.get_ident() != caller:
                return
            if isinstance(module, nn.Linear):
                kept = inputs[0].float().flatten(1)
            else:
                output = output.float()
                kept = torch.cat([output.relu().mean((2, 3)), output.amax((2, 3))], 1)
            pooled.setdefault(name, []).append(kept)
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

HIDDEN = 64  # units of the detector's hidden layer
FIT_STEPS = 600  # full-batch Adam steps
FIT_LR = 1e-2
WEIGHT_DECAY = 1e-2
OUTLIERS_PER_KIND = 1000  # drawn images of each kind that is not clothing (fewer for a tiny bank)
PHOTO_LIKE = 0.3  # weight of the training images made photo-like (a run without photos), beside theirs (1)
OUTLIER_SEED = 1_000_003  # not the seed bench/ood.py draws its sets with
METHOD = "features-mlp"  # model.json's name for this detector; runs calibrated before it are refitted


def _stacked(features: dict[str, torch.Tensor], layers: list[str]) -> torch.Tensor:
    return torch.cat([features[name].float() for name in layers], 1)


def _network(inputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))


class OodDetector:
    """Scores images by how unlike clothing the network's features of them are: a small
    network (one hidden layer) fitted to tell the features of training images from those of
    images that are not clothing, its logit put on the validation split's scale (0 at its
    median, 1 at its 95th percentile). See the module's description."""

    def __init__(self, layers: list[str], mean: torch.Tensor, std: torch.Tensor, net: nn.Sequential,
                 median: float = 0.0, scale: float = 1.0, threshold: float = 0.0):
        self.layers = layers  # the features it reads, in order ("first_conv", "last_conv", "penultimate")
        self.mean, self.std = mean, std  # of the features it was fitted on
        self.net = net.eval()
        self.median, self.scale, self.threshold = median, scale, threshold

    @torch.inference_mode()
    def logit(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The fitted network's logit of "not clothing" (N,)."""
        return self.net((_stacked(features, self.layers) - self.mean) / self.std).squeeze(1)

    def score(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """The out-of-distribution score (N,) of images' features: higher is less like the
        training images; above `threshold` an image is flagged."""
        return (self.logit(features) - self.median) / self.scale

    @classmethod
    def fit(cls, inside: dict[str, torch.Tensor], inside_weight: torch.Tensor, outside: dict[str, torch.Tensor],
            outside_weight: torch.Tensor, val: dict[str, torch.Tensor],
            photos: dict[str, torch.Tensor] | None = None) -> OodDetector:
        """Fitted to tell `inside` (features of training images) from `outside` (of images that
        are not clothing), each example weighted; the threshold the one PASS_RATE of the
        validation images stay under, raised, with held-out real photos, to the one PHOTO_PASS_RATE
        of those stay under."""
        layers = list(inside)
        x_in, x_out = _stacked(inside, layers), _stacked(outside, layers)
        x = torch.cat([x_in, x_out]).clone()  # not inference tensors: they are fitted on
        y = torch.cat([torch.zeros(len(x_in)), torch.ones(len(x_out))])
        weight = torch.cat([inside_weight, outside_weight]).float()
        weight = weight / weight.mean()
        mean, std = x.mean(0), x.std(0).clamp_min(1e-4)
        x = (x - mean) / std
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = _network(x.shape[1])
        optimizer = torch.optim.Adam(net.parameters(), lr=FIT_LR, weight_decay=WEIGHT_DECAY)
        with torch.enable_grad():
            for _ in range(FIT_STEPS):
                optimizer.zero_grad(set_to_none=True)
                loss = F.binary_cross_entropy_with_logits(net(x).squeeze(1), y, weight=weight)
                loss.backward()
                optimizer.step()
        for p in net.parameters():
            p.requires_grad_(False)
        detector = cls(layers, mean, std, net)
        val_logit = detector.logit(val)
        detector.median = val_logit.median().item()
        detector.scale = max(val_logit.quantile(PASS_RATE).item() - detector.median, 1e-6)
        detector.threshold = detector.score(val).quantile(PASS_RATE).item()
        if photos is not None and len(next(iter(photos.values()))):
            detector.threshold = max(detector.threshold, detector.score(photos).quantile(PHOTO_PASS_RATE).item())
        return detector

    def to_json(self) -> dict[str, Any]:
        return {"method": METHOD, "layers": self.layers, "median": self.median, "scale": self.scale,
                "threshold": self.threshold, "pass_rate": PASS_RATE}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std} | {f"net.{k}": v.contiguous() for k, v in self.net.state_dict().items()}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], obj: Any, where: str) -> OodDetector:
        try:
            if obj["method"] != METHOD:
                raise ValueError(f"method {obj['method']!r}, not {METHOD!r}")
            layers = [str(name) for name in obj["layers"]]
            median, scale, threshold = (float(obj[k]) for k in ("median", "scale", "threshold"))
            mean, std = tensors["mean"].float(), tensors["std"].float()
            net = _network(len(mean))
            net.load_state_dict({k[4:]: v.float() for k, v in tensors.items() if k.startswith("net.")})
            if not layers or std.shape != mean.shape or not bool((std > 0).all()) or not scale > 0 \
                    or not all(map(math.isfinite, (median, scale, threshold))):
                raise ValueError("values out of range")
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise FmnistError(f"{where}: malformed out-of-distribution calibration ({e})") from None
        for p in net.parameters():
            p.requires_grad_(False)
        return cls(layers, mean, std, net, median, scale, threshold)



# ----------------------------------------------------------------------------- a run


def bank_indices(n: int, size: int = BANK_SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(size, n)]


def _spread(n: int, total: float) -> torch.Tensor:
    return torch.full((n,), total / max(n, 1))


def calibrate(model: nn.Module, meta: ModelMeta, train: Split, val: Split,
              photos: torch.Tensor | None = None) -> tuple[dict[str, Any], OodDetector]:
    """Fit the temperature and the out-of-distribution detector of a trained model; the
    "calibration" entry of its model.json and the detector (whose weights go in ood.safetensors).

    The detector learns clothing from BANK_SIZE training images and from photos, and what is
    not clothing from drawn images (`fmnist.inference.outliers`: noise, canvases, text,
    shapes outlined and solid, random solid polygons, pen strokes, line drawings, textures,
    dark-on-light pictures), each side weighing the same.
    `photos`, uint8 (P, 28, 28): prepared real photos the model trained on; PHOTO_BANK of them
    join the clothing side, weighing as much as the training images, and the rest set the
    threshold with the validation split. A run without photos has the training images made
    photo-like by `random_photo` in their place, weighing PHOTO_LIKE."""
    if len(val) == 0:
        raise FmnistError("calibration needs a validation split (--val-size > 0)")
    val_logits, val_features = logits_and_features(model, val.images, meta.tta)
    temperature = fit_temperature(val_logits, val.labels)
    norm, device = meta.normalization, train.images.device
    bank = bank_indices(len(train))
    inside = [train.images[bank.to(device)]]
    inside_weight = [_spread(len(bank), 1.0)]
    held_features = None
    if photos is not None and len(photos):
        order = bank_indices(len(photos), len(photos), seed=1)
        cut = round(len(photos) * PHOTO_BANK)
        photo_images = to_tensor(photos, norm.mean, norm.std, device=device)
        inside.append(photo_images[order[:cut].to(device)])
        inside_weight.append(_spread(cut, 1.0))
        _, held_features = logits_and_features(model, photo_images[order[cut:].to(device)], meta.tta)
    else:
        # No real photos: the training images as the preparation makes photos of them look
        # (turned, stretched, cropped again, their intensities bent, blurred) stand in for them.
        generator = torch.Generator(device).manual_seed(OUTLIER_SEED)
        inside.append(random_photo(inside[0], generator, 1.0, norm.black, norm.std))
        inside_weight.append(_spread(len(bank), PHOTO_LIKE))
    _, inside_features = logits_and_features(model, torch.cat(inside), meta.tta)
    per_kind = min(OUTLIERS_PER_KIND, max(50, len(bank) // 10))
    outliers = draw_outliers(train.raw[bank].numpy(), per_kind, OUTLIER_SEED)
    _, outside_features = logits_and_features(
        model, to_tensor(np.concatenate(list(outliers.values())), norm.mean, norm.std, device=device), meta.tta)
    inside_weight = torch.cat(inside_weight)
    kind_weight = inside_weight.sum().item() / len(outliers)  # the two sides weigh the same
    outside_weight = torch.cat([_spread(len(images), kind_weight) for images in outliers.values()])
    detector = OodDetector.fit(inside_features, inside_weight, outside_features, outside_weight,
                               val_features, held_features)
    figures = calibration_figures(val_logits, val.labels, temperature)
    ood = detector.to_json() | ({"photo_pass_rate": PHOTO_PASS_RATE} if held_features is not None else {})
    entry = {"temperature": temperature, "ood": ood,
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
    method = meta.calibration["ood"].get("method") if isinstance(meta.calibration["ood"], dict) else None
    if method != METHOD:
        raise FmnistError(f"{run}: its out-of-distribution calibration is an older kind ({method!r}); "
                          f"recalibrate with: fmnist calibrate --model {run}")
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
    if meta.trained_on_photos:  # its photos join the fit again
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
            f"out-of-distribution threshold {ood['threshold']:.3f} ({ood['pass_rate']:.0%} of validation images pass"
            + (f", at least {ood['photo_pass_rate']:.0%} of held-out training photos)" if "photo_pass_rate" in ood else ")"))
