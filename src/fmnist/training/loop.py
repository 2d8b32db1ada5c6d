"""Training: the data lives on the device as tensors, a batch is an index slice, and the loop
is a step function, an evaluation and `lr_at(step)`.

    fmnist train                       # the post's recipe: Adam 1e-3, batch 128, 500 steps
    fmnist train --init normal         # ... with the post's N(0, 1) initialisation too
    fmnist train --epochs 10 --out runs/ten
    fmnist train --resume runs/ten     # continue from its last checkpoint (runs/ten/last.pt)
    fmnist train --nproc 2             # DistributedDataParallel in 2 processes (fmnist.distributed)
    fmnist train --tensorboard         # also TensorBoard event files (fmnist.training.metrics)

The run folder (`fmnist.run`) gets config.json, metrics.jsonl, model.safetensors + model.json
(the product) and last.pt / best.pt, the training state to resume from (`fmnist.training.checkpoint`).
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmnist import FmnistError
from fmnist.config import TrainConfig, check_resumable, read_saved_config, to_dict
from fmnist.data import CLASS_NAMES, BatchSampler, Normalization, load_splits
from fmnist.data.augment import Augment
from fmnist.data.photos import find_photos_dir
from fmnist.device import autocast_dtype, keep_freed_memory, resolve_device
from fmnist.distributed import Dist, GracefulStop, setup
from fmnist.evaluate import Evaluation, evaluate_split
from fmnist.inference.calibrate import calibrate, save_calibration
from fmnist.models import build_model, init_weights, model_spec
from fmnist.run import (
    EndRecord,
    EvalRecord,
    LossRecord,
    ModelMeta,
    RunDir,
    check_finite,
    save_model,
)
from fmnist.training.checkpoint import CheckpointSaver
from fmnist.training.metrics import Metrics, open_metrics
from fmnist.training.optim import build_ema, build_optimizer, lr_at, set_lr, total_steps
from fmnist.training.photos import PhotoMix, photo_mix, photo_validation, set_loss


@dataclass
class Learner:
    """What training changes: the network, its optimiser, the batch order, the augmentations'
    generator and the moving average of the weights; each is saved in a checkpoint."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    sampler: BatchSampler
    augment: Augment
    ema: torch.optim.swa_utils.AveragedModel | None
    photos: PhotoMix | None = None  # real photos drawn into each batch (--photos, --photo-share)

    @property
    def final(self) -> nn.Module:
        """The weights evaluated and saved: the moving average when on, else the trained ones."""
        return self.ema.module if self.ema is not None else self.model

    def stateful(self) -> dict:
        parts = {"model": self.model, "optimizer": self.optimizer, "sampler": self.sampler, "augment": self.augment}
        return parts | ({"ema": self.ema} if self.ema is not None else {}) | \
            ({"photos": self.photos} if self.photos is not None else {})

    def batch(self, images: torch.Tensor, labels: torch.Tensor, ctx: Dist) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's share of the next batch, augmented; with photos, targets are sets."""
        idx = ctx.my_share(self.sampler.next())
        x, y = images[idx], labels[idx]
        if self.photos is not None:
            x, y = self.photos.add_to(x, y, ctx)
        return self.augment(x), y

    def update_ema(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)


def build_learner(cfg: TrainConfig, n_train: int, norm: Normalization, device: torch.device,
                  photos: PhotoMix | None = None) -> Learner:
    model = build_model(cfg.model, **cfg.model_args)
    init_weights(model, cfg.init)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    dataset_images = cfg.batch_size - (photos.per_batch if photos is not None else 0)
    return Learner(model, build_optimizer(model, cfg), BatchSampler(n_train, dataset_images, cfg.seed, device),
                   Augment.from_config(cfg, norm.black, norm.std, device), build_ema(model, cfg.ema), photos)


def train_step(model, optimizer, x, y, amp_dtype: torch.dtype | None = None,
               label_smoothing: float = 0.0, grad_clip: float = 0.0) -> torch.Tensor:
    """One optimiser step on a batch; returns the mean batch loss, still on the device. `y` holds
    labels (B,), or sets of accepted classes (B, classes) bool when photos are mixed in."""
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(x).float()
        loss = set_loss(logits, y, label_smoothing) if y.dtype == torch.bool else \
            F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()


