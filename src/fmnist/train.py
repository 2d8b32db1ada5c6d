"""Training: the data lives on the device as tensors, a batch is an index slice, and the loop
is a step function, an evaluation and `lr_at(step)`.

    fmnist train                       # the post: Adam 1e-3, batch 128, 500 steps
    fmnist train --init seed           # ... with the post's N(0, 1) initialisation
    fmnist train --epochs 10 --out runs/ten
    fmnist train --resume runs/ten     # continue from its last checkpoint (runs/ten/last.pt)
    fmnist train --nproc 2             # DistributedDataParallel in 2 processes (fmnist.distributed)

A run folder holds config.json, metrics.jsonl, model.safetensors + model.json (the product) and
last.pt / best.pt, the training state to resume from: weights, optimiser and sampler state, the
RNG state of every process, the step. Checkpoints are written every --checkpoint-every steps,
at the end, and at the step boundary after SIGINT or SIGTERM.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel

from fmnist import FmnistError
from fmnist.augment import random_erase, random_flip, random_translate
from fmnist.checkpoint import (
    BEST_STATE,
    LAST_STATE,
    CheckpointWriter,
    cpu_copy,
    load_state,
    save_model,
    write_json,
)
from fmnist.config import TrainConfig, check_resumable, read_saved_config, to_dict
from fmnist.data import CLASS_NAMES, FMNIST_MEAN, FMNIST_STD, NUM_CLASSES, load_split, to_tensor
from fmnist.device import PRECISIONS, autocast_dtype, resolve_device
from fmnist.distributed import Dist, GracefulStop, setup
from fmnist.evaluate import Evaluation, evaluate, predict_logits, score
from fmnist.models import INIT_SCHEMES, build_model, init_weights, model_spec


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

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "epoch": self.epoch, "pos": self.pos, "perm": self.perm}

    def load_state_dict(self, state: dict) -> None:
        if len(state["perm"]) != self.n:
            raise ValueError(f"a permutation of {len(state['perm'])} images, this run has {self.n}")
        self.generator.set_state(state["generator"])
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self.perm = state["perm"].to(self.device)


def total_steps(cfg: TrainConfig, n_train: int) -> int:
    if cfg.epochs is not None:
        return max(1, math.ceil(cfg.epochs * n_train / cfg.batch_size))
    return cfg.steps


OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle")


def lr_at(step: int, cfg: TrainConfig, steps: int) -> float:
    """The learning rate of a step: a linear rise over the first `warmup` fraction of the steps,
    then constant (the post), a cosine to 0, or (onecycle) a straight line down to 0."""
    warm = round(cfg.warmup * steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    done = (step - warm) / max(1, steps - warm)  # 0 -> 1 after the warm-up
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * done))
    return cfg.lr * (1 - done)


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    # The fused kernels update all parameters in one pass, with the same maths.
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def ema_update(decay: float):
    """The moving-average update for AveragedModel, with a warm-up: the decay after n updates
    is min(decay, (1 + n) / (10 + n)), so the first steps' random weights fade out quickly
    instead of weighing on a short run's average."""

    @torch.no_grad()
    def update(averages: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        # AveragedModel passes one list per device and dtype.
        if not averages[0].is_floating_point():  # counters such as num_batches_tracked
            torch._foreach_copy_(averages, current)
            return
        n = float(num_averaged)
        torch._foreach_lerp_(averages, current, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))

    return update


