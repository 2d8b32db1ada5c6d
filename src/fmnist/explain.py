"""What a trained model looks at: attribution heatmaps of single images (Captum), and pictures
of the run: the first convolution's filters, one image's activations through the network, a 2-D
map of the test set's penultimate features (UMAP or t-SNE), the most confused class pairs.

    fmnist explain --model runs/post                # into runs/post/explain/: the run's pictures
                                                    # and 8 test images (half misclassified)
    fmnist explain runs/post                        # the same (a run folder first is the model)
    fmnist explain --model runs/post boot.jpg coat.png --method gradcam --no-run-pictures
    fmnist explain --model runs/post boot.jpg --target "Ankle boot" --json --out seen/
    fmnist explain --model runs/post --embedding tsne --map-size 2000
    python bench/explain_faithfulness.py runs/post runs/cpu-fast

    from fmnist.explain import attribute
    heatmaps = attribute(load_model("runs/post"), images)   # (N, 28, 28) float32, occlusion

Needs the `explain` extra (captum; umap-learn for the map): pip install 'fmnist[explain]'.
Attributions are for the network as `predict` runs it: a model trained with mirror images is
explained through the mean of the image's and its mirror's logits (see `attribute`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import matplotlib

matplotlib.use("Agg")  # headless: files only, no window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from fmnist import FmnistError  # noqa: E402
from fmnist.config import Attribution, Embedding  # noqa: E402
from fmnist.data import IMAGE_SIZE, load_split, to_tensor  # noqa: E402
from fmnist.images import file_stems, prepare_batch, read_inputs  # noqa: E402
from fmnist.models import MirrorAverage  # noqa: E402
from fmnist.plots import save_figure  # noqa: E402
from fmnist.predict import Predictor, load_model  # noqa: E402
from fmnist.run import RunDir  # noqa: E402

METHODS: tuple[str, ...] = get_args(Attribution)
# The default: the method whose top pixels, removed, lower the probability most against random
# ones on both the post's network and cpu-fast (README, "Explain"; bench/explain_faithfulness.py).
DEFAULT_METHOD = "occlusion"
EMBEDDINGS: tuple[str, ...] = get_args(Embedding)
IG_STEPS = 50  # integration steps from the black image: enough for the attributions to sum to the logit change
IG_BATCH = 256  # images per forward and backward pass while integrating: bounds memory (wide ResNets)
OCCLUSION_WINDOW = 3  # pixels: a 3x3 patch set to the background, slid one pixel at a time
OCCLUSION_BATCH = 8  # occluded copies of each image per forward pass (x ATTRIBUTE_CHUNK images)
ATTRIBUTE_CHUNK = 64  # images attributed together
REMOVED_FRACTION = 0.05  # of the 784 pixels, removed by the faithfulness check
MAP_SIZE = 3000  # test images in the feature map: UMAP of 3,000 takes ~15 s on 2 cores (+ ~15 s compiling)
TSNE_DIMS = 50  # principal components t-SNE starts from
SAMPLE_COUNT = 8  # test images explained when none are given
EXAMPLES_PER_PAIR = 8  # images shown per confused class pair
CONFUSED_PAIRS = 5  # class pairs shown
MAX_LAYERS, MAX_CHANNELS = 6, 12  # of the activations picture: convolutions (rows), channels each


# ----------------------------------------------------------------------------- optional libraries


def _captum_attr():
    try:
        import captum.attr
    except ImportError:
        raise FmnistError("explanations need captum: pip install 'fmnist[explain]'") from None
    return captum.attr


def _umap():
    try:
        import umap
    except ImportError:
        raise FmnistError("the UMAP map needs umap-learn: pip install 'fmnist[explain]' "
                          "(or --embedding tsne)") from None
    return umap


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


def plot_explanation(image: np.ndarray, heatmap: np.ndarray, top: list[dict[str, Any]], title: str,
                     target: str, method: str, path: Path) -> None:
    """The input, the heatmap over it and the top classes, side by side."""
    fig, axes = plt.subplots(1, 3, figsize=(9, 3), layout="constrained", gridspec_kw={"width_ratios": [1, 1, 1.3]})
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title("input (28x28)", fontsize=9)
    axes[1].imshow(overlay_rgb(image, heatmap), interpolation="nearest")
    axes[1].set_title(f"{method} for {target}\n(red: for, blue: against)", fontsize=9)
    for ax in axes[:2]:
        ax.set_axis_off()
    labels = [t["label"] for t in top][::-1]
    axes[2].barh(labels, [t["probability"] for t in top][::-1], color="#2f6fdf")
    axes[2].set_xlim(0, 1)
    axes[2].set_xlabel("probability")
    axes[2].tick_params(labelsize=8)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- the run's pictures


def plot_filters(model: nn.Module, path: Path) -> None:
    """The first convolution's filters, each scaled to its own range: mid grey is 0, light
    positive (the filter answers to light there)."""
    weights = _layer(model, nn.Conv2d, 0).weight.detach().float().mean(1).numpy()  # (C, k, k)
    cols = min(8, len(weights))
    rows = -(-len(weights) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.8, rows * 0.8 + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, w in zip(axes.flat, weights, strict=False):
        m = max(float(np.abs(w).max()), 1e-12)
        ax.imshow(w, cmap="gray", vmin=-m, vmax=m, interpolation="nearest")
    k = weights.shape[-1]
    fig.suptitle(f"First convolution: {len(weights)} filters {k}x{k}\n(mid grey 0, light positive)", fontsize=9)
    save_figure(fig, path)


@torch.inference_mode()
def conv_activations(model: nn.Module, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(name, output (C, H, W)) of every convolution for one normalised image (1, 1, 28, 28)."""
    outputs: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: outputs.append((name, out[0].float())))
             for name, m in modules_of(model, nn.Conv2d)]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def plot_activations(predictor: Predictor, image: np.ndarray, name: str, path: Path) -> None:
    """One image through the network: the input, then for each convolution (up to six, evenly
    spread) its most active channels."""
    layers = conv_activations(predictor.model, to_tensor(image[None], predictor.mean, predictor.std))
    if len(layers) > MAX_LAYERS:
        layers = [layers[i] for i in np.linspace(0, len(layers) - 1, MAX_LAYERS).round().astype(int)]
    fig, axes = plt.subplots(len(layers) + 1, MAX_CHANNELS, figsize=(MAX_CHANNELS * 0.85, (len(layers) + 1) * 1.05),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    axes[0, 0].imshow(image, cmap="gray", vmin=0, vmax=255)
    axes[0, 0].set_title("input", fontsize=7)
    for row, (layer, out) in enumerate(layers, 1):
        strongest = out.clamp(min=0).amax((1, 2)).argsort(descending=True)[:MAX_CHANNELS]
        for col, c in enumerate(strongest.tolist()):
            axes[row, col].imshow(out[c].numpy(), cmap="gray", interpolation="nearest")
        c, h, w = out.shape
        axes[row, 0].set_title(f"{layer} ({c}x{h}x{w})", fontsize=7, loc="left")
    fig.suptitle(f"Activations of {name}: each convolution's most active channels (light: high)", fontsize=9)
    save_figure(fig, path)


@torch.inference_mode()
def penultimate_features(predictor: Predictor, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """The classifier's inputs (N, D) for uint8 images: the network's last features. Of the image
    itself (a mirror-trained model's mirror pass is left out)."""
    model, captured = predictor.model, []
    hook = _layer(model, nn.Linear, -1).register_forward_pre_hook(lambda _m, args: captured.append(args[0].float()))
    try:
        for start in range(0, len(images), batch_size):
            model(to_tensor(images[start : start + batch_size], predictor.mean, predictor.std))
    finally:
        hook.remove()
    return torch.cat(captured).numpy() if captured else np.zeros((0, 0), np.float32)


def embed(features: np.ndarray, embedding: str = "umap", seed: int = 0) -> np.ndarray:
    """2-D points (N, 2) of features (N, D): UMAP (umap-learn) or t-SNE (scikit-learn)."""
    if embedding == "umap":
        reducer = _umap().UMAP(n_components=2, random_state=seed, n_jobs=1)
        return reducer.fit_transform(features)
    if embedding == "tsne":
        try:
            from sklearn.decomposition import PCA
            from sklearn.manifold import TSNE
        except ImportError:
            raise FmnistError("the t-SNE map needs scikit-learn: pip install 'fmnist[explain]'") from None

        # t-SNE's neighbour search is the slow part: 50 principal components keep the
        # structure (scikit-learn's advice) and halve the time.
        if min(features.shape) > TSNE_DIMS:
            features = PCA(TSNE_DIMS, random_state=seed).fit_transform(features)
        perplexity = min(30.0, max(2.0, (len(features) - 1) / 3))
        return TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(features)
    raise FmnistError(f"unknown embedding {embedding!r}; choose one of {', '.join(EMBEDDINGS)}")


def plot_feature_map(points: np.ndarray, labels: np.ndarray, class_names: Sequence[str], embedding: str,
                     dims: int, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 6.2))
    colours = plt.get_cmap("tab10")
    for c, name in enumerate(class_names):
        mine = labels == c
        ax.scatter(points[mine, 0], points[mine, 1], s=3, color=colours(c % 10), label=name, alpha=0.8)
    ax.legend(markerscale=4, fontsize=8, loc="best", framealpha=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    title = {"umap": "UMAP", "tsne": "t-SNE"}[embedding]
    ax.set_title(f"{title} of the penultimate features ({dims}-d) of {len(points):,} test images, by true class",
                 fontsize=10)
    save_figure(fig, path)


def confused_pairs(labels: np.ndarray, predicted: np.ndarray, num_classes: int,
                   count: int = CONFUSED_PAIRS) -> list[tuple[int, int, np.ndarray]]:
    """The `count` most frequent (true, predicted) mistakes, most frequent first, each with the
    indices of its images."""
    confusion = np.bincount(labels * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)
    np.fill_diagonal(confusion, 0)
    order = np.argsort(-confusion, axis=None, kind="stable")[:count]
    pairs = []
    for flat in order:
        true, pred = divmod(int(flat), num_classes)
        if confusion[true, pred] == 0:
            break
        pairs.append((true, pred, np.flatnonzero((labels == true) & (predicted == pred))))
    return pairs


def plot_confused_pairs(images: np.ndarray, pairs, class_names: Sequence[str], path: Path) -> None:
    rows = max(1, len(pairs))
    fig, axes = plt.subplots(rows, EXAMPLES_PER_PAIR, figsize=(EXAMPLES_PER_PAIR * 0.95, rows * 1.25), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for row, (true, pred, indices) in enumerate(pairs):
        for col, i in enumerate(indices[:EXAMPLES_PER_PAIR]):
            axes[row, col].imshow(images[i], cmap="gray", vmin=0, vmax=255)
        axes[row, 0].set_title(f"true {class_names[true]}, predicted {class_names[pred]}: {len(indices)} images",
                               fontsize=8, loc="left")
    fig.suptitle("The most confused class pairs (test set)" if pairs else "No test image misclassified", fontsize=10)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- the command


@dataclass
class Explained:
    """What `explain_run` found and wrote."""

    model: str
    method: str
    images: list[dict[str, Any]] = field(default_factory=list)  # per image: file, top, target, heatmap, png
    run_pictures: list[str] = field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return [entry["png"] for entry in self.images] + self.run_pictures

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "method": self.method, "images": self.images, "run_pictures": self.run_pictures}


def sample_test_images(predicted: np.ndarray, labels: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """`count` test image indices, sorted: half of them misclassified (as many as there are)."""
    rng = np.random.default_rng(seed)
    wrong, right = np.flatnonzero(predicted != labels), np.flatnonzero(predicted == labels)
    n_wrong = min(len(wrong), count // 2)
    chosen = [rng.choice(wrong, n_wrong, replace=False), rng.choice(right, min(len(right), count - n_wrong), replace=False)]
    return np.sort(np.concatenate(chosen).astype(int))


def explain_images(predictor: Predictor, names: Sequence[str], images: np.ndarray, out: Path, method: str = DEFAULT_METHOD,
                   target=None, top_k: int = 3, titles: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Write `<stem>-<method>.png` per image into `out`; per image: its file name, top classes
    and out-of-distribution fields (as `predict`), the class explained, its heatmap (28x28
    numbers) and the PNG's path."""
    targets = targets_for(predictor, images, target)
    heatmaps = attribute(predictor, images, method, targets)
    described = predictor.describe(*predictor.assess(images), top_k)  # as `predict` answers
    entries = []
    for i, stem in enumerate(file_stems(names)):
        label = predictor.class_names[targets[i]]
        path = out / f"{stem}-{method}.png"
        title = titles[i] if titles else names[i]
        if described[i]["in_distribution"] is False:
            title += " (does not look like clothing)"
        plot_explanation(images[i], heatmaps[i], described[i]["top"], title, label, method, path)
        entries.append({"file": names[i], **described[i], "target": label, "heatmap": heatmap_json(heatmaps[i]),
                        "png": str(path)})
    return entries


def write_run_pictures(predictor: Predictor, out: Path, test_images: np.ndarray, test_labels: np.ndarray,
                       predicted: np.ndarray, image: tuple[str, np.ndarray], embedding: str = "umap",
                       map_size: int = MAP_SIZE, seed: int = 0) -> list[str]:
    """filters.png, activations.png (of `image`), feature_map-<embedding>.png and
    confused_pairs.png."""
    paths = [out / "filters.png", out / "activations.png", out / f"feature_map-{embedding}.png",
             out / "confused_pairs.png"]
    plot_filters(predictor.model, paths[0])
    plot_activations(predictor, image[1], image[0], paths[1])
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(test_images), min(map_size, len(test_images)), replace=False))
    features = penultimate_features(predictor, test_images[chosen])
    points = embed(features, embedding, seed)
    plot_feature_map(points, test_labels[chosen], predictor.class_names, embedding, features.shape[1], paths[2])
    pairs = confused_pairs(test_labels, predicted, len(predictor.class_names))
    plot_confused_pairs(test_images, pairs, predictor.class_names, paths[3])
    return [str(p) for p in paths]


def explain_run(run_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike] = (), method: str = DEFAULT_METHOD,
                target: int | str | None = None, out: str | os.PathLike | None = None, embedding: str = "umap",
                map_size: int = MAP_SIZE, count: int = SAMPLE_COUNT, run_pictures: bool = True,
                top_k: int = 3, data_dir=None) -> Explained:
    """`fmnist explain`: heatmaps of the input files (pictures, .npy, IDX), or of `count` test
    images (half misclassified) when there are none, and the run's pictures, into `out`
    (default RUN_DIR/explain/)."""
    _check_options(method, embedding, map_size, count, top_k)
    _captum_attr()  # before any work, so a missing extra costs nothing
    if run_pictures and embedding == "umap":
        _umap()
    predictor = load_model(run_dir)
    if target is not None:
        class_index(predictor, target)
    named = read_inputs(inputs) if inputs else []
    out = Path(out) if out is not None else RunDir(run_dir).explain_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FmnistError(f"{out}: cannot create folder ({e.strerror})") from None
    result = Explained(str(run_dir), method)
    test = _test_set(predictor, data_dir) if run_pictures or not named else None
    if named:
        names, images = [n for n, _ in named], np.stack([image for _, image in named])
        result.images = explain_images(predictor, names, images, out, method, target, top_k)
    else:
        test_images, test_labels, predicted = test
        chosen = sample_test_images(predicted, test_labels, count)
        titles = [f"test image {i}: true {predictor.class_names[test_labels[i]]}" for i in chosen]
        result.images = explain_images(predictor, [f"test[{i}]" for i in chosen], test_images[chosen], out, method,
                                       target, top_k, titles)
    if run_pictures:
        first = (named[0][0], named[0][1]) if named else ("test[0]", test[0][0])
        result.run_pictures = write_run_pictures(predictor, out, *test, first, embedding, map_size)
    return result


def _check_options(method: str, embedding: str, map_size: int, count: int, top_k: int) -> None:
    if method not in METHODS:
        raise FmnistError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")
    if embedding not in EMBEDDINGS:
        raise FmnistError(f"unknown embedding {embedding!r}; choose one of {', '.join(EMBEDDINGS)}")
    for flag, value, least in (("--map-size", map_size, 10), ("--count", count, 1), ("--top-k", top_k, 1)):
        if value < least:
            raise FmnistError(f"{flag} must be at least {least}, got {value}")


def _test_set(predictor: Predictor, data_dir) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The test images, labels and the model's predictions for them."""
    images, labels = load_split("test", data_dir)
    return images, labels.astype(np.int64), predictor.probabilities(images).argmax(1)
