"""How well each run's out-of-distribution score tells Fashion-MNIST from images that are not
clothing, against the maximum softmax probability and the energy score, side by side.

    python bench/ood.py --runs runs/post runs/cpu-fast
    python bench/ood.py --runs runs/post --save-examples /tmp/ood-examples.png

Per set and method: AUROC (Fashion-MNIST test images against the set) and the share of the set
flagged at the run's stored threshold for fmnist's score (95% of the *validation* images pass it;
a run trained on photos raises it so that 98% of its held-out training photos pass too) and at
the 95%-of-validation threshold for the others, and
the share of test images that pass at it. Each set from a fixed seed:

  noise    uniform, Gaussian, salt-and-pepper and blocky noise
  blank    64 plain canvases, black to white
  text     words and characters in Pillow's default font
  shapes   outlines of rectangles, ellipses, triangles and lines
  faces    smiley faces, line drawings
  inverted Fashion-MNIST test images, dark on light (a picture prepared without its background removed)

These six are kinds the score is fitted on (drawn by `fmnist.inference.outliers` from another
seed, with gradients, textures, random solid polygons and pen strokes besides). The rest are
never drawn for the fit:

  filled   filled discs, boxes, triangles, stars and thick lines (near the solid shapes fitted on)
  scribbles  smooth pen strokes (near the pen strokes fitted on)
  digits   scikit-learn's 1,797 handwritten digits, 8x8 upscaled to 28x28
  scenes   grey patches of scikit-learn's two sample photographs
  glyphs   one letter, digit or sign in the installed TrueType fonts
  blobs    smooth shapes: soft light clouds and solid blobs
  icons    filled symbols: arrows, crosses, houses, bolts, drops, hearts, rings, crescents
  barcodes bar codes: rows of bars and square codes of cells
  charts   bar charts, line charts and pies
  objects  everyday things that are not clothing: mugs, bottles, chairs, lamps, keys, cars, ...

Digits, scenes, glyphs, filled and blobs were looked at when the fitted kinds and the photo
threshold were chosen; icons and scribbles were added after that choice, and the pen strokes
fitted since were chosen looking at them too; barcodes, charts and objects were added after
that last choice and measured once. The held-out kinds (HELD_OUT) are the ones no fitted kind
was drawn to resemble.

With `--photos N`, also the other side of the coin: N photographs of test images per condition
of bench/photos.py (uneven light, textures, shadows, ...), prepared as `fmnist predict` prepares
pictures, and the share of them the score lets pass as clothing.

Needs scikit-learn (`pip install -e '.[explain]'` brings it) and, for --photos, OpenCV.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fmnist.data import load_split, to_tensor
from fmnist.inference.calibrate import logits_and_features
from fmnist.inference.outliers import CANVAS, blank, faces, noise, resize, shapes, sketched, text
from fmnist.inference.predictor import load_model


def digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return np.stack([resize((im * (255 / 16)).astype(np.uint8)) for im in load_digits().images])


def scenes(n: int, rng) -> np.ndarray:
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(Image.fromarray(im).convert("L")) for im in load_sample_images().images]
    out = []
    for i in range(n):
        im = photos[i % len(photos)]
        s = int(rng.integers(40, 200))
        y, x = rng.integers(0, im.shape[0] - s), rng.integers(0, im.shape[1] - s)
        out.append(resize(im[y : y + s, x : x + s]))
    return np.stack(out)


# ----------------------------------------------------------------------------- held-out kinds
# Never drawn for the fit: they check the score on kinds it was not shaped on (see the module's
# description for which of them were looked at when choosing).

FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation")
GLYPHS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789&@#%?"


def glyphs(n: int, rng) -> np.ndarray:
    """One letter, digit or sign per image, light on black, filling the frame, in the TrueType
    fonts installed (DejaVu, Liberation: regular, bold, italic, serif, mono)."""
    fonts = sorted(str(f) for d in FONT_DIRS for f in Path(d).glob("*.ttf"))
    if not fonts:
        return np.zeros((0, 28, 28), np.uint8)
    out = []
    for _ in range(n):
        font = ImageFont.truetype(fonts[rng.integers(len(fonts))], size=int(rng.integers(60, 100)))
        glyph = GLYPHS[rng.integers(len(GLYPHS))]
        left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), glyph, font=font)
        side = int(max(right - left, bottom - top) * rng.uniform(1.05, 1.3)) + 2
        img = Image.new("L", (side, side), 0)
        ImageDraw.Draw(img).text(((side - (right - left)) / 2 - left, (side - (bottom - top)) / 2 - top), glyph,
                                 fill=int(rng.integers(150, 256)), font=font)
        out.append(resize(np.asarray(img)))
    return np.stack(out)


def _filled_shape(draw: ImageDraw.ImageDraw, rng) -> None:
    for _ in range(rng.integers(1, 4)):
        cx, cy, r = *rng.integers(25, 87, 2), int(rng.integers(12, 45))
        fill, kind = int(rng.integers(90, 256)), rng.integers(0, 5)
        if kind == 0:
            draw.ellipse([cx - r, cy - r * rng.uniform(0.4, 1), cx + r, cy + r], fill=fill)
        elif kind == 1:
            draw.rectangle([cx - r, cy - r // 2, cx + r // 2, cy + r], fill=fill)
        elif kind == 2:
            draw.polygon([(cx - r, cy + r), (cx, cy - r), (cx + r, cy + r)], fill=fill)
        elif kind == 3:
            angles = np.linspace(0, 2 * np.pi, 11)[:-1] + rng.uniform(0, np.pi)
            radii = np.where(np.arange(10) % 2 == 0, r, r / 2.5)
            draw.polygon([(cx + a * np.cos(t), cy + a * np.sin(t)) for a, t in zip(radii, angles, strict=True)], fill=fill)
        else:
            draw.line([cx - r, cy - r, cx + r, cy + r], fill=fill, width=int(rng.integers(8, 20)))


def filled_shapes(n: int, rng) -> np.ndarray:
    """One to three filled discs, boxes, triangles, stars or thick lines per image."""
    return sketched(n, rng, _filled_shape)


def blobs(n: int, rng) -> np.ndarray:
    """Smooth shapes: a few Gaussian bumps summed, as soft light clouds or as solid blobs."""
    yy, xx = np.mgrid[0:28, 0:28]
    out = []
    for _ in range(n):
        field = np.zeros((28, 28))
        for _ in range(rng.integers(1, 5)):
            (cy, cx), s = rng.uniform(6, 22, 2), rng.uniform(2.5, 7)
            field += rng.uniform(0.5, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        field /= field.max()
        if rng.random() < 0.5:  # solid: a soft-edged silhouette
            field = np.clip((field - 0.35) * 6, 0, 1)
        out.append(np.round(field * rng.uniform(150, 255)).astype(np.uint8))
    return np.stack(out)


def _turned(points: np.ndarray, angle: float, scale: float, centre: np.ndarray) -> list[tuple[float, float]]:
    c, s = np.cos(angle), np.sin(angle)
    return [tuple(p) for p in points @ np.array([[c, s], [-s, c]]) * scale + centre]


ICONS = {  # outlines on a unit square around 0: filled, they make the symbol
    "arrow": np.array([[-1, -0.25], [0.2, -0.25], [0.2, -0.7], [1, 0], [0.2, 0.7], [0.2, 0.25], [-1, 0.25]]),
    "plus": np.array([[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3], [1, 0.3], [0.3, 0.3], [0.3, 1],
                      [-0.3, 1], [-0.3, 0.3], [-1, 0.3], [-1, -0.3], [-0.3, -0.3]]),
    "house": np.array([[-0.8, 1], [-0.8, -0.1], [0, -1], [0.8, -0.1], [0.8, 1]]),
    "bolt": np.array([[-0.2, -1], [0.6, -1], [0.1, -0.15], [0.6, -0.15], [-0.4, 1], [-0.05, 0.15], [-0.55, 0.15]]),
    "drop": np.array([[np.sin(t) * (1 - np.cos(t)) / 1.6, -np.cos(t)] for t in np.linspace(0, 2 * np.pi, 24)]),
}


ICON_KINDS = [*ICONS, "heart", "ring", "crescent"]


def _icon(draw: ImageDraw.ImageDraw, rng) -> None:
    kind, fill = ICON_KINDS[rng.integers(len(ICON_KINDS))], int(rng.integers(120, 256))
    centre, scale = rng.uniform(40, 72, 2), rng.uniform(22, 40)
    if kind in ICONS:
        draw.polygon(_turned(ICONS[kind], rng.uniform(0, 2 * np.pi), scale, centre), fill=fill)
    elif kind == "heart":
        t = np.linspace(0, 2 * np.pi, 60)
        points = np.stack([16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], 1) / 17
        draw.polygon(_turned(points, rng.uniform(-0.5, 0.5), scale, centre), fill=fill)
    else:
        (x, y), r = centre, scale
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        if kind == "ring":
            inner = r * rng.uniform(0.4, 0.75)
            draw.ellipse([x - inner, y - inner, x + inner, y + inner], fill=0)
        else:
            dx, dy = np.array([np.cos(a := rng.uniform(0, 2 * np.pi)), np.sin(a)]) * r * rng.uniform(0.3, 0.6)
            draw.ellipse([x + dx - r, y + dy - r, x + dx + r, y + dy + r], fill=0)


def icons(n: int, rng) -> np.ndarray:
    """One filled symbol per image, turned and sized at random: arrows, crosses, houses,
    lightning bolts, drops, hearts, rings and crescents."""
    return sketched(n, rng, _icon)


def _scribble(draw: ImageDraw.ImageDraw, rng) -> None:
    for _ in range(rng.integers(1, 4)):
        heading = rng.uniform(0, 2 * np.pi)
        turns = np.cumsum(rng.normal(0, 0.35, 40))  # the heading drifts: a curve, not a zigzag
        steps = np.stack([np.cos(heading + turns), np.sin(heading + turns)], 1) * rng.uniform(2, 4)
        points = np.clip(rng.uniform(20, 92, 2) + np.cumsum(steps, 0), 4, 108)
        draw.line([tuple(p) for p in points], fill=int(rng.integers(120, 256)),
                  width=int(rng.integers(2, 9)), joint="curve")


def scribbles(n: int, rng) -> np.ndarray:
    """One to three smooth pen strokes per image: a wandering line of even width, as a doodle."""
    return sketched(n, rng, _scribble)


def _barcode(draw: ImageDraw.ImageDraw, rng) -> None:
    fill = int(rng.integers(140, 256))
    if rng.random() < 0.5:  # a row of bars of one to four units, spaces between them
        x, top, bottom, unit = rng.uniform(8, 24), rng.uniform(8, 40), rng.uniform(72, 104), rng.uniform(1.2, 3)
        while x < CANVAS - 12:
            width = unit * rng.integers(1, 5)
            if rng.random() < 0.5:
                draw.rectangle([x, top, x + width - 1, bottom], fill=fill)
            x += width
        return
    cells = int(rng.choice([21, 25]))  # a square code: random cells, three finder squares
    grid = rng.random((cells, cells)) < 0.5
    finder = np.ones((7, 7), bool)
    finder[1:6, 1:6], finder[2:5, 2:5] = False, True
    for r, c in ((0, 0), (0, cells - 7), (cells - 7, 0)):
        grid[r : r + 7, c : c + 7] = finder
    size = rng.uniform(70, 104)
    cell, (x0, y0) = size / cells, (CANVAS - size) / 2 + rng.uniform(-4, 4, 2)
    for r, c in zip(*np.nonzero(grid), strict=True):
        draw.rectangle([x0 + c * cell, y0 + r * cell, x0 + (c + 1) * cell - 1, y0 + (r + 1) * cell - 1], fill=fill)


def barcodes(n: int, rng) -> np.ndarray:
    """Bar codes: a row of bars of random widths, or a square code of random cells with three
    finder squares in its corners."""
    return sketched(n, rng, _barcode)


def _chart(draw: ImageDraw.ImageDraw, rng) -> None:
    fill, width = int(rng.integers(140, 256)), int(rng.integers(2, 5))
    left, top = rng.uniform(6, 20, 2)
    right, bottom = rng.uniform(92, 106, 2)
    kind = rng.integers(3)
    if kind == 2:  # a pie: sectors in turns of grey
        cuts = np.sort(rng.uniform(0, 360, rng.integers(2, 6)))
        for i, (a, b) in enumerate(zip(cuts, np.roll(cuts, -1), strict=True)):
            draw.pieslice([left, top, right, right - left + top], a, b if b > a else b + 360,
                          fill=fill if i % 2 == 0 else fill // 2)
        return
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=fill, width=width)
    count = int(rng.integers(3, 10))
    xs = np.linspace(left + 6, right - 4, count)
    heights = bottom - rng.uniform(0.1, 1, count) * (bottom - top - 4)
    if kind == 0:  # bars
        bar = (xs[1] - xs[0]) * rng.uniform(0.4, 0.8)
        for x, h in zip(xs, heights, strict=True):
            draw.rectangle([x - bar / 2, h, x + bar / 2, bottom - width], fill=fill)
    else:  # a line through points, the points marked or not
        draw.line(list(zip(xs, heights, strict=True)), fill=fill, width=width, joint="curve")
        if rng.random() < 0.5:
            r = width + 2
            for x, h in zip(xs, heights, strict=True):
                draw.ellipse([x - r, h - r, x + r, h + r], fill=fill)


def charts(n: int, rng) -> np.ndarray:
    """Charts: bars or a line on two axes, or a pie."""
    return sketched(n, rng, _chart)


# Everyday things that are not clothing, as parts in a unit box: ("box", left, top, right, bottom),
# ("disc", x, y, radius, hole) (hole: the share of the radius cut out, 0 for none), ("poly",
# points...), ("line", width, points...), ("dome",) (the upper half of a disc filling the box).
OBJECTS = {
    "mug": [("disc", 0.75, 0.5, 0.2, 0.6), ("box", 0.15, 0.2, 0.75, 0.95)],
    "bottle": [("box", 0.3, 0.35, 0.7, 1), ("poly", (0.3, 0.38), (0.42, 0.2), (0.58, 0.2), (0.7, 0.38)),
               ("box", 0.42, 0, 0.58, 0.22)],
    "chair": [("box", 0.2, 0, 0.3, 1), ("box", 0.2, 0.5, 0.8, 0.6), ("box", 0.7, 0.5, 0.8, 1)],
    "table": [("box", 0, 0.3, 1, 0.42), ("box", 0.08, 0.3, 0.16, 1), ("box", 0.84, 0.3, 0.92, 1)],
    "lamp": [("poly", (0.3, 0), (0.7, 0), (0.85, 0.35), (0.15, 0.35)), ("box", 0.46, 0.35, 0.54, 0.9),
             ("box", 0.25, 0.9, 0.75, 1)],
    "key": [("disc", 0.2, 0.5, 0.18, 0.45), ("box", 0.35, 0.45, 1, 0.55), ("box", 0.75, 0.55, 0.82, 0.7),
            ("box", 0.88, 0.55, 0.95, 0.68)],
    "glasses": [("disc", 0.25, 0.5, 0.22, 0.75), ("disc", 0.75, 0.5, 0.22, 0.75), ("line", 0.05, (0.45, 0.45), (0.55, 0.45))],
    "bicycle": [("disc", 0.2, 0.7, 0.2, 0.8), ("disc", 0.8, 0.7, 0.2, 0.8),
                ("line", 0.05, (0.2, 0.7), (0.45, 0.7), (0.7, 0.35), (0.8, 0.7)),
                ("line", 0.05, (0.2, 0.7), (0.35, 0.35), (0.7, 0.35))],
    "tree": [("poly", (0.5, 0), (0.9, 0.75), (0.1, 0.75)), ("box", 0.43, 0.75, 0.57, 1)],
    "car": [("box", 0, 0.45, 1, 0.75), ("poly", (0.2, 0.45), (0.3, 0.2), (0.7, 0.2), (0.8, 0.45)),
            ("disc", 0.22, 0.78, 0.12, 0), ("disc", 0.78, 0.78, 0.12, 0)],
    "umbrella": [("dome",), ("line", 0.05, (0.5, 0.5), (0.5, 0.92), (0.4, 0.98), (0.32, 0.9))],
    "clock": [("disc", 0.5, 0.5, 0.48, 0.85), ("line", 0.05, (0.5, 0.5), (0.5, 0.18)), ("line", 0.05, (0.5, 0.5), (0.72, 0.62))],
}


def _object(draw: ImageDraw.ImageDraw, rng) -> None:
    parts, fill = list(OBJECTS.values())[rng.integers(len(OBJECTS))], int(rng.integers(110, 256))
    s = rng.uniform(60, 100)
    x, y = rng.uniform(4, CANVAS - 4 - s, 2)

    def at(points) -> list[tuple[float, float]]:
        return [(x + a * s, y + b * s) for a, b in points]

    for kind, *args in parts:
        if kind == "box":
            draw.rectangle(at([args[:2], args[2:]]), fill=fill)
        elif kind == "disc":
            (cx, cy, r, hole) = args
            draw.ellipse(at([(cx - r, cy - r), (cx + r, cy + r)]), fill=fill)
            if hole:
                draw.ellipse(at([(cx - r * hole, cy - r * hole), (cx + r * hole, cy + r * hole)]), fill=0)
        elif kind == "poly":
            draw.polygon(at(args), fill=fill)
        elif kind == "line":
            draw.line(at(args[1:]), fill=fill, width=max(2, int(args[0] * s)), joint="curve")
        else:
            draw.pieslice(at([(0, 0), (1, 1)]), 180, 360, fill=fill)


def objects(n: int, rng) -> np.ndarray:
    """One everyday thing per image, solid, drawn from simple parts: mugs, bottles, chairs,
    tables, lamps, keys, glasses, bicycles, trees, cars, umbrellas and clocks."""
    return sketched(n, rng, _object)


HELD_OUT = ("digits", "scenes", "glyphs", "blobs", "icons", "barcodes", "charts", "objects")


def build_sets(test_images: np.ndarray, n: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sets = {"digits": digits(), "noise": noise(n, rng), "blank": blank(64, rng), "text": text(n, rng),
            "shapes": shapes(n, rng), "faces": faces(200, rng), "scenes": scenes(n, rng),
            "inverted": 255 - test_images[rng.choice(len(test_images), n, replace=False)]}
    held = np.random.default_rng(seed + 1)  # their own stream: the sets above stay as they were
    sets |= {"glyphs": glyphs(n, held), "filled": filled_shapes(n, held), "blobs": blobs(n, held)}
    later = np.random.default_rng(seed + 2)  # added once solid shapes were fitted on
    sets |= {"icons": icons(n, later), "scribbles": scribbles(n, later)}
    last = np.random.default_rng(seed + 3)  # added once pen strokes were fitted on
    return sets | {"barcodes": barcodes(n, last), "charts": charts(n, last), "objects": objects(n, last)}


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """The chance that an outside image scores higher than an inside one (ties count half)."""
    scores = np.concatenate([inside, outside])
    ranks = np.empty(len(scores))
    order = np.argsort(scores, kind="stable")
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores[np.diff(np.sort(scores), prepend=np.nan) == 0]):  # average tied ranks
        ranks[scores == value] = ranks[scores == value].mean()
    n_in, n_out = len(inside), len(outside)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


def method_scores(predictor, images: np.ndarray) -> dict[str, np.ndarray]:
    """Each method's score (higher: less like Fashion-MNIST) for uint8 images."""
    x = to_tensor(images, predictor.mean, predictor.std)
    logits, features = logits_and_features(predictor.model, x, predictor.meta.tta)
    logits = logits / predictor.temperature
    scores = {"max softmax": -logits.softmax(1).amax(1).numpy(), "energy": -torch.logsumexp(logits, 1).numpy()}
    if predictor.detector is not None:
        scores["fmnist"] = predictor.detector.score(features).numpy()
    return scores


