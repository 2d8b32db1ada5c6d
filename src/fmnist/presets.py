"""Named training recipes: `fmnist train --preset NAME`. A preset sets config fields; a config
file and flags given alongside still override it.

    fmnist train --preset cpu-fast
    fmnist train --preset best --epochs 60
    fmnist train --preset post --init normal   # the post exactly, its N(0, 1) initialisation too
"""

from __future__ import annotations

from typing import Any

from fmnist import FmnistError

PRESETS: dict[str, dict[str, Any]] = {
    # The post, unchanged: the defaults of TrainConfig.
    "post": {},
    # The best test accuracy a 2-core laptop CPU reaches in about 5 minutes of wall time.
    "cpu-fast": {
        "model": "fast",
        "normalize": True,
        "epochs": 10.0,
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
    },
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


# Seconds on one GPU: the same small network and recipe, bigger batches, compiled.
PRESETS["gpu-fast"] = PRESETS["cpu-fast"] | {"epochs": 12.0, "batch_size": 512, "lr": 0.4, "compile": True}


def preset(name: str) -> dict[str, Any]:
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise FmnistError(f"unknown preset {name!r}; choose from: {', '.join(PRESETS)}") from None