def open_run_dir(cfg: TrainConfig, ctx: Dist, held: ExitStack) -> RunDir:
    """The run folder: the resumed one, or a new one made by rank 0 (its name has the time in
    it), the same path on every process. Rank 0 locks it until `held` closes: two processes
    never train the same run."""
    if cfg.resume:
        check_resumable(read_saved_config(cfg.resume), to_dict(cfg))
    made, run = ("", ""), None
    if ctx.is_main:
        try:
            run = RunDir.existing(cfg.resume).lock() if cfg.resume else RunDir.create(cfg.out, cfg.model)
            held.callback(run.unlock)
            made = ("ok", str(run))
        except FmnistError as e:
            made = ("error", str(e))
    status, value = ctx.broadcast(made)
    if status == "error":
        raise FmnistError(value)
    return run if run is not None else RunDir(value)


class Stopwatch:
    """Seconds of training, the evaluations during it not counted; `before` carries a resumed
    run's earlier seconds."""

    def __init__(self, before: float = 0.0):
        self.before, self.start, self.excluded = before, time.perf_counter(), 0.0

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.start - self.excluded

    @contextmanager
    def excluding(self):
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - begin


class LossLog:
    """The step losses, kept on the device and read back every `every` steps (and before an
    evaluation or a checkpoint): one host sync per interval instead of one per step."""

    def __init__(self, ctx: Dist, metrics: Metrics, every: int, say, last_good):
        self.ctx, self.metrics, self.every, self.say = ctx, metrics, max(1, every), say
        self.last_good = last_good  # "; RUN/last.pt holds step N", for messages
        self.pending: list[tuple[int, float, torch.Tensor]] = []

    def add(self, step: int, lr: float, loss: torch.Tensor) -> None:
        self.pending.append((step, lr, loss))

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def flush(self) -> float:
        """Write the pending losses (the mean over processes), stopping on one not finite;
        prints the last when its step is due; returns it."""
        values = self.ctx.mean(torch.stack([p[2] for p in self.pending])).tolist()
        for (step, lr, _), value in zip(self.pending, values, strict=True):
            if not math.isfinite(value):
                raise FmnistError(f"loss became {value} at step {step}; lower --lr{self.last_good()}")
            self.metrics.write(LossRecord(step, value, lr))
        step = self.pending[-1][0]
        self.pending.clear()
        self.metrics.flush()
        if self.due(step):
            self.say(f"step {step:6d}  loss {values[-1]:.6f}")
        return values[-1]


class Evaluator:
    """Evaluations of the weights that are saved (the EMA's, when on) during and after
    training, each written to the metrics and left out of the training time."""

    def __init__(self, model: nn.Module, splits: dict, ctx: Dist, tta: bool, every: int, metrics: Metrics,
                 clock: Stopwatch):
        self.model, self.splits, self.ctx, self.tta, self.every = model, splits, ctx, tta, every
        self.metrics, self.clock = metrics, clock

    def due(self, done: int) -> bool:
        """Whether to evaluate on the validation split after `done` steps, during training."""
        return bool(self.every) and done % self.every == 0 and len(self.splits["val"]) > 0

    def __call__(self, split: str, step: int) -> Evaluation:
        begin = time.perf_counter()
        with self.clock.excluding():
            result = evaluate_split(self.model, self.splits[split], self.ctx, tta=self.tta)
        took = time.perf_counter() - begin
        self.metrics.write(EvalRecord(step, split, result.accuracy, result.loss,
                                      train_seconds=self.clock.seconds(), eval_seconds=took))
        return result


