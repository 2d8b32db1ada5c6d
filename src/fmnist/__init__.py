"""fmnist: train, evaluate, explain and serve ConvNets for Fashion-MNIST."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fmnist")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"


class FmnistError(Exception):
    """A problem the user can fix (a bad file, flag or path): the CLI prints it as one line."""
