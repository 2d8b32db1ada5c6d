"""The training state that `fmnist train --resume` continues from (last.pt, best.pt): written
atomically on a background thread, read with weights_only=True so a crafted file cannot run
code. `CheckpointSaver` owns when a run writes which of them, and the product (`fmnist.run`'s
`save_model`) at the end."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fmnist import FmnistError, __version__
from fmnist.distributed import Dist
from fmnist.io import atomic_open
from fmnist.run import RunDir
from fmnist.training.metrics import Metrics

STATE_FORMAT = "fmnist-train-state/1"



def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write a training state (tensors, numbers, strings, lists and dicts only) atomically."""
    with atomic_open(path) as f:
        torch.save({"format": STATE_FORMAT, "version": __version__, **state}, f)


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """A training state written by save_state, on the CPU. weights_only=True: a file holding
    anything but tensors and plain containers is refused, never executed."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FmnistError(f"{path}: not found, no checkpoint to resume from") from None
    except Exception as e:  # zip, pickle and weights-only errors each have their own type
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FmnistError(f"{path}: not a valid fmnist training state ({first})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise FmnistError(f"{path}: not an fmnist training state (format {found!r}, expected {STATE_FORMAT!r})")
    return state


def cpu_copy(obj: Any) -> Any:
    """A copy of a (nested) state dict with every tensor copied to the CPU, strides kept, so
    training can go on while it is written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes training states on a background thread, one at a time, so the training loop only
    pays for copying the tensors. A failed write leaves the previous file in place and is
    reported through `log`; training goes on."""

    def __init__(self, log: Callable[[str], None] = print):
        self.log = log
        self.saved_step: dict[Path, int] = {}  # path -> step of the state it now holds
        self._thread: threading.Thread | None = None
        self._failed = False

    def submit(self, paths: list[Path], state: dict[str, Any], before: Callable[[], None] | None = None) -> None:
        """Write `state` to each path in turn; `before` runs first on the thread (e.g. fsync
        the metrics the state points into)."""
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(paths, state, before), daemon=True)
        self._thread.start()

    def _write(self, paths, state, before) -> None:
        for i, path in enumerate(paths):
            try:
                if before is not None and i == 0:
                    before()
                save_state(path, state)
                self.saved_step[path] = state["step"]
            except Exception as e:  # OSError (no space, quota...), or anything torch.save raises
                reason = f"{e.strerror} (errno {e.errno})" if isinstance(e, OSError) and e.strerror else str(e)
                held = self.saved_step.get(path)
                kept = f"{path} still holds step {held}" if held is not None else f"{path} is left as it was"
                self.log(f"warning: checkpoint of step {state['step']} not written: {reason}; {kept}")
                self._failed = True

    def wait(self) -> bool:
        """Wait for the write in flight; False when it failed (the failure is already logged)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        ok, self._failed = not self._failed, False
        return ok


# ----------------------------------------------------------------------------- the policy


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


@dataclass
class Resumed:
    """Where a restored run stands."""

    step: int = 0
    best_val_accuracy: float | None = None
    train_seconds: float = 0.0


class CheckpointSaver:
    """When a run writes which training state: last.pt every `every` steps, when stopped and at
    the end; best.pt whenever validation accuracy improves during training (and at the end,
    when it evaluates during training at all). A state holds each `stateful` component, the RNG
    state of every process and the step. Saving is collective (every process calls it at the
    same step); rank 0 writes, on a background thread."""

    def __init__(self, run: RunDir, stateful: dict, ctx: Dist, every: int, track_best: bool, log):
        self.run, self.stateful, self.ctx = run, stateful, ctx
        self.every, self.track_best = every, track_best
        self.metrics = Metrics()  # made durable before each state that follows them
        self.best_val: float | None = None
        self.writer = CheckpointWriter(log)

    def due(self, done: int) -> bool:
        return bool(self.every) and done % self.every == 0

    def restore(self, steps: int) -> Resumed:
        """Load last.pt into the components and this process's RNG."""
        path = self.run.last_state
        if not path.exists() and not self.run.meta_path.exists():
            return Resumed()  # stopped before its first checkpoint: start it over
        state = load_state(path)
        written_by = state.get("world_size")
        if written_by != self.ctx.world_size:
            raise FmnistError(f"{path}: written by {written_by} processes, this run has {self.ctx.world_size}; "
                              f"resume with {written_by} in all (--nproc {written_by}, or torchrun)")
        done = state.get("step")
        if not isinstance(done, int) or done < 0:
            raise FmnistError(f"{path}: no valid step in it ({done!r})")
        if done >= steps:
            raise FmnistError(f"{self.run}: already trained its {done} steps; give more --steps (or --epochs) to train on")
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
            for stale in self.run.path.glob(".*.pt.*.tmp"):  # a write cut short by a kill
                stale.unlink(missing_ok=True)
        self.best_val = state.get("best_val_accuracy")
        return Resumed(done, self.best_val, state.get("train_seconds", 0.0))

    def after_step(self, done: int, last: bool, val_accuracy: float | None, train_seconds: float) -> None:
        """During training: last.pt when `last`, best.pt when `val_accuracy` is a new best."""
        names = [self.run.last_state] * last + [self.run.best_state] * self._improved(val_accuracy)
        if names:
            self._save(done, names, train_seconds)

    def finish(self, steps: int, val_accuracy: float | None, train_seconds: float) -> None:
        """At the end, after model.json: last.pt always; best.pt when the final validation
        improved on the best seen during training (without evaluations during training there
        is no choice of best: last.pt is it)."""
        improved = self._improved(val_accuracy) and self.track_best
        self._save(steps, [self.run.last_state] + [self.run.best_state] * improved, train_seconds)

    def _improved(self, val_accuracy: float | None) -> bool:
        if val_accuracy is None or (self.best_val is not None and val_accuracy <= self.best_val):
            return False
        self.best_val = val_accuracy
        return True

    def _save(self, step: int, paths: list[Path], train_seconds: float) -> None:
        model = self.stateful["model"]
        if not torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all():
            raise FmnistError(f"weights stopped being finite by step {step}; lower --lr{self.last_good()}")
        rng = {k: self.ctx.gather_same_size(v) for k, v in rng_state(self.ctx.device).items()}
        if not self.ctx.is_main:
            return
        state = {"step": step, "world_size": self.ctx.world_size, "rng": rng,
                 "best_val_accuracy": self.best_val, "train_seconds": train_seconds,
                 **{n: cpu_copy(c.state_dict()) for n, c in self.stateful.items()}}
        self.metrics.flush()
        self.writer.submit(paths, state, before=self.metrics.sync)

    def last_good(self) -> str:
        """"; RUN/last.pt holds step N" for messages, once the write in flight is done."""
        self.writer.wait()
        held = self.writer.saved_step.get(self.run.last_state)
        return f"; {self.run.last_state} holds step {held}" if held is not None else ""

    def wait(self) -> bool:
        return self.writer.wait()
