"""The `fmnist` command: it parses flags and dispatches to the library, nothing more.

    fmnist --help
    fmnist train --help
    fmnist presets

Commands that use a trained model take it as `--model RUN_DIR` (default: the newest run under
./runs, named on stderr). A mistake ends in one line and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import sys
from typing import get_args

from fmnist import FmnistError, __version__
from fmnist.config import (
    TRAIN_GROUPS,
    ExplainConfig,
    Precision,
    PredictConfig,
    TrainConfig,
    choices,
    field_type,
    flag_name,
    resolve,
    resolve_train,
)
from fmnist.serve.config import ServeConfig

# ----------------------------------------------------------------------------- the parser


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes end in one line: the problem, the nearest flag, command or
    value when there is one, and where the help is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {with_suggestion(message)} (see `{self.prog} --help`)\n")

    def unrecognized(self, extras: list[str]):
        """Refuse arguments this (sub)command does not take, suggesting the nearest flag."""
        first = extras[0]
        if not first.startswith("-"):
            self.error(f"unrecognized argument {first!r}")
        flag = first.split("=", 1)[0]
        flags = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
        self.error(f"unrecognized argument {flag}{did_you_mean(flag, flags)}")


def did_you_mean(word: str, candidates, quote: str = "") -> str:
    """'; did you mean --steps?' for the candidate nearest to a mistyped word, or ''."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {quote}{match[0]}{quote}?" if match else ""


def with_suggestion(message: str) -> str:
    """argparse's 'invalid choice' message with the nearest valid choice suggested."""
    found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
    if not found:
        return message
    suggestion = did_you_mean(found[1], re.findall(r"'([^']*)'", found[2]), quote="'")
    if message.startswith("argument COMMAND:"):
        return f"unknown command {found[1]!r}{suggestion or '; the commands: ' + found[2]}"
    return message + suggestion


def help_with_default(f: dataclasses.Field, allowed: tuple[str, ...] | None) -> str:
    """A field's help, then its allowed values and its default, each said once: a help text
    that already names its default keeps it, a default of None is not shown."""
    notes = []
    if allowed:
        notes.append("one of: " + ", ".join(allowed))
    if f.metadata.get("within") is not None:
        notes.append(f.metadata["within"].describe())
    text = f.metadata.get("help", "")
    if f.default is not None and "(default" not in text:
        default = ("on" if f.default else "off") if isinstance(f.default, bool) else f.default
        notes.append(f"default: {default}")
    return f"{text} ({'; '.join(notes)})" if notes else text


# What a str field's flag takes, where its upper-cased name would not say it.
METAVARS = {"model": "NAME", "data_dir": "DIR", "out": "DIR", "resume": "RUN_DIR", "save_input": "DIR",
            "target": "CLASS", "top_k": "K"}


def add_config_flags(parser: argparse.ArgumentParser, cls, groups: tuple[str, ...] = ()) -> dict:
    """One flag per config field (`batch_size` -> `--batch-size`), its help, type, choices and
    range from the field, under the heading its field names (`groups`, in order; others stay
    in the general options). Every default is None, so only the flags a user gives override
    the config file (or the saved config of a resumed run). Returns the headings' groups."""
    headings = {name: parser.add_argument_group(name) for name in groups}
    for f in dataclasses.fields(cls):
        target = headings.get(f.metadata.get("group"), parser)
        kind, _ = field_type(cls, f.name)
        allowed = choices(cls, f.name)
        help_text = help_with_default(f, allowed)
        if kind is bool:
            target.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            metavar = "NAME" if allowed else METAVARS.get(f.name) or {int: "N", float: "X"}.get(kind, f.name.upper())
            target.add_argument(flag_name(f.name), type=kind, default=None, help=help_text, choices=allowed,
                                metavar=metavar)
    return headings


