"""Where training's figures go: a small sink interface, metrics.jsonl behind it, and TensorBoard
event files as a second sink (`fmnist train --tensorboard`).

A sink takes the typed records of `fmnist.run` (losses, evaluations, the end of training) and
images, and can cut itself back to a step when a run resumes from a checkpoint. A new sink is
one class here plus its line in `open_metrics` and a config field in `fmnist.config`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from fmnist import FmnistError
from fmnist.config import TrainConfig
from fmnist.io import writing
from fmnist.run import (
    EvalRecord,
    LossRecord,
    Record,
    RunDir,
    record_from_json,
    record_to_json,
    written_by_step,
)


class MetricsSink(Protocol):
    takes_images: bool  # whether `image` keeps anything: callers prepare no images for a sink that does not

    def write(self, record: Record) -> None: ...

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An (H, W, 3) uint8 picture, such as a plot."""

    def flush(self) -> None:
        """Hand what was written to the OS."""

    def sync(self) -> None:
        """Make what was flushed durable on disk, before a checkpoint that follows it. Called
        from the checkpoint writer's thread."""

    def cut(self, done: int) -> None:
        """Forget what a run wrote after its checkpoint of `done` steps (on resume). Called
        before the first write."""

    def close(self) -> None: ...


class JsonlSink:
    """metrics.jsonl: one JSON object a line, appended as training goes."""

    takes_images = False  # the plots are PNG files beside it

    def __init__(self, run: RunDir):
        self.path = run.metrics_path
        with writing(self.path):
            self.file = self.path.open("ab")

    def write(self, record: Record) -> None:
        with writing(self.path):
            self.file.write((json.dumps(record_to_json(record)) + "\n").encode())

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        pass  # the plots are PNG files beside it

    def flush(self) -> None:
        with writing(self.path):
            self.file.flush()

    def sync(self) -> None:
        os.fsync(self.file.fileno())

    def cut(self, done: int) -> None:
        """Truncate the file after the last record of the first `done` steps (a line cut short
        by a kill goes too); refuse a file that lacks losses its checkpoint saw."""
        self.file.flush()
        keep, last_loss = 0, -1
        with self.path.open("rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                try:
                    record = record_from_json(json.loads(line))
                except (ValueError, FmnistError):
                    break
                if not written_by_step(record, done):
                    break
                keep += len(line)
                if isinstance(record, LossRecord):
                    last_loss = record.step
        if done and last_loss != done - 1:
            raise FmnistError(f"{self.path}: its losses stop at step {last_loss}, before the checkpoint's "
                              f"step {done}; it was changed")
        self.file.truncate(keep)

    def close(self) -> None:
        with writing(self.path):
            self.file.close()


class TensorBoardSink:
    """TensorBoard event files in the run's tensorboard/ folder. Each value is logged at the
    number of optimiser steps done when it was measured (a loss of step s at s + 1), so a
    resumed run's restart marker hides everything written after its checkpoint."""

    takes_images = True

    def __init__(self, run: RunDir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise FmnistError("--tensorboard needs the tensorboard extra: pip install 'fmnist[tensorboard]'") from None
        self._open = lambda purge_step: SummaryWriter(str(run.tensorboard_dir), purge_step=purge_step)
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            self._writer = self._open(None)
        return self._writer

    def write(self, record: Record) -> None:
        if isinstance(record, LossRecord):
            self.writer.add_scalar("train/loss", record.loss, record.step + 1)
            self.writer.add_scalar("train/lr", record.lr, record.step + 1)
        elif isinstance(record, EvalRecord):
            self.writer.add_scalar(f"{record.split}/accuracy", record.accuracy, record.step)
            self.writer.add_scalar(f"{record.split}/loss", record.loss, record.step)
        else:
            self.writer.add_scalar("train/seconds", record.train_seconds, record.step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def sync(self) -> None:
        pass  # the event writer flushes on its own thread; a restart marker covers the rest

    def cut(self, done: int) -> None:
        self._writer = self._open(done + 1)  # TensorBoard keeps the earlier steps <= done

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class Metrics:
    """Every sink of a run, written together. Processes other than rank 0 get none."""

    def __init__(self, sinks: Sequence[MetricsSink] = ()):
        self.sinks = list(sinks)

    @property
    def takes_images(self) -> bool:
        return any(sink.takes_images for sink in self.sinks)

    def write(self, record: Record) -> None:
        for sink in self.sinks:
            sink.write(record)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        for sink in self.sinks:
            sink.image(tag, image, step)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def sync(self) -> None:
        for sink in self.sinks:
            sink.sync()

    def cut(self, done: int) -> None:
        for sink in self.sinks:
            sink.cut(done)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_metrics(run: RunDir, cfg: TrainConfig, resume_from: int | None = None) -> Metrics:
    """The sinks `cfg` asks for, in the run folder; cut back to `resume_from` steps on resume."""
    sinks: list[MetricsSink] = [JsonlSink(run)]
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(run))
    metrics = Metrics(sinks)
    if resume_from is not None:
        metrics.cut(resume_from)
    return metrics
