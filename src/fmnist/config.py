"""Configuration: dataclass defaults, then a TOML or YAML file, then command-line flags,
resolved into one object that is written to the run folder."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

from fmnist import FmnistError
from fmnist.presets import ABOUT, PRESETS, About, preset

# Allowed values, declared once: the CLI's choices and the checks below come from these.
Optimizer = Literal["adam", "adamw", "sgd"]
Schedule = Literal["constant", "cosine", "onecycle"]
Precision = Literal["auto", "fp32", "bf16"]
Init = Literal["default", "normal"]
LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]
Attribution = Literal["occlusion", "ig", "gradcam"]  # fmnist explain --method
Embedding = Literal["umap", "tsne"]  # fmnist explain --embedding

# Decoded pixels of one image (after JPEG's draft scaling), checked from its header: <= 100 MB RGBA.
MAX_PIXELS = 25_000_000

# Names earlier versions wrote into run folders, read as today's.
LEGACY_NAMES = {"model": {"seed": "post", "seed-bn": "post-bn"}, "init": {"seed": "normal"},
                "preset": {"seed": "post"}}


def opt(default: Any, help: str, *, within: str | None = None, group: str | None = None,
        choices: tuple[str, ...] | None = None):
    """A config field whose help text serves the docs and the command-line flag alike.
    `within`: the values a number may take, as an interval ("(0, 1]", "[0, inf)"), checked by
    `check_ranges` and shown in the help; `group`: its heading in `--help`; `choices`: the
    names a str field allows, where they are not a Literal type (they are declared elsewhere)."""
    metadata = {"help": help, "group": group, "choices": choices,
                "within": Range.parse(within) if within else None}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Range:
    """An interval of numbers, written as in mathematics: "(0, 1]", "[0, inf)", "[1, 65535]"."""

    low: float
    high: float
    low_open: bool
    high_open: bool

    @classmethod
    def parse(cls, text: str) -> Range:
        low, high = (part.strip() for part in text.strip()[1:-1].split(","))
        return cls(float(low), float(high), text.strip()[0] == "(", text.strip()[-1] == ")")

    def __contains__(self, value: float) -> bool:  # NaN lies in no range
        above = self.low < value if self.low_open else self.low <= value
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        """'> 0', '>= 1' or 'in (0, 1]': how the help and the errors say it."""
        low, high = _number(self.low), _number(self.high)
        if self.high == float("inf"):
            return f"{'>' if self.low_open else '>='} {low}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def flag_name(name: str) -> str:
    """The command-line flag of a config field: `batch_size` -> `--batch-size`."""
    return "--" + name.replace("_", "-")


def choices(cls, name: str) -> tuple[str, ...] | None:
    """The values a Literal-typed field of `cls` (or one given `choices=`) allows; None for
    other fields."""
    declared = next(f for f in fields(cls) if f.name == name).metadata.get("choices")
    if declared:
        return tuple(declared)
    args = get_args(get_type_hints(cls)[name])
    literal = [a for a in args if isinstance(a, str)]
    return tuple(literal) or None


def check_choices(config) -> None:
    """Refuse a Literal-typed field holding a value outside its choices."""
    for f in fields(config):
        allowed = choices(type(config), f.name)
        value = getattr(config, f.name)
        if allowed and value is not None and value not in allowed:
            raise FmnistError(f"unknown {f.name.replace('_', ' ')} {value!r}; choose from: {', '.join(allowed)}")


def check_ranges(config) -> None:
    """Refuse a number outside its field's `within` interval, naming the flag and the range."""
    for f in fields(config):
        allowed, value = f.metadata.get("within"), getattr(config, f.name)
        if allowed is not None and value is not None and value not in allowed:
            shown = _number(value) if isinstance(value, int | float) else repr(value)
            finite = "a finite number " if isinstance(value, float) and not math.isfinite(value) else ""
            raise FmnistError(f"{flag_name(f.name)} must be {finite}{allowed.describe()}, got {shown}")


# Headings of `fmnist train --help`, in order; each field of TrainConfig names one as its group.
TRAIN_GROUPS = ("data", "model", "optimisation", "augmentation", "evaluation", "checkpoints and resume",
                "device and distributed", "output")


