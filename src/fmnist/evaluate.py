"""Accuracy, per-class accuracy and the confusion matrix of a trained model on the test set.

    fmnist evaluate --model runs/my-run
    fmnist evaluate --model runs/my-run --json
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fmnist.data import CLASS_NAMES, NUM_CLASSES, Split, load_test_split
from fmnist.device import autocast_dtype, keep_freed_memory, resolve_device
from fmnist.distributed import Dist
from fmnist.inference.calibrate import calibration_figures
from fmnist.inference.forward import predict_logits
from fmnist.run import load_network


@dataclass
class Evaluation:
    accuracy: float  # fraction correct, 0..1
    loss: float  # mean cross-entropy
    per_class: dict[str, float]  # class name -> accuracy
    confusion_matrix: list[list[int]]  # [true][predicted] counts
    predictions: torch.Tensor  # (N,) predicted labels, on the CPU
    logits: torch.Tensor | None = None  # (N, classes), on the CPU
    labels: torch.Tensor | None = None  # (N,) true labels, on the CPU
    # ece, nll (with the run's temperature), ece_uncalibrated, nll_uncalibrated, temperature
    calibration: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "loss": self.loss,
            **self.calibration,
            "per_class": self.per_class,
            "confusion_matrix": self.confusion_matrix,
            "class_names": list(self.per_class),
        }

    def calibrate(self, temperature: float) -> Evaluation:
        """Add the calibration figures: expected calibration error and negative log-likelihood,
        with the temperature and without."""
        figures = calibration_figures(self.logits, self.labels, temperature)
        self.calibration = {"ece": figures["ece_calibrated"], "nll": figures["nll_calibrated"],
                            "ece_uncalibrated": figures["ece"], "nll_uncalibrated": figures["nll"],
                            "temperature": temperature}
        return self


def score(logits: torch.Tensor, labels: torch.Tensor, class_names=CLASS_NAMES) -> Evaluation:
    """The figures of an evaluation from logits (N, classes) and true labels (N,)."""
    logits, labels = logits.float().cpu(), labels.cpu()
    k = len(class_names)
    predictions = logits.argmax(1)
    confusion = torch.bincount(labels * k + predictions, minlength=k * k).reshape(k, k)
    per_class_total = confusion.sum(1).clamp(min=1)
    per_class = (confusion.diag() / per_class_total).tolist()
    return Evaluation(
        accuracy=(predictions == labels).float().mean().item(),
        loss=F.cross_entropy(logits, labels).item(),
        per_class=dict(zip(class_names, per_class, strict=True)),
        confusion_matrix=confusion.tolist(),
        predictions=predictions,
        logits=logits,
        labels=labels,
    )


def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, class_names=CLASS_NAMES,
    amp_dtype: torch.dtype | None = None, tta: bool = False,
) -> Evaluation:
    return score(predict_logits(model, images, amp_dtype=amp_dtype, tta=tta), labels, class_names)


def evaluate_split(model: nn.Module, split: Split, ctx: Dist, tta: bool = False) -> Evaluation:
    """The evaluation of a whole split; under torchrun each process scores its share and the
    logits are gathered, so every process holds the same result."""
    if not ctx.enabled:
        return evaluate(model, split.images, split.labels, tta=tta)
    part = ctx.shard(len(split))
    if part.start < part.stop:
        logits = predict_logits(model, split.images[part], tta=tta)
    else:
        logits = split.images.new_zeros((0, NUM_CLASSES))
    return score(ctx.gather_rows(logits), split.labels)


def evaluate_run(run_dir, data_dir=None, device="cpu", precision: str = "fp32") -> Evaluation:
    """The test-set evaluation of a run folder's model. fp32 by default, so the figures are
    exact; "bf16" or "auto" trade a few disagreeing predictions in 10,000 for speed."""
    keep_freed_memory()
    device = resolve_device(device)
    amp_dtype = autocast_dtype(precision, device)
    model, meta = load_network(run_dir, device)
    model = model.to(memory_format=torch.channels_last)  # faster convolutions on CPU and GPU
    test = load_test_split(meta.normalization, data_dir, device)
    result = evaluate(model, test.images, test.labels, meta.class_names, amp_dtype, tta=meta.tta)
    return result.calibrate(meta.temperature)


def format_evaluation(result) -> str:
    """The evaluation as a table: accuracy, per-class accuracy, confusion matrix."""
    names = list(result.per_class)
    width = max(len(n) for n in names)
    lines = [f"test accuracy {result.accuracy:.4f}   loss {result.loss:.4f}"]
    c = result.calibration
    if c:
        lines.append(f"calibration   ECE {c['ece']:.2%}   NLL {c['nll']:.4f}   (temperature {c['temperature']:.3f}; "
                     f"without it ECE {c['ece_uncalibrated']:.2%}, NLL {c['nll_uncalibrated']:.4f})")
    lines.append("")
    lines.append(f"{'class':<{width}}  accuracy")
    for name, acc in result.per_class.items():
        lines.append(f"{name:<{width}}  {acc:8.4f}")
    lines += ["", "confusion matrix (rows: true, columns: predicted)"]
    header = " " * (width + 1) + " ".join(f"{i:>5}" for i in range(len(names)))
    lines.append(header)
    for i, (name, row) in enumerate(zip(names, result.confusion_matrix, strict=True)):
        lines.append(f"{name:<{width}} " + " ".join(f"{c:>5}" for c in row) + f"   ({i})")
    return "\n".join(lines)