def config_from_args(cls, args: argparse.Namespace, file=None):
    """The config of `cls` from its defaults, a config file and the flags given."""
    return resolve(cls, file, **{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


# ----------------------------------------------------------------------------- which model

NEWEST = "the most recent run under ./runs"


def add_model_arg(parser: argparse.ArgumentParser, positional_too: bool = False) -> None:
    """`--model RUN_DIR`, the one way every command names the trained model it uses, defaulting
    to the newest run; `positional_too` keeps the older `fmnist evaluate RUN_DIR` working."""
    parser.add_argument("--model", metavar="RUN_DIR", help=f"run folder of the trained model (default: {NEWEST})")
    if positional_too:
        parser.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help=argparse.SUPPRESS)


def which_model(args: argparse.Namespace) -> str:
    """The run folder a command uses: --model, the deprecated positional RUN_DIR (with a note),
    or the newest run under ./runs, saying which it picked and how good it is."""
    from fmnist.run import RunDir

    legacy = getattr(args, "run_dir", None)
    if legacy is not None:
        if args.model is not None and args.model != legacy:
            raise FmnistError(f"two models given, {legacy} and --model {args.model}; give one")
        note(f"`fmnist {args.command} RUN_DIR` is deprecated; write `fmnist {args.command} --model {legacy}`")
        return legacy
    if args.model is not None:
        return args.model
    run = RunDir.latest("runs")
    note(f"using {run}, {NEWEST} ({describe_model(run)}); choose another with --model RUN_DIR")
    return str(run.path)


def describe_model(run) -> str:
    """'post, test accuracy 88.52%': the network and its figure, from model.json."""
    meta = run.read_meta()
    accuracy = meta.test_accuracy
    return meta.model + (f", test accuracy {accuracy:.2%}" if accuracy is not None else "")


def note(message: str) -> None:
    """A line for the user on stderr, apart from the output a pipe or --json reader takes."""
    print(f"fmnist: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- commands


def cmd_download(args) -> int:
    from fmnist.data import download

    download(args.data_dir, mirror=args.mirror, progress=not args.quiet, timeout=args.timeout)
    return 0


def cmd_train(args) -> int:
    from fmnist.distributed import launched_by_torchrun
    from fmnist.training.launch import launch
    from fmnist.training.loop import train

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    cfg = resolve_train(args.config, **overrides)  # with --resume: the run's saved config
    if cfg.nproc > 1 and not launched_by_torchrun():
        return launch(cfg, quiet=args.quiet)
    train(cfg, progress=not args.quiet)
    return 0


def cmd_evaluate(args) -> int:
    from fmnist.evaluate import evaluate_run, format_evaluation
    from fmnist.plots import write_reliability
    from fmnist.run import RunDir

    run = RunDir(which_model(args))
    result = evaluate_run(run.path, args.data_dir, args.device, args.precision)
    try:
        reliability = write_reliability(run, result, result.calibration.get("temperature", 1.0))
    except OSError as e:
        note(f"warning: no reliability diagram: {run.reliability_path}: {e.strerror}")
        reliability = None
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(format_evaluation(result))
        if reliability:
            print(f"\nreliability diagram written to {reliability}")
    return 0


def cmd_plot(args) -> int:
    from fmnist.plots import plot_run

    for path in plot_run(which_model(args), args.data_dir):
        print(path)
    return 0


def cmd_models(args) -> int:
    from fmnist.models import describe_models, format_models

    rows = describe_models()
    print(json.dumps(rows) if args.json else format_models(rows))
    return 0


def cmd_predict(args) -> int:
    from fmnist.inference.predictor import format_predictions, predict_files
    from fmnist.run import RunDir

    run_dir = which_model(args)
    result = predict_files(run_dir, args.images, config_from_args(PredictConfig, args))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model: {run_dir} ({describe_model(RunDir(run_dir))})")
    print(format_predictions(result))
    return 0


def cmd_explain(args) -> int:
    from fmnist.explain.pictures import explain_run

    # The issue's `fmnist explain RUN_DIR [IMAGE ...]` as well as --model: a folder first among
    # the positionals is the run folder (an image is never a folder).
    images = args.images
    if args.model is None and images and os.path.isdir(images[0]):
        run_dir, images = images[0], images[1:]
    else:
        run_dir = which_model(args)
    result = explain_run(run_dir, images, config_from_args(ExplainConfig, args))
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    for path in result.paths:
        print(path)
    for entry in result.refused:  # the paths above are for scripts; what was skipped is for the user
        note(f"not explained: {entry['error']}")
    return 0


def cmd_calibrate(args) -> int:
    from fmnist.inference.calibrate import calibrate_run, format_calibration

    run_dir = which_model(args)
    entry = calibrate_run(run_dir, args.data_dir, args.device)
    if args.json:
        print(json.dumps(entry))
        return 0
    print(f"{run_dir}: {format_calibration(entry)}")
    return 0


def cmd_export(args) -> int:
    from fmnist.export import export_onnx

    print(export_onnx(which_model(args), args.out, quantize=args.quantize, data_dir=args.data_dir))
    return 0


def cmd_serve(args) -> int:
    from fmnist.serve.server import serve

    config = config_from_args(ServeConfig, args)
    config.validate()  # a bad flag first, before a note about which model
    serve(which_model(args), config)
    return 0


def cmd_presets(args) -> int:
    from fmnist.config import format_presets, preset_rows

    if args.json:
        print(json.dumps([{"name": name, "summary": about.summary, "fields": fields, "measured": about.measured}
                          for name, fields, about in preset_rows()]))
        return 0
    print(format_presets())
    return 0


def cmd_report(args) -> int:
    from fmnist.report import run_ladder

    path = run_ladder(args.out, quick=args.quick, include_best=args.include_best, data_dir=args.data_dir,
                      device=args.device, progress=not args.quiet)
    print(f"report written to {path}")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> Parser:
    parser = Parser(
        prog="fmnist",
        description="Train, evaluate, explain and serve ConvNets on Fashion-MNIST. Commands that use a "
        "trained model take it as --model RUN_DIR (default: the most recent run under ./runs).",
    )
    parser.add_argument("--version", action="version", version=f"fmnist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.commands = sub.choices  # name -> subparser, for their own error messages

    data_dir_help = "folder with the four IDX files (default: search $FMNIST_DATA, ./data/fashion, ~/.cache/fmnist, /usr/share/datasets/fashion-mnist)"

    p = sub.add_parser("download", help="fetch and verify the dataset (or say where it already is)",
                       description="Fetch the four Fashion-MNIST files, verify their checksums and "
                       "write each atomically; nothing is fetched when the data is found already. "
                       "Data is looked for in: --data-dir, $FMNIST_DATA, ./data/fashion, "
                       "~/.cache/fmnist, /usr/share/datasets/fashion-mnist.")
    p.add_argument("--data-dir", help="where to put the files (default: ~/.cache/fmnist, unless the data is found)")
    p.add_argument("--mirror", help="base URL to download from (default: $FMNIST_MIRROR or the official mirror, over HTTPS)")
    p.add_argument("--timeout", type=float, default=600.0, help="most seconds one file may take (default: 600)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("train", help="train a network and write a run folder",
                       usage="%(prog)s [-h] [--preset NAME] [--config FILE] [FLAG ...]",
                       description="Train a network; the defaults are the post's recipe. Flags override "
                       "--config, which overrides --preset, which overrides the defaults.")
    p.add_argument("--config", metavar="FILE", help="TOML, YAML or JSON file of config fields")
    headings = add_config_flags(p, TrainConfig, TRAIN_GROUPS)
    headings["output"].add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("presets", help="list the named training recipes (--preset) and what they measured",
                       description="The presets of `fmnist train --preset NAME`: each one's recipe as "
                       "flags and the accuracy and time it measured.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("evaluate", help="test accuracy, per-class accuracy, confusion matrix",
                       description="Evaluate a run's model on the 10,000 test images.")
    add_model_arg(p, positional_too=True)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--data-dir", help=data_dir_help)
    p.add_argument("--device", default="cpu", help="device to evaluate on (default: cpu)")
    p.add_argument("--precision", default="fp32", choices=get_args(Precision), metavar="NAME",
                   help="fp32 (exact), bf16 autocast, or auto: bf16 where native (one of: auto, fp32, bf16; default: fp32)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("plot", help="redraw a run's plots",
                       description="Write cost.png, samples.png, confusion_matrix.png and "
                       "misclassified.png into a run folder.")
    add_model_arg(p, positional_too=True)
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

    p = sub.add_parser("calibrate", help="fit a run's temperature and out-of-distribution detector",
                       description="Fit, on the run's validation split, the temperature that makes its "
                       "probabilities honest and the out-of-distribution detector with its threshold (95% of "
                       "validation images pass), and write them into its model.json and ood.safetensors. "
                       "Training does this itself; this is for runs trained or calibrated by an older fmnist.")
    add_model_arg(p, positional_too=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--data-dir", help=data_dir_help)
    p.add_argument("--device", default="cpu", help="device to run the model on (default: cpu)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("models", help="list the registered networks",
                       description="List the registered networks with parameters and FLOPs per image.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("predict", help="classify pictures, .npy or IDX files with a trained model",
                       description="Classify PNG, JPEG, WebP, BMP or GIF pictures (any size, colour "
                       "or grey: each is turned into a Fashion-MNIST-like 28x28 image first) and "
                       ".npy or IDX batches of 28x28 uint8 images.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="picture, .npy or IDX file")
    add_model_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    add_config_flags(p, PredictConfig)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("explain", help="attribution heatmaps and pictures of what a model learnt",
                       usage="%(prog)s [RUN_DIR | --model RUN_DIR] [IMAGE ...] [--method NAME] "
                       "[--target CLASS] [FLAG ...]",
                       description="For each image (pictures, .npy or IDX files; without any, 8 test "
                       "images, half of them misclassified): the 28x28 input, an attribution heatmap "
                       "for the predicted class over it and the top classes, as PNG. For the run: the "
                       "first convolution's filters, one image's activations, a 2-D map of the test "
                       "set's penultimate features, the most confused class pairs. Written into "
                       "RUN_DIR/explain/ (or --out). Needs the explain extra.")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="picture, .npy or IDX file (default: test "
                   "images); a run folder given first is the model, as with --model")
    add_model_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (top classes, heatmaps, paths) instead of the paths")
    add_config_flags(p, ExplainConfig)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("export", help="export a trained model to ONNX",
                       description="Write the model as ONNX: input float32 pixels 0..255 of shape "
                       "(N, 1, 28, 28), normalisation included; outputs logits and probabilities; "
                       "class names in the metadata. Needs the export extra.")
    add_model_arg(p)
    p.add_argument("--format", choices=["onnx"], default="onnx", help="file format (default: onnx)")
    p.add_argument("--out", metavar="FILE", required=True, help="file to write, e.g. model.onnx")
    p.add_argument("--quantize", choices=["int8"], help="write a static int8 model (activation "
                   "ranges calibrated on 1,000 training images): several times faster on CPUs")
    p.add_argument("--data-dir", help="where the training images for calibration are (default: searched)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="HTTP prediction service with a web page",
                       description="Serve a model over HTTP: POST /v1/predict (multipart field "
                       "'file'), POST /v1/explain (the same, plus a heatmap; the explain extra), GET "
                       "/v1/classes, GET /healthz, the OpenAPI description at /openapi.json (its page "
                       "at /docs with --docs) and a web page at /. Set FMNIST_API_KEY (or --api-key) "
                       "before binding beyond loopback. Needs the serve extra.")
    add_model_arg(p)
    add_config_flags(p, ServeConfig)
    p.set_defaults(func=cmd_serve)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line as a namespace; a mistake ends in one line from the (sub)command it
    concerns, with the nearest flag suggested."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        parser.commands[args.command].unrecognized(extras)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # Under torchrun every process meets the same error: rank 0 alone says it.
    say = os.environ.get("RANK", "0") == "0"
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        # `fmnist predict ... | head`: the reader has all it wants. Quiet, as a tool killed by
        # SIGPIPE; stdout goes to devnull so that the interpreter's own flush does not fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool that SIGPIPE ended
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
