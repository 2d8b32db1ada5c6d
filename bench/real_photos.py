"""Real photos of clothing, one item each, classified by each model as `fmnist predict` would:
top-1 in the label's accepted classes (overall and per label), the mean top-1 probability beside
how often that answer is right, a confusion table, the share passing the out-of-distribution
flag, refusals and seconds per photo.

    python bench/real_photos.py data/clothing/validation --models runs/post runs/cpu-fast
    python bench/real_photos.py data/clothing/validation --models runs/cpu-fast --json
    python bench/real_photos.py data/clothing/validation --models runs/cpu-fast \
        --save-input /tmp/worst

DIR holds one folder per label, DIR/<label>/*.jpg, as the CC0 collection
github.com/alexeygrigorev/clothing-dataset-small does (train/, validation/, test/ each laid out
so). A label's photos count towards accuracy when `fmnist.data.photos.ACCEPTED` gives it a set
of Fashion-MNIST classes (the table training on photos uses); a prediction is right when it is in that set (partial labels: a long sleeve may be a
pullover or a shirt). Labels without a class (shorts, skirt, hat) count only in the confusion
table and in the out-of-distribution figures. A photo the preparation refuses ("no object
found", an unreadable file) counts as a miss and is listed. Seconds per photo: decoding,
preparation and one model call for that photo alone, median over the photos.

`--average` adds the models' average (an ensemble): their probabilities averaged, and as its
out-of-distribution score the mean of theirs against the mean of their thresholds; its
Fashion-MNIST test accuracy is measured here.

    python bench/real_photos.py data/clothing/validation --models runs/photo runs/photo-s1 --average

`--save-input DIR` writes, per model and label, a contact sheet (PNG, 3x enlarged) of the 28x28
images the model saw for its worst cases, the wrong answers it was most sure of, with a .tsv
naming each tile's photo, prediction and probability. Needs OpenCV (`pip install -e '.[photo]'`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image, ImageDraw

from fmnist import FmnistError
from fmnist.data import CLASS_NAMES, load_split
from fmnist.data.photos import ACCEPTED, PHOTO_SUFFIXES
from fmnist.inference.decode import ImageError, open_image
from fmnist.inference.photo import prepare_image
from fmnist.inference.predictor import Predictor, load_model

SHEET_SCALE = 3  # each 28x28 tile drawn 3x larger
SHEET_COLUMNS = 10
REFUSED = "refused"  # the confusion table's column for photos that got no class


def accepted_indices(label: str, class_names: list[str] = CLASS_NAMES) -> frozenset[int]:
    """The class indices a photo of `label` may rightly get; empty for a label without a class."""
    return frozenset(class_names.index(c) for c in ACCEPTED.get(label, ()))


# ----------------------------------------------------------------------------- photos


@dataclass
class Photo:
    path: Path
    label: str
    image: np.ndarray | None = None  # the prepared uint8 (28, 28); None when refused
    refusal: str | None = None  # why the preparation gave no image
    seconds: float = 0.0  # decoding and preparation


def find_photos(root: Path) -> list[Photo]:
    """Every photo under root/<label>/, sorted by label and name."""
    if not root.is_dir():
        raise FmnistError(f"{root}: not a folder (expected DIR/<label>/*.jpg)")
    photos = [
        Photo(path, folder.name)
        for folder in sorted(p for p in root.iterdir() if p.is_dir())
        for path in sorted(folder.iterdir())
        if path.suffix.lower() in PHOTO_SUFFIXES
    ]
    if not photos:
        raise FmnistError(f"{root}: no photos in label folders (expected DIR/<label>/*.jpg)")
    return photos


def prepare(photos: list[Photo]) -> None:
    """Decode and prepare every photo once (the preparation does not depend on the model)."""
    for photo in photos:
        start = time.perf_counter()
        try:
            with open_image(photo.path) as image:
                photo.image = prepare_image(image, name=f"{photo.label}/{photo.path.name}")
        except ImageError as e:
            photo.refusal = str(e)
        photo.seconds = time.perf_counter() - start


# ----------------------------------------------------------------------------- measuring


@dataclass
class Answer:
    predicted: int | None  # None: refused
    probability: float = 0.0
    passes: bool | None = None  # under the out-of-distribution threshold; None: no detector
    seconds: float = 0.0  # the model call alone


@dataclass
class Result:
    model: str
    labels: list[str]
    class_names: list[str]
    answers: list[Answer] = field(default_factory=list)


def answer_each(predictor: Predictor, photos: list[Photo]) -> list[Answer]:
    """Each prepared photo through the model on its own, as one `fmnist predict` call does."""
    answers = []
    for photo in photos:
        if photo.image is None:
            answers.append(Answer(None))
            continue
        start = time.perf_counter()
        probabilities, scores = predictor.assess(photo.image[None])
        seconds = time.perf_counter() - start
        passes = None if scores is None else bool(scores[0] <= predictor.detector.threshold)
        best = int(probabilities[0].argmax())
        answers.append(Answer(best, float(probabilities[0, best]), passes, seconds))
    return answers


class Averaged:
    """Several runs as one model: their class probabilities averaged. Its out-of-distribution
    score is the mean of theirs (each on its own validation split's scale) against the mean of
    their thresholds; None unless every run is calibrated."""

    def __init__(self, members: list[Predictor]):
        if any(m.class_names != members[0].class_names for m in members):
            raise FmnistError("--average: the runs name different classes")
        self.members = members
        self.class_names = members[0].class_names
        self.detector = None
        if all(m.detector is not None for m in members):
            self.detector = SimpleNamespace(
                threshold=statistics.fmean(m.detector.threshold for m in members)
            )

    def assess(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        assessed = [m.assess(images) for m in self.members]
        probabilities = np.mean([p for p, _ in assessed], axis=0)
        scores = None if self.detector is None else np.mean([s for _, s in assessed], axis=0)
        return probabilities, scores

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return np.mean([m.probabilities(images) for m in self.members], axis=0)

    def test_accuracy(self) -> float:
        images, labels = load_split("test")
        return float((self.probabilities(images).argmax(1) == labels).mean())


def share(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def summarise(
    model: str, class_names: list[str], photos: list[Photo], answers: list[Answer]
) -> dict:
    """The figures of one model, as --json prints them."""
    labels = sorted({p.label for p in photos})
    per_label, confusion = {}, {}
    for label in labels:
        rows = [(p, a) for p, a in zip(photos, answers, strict=True) if p.label == label]
        accepted = accepted_indices(label, class_names)
        counts = dict.fromkeys([*class_names, REFUSED], 0)
        for _, a in rows:
            counts[REFUSED if a.predicted is None else class_names[a.predicted]] += 1
        confusion[label] = counts
        answered = [a for _, a in rows if a.predicted is not None]
        per_label[label] = {
            "photos": len(rows),
            "accepted": sorted(class_names[i] for i in accepted),
            "accuracy": share([a.predicted in accepted for _, a in rows]) if accepted else None,
            "ood_pass": share([a.passes for a in answered if a.passes is not None]),
            "refused": len(rows) - len(answered),
        }
    clothing = [(p, a) for p, a in zip(photos, answers, strict=True) if p.label in ACCEPTED]
    answered_pairs = [(p, a) for p, a in clothing if a.predicted is not None]
    answered = [a for _, a in answered_pairs]
    seconds = [
        p.seconds + a.seconds
        for p, a in zip(photos, answers, strict=True)
        if a.predicted is not None
    ]
    return {
        "model": model,
        "photos": len(photos),
        "clothing_photos": len(clothing),
        "accuracy": share(
            [a.predicted in accepted_indices(p.label, class_names) for p, a in clothing]
        ),
        # Probabilities that mean what they say: the mean top-1 probability of the answered
        # clothing photos beside how often that top-1 is right.
        "mean_probability": statistics.fmean(a.probability for a in answered) if answered else None,
        "answered_accuracy": share(
            [a.predicted in accepted_indices(p.label, class_names) for p, a in answered_pairs]
        ),
        "ood_pass": share([a.passes for a in answered if a.passes is not None]),
        "refused": [
            {"file": str(p.path), "error": p.refusal} for p in photos if p.refusal is not None
        ],
        "seconds_per_photo": statistics.median(seconds) if seconds else None,
        "per_label": per_label,
        "confusion": confusion,
    }


# ----------------------------------------------------------------------------- output


def percent(x: float | None) -> str:
    return "     -" if x is None else f"{100 * x:5.1f}%"


def print_summary(s: dict, class_names: list[str]) -> None:
    print(f"\n{s['model']}: {s['clothing_photos']} clothing photos of {s['photos']}")
    if s.get("test_accuracy") is not None:
        print(f"  Fashion-MNIST test accuracy     {100 * s['test_accuracy']:6.2f}%")
    print(f"  top-1 in the accepted set       {percent(s['accuracy'])}")
    if s["mean_probability"] is not None:
        print(f"  mean top-1 probability          {percent(s['mean_probability'])}  "
              f"(right on {percent(s['answered_accuracy']).strip()} of those answered)")
    print(f"  clothing passing the OOD flag   {percent(s['ood_pass'])}  (of those answered)")
    print(f"  refused                         {len(s['refused']):6d}")
    if s["seconds_per_photo"] is not None:
        print(f"  seconds per photo (median)      {s['seconds_per_photo']:6.3f}")
    print(f"\n  {'label':<12} {'photos':>6} {'top-1':>6} {'OOD pass':>8} {'refused':>7}  accepted")
    for label, row in s["per_label"].items():
        print(
            f"  {label:<12} {row['photos']:6d} {percent(row['accuracy'])} "
            f"{percent(row['ood_pass']):>8} "
            f"{row['refused']:7d}  {', '.join(row['accepted']) or '(no class)'}"
        )
    columns = [*class_names, REFUSED]
    short = [c.split("/")[0][:7] for c in columns]
    print(
        f"\n  confusion (rows: label, columns: predicted class)\n  {'':<12}"
        + "".join(f"{c:>8}" for c in short)
    )
    for label, counts in s["confusion"].items():
        print(f"  {label:<12}" + "".join(f"{counts[c]:8d}" for c in columns))
    for refusal in s["refused"]:
        print(f"  refused: {refusal['error']}")


def save_sheets(
    directory: Path,
    model_name: str,
    class_names: list[str],
    photos: list[Photo],
    answers: list[Answer],
    count: int,
) -> list[Path]:
    """Per label: the `count` wrong answers the model was surest of, as one PNG sheet of the
    28x28 inputs it saw (most sure first, row by row) and a .tsv naming each tile."""
    directory.mkdir(parents=True, exist_ok=True)
    tile = 28 * SHEET_SCALE
    written = []
    for label in sorted({p.label for p in photos if p.label in ACCEPTED}):
        accepted = accepted_indices(label, class_names)
        wrong = sorted(
            (
                (a.probability, p, a)
                for p, a in zip(photos, answers, strict=True)
                if p.label == label and a.predicted is not None and a.predicted not in accepted
            ),
            key=lambda t: -t[0],
        )[:count]
        if not wrong:
            continue
        rows = -(-len(wrong) // SHEET_COLUMNS)
        sheet = Image.new("L", (SHEET_COLUMNS * (tile + 2), rows * (tile + 2)), 128)
        draw = ImageDraw.Draw(sheet)
        lines = ["tile\tfile\tpredicted\tprobability\tpasses_ood"]
        for i, (probability, photo, answer) in enumerate(wrong):
            x, y = (i % SHEET_COLUMNS) * (tile + 2), (i // SHEET_COLUMNS) * (tile + 2)
            sheet.paste(
                Image.fromarray(photo.image).resize((tile, tile), Image.Resampling.NEAREST), (x, y)
            )
            draw.text((x + 2, y + 1), class_names[answer.predicted][:5], fill=255)
            lines.append(
                f"{i}\t{photo.path}\t{class_names[answer.predicted]}\t"
                f"{probability:.3f}\t{answer.passes}"
            )
        stem = f"{model_name}-{label}"
        sheet.save(directory / f"{stem}.png")
        (directory / f"{stem}.tsv").write_text("\n".join(lines) + "\n")
        written.append(directory / f"{stem}.png")
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "dir", type=Path, metavar="DIR", help="folder of photos laid out as DIR/<label>/*.jpg"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        required=True,
        metavar="RUN",
        help="run folders written by `fmnist train`",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of tables"
    )
    parser.add_argument(
        "--save-input",
        type=Path,
        metavar="DIR",
        help="write contact sheets of the worst cases' 28x28 inputs into this folder",
    )
    parser.add_argument(
        "--worst",
        type=int,
        default=30,
        metavar="N",
        help="tiles per label on a contact sheet (default: 30)",
    )
    parser.add_argument(
        "--average",
        action="store_true",
        help="add the models' average (an ensemble: probabilities averaged) as one more model",
    )
    args = parser.parse_args()
    try:
        predictors = [(str(run), load_model(run)) for run in args.models]  # every run checked first
        if args.average:
            if len(predictors) < 2:
                raise FmnistError("--average needs at least two --models")
            averaged = Averaged([p for _, p in predictors])
            predictors.append(("average of " + " ".join(args.models), averaged))
        photos = find_photos(args.dir)
    except FmnistError as e:
        print(f"real_photos: error: {e}", file=sys.stderr)
        return 2

    prepare(photos)
    results = []
    for name, predictor in predictors:
        answers = answer_each(predictor, photos)
        summary = summarise(name, predictor.class_names, photos, answers)
        summary["test_accuracy"] = (
            predictor.test_accuracy()
            if isinstance(predictor, Averaged)
            else predictor.meta.test_accuracy
        )
        if args.save_input:
            model_name = "average" if isinstance(predictor, Averaged) else Path(name).resolve().name
            sheets = save_sheets(
                args.save_input, model_name, predictor.class_names, photos, answers, args.worst
            )
            summary["sheets"] = [str(p) for p in sheets]
        results.append(summary)
        if not args.json:
            print_summary(summary, predictor.class_names)
            if summary.get("sheets"):
                print(
                    f"  worst cases' inputs: {len(summary['sheets'])} sheets in {args.save_input}"
                )
    if args.json:
        print(json.dumps({"dir": str(args.dir), "models": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
