"""The run folder, defined once: its file names, the records of metrics.jsonl and the
description of its trained model (model.json). Every command that reads or writes a run goes
through `RunDir` and `ModelMeta`; nobody else spells a file name or a key.

    runs/my-run/
        config.json          the resolved TrainConfig, plus what was resolved at run time
        metrics.jsonl        LossRecord / EvalRecord / EndRecord, one JSON object a line
        model.safetensors    the weights          } the product: `save_model` below
        model.json           ModelMeta            }
        last.pt, best.pt     training state to resume from (`fmnist.training.checkpoint`)
        *.png                plots (`fmnist.plots`)
        tensorboard/         event files, with `fmnist train --tensorboard`
        explain/             pictures of what the model learnt, by `fmnist explain` (`fmnist.explain.pictures`)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked
    fcntl = None

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from fmnist import FmnistError, __version__
from fmnist.config import CONFIG_FILE, LEGACY_NAMES, read_run_config
from fmnist.data import Normalization
from fmnist.io import atomic_open, read_json, write_json, writing
from fmnist.models import build_model, count_parameters, model_spec

METRICS_FILE = "metrics.jsonl"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
OOD_FILE = "ood.safetensors"  # the training examples the out-of-distribution score compares with
LAST_STATE = "last.pt"  # training state of the latest checkpoint
BEST_STATE = "best.pt"  # training state at the best validation accuracy
TENSORBOARD_DIR = "tensorboard"
EXPLAIN_DIR = "explain"
PLOT_FILES = ("cost.png", "samples.png", "confusion_matrix.png", "misclassified.png")
RELIABILITY_FILE = "reliability.png"  # drawn when the run is calibrated

# A model.json may ask for any network the registry builds; more parameters than this is a
# crafted or corrupt file, refused before anything is allocated (wrn-28-10 has 36.5 million).
MAX_PARAMETERS = 500_000_000


# ----------------------------------------------------------------------------- metrics records


@dataclass(frozen=True)
class LossRecord:
    """The mean training loss of one optimiser step (`step` counts from 0) and its learning rate."""

    step: int
    loss: float
    lr: float


@dataclass(frozen=True)
class EvalRecord:
    """An evaluation after `step` optimiser steps."""

    step: int
    split: str  # "val" or "test"
    accuracy: float
    loss: float
    train_seconds: float  # training time before this evaluation, evaluations excluded
    eval_seconds: float


@dataclass(frozen=True)
class EndRecord:
    """The end of training after `step` optimiser steps."""

    step: int
    train_seconds: float


Record = LossRecord | EvalRecord | EndRecord


def record_to_json(record: Record) -> dict[str, Any]:
    return dataclasses.asdict(record)


def record_from_json(obj: Any, where: str = "metrics record") -> Record:
    """The record a JSON object of metrics.jsonl holds; its kind is told by its keys."""
    if not isinstance(obj, dict):
        raise FmnistError(f"{where}: not a JSON object")
    kind = EvalRecord if "split" in obj else LossRecord if "loss" in obj else EndRecord
    names = [f.name for f in dataclasses.fields(kind)]
    try:
        return kind(**{name: obj[name] for name in names})
    except KeyError as e:
        raise FmnistError(f"{where}: {kind.__name__} without {e.args[0]!r}") from None


def written_by_step(record: Record, done: int) -> bool:
    """Whether a record belongs to the first `done` steps of a run: a checkpoint after `done`
    steps follows the losses of steps 0..done-1 and the evaluations after `done` steps."""
    return record.step < done if isinstance(record, LossRecord) else record.step <= done


# ----------------------------------------------------------------------------- model.json

MODEL_FORMAT = "fmnist-model/1"
INPUT = {"height": 28, "width": 28, "channels": 1, "scale": "pixels / 255"}


@dataclass
class ModelMeta:
    """model.json: what it takes to rebuild, run and judge the trained model."""

    model: str  # a name from the registry
    model_args: dict[str, Any]  # the builder's arguments besides num_classes
    class_names: list[str]
    normalization: Normalization
    tta: bool = False  # evaluate on the mean logits of each image and its mirror image
    config: dict[str, Any] = field(default_factory=dict)  # the TrainConfig it was trained with
    steps: int = 0
    train_seconds: float = 0.0
    metrics: dict[str, float | None] = field(default_factory=dict)  # test_accuracy, test_loss, val_accuracy
    calibration: dict[str, Any] = field(default_factory=dict)  # temperature, ood (fmnist.inference.calibrate)
    format: str = MODEL_FORMAT
    version: str = __version__  # of fmnist, when written
    input: dict[str, Any] = field(default_factory=lambda: dict(INPUT))

    @property
    def test_accuracy(self) -> float | None:
        return self.metrics.get("test_accuracy")

    @property
    def trained_on_photos(self) -> bool:
        """Whether real photos were mixed into its training (`--photos` with a photo share)."""
        return bool(self.config.get("photo_share"))

    @property
    def temperature(self) -> float:
        """What the logits are divided by before the softmax (1.0 for a run not calibrated)."""
        return float(self.calibration.get("temperature", 1.0))

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "version": self.version, "model": self.model,
                "model_args": self.model_args, "class_names": self.class_names,
                "normalization": {"mean": self.normalization.mean, "std": self.normalization.std},
                "tta": self.tta, "input": self.input, "config": self.config, "steps": self.steps,
                "train_seconds": self.train_seconds, "metrics": self.metrics,
                "calibration": self.calibration}

    @classmethod
    def from_json(cls, obj: Any, where: str = META_FILE) -> ModelMeta:
        """Validated: a file that is not an fmnist model description, names an unknown model,
        asks for an absurd network or has malformed fields gives one clear FmnistError."""

        def bad(problem: str) -> FmnistError:
            return FmnistError(f"{where}: {problem}")

        if not isinstance(obj, dict) or "model" not in obj:
            raise bad("not an fmnist model description")
        fmt = obj.get("format", MODEL_FORMAT)
        if not isinstance(fmt, str) or not fmt.startswith("fmnist-model/"):
            raise bad(f"not an fmnist model description (format {fmt!r})")
        if fmt != MODEL_FORMAT:
            raise bad(f"format {fmt!r} is newer than this fmnist reads ({MODEL_FORMAT!r}); upgrade fmnist")
        for key, kind in (("model", str), ("model_args", dict), ("class_names", list), ("normalization", dict),
                          ("tta", bool), ("config", dict), ("metrics", dict), ("calibration", dict)):
            if key in obj and not isinstance(obj[key], kind):
                raise bad(f"{key!r} must be a {'JSON object' if kind is dict else kind.__name__}, "
                          f"got {type(obj[key]).__name__}")
        for key in ("class_names", "normalization"):
            if key not in obj:
                raise bad(f"{key!r} is missing")
        names = obj["class_names"]
        if not names or not all(isinstance(n, str) for n in names):
            raise bad("'class_names' must be a non-empty list of strings")
        norm = obj["normalization"]
        mean, std = norm.get("mean"), norm.get("std")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in (mean, std)):
            raise bad(f"normalization needs finite numbers 'mean' and 'std', got {norm!r}")
        if std <= 0:
            raise bad(f"normalization 'std' must be positive, got {std}")
        temperature = obj.get("calibration", {}).get("temperature", 1.0)
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise bad(f"calibration 'temperature' must be a positive number, got {temperature!r}")
        model = LEGACY_NAMES["model"].get(obj["model"], obj["model"])
        model_spec(model)  # an unknown name ends here, naming the known ones
        meta = cls(model=model, model_args=obj.get("model_args", {}), class_names=list(names),
                   normalization=Normalization(float(mean), float(std)), tta=obj.get("tta", False),
                   config=obj.get("config", {}), steps=obj.get("steps", 0),
                   train_seconds=obj.get("train_seconds", 0.0), metrics=obj.get("metrics", {}),
                   calibration=obj.get("calibration", {}),
                   format=fmt, version=str(obj.get("version", "")), input=obj.get("input", dict(INPUT)))
        meta.check_network(where)
        return meta

    def build(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The network this description names, freshly initialised."""
        return build_model(self.model, num_classes=len(self.class_names), **self.model_args).to(device)

    def check_network(self, where: str = META_FILE) -> None:
        """Build the network on the meta device (no memory) to refuse arguments its builder does
        not take and sizes no real model has."""
        try:
            with torch.device("meta"):
                network = build_model(self.model, num_classes=len(self.class_names), **self.model_args)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise FmnistError(f"{where}: model_args {self.model_args!r} do not build {self.model!r} ({first})") from None
        n = count_parameters(network)
        if n > MAX_PARAMETERS:
            raise FmnistError(f"{where}: model_args {self.model_args!r} ask for {n:,} parameters, "
                              f"more than the limit of {MAX_PARAMETERS:,}")