class Augment:
    """The run's augmentations, drawn from their own generator so that a resumed run draws
    the same ones; `fill` is the normalised value of a black pixel, the dataset's background."""

    def __init__(self, cfg: TrainConfig, fill: float, device: torch.device):
        self.cfg, self.fill = cfg, fill
        self.generator = torch.Generator(device).manual_seed(cfg.seed + 7919)
        self.enabled = bool(cfg.translate or cfg.flip or cfg.erase)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        memory_format = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        if self.cfg.translate:
            x = random_translate(x, self.generator, self.cfg.translate, self.fill)
        if self.cfg.flip:
            x = random_flip(x, self.generator)
        if self.cfg.erase:
            x = random_erase(x, self.generator, self.cfg.erase, fill=self.fill)
        return x.contiguous(memory_format=memory_format)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def check_config(cfg: TrainConfig) -> None:
    """Refuse settings that cannot work, before any data is read or process started."""
    model_spec(cfg.model)
    if cfg.init not in INIT_SCHEMES:
        raise FmnistError(f"unknown init {cfg.init!r}; choose from: {', '.join(INIT_SCHEMES)}")
    for name, value, choices in (("optimizer", cfg.optimizer, OPTIMIZERS), ("schedule", cfg.schedule, SCHEDULES)):
        if value not in choices:
            raise FmnistError(f"unknown {name} {value!r}; choose from: {', '.join(choices)}")
    for name in ("warmup", "label_smoothing", "erase", "ema"):
        if not 0.0 <= getattr(cfg, name) < 1.0 + (name == "erase"):
            raise FmnistError(f"--{name.replace('_', '-')} must lie in [0, 1), got {getattr(cfg, name)}")
    if cfg.translate < 0 or cfg.grad_clip < 0:
        raise FmnistError("--translate and --grad-clip must not be negative")
    if cfg.precision not in PRECISIONS:
        raise FmnistError(f"unknown precision {cfg.precision!r}; choose from: {', '.join(PRECISIONS)}")
    for name in ("batch_size", "nproc"):
        if getattr(cfg, name) < 1:
            raise FmnistError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.epochs is None and cfg.steps < 1:
        raise FmnistError(f"--steps must be positive, got {cfg.steps}")
    if cfg.checkpoint_every < 0:
        raise FmnistError(f"--checkpoint-every must be 0 or more, got {cfg.checkpoint_every}")
    if cfg.batch_size % cfg.nproc:
        raise FmnistError(f"--batch-size {cfg.batch_size} does not split into {cfg.nproc} equal shares (--nproc)")


def build_network(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, dict]:
    """The initialised network on the device, and the arguments it was built with."""
    model_args = {"keep_prob": cfg.keep_prob} if cfg.model.startswith("seed") else {}
    model = build_model(cfg.model, **model_args)
    init_weights(model, cfg.init)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return model.to(device, memory_format=memory_format), model_args


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global generators this process draws from (dropout): the CPU's, and the GPU's."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:  # absent when the run began on the CPU
        torch.cuda.set_rng_state(state["cuda"], device)


