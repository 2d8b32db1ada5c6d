"""Faithfulness of the attributions of `fmnist explain`: on the first test images, how far the
predicted class's probability falls when the 5% of pixels with the highest attribution are set
to black (the background), against 5% of the object's pixels (> 0) chosen at random (the mean
of three draws). Per run and method, with the seconds each method took.

    python bench/explain_faithfulness.py runs/post runs/cpu-fast
    python bench/explain_faithfulness.py runs/post --methods ig --images 1000
"""

from __future__ import annotations

import argparse
import time

from fmnist.data import load_split
from fmnist.explain import METHODS, faithfulness
from fmnist.inference.predictor import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders of trained models")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="attribution methods")
    parser.add_argument("--images", type=int, default=300, help="test images, the first ones (default: 300)")
    parser.add_argument("--fraction", type=float, default=0.05, help="of the pixels removed (default: 0.05)")
    args = parser.parse_args()

    images, _ = load_split("test")
    images = images[: args.images]
    print(f"{'run':<28} {'model':<6} {'mirror':<6} {'accuracy':>8} {'method':<10} "
          f"{'top drop':>8} {'random':>8} {'ratio':>6} {'seconds':>8}")
    for run in args.runs:
        predictor = load_model(run)
        accuracy = predictor.meta.test_accuracy
        for method in args.methods:
            start = time.perf_counter()
            result = faithfulness(predictor, images, method, fraction=args.fraction)
            seconds = time.perf_counter() - start
            print(f"{run:<28} {predictor.meta.model:<6} {str(predictor.meta.tta):<6} "
                  f"{accuracy if accuracy is not None else float('nan'):>8.4f} {method:<10} "
                  f"{result.attributed_drop:>8.3f} {result.random_drop:>8.3f} {result.ratio:>6.1f} {seconds:>8.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