def report(run: str, sets: dict[str, np.ndarray], val_images: np.ndarray, test_images: np.ndarray) -> None:
    predictor = load_model(run)
    if predictor.detector is None:
        print(f"{run}: not calibrated; run `fmnist calibrate --model {run}` first\n")
    val, test = method_scores(predictor, val_images), method_scores(predictor, test_images)
    outside = {name: method_scores(predictor, images) for name, images in sets.items()}
    acc = predictor.meta.test_accuracy
    print(f"## {run} ({predictor.meta.model}, test accuracy {acc:.4f})\n" if acc else f"## {run}\n")
    print("| method | test passing | " + " | ".join(sets) + " |")
    print("|---|---:|" + "---:|" * len(sets))
    for method in val:
        # fmnist's score has its own threshold is the run's (photo runs raise it so real photos pass);
        # the others get the one that lets 95% of validation images pass.
        stored = method == "fmnist" and predictor.detector is not None
        threshold = predictor.detector.threshold if stored else np.quantile(val[method], 0.95)
        cells = [f"{auroc(test[method], outside[s][method]):.3f} / {np.mean(outside[s][method] > threshold):.0%}"
                 for s in sets]
        print(f"| {method} | {np.mean(test[method] <= threshold):.1%} | " + " | ".join(cells) + " |")
    print("\ncells: AUROC against the test set / share flagged at the run's threshold (fmnist) or at the "
          f"95%-of-validation threshold (the others); never fitted on: {', '.join(HELD_OUT)} (see the docstring "
          "for which were looked at when choosing)\n")