@dataclass
class TrainConfig:
    """What `fmnist train` does. The defaults are the post's recipe."""

    preset: str | None = opt(None, "named recipe, listed by `fmnist presets`; --config and flags override its fields",
                             choices=tuple(PRESETS))
    model: str = opt("post", "network, a name from `fmnist models`", group="model")
    init: Init = opt("default", "initialisation: 'default' (PyTorch's) or 'normal' (every weight and bias ~ N(0, 1), the post's tf.random_normal)",
                     group="model")
    keep_prob: float = opt(0.75, "dropout keep probability of the post's networks (the post's `dropout`)",
                           within="(0, 1]", group="model")
    steps: int = opt(500, "optimiser steps (the post's num_steps)", within="[1, inf)", group="optimisation")
    epochs: float | None = opt(None, "passes over the training split; overrides --steps when set", within="(0, inf)",
                               group="optimisation")
    batch_size: int = opt(128, "images per optimiser step", within="[1, inf)", group="optimisation")
    lr: float = opt(0.001, "learning rate (the peak, with a schedule)", within="(0, inf)", group="optimisation")
    optimizer: Optimizer = opt("adam", "'adam' (the post), 'adamw' or 'sgd' (with Nesterov momentum)", group="optimisation")
    momentum: float = opt(0.9, "SGD momentum", within="[0, 1)", group="optimisation")
    weight_decay: float = opt(0.0, "weight decay (decoupled from the gradient for adamw)", within="[0, inf)",
                              group="optimisation")
    schedule: Schedule = opt("constant", "learning rate over the run: 'constant' (the post), 'cosine' (to 0), 'onecycle' (linear up to --lr, then linearly down to 0)",
                             group="optimisation")
    warmup: float = opt(0.0, "fraction of the steps the learning rate rises from 0 (the peak of onecycle)",
                        within="[0, 1)", group="optimisation")
    label_smoothing: float = opt(0.0, "weight of the uniform distribution mixed into the targets", within="[0, 1)",
                                 group="optimisation")
    grad_clip: float = opt(0.0, "clip the gradients' total norm to this (0: no clipping)", within="[0, inf)",
                           group="optimisation")
    translate: int = opt(0, "shift each image by up to this many pixels", within="[0, 27]", group="augmentation")
    flip: bool = opt(False, "mirror half the images left-right", group="augmentation")
    erase: float = opt(0.0, "probability of erasing a random rectangle", within="[0, 1]", group="augmentation")
    photo: float = opt(0.0, "probability of making an image look like a prepared photo (mirror, rotation up to 15 degrees, stretch, the preparation's crop and resize, gamma, blur)",
                       within="[0, 1]", group="augmentation")
    ema: float = opt(0.0, "decay of an exponential moving average of the weights, which is evaluated and saved (0: off)",
                     within="[0, 1)", group="optimisation")
    tta: bool = opt(False, "test-time augmentation: average the logits of each image and its mirror image",
                    group="evaluation")
    compile: bool = opt(False, "torch.compile the network for training", group="device and distributed")
    seed: int = opt(0, "seed of every random generator: same seed, same numbers on the CPU", within="[0, 4294967295]")
    val_size: int = opt(5000, "images held out of the training file for validation (its first ones, as the post's loader)",
                        within="[0, inf)", group="data")
    normalize: bool = opt(False, "standardise pixels by the training mean and std (the post only scales them to 0..1)",
                          group="data")
    photos: str | None = opt(None, "folder of labelled real photos (DIR/train/<label>/*.jpg, optional DIR/validation/) "
                             "mixed into training with --photo-share; unset: $FMNIST_PHOTOS", group="data")
    photo_share: float = opt(0.0, "share of each batch drawn from the prepared --photos (0: the dataset alone)",
                             within="[0, 1)", group="data")
    photo_balance: float = opt(0.0, "how evenly the photos' labels are drawn: a photo is drawn in proportion to "
                               "its label's count to the power minus this (0: as they come, 1: each label as often)",
                               within="[0, 1]", group="data")
    photo_views: int = opt(1, "views of each training photo: as taken, and the others as someone else might have "
                           "taken it (framed closer, turned, other light and colour), each prepared", within="[1, inf)",
                           group="data")
    log_every: int = opt(100, "steps between printed loss lines (the post's 100)", within="[1, inf)", group="output")
    eval_every: int = opt(0, "steps between validation evaluations (0: at the end only)", within="[0, inf)",
                          group="evaluation")
    eval_test: bool = opt(False, "also evaluate the test set at each --eval-every, for time-to-accuracy benchmarks (choose settings on validation)",
                          group="evaluation")
    device: str = opt("auto", "'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1', ...",
                      group="device and distributed")
    precision: Precision = opt("auto", "'fp32', 'bf16' (autocast, weights stay fp32) or 'auto': bf16 where the device computes it natively (recent GPUs, CPUs with AVX-512 BF16 or AMX)",
                               group="device and distributed")
    threads: int = opt(0, "intra-op CPU threads (0: PyTorch's default, one per core)", within="[0, inf)",
                       group="device and distributed")
    channels_last: bool = opt(True, "NHWC memory layout, faster convolutions on CPU and GPU", group="device and distributed")
    data_dir: str | None = opt(None, "folder with the four IDX files (default: searched, see `fmnist download --help`)",
                               group="data")
    out: str | None = opt(None, "run folder to create (default: runs/<time>-<model>; never overwritten)", group="output")
    plots: bool = opt(True, "write the PNG plots at the end", group="output")
    tensorboard: bool = opt(False, "also write TensorBoard event files into the run folder (needs the tensorboard extra)",
                            group="output")
    # 200 writes 2 checkpoints in the post's 500 steps, plus the final one; each costs a copy of
    # the weights and optimiser state, the file itself is written on a background thread.
    checkpoint_every: int = opt(200, "steps between checkpoints of the training state (last.pt) for --resume; 0: only at the end and when stopped",
                                within="[0, inf)", group="checkpoints and resume")
    resume: str | None = opt(None, "run folder to continue from its last checkpoint, with its saved config; only --steps/--epochs (more), logging, checkpoint, device, threads, data-dir, nproc and plots flags may be given alongside",
                             group="checkpoints and resume")
    nproc: int = opt(1, "processes to train on with DistributedDataParallel on this machine (one per GPU, or CPU processes), launched through torchrun; ignored under torchrun",
                     within="[1, inf)", group="device and distributed")

    def validate(self) -> None:
        """Refuse settings that cannot work, before any data is read or process started: a
        choice or a number outside what its field allows (one line naming the flag and the
        allowed values), a batch that does not split over the processes. The network's name is
        checked against the registry by `fmnist.training` (the registry needs torch)."""
        check_choices(self)
        check_ranges(self)
        if self.batch_size % self.nproc:
            raise FmnistError(f"--batch-size {self.batch_size} does not split into {self.nproc} equal shares (--nproc)")
        if self.tensorboard:
            try:
                import tensorboard  # noqa: F401  (an optional extra)
            except ImportError:
                raise FmnistError("--tensorboard needs the tensorboard extra: pip install 'fmnist[tensorboard]'") from None

    @property
    def model_args(self) -> dict[str, Any]:
        """The arguments the network is built with besides the number of classes."""
        return {"keep_prob": self.keep_prob} if self.model.startswith("post") else {}


