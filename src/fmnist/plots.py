"""The run's pictures, as PNG files in its folder: the post's cost curve and sample images,
the confusion matrix, and misclassified test images.

    fmnist plot --model runs/my-run
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only, no window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fmnist import FmnistError  # noqa: E402
from fmnist.data import load_split, load_test_split  # noqa: E402
from fmnist.evaluate import evaluate  # noqa: E402
from fmnist.io import atomic_open  # noqa: E402
from fmnist.run import (
    RunDir,  # noqa: E402
    load_network,  # noqa: E402
)

# Pixel 0 black, 255 white: Fashion-MNIST's own rendering (light objects on black), the input
# the network sees.
AS_THE_MODEL_SEES = "gray"


def save_figure(fig, path: Path) -> None:
    """Write a figure as PNG atomically and close it."""
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_cost(steps, losses, lr: float, path: Path) -> None:
    """The post's figure: the mean batch loss of every step, the learning rate in the title."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(steps, losses, linewidth=0.9)
    if len(losses) and losses.max() > 100 * max(np.median(losses), 1e-12):
        ax.set_yscale("log")  # the post's N(0, 1) initialisation starts at losses in the 1e4s
    ax.set_ylabel("Cost")
    ax.set_xlabel("Iterations")
    ax.set_title(f"Learning rate = {lr:g}")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_samples(images: np.ndarray, labels: np.ndarray, class_names, path: Path, per_class: int = 8) -> None:
    """A grid of training examples, one row per class, light on black as the model sees them
    (the post showed them dark on white, in the 'Greys' colour map)."""
    k = len(class_names)
    # "compressed": the grid packed under its title, without matplotlib's default top margin
    fig, axes = plt.subplots(k, per_class, figsize=(per_class * 0.9, k * 0.95), layout="compressed")
    for c in range(k):
        idx = np.flatnonzero(labels == c)[:per_class]
        for j in range(per_class):
            ax = axes[c, j]
            ax.set_axis_off()
            if j < len(idx):
                ax.imshow(images[idx[j]], cmap=AS_THE_MODEL_SEES, vmin=0, vmax=255)
        axes[c, 0].text(-4, 14, class_names[c], ha="right", va="center", fontsize=9)
    fig.suptitle("Fashion-MNIST training examples")
    save_figure(fig, path)


def plot_confusion(confusion, class_names, path: Path) -> None:
    cm = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(f"Confusion matrix (test accuracy {accuracy:.2%})")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    save_figure(fig, path)


def plot_misclassified(images, labels, predictions, class_names, path: Path, count: int = 36) -> None:
    """The first misclassified test images with their true and predicted classes, light on
    black as the model sees them."""
    wrong = np.flatnonzero(np.asarray(predictions) != np.asarray(labels))[:count]
    cols = 6
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.9), squeeze=False, layout="compressed")
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, i in zip(axes.flat, wrong, strict=False):
        ax.imshow(images[i], cmap=AS_THE_MODEL_SEES, vmin=0, vmax=255)
        ax.set_title(f"true: {class_names[labels[i]]}\npred: {class_names[predictions[i]]}", fontsize=7)
    fig.suptitle(f"Misclassified test images (first {len(wrong)})")
    save_figure(fig, path)


def write_plots(run: RunDir, train_images, train_labels, test_images, test_labels, evaluation,
                class_names=None, temperature: float | None = None) -> list[Path]:
    """All four plots of a run, and its reliability diagram when it is calibrated (a
    `temperature`); the cost curve comes from its metrics.jsonl and config.json."""
    class_names = list(class_names or evaluation.per_class)
    records = run.losses()
    steps = np.asarray([r.step for r in records])
    losses = np.asarray([r.loss for r in records], dtype=np.float64)
    paths = run.plot_paths()
    plot_cost(steps, losses, run.read_config()["lr"], paths[0])
    plot_samples(np.asarray(train_images), np.asarray(train_labels), class_names, paths[1])
    plot_confusion(evaluation.confusion_matrix, class_names, paths[2])
    plot_misclassified(np.asarray(test_images), np.asarray(test_labels),
                       evaluation.predictions.numpy(), class_names, paths[3])
    if temperature is not None:
        paths.append(write_reliability(run, evaluation, temperature))
    return paths


def write_reliability(run: RunDir, evaluation, temperature: float) -> Path:
    """The reliability diagram of a test-set evaluation, into the run folder; its path."""
    plot_reliability(evaluation.logits, evaluation.labels, temperature, run.reliability_path)
    return run.reliability_path


def plot_run(run_dir, data_dir=None) -> list[Path]:
    """Redraw a finished run's plots from its folder and the dataset."""
    run = RunDir(run_dir)
    if not run.config_path.is_file() or not run.metrics_path.is_file():
        raise FmnistError(f"{run}: not a run folder (config.json or metrics.jsonl missing)")
    model, meta = load_network(run)
    test = load_test_split(meta.normalization, data_dir)
    evaluation = evaluate(model, test.images, test.labels, meta.class_names, tta=meta.tta)
    train_raw, train_labels = load_split("train", data_dir)
    return write_plots(run, train_raw, train_labels, test.raw, test.labels, evaluation, meta.class_names,
                       meta.temperature if meta.calibration else None)


def plot_reliability(logits, labels, temperature: float, path: Path) -> None:
    """The reliability diagram of the test set: in each confidence bin, how often the model is
    right against how sure it says it is, before and after the run's temperature."""
    import torch

    from fmnist.inference.calibrate import expected_calibration_error, reliability

    logits, labels = torch.as_tensor(logits).float(), torch.as_tensor(labels)
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.4), sharey=True)
    for ax, t, name in ((axes[0], 1.0, "raw softmax"), (axes[1], temperature, f"temperature {temperature:.2f}")):
        probabilities = (logits / t).softmax(1)
        bins = reliability(probabilities, labels)
        width = 1 / len(bins["centers"])
        accuracy = [a if a is not None else 0 for a in bins["accuracy"]]
        ax.bar(bins["centers"], accuracy, width=width * 0.95, color="#4c72b0", label="accuracy in the bin")
        confidence = [c if c is not None else a for c, a in zip(bins["confidence"], accuracy, strict=True)]
        ax.bar(bins["centers"], np.abs(np.subtract(confidence, accuracy)), bottom=np.minimum(confidence, accuracy),
               width=width * 0.95, facecolor="none", edgecolor="#c44e52", hatch="///", linewidth=0.8,
               label="gap to the mean confidence")
        ax.plot([0, 1], [0, 1], color="black", linewidth=0.8, linestyle="--", label="perfect calibration")
        ece = expected_calibration_error(probabilities, labels)
        ax.set_title(f"{name}: ECE {ece:.2%}")
        ax.set_xlabel("confidence (top class probability)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle("Reliability on the test set")
    save_figure(fig, path)
