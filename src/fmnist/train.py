"""`from fmnist.train import train`: training under the name the docs have always used; the
loop lives in `fmnist.training.loop`."""

from fmnist.training.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
