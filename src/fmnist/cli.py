"""The `fmnist` command: it parses flags and dispatches to the library, nothing more.

    fmnist --help
    fmnist train --help
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, get_args

from fmnist import FmnistError, __version__
from fmnist.config import (
    Attribution,
    Embedding,
    ServeConfig,
    TrainConfig,
    choices,
    field_type,
    resolve,
    resolve_train,
)


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per config field (`batch_size` -> `--batch-size`), its help, type and choices
    from the field. Every default is None, so only the flags a user gives override the config
    file (or the saved config of a resumed run)."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        kind, _ = field_type(cls, f.name)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            allowed = choices(cls, f.name)
            parser.add_argument(flag, type=kind, default=None, help=help_text, choices=allowed,
                                metavar=None if allowed else f.name.upper())


def config_from_args(cls, args: argparse.Namespace, file=None):
    """The config of `cls` from its defaults, a config file and the flags given."""
    return resolve(cls, file, **{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


# ----------------------------------------------------------------------------- commands


def cmd_download(args) -> int:
    from fmnist.data import download

    download(args.data_dir, mirror=args.mirror, progress=not args.quiet)
    return 0


def cmd_train(args) -> int:
    from fmnist.distributed import launch, launched_by_torchrun
    from fmnist.train import train

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    cfg = resolve_train(args.config, **overrides)  # with --resume: the run's saved config
    if cfg.nproc > 1 and not launched_by_torchrun():
        return launch(cfg, quiet=args.quiet)
    train(cfg, progress=not args.quiet)
    return 0


def format_evaluation(result) -> str:
    """The evaluation as a table: accuracy, per-class accuracy, confusion matrix."""
    names = list(result.per_class)
    width = max(len(n) for n in names)
    lines = [f"test accuracy {result.accuracy:.4f}   loss {result.loss:.4f}", ""]
    lines.append(f"{'class':<{width}}  accuracy")
    for name, acc in result.per_class.items():
        lines.append(f"{name:<{width}}  {acc:8.4f}")
    lines += ["", "confusion matrix (rows: true, columns: predicted)"]
    header = " " * (width + 1) + " ".join(f"{i:>5}" for i in range(len(names)))
    lines.append(header)
    for i, (name, row) in enumerate(zip(names, result.confusion_matrix, strict=True)):
        lines.append(f"{name:<{width}} " + " ".join(f"{c:>5}" for c in row) + f"   ({i})")
    return "\n".join(lines)


def cmd_evaluate(args) -> int:
    from fmnist.evaluate import evaluate_run

    result = evaluate_run(args.run_dir, args.data_dir, args.device, args.precision)
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
    from fmnist.models import (
        build_model,
        count_parameters,
        flops_per_image,
        model_names,
        model_spec,
    )

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


def format_predictions(result: dict[str, Any]) -> str:
    """A small table per image: rank, class, probability and a bar."""
    lines = []
    for entry in result["predictions"]:
        lines.append(entry["file"] or "<image>")
        width = max(len(t["label"]) for t in entry["top"])
        for rank, t in enumerate(entry["top"], 1):
            bar = "#" * round(20 * t["probability"])
            lines.append(f"  {rank}. {t['label']:<{width}}  {t['probability']:6.1%}  {bar}")
    return "\n".join(lines)


def cmd_predict(args) -> int:
    from fmnist.predict import predict_files
    from fmnist.run import RunDir

    run_dir = args.model or RunDir.latest("runs").path
    result = predict_files(run_dir, args.images, top_k=args.top_k, save_input=args.save_input)
    if args.json:
        print(json.dumps(result))
        return 0
    note = "" if args.model else " (the most recent run under ./runs)"
    print(f"model: {run_dir}{note}")
    print(format_predictions(result))
    return 0


def cmd_explain(args) -> int:
    from fmnist.explain import explain_run

    if args.model:  # `--model RUN_DIR`, as predict takes it: every positional is an image
        run_dir, images = args.model, [args.run_dir] * (args.run_dir is not None) + args.images
    elif args.run_dir:
        run_dir, images = args.run_dir, args.images
    else:
        raise FmnistError("explain: give the run folder, RUN_DIR or --model RUN_DIR")
    result = explain_run(run_dir, images, method=args.method, target=args.target, out=args.out,
                         embedding=args.embedding, map_size=args.map_size, count=args.count,
                         run_pictures=args.run_pictures, top_k=args.top_k, data_dir=args.data_dir)
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    for path in result.paths:
        print(path)
    return 0


def cmd_export(args) -> int:
    from fmnist.export import export_onnx

    print(export_onnx(args.model, args.out, quantize=args.quantize, data_dir=args.data_dir))
    return 0


def cmd_serve(args) -> int:
    from fmnist.run import RunDir
    from fmnist.serve import serve

    run_dir = args.model or RunDir.latest("runs").path
    serve(run_dir, config_from_args(ServeConfig, args))
    return 0


def cmd_report(args) -> int:
    from fmnist.report import run_ladder

    path = run_ladder(args.out, quick=args.quick, include_best=args.include_best, data_dir=args.data_dir,
                      device=args.device, progress=not args.quiet)
    print(f"report written to {path}")
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
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="fp32 (exact, the default), bf16 autocast, or auto (bf16 where native)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("plot", help="redraw a run's plots",
                       description="Write cost.png, samples.png, confusion_matrix.png and "
                       "misclassified.png into a run folder.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `fmnist train`")
    p.add_argument("--data-dir", help=data_dir_help)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("report", help="train the ladder from the post to the best recipe and report",
                       description="Train a sequence of runs from the post's recipe upwards, one change "
                       "at a time, and write report.md with each step's accuracy, time and curves. "
                       "Finished runs in the report folder are reused.")
    p.add_argument("--out", default="reports/ladder", help="report folder (default: reports/ladder)")
    p.add_argument("--quick", action="store_true", help="short runs: a few minutes on a laptop CPU")
    p.add_argument("--include-best", action="store_true", help="add the wide ResNet rung (hours on a CPU; for a GPU)")
    p.add_argument("--device", default="auto", help="device to train on (default: auto)")
    p.add_argument("--data-dir", help=data_dir_help)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("models", help="list the registered networks",
                       description="List the registered networks with parameters and FLOPs per image.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("predict", help="classify pictures, .npy or IDX files with a trained model",
                       description="Classify PNG, JPEG, WebP, BMP or GIF pictures (any size, colour "
                       "or grey: each is turned into a Fashion-MNIST-like 28x28 image first) and "
                       ".npy or IDX batches of 28x28 uint8 images.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="picture, .npy or IDX file")
    p.add_argument("--model", metavar="RUN_DIR", help="run folder of the model (default: the most recent under ./runs)")
    p.add_argument("--top-k", type=int, default=3, help="how many classes to show per image (default: 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--save-input", metavar="DIR", help="write the 28x28 image the model saw, per input, as PNG into DIR")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("explain", help="attribution heatmaps and pictures of what a model learnt",
                       description="For each image (pictures, .npy or IDX files; without any, 8 test "
                       "images, half of them misclassified): the 28x28 input, an attribution heatmap "
                       "for the predicted class over it and the top classes, as PNG. For the run: the "
                       "first convolution's filters, one image's activations, a 2-D map of the test "
                       "set's penultimate features, the most confused class pairs. Written into "
                       "RUN_DIR/explain/ (or --out). Needs the explain extra.")
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a run folder written by `fmnist train`")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="picture, .npy or IDX file (default: test images)")
    p.add_argument("--model", metavar="RUN_DIR", help="the run folder, as predict takes it (then every positional is an image)")
    p.add_argument("--method", default="ig", choices=get_args(Attribution),
                   help="ig: integrated gradients from the black image (default); gradcam: Grad-CAM on "
                   "the last convolution; occlusion: a 3x3 black patch slid over the image")
    p.add_argument("--target", metavar="CLASS", help="explain this class (name or index) instead of the predicted one")
    p.add_argument("--out", metavar="DIR", help="folder to write into (default: RUN_DIR/explain)")
    p.add_argument("--json", action="store_true", help="print one JSON object (top classes, heatmaps, paths) instead of the paths")
    p.add_argument("--top-k", type=int, default=3, help="classes shown per image (default: 3)")
    p.add_argument("--count", type=int, default=8, help="test images explained when no image is given (default: 8)")
    p.add_argument("--run-pictures", action=argparse.BooleanOptionalAction, default=True,
                   help="also draw the run's filters, activations, feature map and confused pairs (default: on)")
    p.add_argument("--embedding", default="umap", choices=get_args(Embedding),
                   help="the feature map's method: umap (umap-learn) or tsne (scikit-learn) (default: umap)")
    p.add_argument("--map-size", type=int, default=3000, help="test images in the feature map (default: 3000)")
    p.add_argument("--data-dir", help=data_dir_help)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("export", help="export a trained model to ONNX",
                       description="Write the model as ONNX: input float32 pixels 0..255 of shape "
                       "(N, 1, 28, 28), normalisation included; outputs logits and probabilities; "
                       "class names in the metadata. Needs the export extra.")
    p.add_argument("--model", metavar="RUN_DIR", required=True, help="run folder of the model")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="file format (default: onnx)")
    p.add_argument("--out", metavar="FILE", required=True, help="file to write, e.g. model.onnx")
    p.add_argument("--quantize", choices=["int8"], help="write a static int8 model (activation "
                   "ranges calibrated on 1,000 training images): several times faster on CPUs")
    p.add_argument("--data-dir", help="where the training images for calibration are (default: searched)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="HTTP prediction service with a web page",
                       description="Serve a model over HTTP: POST /v1/predict (multipart field "
                       "'file'), GET /v1/classes, GET /healthz, the OpenAPI page at /docs and a "
                       "web page at /. Needs the serve extra.")
    p.add_argument("--model", metavar="RUN_DIR", help="run folder of the model (default: the most recent under ./runs)")
    add_config_flags(p, ServeConfig)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Under torchrun every process meets the same error: rank 0 alone says it.
    say = os.environ.get("RANK", "0") == "0"
    try:
        return args.func(args)
    except FmnistError as e:
        if say:
            print(f"fmnist: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if say:
            print("fmnist: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