def photo_pass_rates(runs: list[str], n: int) -> None:
    """The share of prepared clothing photos each run's score lets pass, per photo condition."""
    from photos import CONDITIONS, render_condition

    images, labels = load_split("test")
    renders = [render_condition(c, images, labels, n, seed=0) for c in CONDITIONS if c != "all"]
    print(f"## clothing photos passing ({n} per condition, pictures with no object found left out)\n")
    print("| run | " + " | ".join(r.condition for r in renders) + " |")
    print("|---|" + "---:|" * len(renders))
    for run in runs:
        predictor = load_model(run)
        cells = []
        for r in renders:
            found = r.new[~r.no_object]
            _, scores = predictor.assess(found)
            cells.append("-" if scores is None else f"{np.mean(scores <= predictor.detector.threshold):.0%}")
        print(f"| {run} | " + " | ".join(cells) + " |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="run folders to measure")
    parser.add_argument("--per-set", type=int, default=1000, help="images per drawn set (default: 1000)")
    parser.add_argument("--save-examples", metavar="PNG", help="write the first 12 images of each set as one PNG")
    parser.add_argument("--photos", type=int, default=0, metavar="N",
                        help="also N clothing photos per condition of bench/photos.py (default: 0, none)")
    args = parser.parse_args()
    torch.manual_seed(0)
    train_images, _ = load_split("train")
    test_images, _ = load_split("test")
    sets = build_sets(test_images, args.per_set)
    print("sets: " + ", ".join(f"{name} {len(images)}" for name, images in sets.items()) + "\n")
    if args.save_examples:
        grid = np.concatenate([np.concatenate(list(images[:12]), 1) for images in sets.values()], 0)
        Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(args.save_examples)
        print(f"examples written to {args.save_examples}\n")
    for run in args.runs:
        meta = load_model(run).meta
        val_size = meta.config.get("val_size", 5000)
        report(str(Path(run)), sets, train_images[:val_size], test_images)
    if args.photos:
        photo_pass_rates(args.runs, args.photos)


if __name__ == "__main__":
    main()
