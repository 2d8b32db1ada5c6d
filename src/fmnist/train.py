"""Training: the data lives on the device as tensors, a batch is an index slice, and the loop
is a step function, an evaluation and `lr_at(step)`.

    fmnist train                       # the post: Adam 1e-3, batch 128, 500 steps
    fmnist train --init seed           # ... with the post's N(0, 1) initialisation
    fmnist train --epochs 10 --out runs/ten
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fmnist import FmnistError
from fmnist.checkpoint import save_model, write_json
from fmnist.config import TrainConfig, to_dict
from fmnist.data import CLASS_NAMES, FMNIST_MEAN, FMNIST_STD, load_split, to_tensor
from fmnist.evaluate import Evaluation, evaluate
from fmnist.models import build_model, init_weights


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FmnistError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FmnistError(f"device {name!r} requested but CUDA is not available")
    return device


PRECISIONS = ("auto", "fp32", "bf16")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting on a device; None means plain fp32."""
    if precision not in PRECISIONS:
        raise FmnistError(f"unknown precision {precision!r}; choose from: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


@dataclass
class Split:
    images: torch.Tensor  # (N, 1, 28, 28) float32, normalised, on the device
    labels: torch.Tensor  # (N,) int64, on the device
    raw: torch.Tensor  # (N, 28, 28) uint8 on the CPU, for plots

    def __len__(self) -> int:
        return len(self.labels)


def normalization(cfg: TrainConfig) -> dict[str, float]:
    if cfg.normalize:
        return {"mean": FMNIST_MEAN, "std": FMNIST_STD}
    return {"mean": 0.0, "std": 1.0}


def load_data(cfg: TrainConfig, device: torch.device) -> dict[str, Split]:
    """The train, validation (the first `val_size` training images) and test splits."""
    norm = normalization(cfg)
    train_raw, train_labels = load_split("train", cfg.data_dir)
    test_raw, test_labels = load_split("test", cfg.data_dir)
    if not 0 <= cfg.val_size < len(train_raw):
        raise FmnistError(f"--val-size must be in 0..{len(train_raw) - 1}, got {cfg.val_size}")

    def split(raw, labels) -> Split:
        return Split(
            to_tensor(raw, norm["mean"], norm["std"], device),
            torch.as_tensor(labels, device=device),
            torch.as_tensor(raw),
        )

    v = cfg.val_size
    return {
        "train": split(train_raw[v:], train_labels[v:]),
        "val": split(train_raw[:v], train_labels[:v]),
        "test": split(test_raw, test_labels),
    }


class BatchSampler:
    """Index batches over a reshuffled permutation each epoch. A batch that crosses an epoch's
    end takes the rest of that epoch and the start of the next, like the post's next_batch."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device):
        self.n, self.batch_size, self.device = n, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.pos = 0
        self.perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        return torch.randperm(self.n, generator=self.generator).to(self.device)

    def next(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need:
            take = min(need, self.n - self.pos)
            parts.append(self.perm[self.pos : self.pos + take])
            self.pos += take
            need -= take
            if self.pos == self.n:
                self.epoch += 1
                self.pos = 0
                self.perm = self._permutation()
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def total_steps(cfg: TrainConfig, n_train: int) -> int:
    if cfg.epochs is not None:
        return max(1, math.ceil(cfg.epochs * n_train / cfg.batch_size))
    return cfg.steps


def lr_at(step: int, cfg: TrainConfig, steps: int) -> float:
    """The learning rate of a step: constant, as the post."""
    return cfg.lr


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    # The fused kernel updates all parameters in one pass: same maths as torch.optim.Adam's.
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)


def train_step(model, optimizer, x, y, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One optimiser step on a batch; returns the mean batch loss, still on the device."""
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = F.cross_entropy(model(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def make_run_dir(out: str | None, model: str) -> Path:
    run_dir = Path(out) if out else Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{model}"
    if run_dir.exists() and not run_dir.is_dir():
        raise FmnistError(f"{run_dir}: exists and is not a folder")
    if (run_dir / "metrics.jsonl").exists() or (run_dir / "model.json").exists():
        raise FmnistError(f"{run_dir}: already holds a run; choose another --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FmnistError(f"{run_dir}: cannot create run folder ({e.strerror})") from None
    return run_dir


class MetricsLog:
    """metrics.jsonl: one JSON object a line, appended and flushed as training goes."""

    def __init__(self, path: Path):
        self.file = path.open("a")

    def write(self, **record) -> None:
        self.file.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@dataclass
class TrainResult:
    run_dir: Path
    test: Evaluation
    val: Evaluation | None
    steps: int
    train_seconds: float


def train(cfg: TrainConfig, progress: bool = True, log=print) -> TrainResult:
    from tqdm.auto import tqdm

    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size < 1:
        raise FmnistError(f"--batch-size must be positive, got {cfg.batch_size}")
    torch.manual_seed(cfg.seed)
    data = load_data(cfg, device)
    train_split = data["train"]
    steps = total_steps(cfg, len(train_split))
    if steps < 1:
        raise FmnistError(f"--steps must be positive, got {steps}")

    model_args = {"keep_prob": cfg.keep_prob} if cfg.model.startswith("seed") else {}
    model = build_model(cfg.model, **model_args)
    init_weights(model, cfg.init)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    optimizer = build_optimizer(model, cfg, device)
    amp_dtype = autocast_dtype(cfg.precision, device)
    sampler = BatchSampler(len(train_split), cfg.batch_size, cfg.seed, device)
    images = train_split.images.contiguous(memory_format=memory_format)

    run_dir = make_run_dir(cfg.out, cfg.model)
    precision = "bf16" if amp_dtype == torch.bfloat16 else "fp32"
    resolved = {"out": str(run_dir), "total_steps": steps, "device_resolved": str(device), "precision_resolved": precision}
    write_json(run_dir / "config.json", to_dict(cfg) | resolved)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    log(f"training {cfg.model} on {device} ({precision}) for {steps} steps of {cfg.batch_size} -> {run_dir}")

    def run_eval(split: str, step: int) -> Evaluation:
        result = evaluate(model, data[split].images, data[split].labels)
        metrics.write(step=step, split=split, accuracy=result.accuracy, loss=result.loss)
        return result

    # Losses stay on the device and are read back every `log_every` steps: one host sync per
    # interval instead of one per step.
    flush_every = max(1, cfg.log_every)
    pending: list[tuple[int, float, torch.Tensor]] = []
    val_result, val_step = None, None
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        lr = lr_at(step, cfg, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = sampler.next()
        loss = train_step(model, optimizer, images[idx], train_split.labels[idx], amp_dtype)
        pending.append((step, lr, loss))
        if step % flush_every == 0 or step == steps - 1:
            values = torch.stack([p[2] for p in pending]).tolist()
            for (s, r, _), value in zip(pending, values, strict=True):
                if not math.isfinite(value):
                    raise FmnistError(f"loss became {value} at step {s}; lower --lr")
                metrics.write(step=s, loss=value, lr=r)
            pending.clear()
            metrics.flush()
            bar.set_postfix(loss=f"{values[-1]:.4f}")
            if step % flush_every == 0:
                (bar.write if progress else log)(f"step {step:6d}  loss {values[-1]:.6f}")
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and len(data["val"]):
            val_result, val_step = run_eval("val", step + 1), step + 1
            model.train()
    bar.close()
    train_seconds = time.perf_counter() - start

    if len(data["val"]) and val_step != steps:
        val_result = run_eval("val", steps)
    test_result = run_eval("test", steps)
    metrics.write(step=steps, train_seconds=train_seconds)
    metrics.close()
    log(f"trained {steps} steps in {train_seconds:.1f} s")
    if val_result is not None:
        log(f"validation accuracy {val_result.accuracy:.4f}")
    log(f"test accuracy {test_result.accuracy:.4f}")

    meta = {
        "model": cfg.model,
        "model_args": model_args,
        "class_names": list(CLASS_NAMES),
        "normalization": normalization(cfg),
        "input": {"height": 28, "width": 28, "channels": 1, "scale": "pixels / 255"},
        "config": to_dict(cfg),
        "steps": steps,
        "train_seconds": train_seconds,
        "metrics": {
            "test_accuracy": test_result.accuracy,
            "test_loss": test_result.loss,
            "val_accuracy": val_result.accuracy if val_result else None,
        },
    }
    save_model(run_dir, model, meta)
    if cfg.plots:
        from fmnist.plots import write_plots

        write_plots(run_dir, train_split.raw, train_split.labels.cpu(),
                    data["test"].raw, data["test"].labels.cpu(), test_result, CLASS_NAMES)
        log(f"plots written to {run_dir}")
    return TrainResult(run_dir, test_result, val_result, steps, train_seconds)