def train_step(model, optimizer, x, y, amp_dtype: torch.dtype | None = None,
               label_smoothing: float = 0.0, grad_clip: float = 0.0) -> torch.Tensor:
    """One optimiser step on a batch; returns the mean batch loss, still on the device."""
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = F.cross_entropy(model(x).float(), y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()


def make_run_dir(out: str | None, model: str) -> Path:
    run_dir = Path(out) if out else Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{model}"
    if run_dir.exists() and not run_dir.is_dir():
        raise FmnistError(f"{run_dir}: exists and is not a folder")
    if any((run_dir / name).exists() for name in ("metrics.jsonl", "model.json", LAST_STATE)):
        raise FmnistError(f"{run_dir}: already holds a run; choose another --out, or continue it with --resume {run_dir}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FmnistError(f"{run_dir}: cannot create run folder ({e.strerror})") from None
    return run_dir


def open_run_dir(cfg: TrainConfig, ctx: Dist) -> Path:
    """The run folder: the resumed one, or a new one made by rank 0 (its name has the time in
    it), the same path on every process."""
    if cfg.resume:
        run_dir = Path(cfg.resume)
        check_resumable(read_saved_config(run_dir), to_dict(cfg))
        return run_dir
    made = ("", "")
    if ctx.is_main:
        try:
            made = ("ok", str(make_run_dir(cfg.out, cfg.model)))
        except FmnistError as e:
            made = ("error", str(e))
    status, value = ctx.broadcast(made)
    if status == "error":
        raise FmnistError(value)
    return Path(value)


class MetricsLog:
    """metrics.jsonl: one JSON object a line, appended and flushed as training goes. A resumed
    run first cuts it back to the `keep_bytes` its checkpoint saw, dropping the lines of the
    steps it will train again. `path` None (processes other than rank 0) writes nothing."""

    def __init__(self, path: Path | None, keep_bytes: int | None = None):
        self.file = path.open("ab") if path is not None else None
        if self.file is not None and keep_bytes is not None:
            size = self.file.seek(0, os.SEEK_END)
            if size < keep_bytes:
                raise FmnistError(f"{path}: {size} bytes, shorter than the {keep_bytes} its checkpoint saw; it was changed")
            self.file.truncate(keep_bytes)

    def write(self, **record) -> None:
        if self.file is not None:
            self.file.write((json.dumps(record) + "\n").encode())

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def tell(self) -> int:
        return self.file.tell() if self.file is not None else 0

    def sync(self) -> None:
        """Make the lines written so far durable, before a checkpoint that points past them."""
        if self.file is not None:
            os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class Checkpoints:
    """The training state of a run: the state of each `stateful` component, the RNG state of
    every process, the step, and where metrics.jsonl stood. `save` is collective (every process
    calls it at the same step); rank 0 writes, on a background thread."""

    def __init__(self, run_dir: Path, stateful: dict, ctx: Dist, metrics: MetricsLog, log):
        self.run_dir, self.stateful, self.ctx, self.metrics = run_dir, stateful, ctx, metrics
        self.writer = CheckpointWriter(log)

    def restore(self, steps: int) -> dict:
        """Load last.pt into the components and this process's RNG; the whole state."""
        path = self.run_dir / LAST_STATE
        if not path.exists() and not (self.run_dir / "model.json").exists():
            return {"metrics_bytes": 0}  # stopped before its first checkpoint: start it over
        state = load_state(path)
        written_by = state.get("world_size")
        if written_by != self.ctx.world_size:
            raise FmnistError(f"{path}: written by {written_by} processes, this run has {self.ctx.world_size}; "
                              f"resume with {written_by} in all (--nproc {written_by}, or torchrun)")
        done = state.get("step")
        if not isinstance(done, int) or done < 0:
            raise FmnistError(f"{path}: no valid step in it ({done!r})")
        if done >= steps:
            raise FmnistError(f"{self.run_dir}: already trained its {done} steps; give more --steps (or --epochs) to train on")
        for name, component in self.stateful.items():
            if name not in state:
                raise FmnistError(f"{path}: holds no {name} state")
            try:
                component.load_state_dict(state[name])
            except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise FmnistError(f"{path}: its {name} state does not fit this run ({first})") from None
        try:
            set_rng_state({k: v[self.ctx.rank] for k, v in state["rng"].items()}, self.ctx.device)
        except (KeyError, IndexError, TypeError, RuntimeError) as e:
            raise FmnistError(f"{path}: no usable RNG state ({type(e).__name__}: {e})") from None
        self.writer.saved_step[path] = done
        if self.ctx.is_main:
            for stale in self.run_dir.glob(".*.pt.*.tmp"):  # a write cut short by a kill
                stale.unlink(missing_ok=True)
        return state

    def save(self, step: int, names: list[str], **extra) -> None:
        """Checkpoint the state after `step` steps into each of `names` (last.pt, best.pt)."""
        model = self.stateful["model"]
        if not torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all():
            raise FmnistError(f"weights stopped being finite by step {step}; lower --lr{self.last_good()}")
        rng = {k: self.ctx.gather_same_size(v) for k, v in rng_state(self.ctx.device).items()}
        if not self.ctx.is_main:
            return
        state = {"step": step, "world_size": self.ctx.world_size, "metrics_bytes": self.metrics.tell(),
                 "rng": rng, **extra, **{n: cpu_copy(c.state_dict()) for n, c in self.stateful.items()}}
        self.writer.submit([self.run_dir / n for n in names], state, before=self.metrics.sync)

    def last_good(self) -> str:
        """"; RUN/last.pt holds step N" for messages, once the write in flight is done."""
        self.writer.wait()
        held = self.writer.saved_step.get(self.run_dir / LAST_STATE)
        return f"; {self.run_dir / LAST_STATE} holds step {held}" if held is not None else ""

    def wait(self) -> bool:
        return self.writer.wait()


class TrainingStopped(KeyboardInterrupt):
    """Training stopped at a step boundary on SIGINT or SIGTERM, after writing a checkpoint."""


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
    check_config(cfg)
    ctx = setup(resolve_device(cfg.device))
    try:
        # Only rank 0 prints, logs, writes checkpoints and plots.
        return _train(cfg, ctx, progress and ctx.is_main, log if ctx.is_main else _silent)
    finally:
        ctx.close()


def _train(cfg: TrainConfig, ctx: Dist, progress: bool, log) -> TrainResult:
    from torch.nn.parallel import DistributedDataParallel
    from tqdm.auto import tqdm

    device = ctx.device
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size % ctx.world_size:
        raise FmnistError(f"--batch-size {cfg.batch_size} does not split into {ctx.world_size} equal shares")
    torch.manual_seed(cfg.seed)
    data = load_data(cfg, device)
    train_split = data["train"]
    steps = total_steps(cfg, len(train_split))
    if steps < 1:
        raise FmnistError(f"--steps must be positive, got {steps}")

    model, model_args = build_network(cfg, device)
    optimizer = build_optimizer(model, cfg, device)
    sampler = BatchSampler(len(train_split), cfg.batch_size, cfg.seed, device)
    norm = normalization(cfg)
    augment = Augment(cfg, fill=-norm["mean"] / norm["std"], device=device)  # a black pixel, normalised
    # The weights evaluated and saved: an exponential moving average of the trained ones
    # (batch-norm statistics included) when --ema is set, else the trained ones.
    ema = None
    if cfg.ema:
        ema = AveragedModel(model, multi_avg_fn=ema_update(cfg.ema), use_buffers=True)
    final = ema.module if ema is not None else model
    # Everything a checkpoint restores besides the RNG and the step.
    stateful = {"model": model, "optimizer": optimizer, "sampler": sampler, "augment": augment}
    if ema is not None:
        stateful["ema"] = ema
    if ctx.rank:
        torch.manual_seed(cfg.seed + 1_000_003 * ctx.rank)  # its own dropout masks
    amp_dtype = autocast_dtype(cfg.precision, device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    images = train_split.images.contiguous(memory_format=memory_format)

    run_dir = open_run_dir(cfg, ctx)
    checkpoints = Checkpoints(run_dir, stateful, ctx, MetricsLog(None), log)
    resumed = checkpoints.restore(steps) if cfg.resume else {}
    net = model
    if ctx.enabled:  # averages the gradients over the processes during backward
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    precision = "bf16" if amp_dtype == torch.bfloat16 else "fp32"
    if ctx.is_main:
        resolved = {"out": str(run_dir), "total_steps": steps, "device_resolved": str(device),
                    "precision_resolved": precision, "world_size": ctx.world_size}
        write_json(run_dir / "config.json", to_dict(cfg) | resolved)
        checkpoints.metrics = MetricsLog(run_dir / "metrics.jsonl", keep_bytes=resumed.get("metrics_bytes"))
    metrics = checkpoints.metrics
    start = resumed.get("step", 0)
    processes = f" in {ctx.world_size} processes" if ctx.enabled else ""
    log(f"training {cfg.model} on {device} ({precision}){processes} for {steps} steps of {cfg.batch_size} -> {run_dir}")
    if cfg.resume:
        log(f"resuming from step {start} ({run_dir / LAST_STATE})" if start else
            f"no checkpoint in {run_dir} yet: training it from the start")

    def elapsed() -> float:
        """Seconds of training so far, evaluations during it not counted."""
        return seconds_before + time.perf_counter() - clock - eval_seconds

    def run_eval(split: str, step: int) -> Evaluation:
        nonlocal eval_seconds
        begin = time.perf_counter()
        result = evaluate_split(final, data[split], ctx, tta=cfg.tta)
        took = time.perf_counter() - begin
        metrics.write(step=step, split=split, accuracy=result.accuracy, loss=result.loss,
                      train_seconds=elapsed() + took, eval_seconds=took)
        eval_seconds += took
        return result

    def write_losses() -> float:
        """Write the pending losses (the mean over processes), stopping on one not finite."""
        values = ctx.mean(torch.stack([p[2] for p in pending])).tolist()
        for (s, r, _), value in zip(pending, values, strict=True):
            if not math.isfinite(value):
                raise FmnistError(f"loss became {value} at step {s}; lower --lr{checkpoints.last_good()}")
            metrics.write(step=s, loss=value, lr=r)
        pending.clear()
        metrics.flush()
        return values[-1]

    # Losses stay on the device and are read back every `log_every` steps (and before an
    # evaluation or a checkpoint): one host sync per interval instead of one per step.
    flush_every = max(1, cfg.log_every)
    pending: list[tuple[int, float, torch.Tensor]] = []
    val_result, val_step = None, None
    best_val = resumed.get("best_val_accuracy")
    seconds_before = resumed.get("train_seconds", 0.0)
    model.train()
    clock, eval_seconds = time.perf_counter(), 0.0
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train", unit="step",
               disable=not progress, dynamic_ncols=True)
    try:
        with GracefulStop(ctx) as stop:
            for step in bar:
                lr = lr_at(step, cfg, steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                idx = sampler.next()
                if ctx.enabled:
                    idx = idx.tensor_split(ctx.world_size)[ctx.rank]  # this process's slice of the batch
                x = images[idx]
                if augment.enabled:
                    x = augment(x)
                loss = train_step(net, optimizer, x, train_split.labels[idx], amp_dtype,
                                  cfg.label_smoothing, cfg.grad_clip)
                if ema is not None:
                    ema.update_parameters(model)
                pending.append((step, lr, loss))
                done = step + 1
                stopping = stop.requested() and done < steps
                checkpoint = stopping or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < steps)
                evaluating = bool(cfg.eval_every) and done % cfg.eval_every == 0 and len(data["val"]) > 0
                if step % flush_every == 0 or done == steps or checkpoint or evaluating:
                    value = write_losses()
                    bar.set_postfix(loss=f"{value:.4f}")
                    if step % flush_every == 0:
                        (bar.write if progress else log)(f"step {step:6d}  loss {value:.6f}")
                new_best = False
                if evaluating:
                    val_result, val_step = run_eval("val", done), done
                    if cfg.eval_test and done < steps:
                        run_eval("test", done)
                    model.train()
                    new_best = done < steps and (best_val is None or val_result.accuracy > best_val)
                    best_val = val_result.accuracy if new_best else best_val
                names = [LAST_STATE] * bool(checkpoint) + [BEST_STATE] * new_best
                if names:
                    checkpoints.save(done, names, best_val_accuracy=best_val,
                                     train_seconds=elapsed())
                if stopping:
                    bar.close()
                    held = checkpoints.last_good()
                    log(f"stopped by {stop.received or 'a signal to another process'} after step {done}{held}; "
                        f"continue with: fmnist train --resume {run_dir}")
                    raise TrainingStopped
        bar.close()
        train_seconds = elapsed()

        if len(data["val"]) and val_step != steps:
            val_result = run_eval("val", steps)
        test_result = run_eval("test", steps)
        metrics.write(step=steps, train_seconds=train_seconds)
        metrics.flush()
        log(f"trained {steps} steps in {train_seconds:.1f} s")
        if val_result is not None:
            log(f"validation accuracy {val_result.accuracy:.4f}")
        log(f"test accuracy {test_result.accuracy:.4f}")

        if ctx.is_main:
            meta = {
                "model": cfg.model,
                "model_args": model_args,
                "class_names": list(CLASS_NAMES),
                "normalization": norm,
                "tta": cfg.tta,
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
            save_model(run_dir, final, meta)
        # After model.json: a run killed before this point resumes from its previous checkpoint
        # and trains its last steps again. Without evaluations during training there is no
        # choice of best: last.pt is it.
        improved = val_result is not None and (best_val is None or val_result.accuracy > best_val)
        best_val = val_result.accuracy if improved else best_val
        checkpoints.save(steps, [LAST_STATE] + [BEST_STATE] * (improved and cfg.eval_every > 0),
                         best_val_accuracy=best_val, train_seconds=train_seconds)
        if ctx.is_main:
            if cfg.plots:
                from fmnist.plots import write_plots

                write_plots(run_dir, train_split.raw, train_split.labels.cpu(),
                            data["test"].raw, data["test"].labels.cpu(), test_result, CLASS_NAMES)
                log(f"plots written to {run_dir}")
    finally:
        checkpoints.wait()
        metrics.close()
    return TrainResult(run_dir, test_result, val_result, steps, train_seconds, final)
