"""Networks and the registry that builds them by name.

- `registry`: `register_model`, `build_model`, parameter and FLOP counts, `MirrorAverage`.
- `layers`: Conv2d, Dense and Dropout with faster fp32 CPU paths, equal to torch's.
- `networks`: every registered network (a new one is one decorated function there).
"""

from fmnist.models import networks  # noqa: F401  (registers the networks)
from fmnist.models.registry import (
    MirrorAverage,
    ModelSpec,
    build_model,
    count_parameters,
    describe_models,
    flops_per_image,
    format_models,
    init_weights,
    model_names,
    model_spec,
    register_model,
)

__all__ = ["MirrorAverage", "ModelSpec", "build_model", "count_parameters", "describe_models", "format_models", "flops_per_image", "init_weights",
           "model_names", "model_spec", "register_model"]