class TrainingStopped(KeyboardInterrupt):
    """Training stopped at a step boundary on SIGINT or SIGTERM, after writing a checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    test: Evaluation
    val: Evaluation | None
    steps: int
    train_seconds: float
    model: nn.Module | None = None  # the trained network, on its device


def _silent(*_) -> None:
    pass


def train(cfg: TrainConfig, progress: bool = True, log=print) -> TrainResult:
    """Train as `cfg` says, in this process, or as one process of a torchrun job."""
    cfg.validate()
    model_spec(cfg.model)  # an unknown network, in one line before any data is read
    if cfg.photo_share:
        find_photos_dir(cfg.photos)  # the photos' folder, as early
    keep_freed_memory()
    ctx = setup(resolve_device(cfg.device))
    try:
        if not ctx.enabled:  # fail fast, before any data is read; checked again under the lock
            if cfg.resume:
                RunDir.existing(cfg.resume).lock().unlock()
            elif cfg.out:
                RunDir(cfg.out).refuse_if_not_empty()
        with ExitStack() as held:  # the run folder's lock, released however training ends
            # Only rank 0 prints, logs, writes checkpoints and plots.
            return _train(cfg, ctx, held, progress and ctx.is_main, log if ctx.is_main else _silent)
    finally:
        ctx.close()


def wrap_network(model: nn.Module, compile: bool, ctx: Dist) -> nn.Module:
    """The network the training step calls: under DDP (which averages the gradients over the
    processes during backward), compiled when asked."""
    from torch.nn.parallel import DistributedDataParallel

    net = model
    if ctx.enabled:
        net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return torch.compile(net) if compile else net


def announce(log, cfg: TrainConfig, ctx: Dist, run: RunDir, steps: int, precision: str, start: int) -> None:
    processes = f" in {ctx.world_size} processes" if ctx.enabled else ""
    log(f"training {cfg.model} on {ctx.device} ({precision}){processes} for {steps} steps of {cfg.batch_size} -> {run}")
    if cfg.resume:
        log(f"resuming from step {start} ({run.last_state})" if start else
            f"no checkpoint in {run} yet: training it from the start")


def _train(cfg: TrainConfig, ctx: Dist, held: ExitStack, progress: bool, log) -> TrainResult:
    from tqdm.auto import tqdm

    # ---- set-up: data, network, optimiser, run folder, resumed state
    device = ctx.device
    if cfg.batch_size % ctx.world_size:
        raise FmnistError(f"--batch-size {cfg.batch_size} does not split into {ctx.world_size} equal shares")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    norm = Normalization.of_training_set(cfg.normalize)
    data = load_splits(cfg.val_size, norm, cfg.data_dir, device)
    steps = total_steps(cfg, len(data["train"]))
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    photos = photo_mix(cfg, norm, device, ctx.world_size, log, memory_format, progress)
    learner = build_learner(cfg, len(data["train"]), norm, device, photos)
    model, optimizer = learner.model, learner.optimizer
    if ctx.rank:
        torch.manual_seed(cfg.seed + 1_000_003 * ctx.rank)  # its own dropout masks
    amp_dtype = autocast_dtype(cfg.precision, device)
    images, labels = data["train"].images.contiguous(memory_format=memory_format), data["train"].labels

    run = open_run_dir(cfg, ctx, held)
    saver = CheckpointSaver(run, learner.stateful(), ctx, cfg.checkpoint_every, track_best=cfg.eval_every > 0, log=log)
    resumed = saver.restore(steps) if cfg.resume else None
    start = resumed.step if resumed else 0
    net = wrap_network(model, cfg.compile, ctx)
    precision = "bf16" if amp_dtype == torch.bfloat16 else "fp32"
    metrics = Metrics()
    if ctx.is_main:
        run.write_config(to_dict(cfg) | {"out": str(run), "total_steps": steps, "device_resolved": str(device),
                                         "precision_resolved": precision, "world_size": ctx.world_size})
        metrics = open_metrics(run, cfg, resume_from=start if resumed else None)
    saver.metrics = metrics
    announce(log, cfg, ctx, run, steps, precision, start)

    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train", unit="step",
               disable=not progress, dynamic_ncols=True)
    losses = LossLog(ctx, metrics, cfg.log_every, bar.write if progress else log, saver.last_good)
    clock = Stopwatch(resumed.train_seconds if resumed else 0.0)
    evaluate = Evaluator(learner.final, data, ctx, cfg.tta, cfg.eval_every, metrics, clock)
    val_result, val_step = None, None
    model.train()
    try:
        with GracefulStop(ctx) as stop:
            # ---- the loop: learning rate, batch, augment, step, EMA; then log, evaluate, checkpoint
            for step in bar:
                lr = set_lr(optimizer, lr_at(step, cfg, steps))
                loss = train_step(net, optimizer, *learner.batch(images, labels, ctx), amp_dtype,
                                  cfg.label_smoothing, cfg.grad_clip)
                learner.update_ema()
                losses.add(step, lr, loss)

                done = step + 1
                stopping = stop.requested() and done < steps
                checkpointing = done < steps and (stopping or saver.due(done))
                evaluating = evaluate.due(done)
                if losses.due(step) or done == steps or checkpointing or evaluating:
                    bar.set_postfix(loss=f"{losses.flush():.4f}")
                if evaluating:
                    val_result, val_step = evaluate("val", done), done
                    if cfg.eval_test and done < steps:
                        evaluate("test", done)
                if done < steps:
                    saver.after_step(done, checkpointing, val_result.accuracy if val_step == done else None,
                                     clock.seconds())
                if stopping:
                    bar.close()
                    log(f"stopped by {stop.received or 'a signal to another process'} after step {done}"
                        f"{saver.last_good()}; continue with: fmnist train --resume {run}")
                    raise TrainingStopped
        bar.close()

        # ---- finish: final evaluations, the model, the last checkpoint, plots
        train_seconds = clock.seconds()
        if len(data["val"]) and val_step != steps:
            val_result = evaluate("val", steps)
        test_result = evaluate("test", steps)
        metrics.write(EndRecord(steps, train_seconds))
        metrics.flush()
        log(f"trained {steps} steps in {train_seconds:.1f} s")
        if val_result is not None:
            log(f"validation accuracy {val_result.accuracy:.4f}")
        log(f"test accuracy {test_result.accuracy:.4f}")
        meta = ModelMeta(cfg.model, cfg.model_args, list(CLASS_NAMES), norm, tta=cfg.tta, config=to_dict(cfg),
                         steps=steps, train_seconds=train_seconds,
                         metrics={"test_accuracy": test_result.accuracy, "test_loss": test_result.loss,
                                  "val_accuracy": val_result.accuracy if val_result else None}
                         | photo_validation(cfg, learner.final, norm, device, log))
        check_finite(learner.final, f"{run}: the final weights", f"{saver.last_good()}; lower --lr")
        if ctx.is_main:
            save_model(run, learner.final, meta)
            calibrate_model(run, learner.final, meta, data, learner, log)
        # After model.json: a run killed before this point resumes from its previous checkpoint
        # and trains its last steps again.
        saver.finish(steps, meta.metrics["val_accuracy"], train_seconds)
        if ctx.is_main and cfg.plots:
            write_run_plots(run, data, test_result, metrics, steps, meta)
            log(f"plots written to {run}")
    finally:
        saver.wait()
        metrics.close()
    return TrainResult(run.path, test_result, val_result, steps, train_seconds, learner.final)


def calibrate_model(run: RunDir, model: torch.nn.Module, meta: ModelMeta, data: dict, learner: Learner, log) -> None:
    """The temperature and the out-of-distribution detector, fitted on the validation split
    (fmnist.inference.calibrate); a run without one stays uncalibrated, and says so."""
    if not len(data["val"]):
        log("not calibrated: no validation split (--val-size 0); probabilities are the raw softmax")
        return
    photos = learner.photos.raw if learner.photos is not None else None
    entry, detector = calibrate(model, meta, data["train"], data["val"], photos)
    save_calibration(run, meta, entry, detector)
    figures = entry["validation"]
    log(f"calibrated on the validation split: temperature {entry['temperature']:.3f}, "
        f"ECE {figures['ece']:.2%} -> {figures['ece_calibrated']:.2%}")


def write_run_plots(run: RunDir, data: dict, test_result: Evaluation, metrics: Metrics, step: int,
                    meta: ModelMeta) -> None:
    """The run's plots as PNG files, and as images in the metrics sinks that take them."""
    from PIL import Image

    from fmnist.plots import write_plots

    paths = write_plots(run, data["train"].raw, data["train"].labels.cpu(), data["test"].raw,
                        data["test"].labels.cpu(), test_result, CLASS_NAMES,
                        meta.temperature if meta.calibration else None)
    for path in paths if metrics.takes_images else []:  # read back only for a sink that keeps images
        with Image.open(path) as picture:
            metrics.image(f"plots/{path.stem}", np.asarray(picture.convert("RGB")), step)
