"""The `fmnist` command: it parses flags and dispatches to the library, nothing more.

    fmnist --help
    fmnist train --help
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from fmnist import FmnistError, __version__
from fmnist.config import TrainConfig, resolve


def _flag_type(annotation: str):
    base = annotation.split("|")[0].strip()
    return {"int": int, "float": float, "str": str}[base]


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per config field (`batch_size` -> `--batch-size`), its help from the field.
    Every default is None, so only the flags a user gives override the config file."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        annotation = str(f.type)
        if annotation == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=_flag_type(annotation), default=None, help=help_text,
                                metavar=f.name.upper())


def config_from_args(cls, args: argparse.Namespace):
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return resolve(cls, args.config, **overrides)


# ----------------------------------------------------------------------------- commands


def cmd_download(args) -> int:
    from fmnist.data import download

    download(args.data_dir, mirror=args.mirror, progress=not args.quiet)
    return 0


def cmd_train(args) -> int:
    from fmnist.train import train

    cfg = config_from_args(TrainConfig, args)
    train(cfg, progress=not args.quiet)
    return 0


def cmd_evaluate(args) -> int:
    from fmnist.evaluate import evaluate_run, format_evaluation

    result = evaluate_run(args.run_dir, args.data_dir, args.device)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(format_evaluation(result))
    return 0


def cmd_plot(args) -> int:
    from fmnist.plots import plot_run

    for path in plot_run(args.run_dir, args.data_dir):
        print(path)
    return 0


def cmd_models(args) -> int:
    from fmnist.models import build_model, count_parameters, flops_per_image, model_names, model_spec

    rows = []
    for name in model_names():
        model = build_model(name)
        rows.append((name, count_parameters(model), flops_per_image(model), model_spec(name).description))
    if args.json:
        print(json.dumps([{"name": n, "parameters": p, "flops_per_image": f, "description": d}
                          for n, p, f, d in rows]))
        return 0
    print(f"{'model':<14} {'params':>10} {'MFLOP/img':>10}  description")
    for name, params, flops, description in rows:
        print(f"{name:<14} {params:>10,} {flops / 1e6:>10.1f}  {description}")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmnist",
        description="Train, evaluate and plot ConvNets on Fashion-MNIST.",
    )
    parser.add_argument("--version", action="version", version=f"fmnist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data_dir_help = "folder with the four IDX files (default: search $FMNIST_DATA, ./data/fashion, ~/.cache/fmnist, /usr/share/datasets/fashion-mnist)"

    p = sub.add_parser("download", help="fetch and verify the dataset",
                       description="Fetch the four Fashion-MNIST files, verify their checksums and "
                       "write each atomically. Data is looked for in: --data-dir, $FMNIST_DATA, "
                       "./data/fashion, ~/.cache/fmnist, /usr/share/datasets/fashion-mnist.")
    p.add_argument("--data-dir", help="where to put the files (default: ~/.cache/fmnist)")
    p.add_argument("--mirror", help="base URL to download from (default: $FMNIST_MIRROR or the official mirror)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("train", help="train a network and write a run folder",
                       description="Train a network; the defaults reproduce the post. Flags override "
                       "--config, which overrides the defaults.")
    p.add_argument("--config", metavar="FILE", help="TOML, YAML or JSON file of config fields")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test accuracy, per-class accuracy, confusion matrix",
                       description="Evaluate a run's model on the 10,000 test images.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `fmnist train`")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--data-dir", help=data_dir_help)
    p.add_argument("--device", default="cpu", help="device to evaluate on (default: cpu)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("plot", help="redraw a run's plots",
                       description="Write cost.png, samples.png, confusion_matrix.png and "
                       "misclassified.png into a run folder.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `fmnist train`")
    p.add_argument("--data-dir", help=data_dir_help)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("models", help="list the registered networks",
                       description="List the registered networks with parameters and FLOPs per image.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FmnistError as e:
        print(f"fmnist: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fmnist: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
