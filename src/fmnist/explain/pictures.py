"""Pictures of what a trained model looks at: heatmaps beside the top classes, the first
convolution's filters, one image's activations through the network, a 2-D map of the test set's
penultimate features (UMAP or t-SNE), the most confused class pairs; and `fmnist explain`.

    fmnist explain --model runs/post                # into runs/post/explain/: the run's pictures
                                                    # and 8 test images (half misclassified)
    fmnist explain runs/post                        # the same (a run folder first is the model)
    fmnist explain --model runs/post boot.jpg coat.png --method gradcam --no-run-pictures
    fmnist explain --model runs/post boot.jpg --target "Ankle boot" --json --out seen/
    fmnist explain --model runs/post --embedding tsne --map-size 2000
    python bench/explain_faithfulness.py runs/post runs/cpu-fast

Needs the `explain` extra (captum; umap-learn for the map): pip install 'fmnist[explain]'.
"""
from __future__ import annotations

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
from torch import nn  # noqa: E402

from fmnist import FmnistError  # noqa: E402
from fmnist.config import Embedding, ExplainConfig  # noqa: E402
from fmnist.data import load_test_split, to_tensor  # noqa: E402
from fmnist.explain.attribution import (  # noqa: E402
    DEFAULT_METHOD,
    _captum_attr,
    _layer,
    attribute,
    class_index,
    heatmap_json,
    modules_of,
    overlay_rgb,
    targets_for,
)
from fmnist.inference.inputs import answered, file_stems, read_each  # noqa: E402
from fmnist.inference.predictor import Predictor, load_model  # noqa: E402
from fmnist.plots import save_figure  # noqa: E402
from fmnist.run import RunDir  # noqa: E402

EMBEDDINGS: tuple[str, ...] = get_args(Embedding)
MAP_SIZE = ExplainConfig.map_size  # test images in the feature map: UMAP of 3,000 takes ~15 s on 2 cores (+ ~15 s compiling)
TSNE_DIMS = 50  # principal components t-SNE starts from
EXAMPLES_PER_PAIR = 8  # images shown per confused class pair
CONFUSED_PAIRS = 5  # class pairs shown
MAX_LAYERS, MAX_CHANNELS = 6, 12  # of the activations picture: convolutions (rows), channels each


def _umap():
    try:
        import umap
    except ImportError:
        raise FmnistError("the UMAP map needs umap-learn: pip install 'fmnist[explain]' "
                          "(or --embedding tsne)") from None
    return umap


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
    refused: list[dict[str, str]] = field(default_factory=list)  # per file not explained: file, error

    @property
    def paths(self) -> list[str]:
        return [entry["png"] for entry in self.images] + self.run_pictures

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "method": self.method, "images": self.images, "run_pictures": self.run_pictures,
                "refused": self.refused}


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


def explain_run(run_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike] = (),
                config: ExplainConfig | None = None) -> Explained:
    """`fmnist explain`: heatmaps of the input files (pictures, .npy, IDX), or of `count` test
    images (half misclassified) when there are none, and the run's pictures, into `out`
    (default RUN_DIR/explain/). Of several files, one that cannot be read or shows nothing is
    listed in `refused` and the others explained; a single file's error, or every file's, is
    raised."""
    config = config or ExplainConfig()
    config.validate()
    method, target, embedding, top_k = config.method, config.target, config.embedding, config.top_k
    run_pictures, data_dir = config.run_pictures, config.data_dir
    _captum_attr()  # before any work, so a missing extra costs nothing
    if run_pictures and embedding == "umap":
        _umap()
    predictor = load_model(run_dir)
    if target is not None:
        class_index(predictor, target)
    read = read_each(inputs, "explained") if inputs else []
    named = answered(read)
    refused = [{"file": str(path), "error": str(got)} for path, got in zip(inputs, read, strict=True)
               if isinstance(got, FmnistError)]
    out = Path(config.out) if config.out is not None else RunDir(run_dir).explain_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FmnistError(f"{out}: cannot create folder ({e.strerror})") from None
    result = Explained(str(run_dir), method, refused=refused)
    test = _test_set(predictor, data_dir) if run_pictures or not named else None
    if named:
        names, images = [n for n, _ in named], np.stack([image for _, image in named])
        result.images = explain_images(predictor, names, images, out, method, target, top_k)
    else:
        test_images, test_labels, predicted = test
        chosen = sample_test_images(predicted, test_labels, config.count)
        titles = [f"test image {i}: true {predictor.class_names[test_labels[i]]}" for i in chosen]
        result.images = explain_images(predictor, [f"test[{i}]" for i in chosen], test_images[chosen], out, method,
                                       target, top_k, titles)
    if run_pictures:
        first = (named[0][0], named[0][1]) if named else ("test[0]", test[0][0])
        result.run_pictures = write_run_pictures(predictor, out, *test, first, embedding, config.map_size)
    return result


def _test_set(predictor: Predictor, data_dir) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The test images, labels and the model's predictions for them."""
    test = load_test_split(predictor.meta.normalization, data_dir)
    images = test.raw.numpy()
    return images, test.labels.numpy(), predictor.probabilities(images).argmax(1)
