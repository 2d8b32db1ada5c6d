"""Named training recipes: `fmnist train --preset NAME`. A preset sets config fields; a config
file and flags given alongside still override it.

    fmnist train --preset cpu-fast
    fmnist train --preset best --epochs 60
    fmnist train --preset post --init normal   # the post exactly, its N(0, 1) initialisation too
    fmnist presets                             # each one's recipe and what it measured
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fmnist import FmnistError

# The best test accuracy a 2-core laptop CPU reaches in about 5 minutes of wall time.
_CPU_FAST = {
    "model": "fast2",
    "normalize": True,
    "epochs": 17.0,
    "batch_size": 256,
    "optimizer": "sgd",
    "lr": 0.2,
    "weight_decay": 5e-4,
    "schedule": "onecycle",
    "warmup": 0.15,
    "label_smoothing": 0.1,
    "translate": 2,
    "flip": True,
    "tta": True,
}

# The recipe cpu-fast had before: the `fast` network (normalising before pooling) for 10 epochs.
_CPU_FAST_V1 = _CPU_FAST | {"model": "fast", "epochs": 10.0}

PRESETS: dict[str, dict[str, Any]] = {
    # The post's recipe: the defaults of TrainConfig (--init normal adds its initialisation).
    "post": {},
    "cpu-fast": _CPU_FAST,
    "cpu-fast-v1": _CPU_FAST_V1,
    # Seconds on one GPU: the same small network and recipe, bigger batches, compiled.
    "gpu-fast": _CPU_FAST_V1 | {"epochs": 12.0, "batch_size": 512, "lr": 0.4, "compile": True},
    # Top accuracy: a wide ResNet with random erasing, EMA and flip TTA.
    "best": {
        "model": "wrn-28-10",
        "normalize": True,
        "epochs": 40.0,
        "batch_size": 256,
        "optimizer": "sgd",
        "lr": 0.1,
        "weight_decay": 5e-4,
        "schedule": "cosine",
        "warmup": 0.02,
        "label_smoothing": 0.1,
        "translate": 2,
        "flip": True,
        "erase": 0.5,
        "ema": 0.999,
        "tta": True,
        "compile": True,
    },
}


@dataclass(frozen=True)
class About:
    """What `fmnist presets` says of a preset: its recipe in words and what it measured (the
    README's "Measured" section has the commands and the machines)."""

    summary: str
    measured: str


ABOUT = {
    "post": About("the blog post's recipe (the defaults of `fmnist train`) with PyTorch's initialisation; "
                  "add --init normal for the post's own",
                  "88.52% test accuracy, 500 steps in 19.6 s on 2 CPU cores; 81.92% with --init normal "
                  "(the post's initialisation and the post's own figure)"),
    "cpu-fast": About("a small residual network pooling before normalising (`fast2`), 17 epochs of SGD one-cycle "
                      "with shifts, flips and flip test-time augmentation",
                      "93.65 ± 0.02% test accuracy (3 seeds) in 237 s on 2 CPU cores (aimed at >= 94% in <= 300 s)"),
    "cpu-fast-v1": About("cpu-fast before: the `fast` network (normalising before pooling) for 10 epochs",
                         "93.14 ± 0.03% test accuracy (3 seeds) in 152 s on 2 CPU cores, in the same run as cpu-fast's"),
    "gpu-fast": About("cpu-fast-v1's recipe for one GPU: 12 epochs of batch 512, compiled",
                      "93.13 ± 0.13% test accuracy in 6.5 s on one H200 (aimed at >= 94% in <= 3 s)"),
    "best": About("a wide ResNet (WRN-28-10), 40 epochs of SGD cosine, random erasing, EMA, flip test-time "
                  "augmentation, compiled",
                  "95.84% test accuracy in 3.6 min on one H200 (aimed at >= 96% within 10 minutes)"),
}


def preset(name: str) -> dict[str, Any]:
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise FmnistError(f"unknown preset {name!r}; choose from: {', '.join(PRESETS)}") from None
