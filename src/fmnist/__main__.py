"""`python -m fmnist ...` (and `torchrun -m fmnist train ...`) runs the CLI."""

from fmnist.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
