"""Saving and loading trained models: weights as safetensors plus a JSON of metadata, each
written atomically (a temporary file in the same folder, fsync, rename); and the training state
that `fmnist train --resume` continues from (last.pt, best.pt), read with weights_only=True so a
crafted file cannot run code."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from fmnist import FmnistError, __version__

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
LAST_STATE = "last.pt"  # training state of the latest checkpoint
BEST_STATE = "best.pt"  # training state at the best validation accuracy
STATE_FORMAT = "fmnist-train-state/1"


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file next to `path`; on success it is fsynced and renamed over `path`,
    on failure removed, so `path` is either the old file or the complete new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FmnistError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FmnistError(f"{path}: not readable JSON ({e})") from None


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights as contiguous CPU tensors (channels-last weights are not contiguous)."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_model(run_dir: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write model.safetensors and model.json (model name and arguments, class names,
    normalisation, metrics...) into run_dir."""
    run_dir = Path(run_dir)
    meta = {"format": "fmnist-model/1", "version": __version__, **meta}
    with atomic_open(run_dir / WEIGHTS_FILE) as f:
        f.write(safetensors_save(cpu_state_dict(model), metadata={"model": str(meta["model"])}))
    write_json(run_dir / META_FILE, meta)


def read_meta(run_dir: str | os.PathLike) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FmnistError(f"{run_dir}: no such run folder")
    meta = read_json(run_dir / META_FILE)
    if not isinstance(meta, dict) or "model" not in meta:
        raise FmnistError(f"{run_dir / META_FILE}: not an fmnist model description")
    return meta


def load_model(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The trained model of a run folder, in eval mode, and its metadata."""
    from fmnist.models import build_model

    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    path = run_dir / WEIGHTS_FILE
    try:
        state = safetensors_load(path.read_bytes())
    except FileNotFoundError:
        raise FmnistError(f"{path}: not found") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise FmnistError(f"{path}: not a valid safetensors file ({e})") from None
    model = build_model(meta["model"], num_classes=len(meta["class_names"]), **meta.get("model_args", {}))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise FmnistError(f"{path}: weights do not fit model {meta['model']!r} ({first})") from None
    return model.to(device).eval(), meta


# ----------------------------------------------------------------------------- training state


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