def field_type(cls, name: str) -> tuple[type, bool]:
    """The plain type of a field (int, float, bool or str; a Literal is str) and whether it may
    be None."""
    hint = get_type_hints(cls)[name]
    args = get_args(hint)
    optional = type(None) in args
    if args and all(isinstance(a, str) for a in args):  # Literal["a", "b"]
        return str, optional
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    return base, optional


def _coerce(cls, name: str, value: Any) -> Any:
    """Check a value from a config file against the field's type."""
    base, optional = field_type(cls, name)
    if value is None and optional:
        return None
    expected = (int, float) if base is float else base
    if (isinstance(value, bool) and base is not bool) or not isinstance(value, expected):
        raise FmnistError(f"config field {name!r}: expected {base.__name__}, got {value!r}")
    return float(value) if base is float else value


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A flat mapping of field names to values from a .toml, .yaml/.yml or .json file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise FmnistError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise FmnistError(f"{path}: config must be .toml, .yaml, .yml or .json")
    except FmnistError:
        raise
    except Exception as e:  # each parser has its own error type
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FmnistError(f"{path}: invalid config: {first}") from None
    if not isinstance(data, dict):
        raise FmnistError(f"{path}: config must be a mapping of field = value")
    return data


def _explicit_values(cls, file: str | os.PathLike | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The values a config file and explicit overrides (not None) set, checked against `cls`."""
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    if file is not None:
        for key, value in read_config_file(file).items():
            if not isinstance(key, str):
                raise FmnistError(f"{file}: config keys must be field names, got {key!r}")
            key = key.replace("-", "_")
            if key not in known:
                raise FmnistError(f"{file}: unknown config field {key!r}")
            values[key] = _coerce(cls, key, value)
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(values) - set(known)
    if unknown:
        raise FmnistError(f"unknown config field {sorted(unknown)[0]!r}")
    return values


def resolve(cls, file: str | os.PathLike | None = None, **overrides):
    """Defaults of `cls`, updated by a config file, updated by explicit overrides (not None)."""
    return cls(**_explicit_values(cls, file, overrides))


# What a resumed run may change: how long it trains, how it reports, where it runs. Everything
# else would make it a different run than the one its checkpoint belongs to.
RESUME_MAY_CHANGE = ("steps", "epochs", "log_every", "eval_every", "eval_test", "checkpoint_every", "plots",
                     "tensorboard", "device", "threads", "data_dir", "photos", "nproc")


# Fields that say where and how a run is carried out or reported, not what it trains: two runs
# that differ only in these follow the same recipe.
NOT_RECIPE = ("out", "resume", "preset", "device", "threads", "data_dir", "photos", "nproc", "compile", "channels_last",
              "plots", "tensorboard", "log_every", "eval_every", "eval_test", "checkpoint_every")


def recipe(values: dict[str, Any]) -> dict[str, Any]:
    """The fields of a TrainConfig (as a dict, names upgraded) that decide what is trained. A
    field an older run's config lacks takes its default: an option is added with the default
    that trains as before, so that run follows the same recipe as one saved today."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in (defaults | upgrade_names(values)).items() if k not in NOT_RECIPE}


def check_resumable(saved: dict[str, Any], values: dict[str, Any]) -> None:
    """Refuse values that differ from a run's saved config outside RESUME_MAY_CHANGE, and
    shorter training than the run was set for."""
    for name, value in values.items():
        if name in ("resume", "out") or name not in saved or value == saved[name]:
            continue
        flag = "--" + name.replace("_", "-")
        if name not in RESUME_MAY_CHANGE:
            allowed = ", ".join("--" + n.replace("_", "-") for n in RESUME_MAY_CHANGE)
            raise FmnistError(f"{flag} {value} conflicts with the resumed run's {saved[name]}; "
                              f"a resumed run may only change {allowed}")
        if name in ("steps", "epochs") and saved[name] is not None and (value is None or value < saved[name]):
            raise FmnistError(f"{flag} {value} would shorten the resumed run ({name} {saved[name]}); give more, not fewer")


CONFIG_FILE = "config.json"  # in a run folder: the resolved TrainConfig (`fmnist.run.RunDir.read_config`)


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run folder's config.json as written (the one reader of that file)."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise FmnistError(f"{path}: not found; {run_dir} is not a run folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FmnistError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(saved, dict):
        raise FmnistError(f"{path}: not an fmnist run config")
    return saved


def read_saved_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The fields of TrainConfig in a run folder's config.json."""
    if not Path(run_dir).is_dir():
        raise FmnistError(f"{run_dir}: no such run folder to resume")
    saved = read_run_config(run_dir)
    known = {f.name for f in fields(TrainConfig)}
    return upgrade_names({k: v for k, v in saved.items() if k in known})


def upgrade_names(values: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the names earlier versions used (model "seed", init "seed") renamed."""
    return values | {k: LEGACY_NAMES[k].get(v, v) for k, v in values.items()
                     if k in LEGACY_NAMES and isinstance(v, str)}


def resolve_train(file: str | os.PathLike | None = None, **overrides) -> TrainConfig:
    """`resolve(TrainConfig, ...)`; with `resume`, the base is the run's saved config.json
    instead of the defaults, and only RESUME_MAY_CHANGE fields may differ from it."""
    values = _explicit_values(TrainConfig, file, overrides)
    run_dir = values.get("resume")
    if run_dir is None:
        base = preset(values["preset"]) if values.get("preset") else {}
        return TrainConfig(**(base | values))
    if values.get("out") is not None and Path(values["out"]).resolve() != Path(run_dir).resolve():
        raise FmnistError(f"--out {values['out']} conflicts with --resume {run_dir}: a resumed run continues in its own folder")
    saved = read_saved_config(run_dir)
    check_resumable(saved, values)
    try:
        return TrainConfig(**(saved | values | {"out": str(run_dir), "resume": str(run_dir)}))
    except TypeError as e:
        raise FmnistError(f"{Path(run_dir) / CONFIG_FILE}: not an fmnist run config ({e})") from None


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


# ----------------------------------------------------------------------------- using a model


@dataclass
class PredictConfig:
    """What `fmnist predict` does with its files, besides which model it uses."""

    top_k: int = opt(3, "how many classes to show per image", within="[1, inf)")
    save_input: str | None = opt(None, "write the 28x28 image the model saw, per input, as PNG into DIR "
                                 "(batch.npy[1] -> DIR/batch-1.png) and say where")

    def validate(self) -> None:
        check_ranges(self)


@dataclass
class ExplainConfig:
    """What `fmnist explain` draws, besides which model and images."""

    method: Attribution = opt("occlusion", "occlusion: a 3x3 black patch slid over the image; ig: integrated "
                              "gradients from the black image; gradcam: Grad-CAM on the last convolution; "
                              "occlusion, the default, is the most faithful")
    target: str | None = opt(None, "explain this class (name or index) instead of the predicted one")
    out: str | None = opt(None, "folder to write into (default: RUN_DIR/explain)")
    top_k: int = opt(3, "classes shown per image", within="[1, inf)")
    count: int = opt(8, "test images explained when no image is given", within="[1, inf)")
    run_pictures: bool = opt(True, "also draw the run's filters, activations, feature map and confused pairs")
    embedding: Embedding = opt("umap", "the feature map's method: umap (umap-learn) or tsne (scikit-learn)")
    map_size: int = opt(3000, "test images in the feature map", within="[10, inf)")
    data_dir: str | None = opt(None, "folder with the four IDX files (default: searched)")

    def validate(self) -> None:
        check_choices(self)
        check_ranges(self)


# ----------------------------------------------------------------------------- presets, shown


def preset_flags(values: dict[str, Any]) -> str:
    """Config values as the flags that set them: {"flip": True, "lr": 0.2} -> "--flip --lr 0.2"."""
    words = []
    for name, value in values.items():
        if isinstance(value, bool):
            words.append(flag_name(name) if value else "--no-" + flag_name(name)[2:])
        else:
            words.append(f"{flag_name(name)} {value:g}" if isinstance(value, float) else f"{flag_name(name)} {value}")
    return " ".join(words)


# The fields that make the post's recipe, shown for the preset that changes none of them.
POST_RECIPE = ("model", "init", "steps", "batch_size", "optimizer", "lr", "keep_prob")


def preset_rows() -> list[tuple[str, dict[str, Any], About]]:
    """(name, the fields it sets, what it measured) of each preset; the post's row shows the
    defaults that make its recipe, since it changes none of them."""
    defaults = TrainConfig()
    return [(name, PRESETS[name] or {f: getattr(defaults, f) for f in POST_RECIPE}, ABOUT[name]) for name in PRESETS]


def format_presets() -> str:
    """`fmnist presets`: each preset's summary, its recipe as flags and what it measured."""
    lines = []
    for name, values, about in preset_rows():
        lines += [f"{name}: {about.summary}", f"  recipe:   {preset_flags(values)}", f"  measured: {about.measured}", ""]
    lines.append("Train one with `fmnist train --preset NAME`; flags given alongside override its fields.")
    return "\n".join(lines)