# ----------------------------------------------------------------------------- the folder


class RunDir:
    """A run folder and the files in it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __eq__(self, other) -> bool:
        return isinstance(other, RunDir) and self.path == other.path

    def __hash__(self) -> int:
        return hash(self.path)

    config_path = property(lambda self: self.path / CONFIG_FILE)
    metrics_path = property(lambda self: self.path / METRICS_FILE)
    weights_path = property(lambda self: self.path / WEIGHTS_FILE)
    meta_path = property(lambda self: self.path / META_FILE)
    ood_path = property(lambda self: self.path / OOD_FILE)
    reliability_path = property(lambda self: self.path / RELIABILITY_FILE)
    last_state = property(lambda self: self.path / LAST_STATE)
    best_state = property(lambda self: self.path / BEST_STATE)
    tensorboard_dir = property(lambda self: self.path / TENSORBOARD_DIR)
    explain_dir = property(lambda self: self.path / EXPLAIN_DIR)

    def plot_paths(self) -> list[Path]:
        return [self.path / name for name in PLOT_FILES]

    # --- finding and creating

    @classmethod
    def create(cls, out: str | os.PathLike | None, model: str) -> RunDir:
        """A new run folder, locked (`lock`): `out`, made or found empty, or by default
        runs/<time>-<model>, with -2, -3... when another run took that name in the same second.
        Refused when `out` holds anything: nothing of another run or file is written over."""
        if not out:
            base = Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{model}"
            for n in itertools.count(1):
                run = cls(base if n == 1 else base.with_name(f"{base.name}-{n}"))
                try:
                    run.path.mkdir(parents=True)  # atomic: of two processes, one makes each name
                    return run.lock()
                except FileExistsError:
                    continue
                except OSError as e:
                    raise FmnistError(f"{run}: cannot create run folder ({e.strerror})") from None
        run = cls(out)
        if run.path.exists() and not run.path.is_dir():
            raise FmnistError(f"{run}: exists and is not a folder")
        run.refuse_if_not_empty()
        try:
            run.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise FmnistError(f"{run}: cannot create run folder ({e.strerror})") from None
        run.lock()
        try:
            run.refuse_if_not_empty()  # again under the lock: two processes cannot both find it empty
        except FmnistError:
            run.unlock()
            raise
        return run

    def refuse_if_not_empty(self) -> None:
        """Refuse a folder that holds anything, a run (continue it with --resume) or not."""
        if not self.path.is_dir() or not any(self.path.iterdir()):
            return
        if any(p.exists() for p in (self.metrics_path, self.meta_path, self.last_state)):
            raise FmnistError(f"{self}: already holds a run; choose another --out, or continue it with --resume {self}")
        raise FmnistError(f"{self}: is not empty; choose another --out, or an empty or new folder")

    def lock(self) -> RunDir:
        """Hold an exclusive lock on the folder until `unlock` (or until this process ends, however
        it ends: the kernel releases it, and nothing is left on disk): a second process training
        or resuming the same run is refused."""
        if fcntl is None or getattr(self, "_lock", None) is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise FmnistError(f"{self}: cannot open run folder ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise FmnistError(f"{self}: another fmnist process is training this run; wait for it to end") from None
        self._lock = fd
        return self

    def unlock(self) -> None:
        fd, self._lock = getattr(self, "_lock", None), None
        if fd is not None:
            os.close(fd)

    @classmethod
    def existing(cls, path: str | os.PathLike) -> RunDir:
        run = cls(path)
        if not run.path.is_dir():
            raise FmnistError(f"{run}: no such run folder")
        return run

    @classmethod
    def latest(cls, root: str | os.PathLike = "runs") -> RunDir:
        """The run folder under `root` whose model was written last."""
        root = Path(root)
        runs = [cls(p.parent) for p in root.glob(f"*/{META_FILE}") if (p.parent / WEIGHTS_FILE).is_file()]
        if not runs:
            raise FmnistError(f"no trained model under {root}/; pass --model RUN_DIR")
        return max(runs, key=lambda run: run.meta_path.stat().st_mtime)

    def has_model(self) -> bool:
        return self.meta_path.is_file() and self.weights_path.is_file()

    # --- config.json

    def write_config(self, values: dict[str, Any]) -> None:
        with writing(self.config_path):
            write_json(self.config_path, values)

    def read_config(self) -> dict[str, Any]:
        return read_run_config(self.path)

    # --- model.json

    def read_meta(self) -> ModelMeta:
        if not self.path.is_dir():
            raise FmnistError(f"{self}: no such run folder")
        return ModelMeta.from_json(read_json(self.meta_path), str(self.meta_path))

    def write_meta(self, meta: ModelMeta) -> None:
        with writing(self.meta_path):
            write_json(self.meta_path, meta.to_json())

    # --- metrics.jsonl

    def read_metrics(self) -> list[Record]:
        try:
            lines = self.metrics_path.read_text().splitlines()
        except OSError as e:
            raise FmnistError(f"{self.metrics_path}: cannot read ({e.strerror})") from None
        records = []
        for n, line in enumerate(lines, 1):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise FmnistError(f"{self.metrics_path}: line {n} is not JSON") from None
            records.append(record_from_json(obj, f"{self.metrics_path}: line {n}"))
        return records

    def losses(self) -> list[LossRecord]:
        return [r for r in self.read_metrics() if isinstance(r, LossRecord)]

    def evaluations(self, split: str | None = None) -> list[EvalRecord]:
        return [r for r in self.read_metrics() if isinstance(r, EvalRecord) and split in (None, r.split)]


# ----------------------------------------------------------------------------- the product


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights as contiguous CPU tensors (channels-last weights are not contiguous)."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def check_finite(model: nn.Module, what: str, advice: str = "") -> None:
    """Refuse weights holding NaN or infinity: a step can break them after the last loss was
    computed, and a model that answers NaN must not be saved as the product."""
    for name, tensor in getattr(model, "module", model).state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise FmnistError(f"{what} are not finite ({name} holds NaN or infinity); the model was not saved{advice}")


def save_model(run: RunDir, model: nn.Module, meta: ModelMeta) -> None:
    """Write model.safetensors, then model.json, into the run folder; refused for weights that
    are not finite."""
    check_finite(model, f"{run}: the weights")
    with writing(run.weights_path), atomic_open(run.weights_path) as f:
        f.write(safetensors_save(cpu_state_dict(model), metadata={"model": meta.model}))
    run.write_meta(meta)


def load_network(run_dir: str | os.PathLike | RunDir, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelMeta]:
    """The trained network of a run folder, in eval mode, and its description. For inference
    use `fmnist.inference.predictor.load_model`, which wraps both."""
    run = RunDir(run_dir) if not isinstance(run_dir, RunDir) else run_dir
    meta = run.read_meta()
    path = run.weights_path
    try:
        state = safetensors_load(path.read_bytes())
    except FileNotFoundError:
        raise FmnistError(f"{path}: not found") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise FmnistError(f"{path}: not a valid safetensors file ({e})") from None
    model = meta.build()
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise FmnistError(f"{path}: weights do not fit model {meta.model!r} ({first})") from None
    return model.to(device).eval(), meta


# ----------------------------------------------------------------------------- training state
