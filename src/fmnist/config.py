"""Configuration: dataclass defaults, then a TOML or YAML file, then command-line flags,
resolved into one object that is written to the run folder."""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fmnist import FmnistError


def opt(default: Any, help: str):
    """A config field whose help text serves the docs and the command-line flag alike."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """What `fmnist train` does. The defaults are the post's recipe."""

    model: str = opt("seed", "network, a name from `fmnist models`")
    init: str = opt("default", "initialisation: 'default' (PyTorch's) or 'seed' (every weight and bias ~ N(0, 1), as the post)")
    keep_prob: float = opt(0.75, "dropout keep probability of the seed networks (the post's `dropout`)")
    steps: int = opt(500, "optimiser steps (the post's num_steps)")
    epochs: float | None = opt(None, "passes over the training split; overrides --steps when set")
    batch_size: int = opt(128, "images per optimiser step")
    lr: float = opt(0.001, "Adam learning rate")
    seed: int = opt(0, "seed of every random generator: same seed, same numbers on the CPU")
    val_size: int = opt(5000, "images held out of the training file for validation (its first ones, as the post's loader)")
    normalize: bool = opt(False, "standardise pixels by the training mean and std (the post only scales them to 0..1)")
    log_every: int = opt(100, "steps between printed loss lines (the post's 100)")
    eval_every: int = opt(0, "steps between validation evaluations (0: at the end only)")
    device: str = opt("auto", "'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1', ...")
    precision: str = opt("auto", "'fp32', 'bf16' (autocast, weights stay fp32) or 'auto': bf16 where the device computes it natively (recent GPUs, CPUs with AVX-512 BF16 or AMX)")
    threads: int = opt(0, "intra-op CPU threads (0: PyTorch's default, one per core)")
    channels_last: bool = opt(True, "NHWC memory layout, faster convolutions on CPU and GPU")
    data_dir: str | None = opt(None, "folder with the four IDX files (default: searched, see `fmnist download --help`)")
    out: str | None = opt(None, "run folder to create (default: runs/<time>-<model>)")
    plots: bool = opt(True, "write the PNG plots at the end")


def _coerce(name: str, value: Any, default: Any, annotation: str) -> Any:
    """Check a value from a config file against the field's type."""
    kinds = {"int": int, "float": (int, float), "bool": bool, "str": str}
    base = annotation.split("|")[0].strip()
    if value is None and "None" in annotation:
        return None
    expected = kinds.get(base)
    if expected is None:
        return value
    if isinstance(value, bool) and base != "bool":
        raise FmnistError(f"config field {name!r}: expected {base}, got {value!r}")
    if not isinstance(value, expected):
        raise FmnistError(f"config field {name!r}: expected {base}, got {value!r}")
    return float(value) if base == "float" else value


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


def resolve(cls, file: str | os.PathLike | None = None, **overrides):
    """Defaults of `cls`, updated by a config file, updated by explicit overrides (not None)."""
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    if file is not None:
        for key, value in read_config_file(file).items():
            key = key.replace("-", "_")
            if key not in known:
                raise FmnistError(f"{file}: unknown config field {key!r}")
            values[key] = _coerce(key, value, known[key].default, str(known[key].type))
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(values) - set(known)
    if unknown:
        raise FmnistError(f"unknown config field {sorted(unknown)[0]!r}")
    return cls(**values)


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)
