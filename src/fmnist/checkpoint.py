"""Saving and loading trained models: weights as safetensors plus a JSON of metadata, each
written atomically (a temporary file in the same folder, fsync, rename)."""

from __future__ import annotations

import json
import os
import tempfile
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
