"""Photos of Fashion-MNIST test images under the conditions real photos bring (uneven light,
coloured and textured backgrounds, coloured objects, shadows, mirror images, rotations, heavy
JPEG, pairs of shoes, objects cut by the edge), classified after today's preparation and the
new one side by side, per model; plus the preparation time of a 12-megapixel JPEG and a 28x28 PNG.

    python bench/photos.py --models /tmp/photo-runs/post /tmp/photo-runs/cpu-fast --mirror-average
    python bench/photos.py --models runs/post --per-condition 100 --conditions easy shadow
    python bench/photos.py --models runs/post --save-examples /tmp/photo-examples
    python bench/photos.py --models runs/post --split train --seed 1   # the renders tuned on
    python bench/photos.py --models runs/cpu-fast runs/cpu-fast-photo50 --mirror-average
    python bench/photos.py --models runs/photo runs/photo-s1 --average --mirror-average

"today" is `fmnist.inference.photo.prepare_image` before the background model (kept below as
`prepare_image_v1`, for this comparison only); "new" is the current one. A photo the new one
says holds no object counts as a miss. "+mirror" averages each 28x28's class probabilities with
those of its mirror image; the other columns classify one image alone, even for a model whose
model.json asks for mirror averaging. With several models, a last table puts their `new` columns
side by side, each model used as its model.json asks (mirror-averaged where it says so);
`--average` adds the models' average to it (their probabilities averaged, as
bench/real_photos.py's `--average` does; with the mirror image's where every model asks for
it). Every render is drawn from a fixed seed, so two runs print the same tables. The preparation's
thresholds were tuned on renders of training images (`--split train --seed 1`); the tables
report renders of test images (`--split test --seed 0`).
Needs OpenCV (`pip install -e '.[photo]'`).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from real_photos import Averaged

from fmnist.data import CLASS_NAMES, IMAGE_SIZE, load_split
from fmnist.inference.decode import open_image
from fmnist.inference.photo import NoObject, prepare_image
from fmnist.inference.predictor import load_model

CONDITIONS = ("easy", "gradient", "vignette", "shadow", "colour-background", "texture",
              "colour-object", "mirror", "rotation", "jpeg", "pair", "edge", "all")
SHOE_CLASSES = tuple(CLASS_NAMES.index(c) for c in ("Sandal", "Sneaker", "Ankle boot"))
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as Pillow's "L"


# ----------------------------------------------------------------------------- rendering


@dataclass
class Scene:
    """What one photo varies; `scene_for` draws one per condition."""

    background: str = "paper"  # paper (light, near grey), colour (saturated), wood, fabric
    ink: str = "dark"  # the object's colour: dark, light, colour, colour-same-grey (as the ground)
    gradient: float = 0.0  # brightness change from one side of the picture to the other (fraction)
    vignette: float = 0.0  # darkening of the corners (fraction)
    shadow: float = 0.0  # darkening of the ground in the object's cast shadow (fraction)
    mirror: bool = False
    rotation: float = 0.0  # degrees, counter-clockwise
    quality: int = 90  # JPEG quality
    pair: bool = False  # two copies of the (shoe) image side by side
    edge: bool = False  # the object touches or crosses an edge of the picture


def scene_for(condition: str, rng: np.random.Generator) -> Scene:
    scene = Scene(quality=int(rng.integers(80, 96)))
    if condition == "all":
        parts = [c for c in CONDITIONS[1:-1] if c not in ("pair",) and rng.random() < 0.35]
    else:
        parts = [condition]
    for part in parts:
        if part == "gradient":
            scene.gradient = rng.uniform(0.02, 0.10)
        elif part == "vignette":
            scene.vignette = rng.uniform(0.15, 0.35)
        elif part == "shadow":
            scene.shadow = rng.uniform(0.15, 0.4)
        elif part == "colour-background":
            scene.background, scene.ink = "colour", rng.choice(["dark", "light"])
        elif part == "texture":
            scene.background = rng.choice(["wood", "fabric"])
            scene.ink = rng.choice(["dark", "light", "colour"])
        elif part == "colour-object":
            scene.background, scene.ink = rng.choice(["colour", "wood"]), "colour-same-grey"
        elif part == "mirror":
            scene.mirror = True
        elif part == "rotation":
            scene.rotation = float(rng.choice([-1, 1]) * rng.uniform(5, 15))
        elif part == "jpeg":
            scene.quality = int(rng.integers(20, 41))
        elif part == "pair":
            scene.pair = True
        elif part == "edge":
            scene.edge = True
    return scene


def hsv_colour(h: float, s: float, v: float) -> np.ndarray:
    """RGB 0..255 of a hue in degrees, saturation and value 0..1."""
    hsv = np.array([[[h / 2, s * 255, v * 255]]], dtype=np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def with_grey(colour: np.ndarray, grey: float) -> np.ndarray:
    """The colour scaled (and if needed lifted towards white) to the given grey level."""
    colour = colour * (grey / max(float(colour @ LUMA), 1.0))
    while colour.max() > 255:
        excess = colour.max() - 255
        colour = np.minimum(colour, 255) + excess * 0.5
        colour *= grey / float(colour @ LUMA)
    return np.clip(colour, 0, 255)


def background(scene: Scene, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Reflectance of the ground, float32 (H, W, 3) in 0..255."""
    h, w = shape
    if scene.background == "paper":
        base = rng.uniform(200, 250) + rng.uniform(-6, 6, 3)
        return np.broadcast_to(base, (h, w, 3)) + rng.normal(0, 1.0, (h, w, 1))
    if scene.background == "colour":
        base = hsv_colour(rng.uniform(0, 360), rng.uniform(0.5, 1.0), rng.uniform(0.45, 0.95))
        return np.broadcast_to(base, (h, w, 3)).astype(np.float32)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    along = x * np.cos(angle) + y * np.sin(angle)
    across = -x * np.sin(angle) + y * np.cos(angle)
    if scene.background == "wood":  # rings: stripes whose phase wanders slowly along the grain
        base = hsv_colour(rng.uniform(15, 40), rng.uniform(0.4, 0.7), rng.uniform(0.45, 0.85))
        period = rng.uniform(12, 40)
        wander = cv2.resize(rng.normal(0, 1, (4, 4)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
        stripes = np.sin(2 * np.pi * across / period + 3 * wander + 0.002 * along)
        grain = rng.uniform(0.08, 0.2) * stripes ** 3 + rng.normal(0, 0.02, (h, w))
        return base * (1 + grain[..., None])
    # fabric: a fine weave
    base = hsv_colour(rng.uniform(0, 360), rng.uniform(0.15, 0.7), rng.uniform(0.35, 0.9))
    period = rng.uniform(3, 7)
    weave = np.sin(2 * np.pi * along / period) * np.sin(2 * np.pi * across / period)
    texture = rng.uniform(0.05, 0.12) * weave + rng.normal(0, 0.03, (h, w))
    return base * (1 + texture[..., None])


def ink_colour(scene: Scene, ground: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The object's colour at full intensity: a dark or light garment, or a coloured one."""
    mean = ground.reshape(-1, 3).mean(0)
    grey = float(mean @ LUMA)
    if scene.ink == "dark":
        return rng.uniform(5, 50) + rng.uniform(-5, 5, 3)
    if scene.ink == "light" or (scene.ink == "colour" and grey < 90):
        return rng.uniform(225, 252) + rng.uniform(-3, 3, 3)
    hue = cv2.cvtColor(np.clip(mean, 0, 255).astype(np.uint8)[None, None], cv2.COLOR_RGB2HSV)[0, 0, 0] * 2.0
    colour = hsv_colour((hue + rng.uniform(90, 270)) % 360, rng.uniform(0.6, 1.0), 1.0)
    if scene.ink == "colour-same-grey":
        return with_grey(colour, grey + rng.uniform(-12, 12))
    target = grey - 90 if grey > 120 else grey + 90
    return with_grey(colour, target)


def object_layer(image: np.ndarray, scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """The object's intensity 0..1, float32, enlarged 4-12x (pairs 3-6x) with smooth interpolation."""
    t = image.astype(np.float32) / 255
    if scene.mirror:
        t = t[:, ::-1]
    side = round(IMAGE_SIZE * rng.uniform(3, 6) if scene.pair else IMAGE_SIZE * rng.uniform(4, 12))
    t = np.clip(cv2.resize(t, (side, side), interpolation=cv2.INTER_CUBIC), 0, 1)
    if scene.pair:
        gap = round(side * rng.uniform(0.0, 0.25))  # between the frames: the shoes stand apart
        rows = round(side * rng.uniform(0, 0.1))
        pair = np.zeros((side + rows, 2 * side + gap), np.float32)
        pair[:side, :side] = t
        right = pair[rows:, side + gap :]
        np.maximum(right, t[:, : right.shape[1]], out=right)
        t = pair
    if scene.rotation:
        h, w = t.shape
        big = max(h, w) * 3 // 2
        padded = np.zeros((big, big), np.float32)
        padded[(big - h) // 2 : (big - h) // 2 + h, (big - w) // 2 : (big - w) // 2 + w] = t
        turn = cv2.getRotationMatrix2D((big / 2, big / 2), scene.rotation, 1.0)
        t = np.clip(cv2.warpAffine(padded, turn, (big, big), flags=cv2.INTER_CUBIC), 0, 1)
    rows, cols = np.flatnonzero(t.max(1) > 0.02), np.flatnonzero(t.max(0) > 0.02)
    if not rows.size:  # a blank: nothing to place
        return t
    return t[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def render_photo(image: np.ndarray, scene: Scene, rng: np.random.Generator) -> bytes:
    """A 28x28 Fashion-MNIST image as a JPEG photo: the intensity is the density of the object's
    colour over the ground (dark garment on paper: the photo the dataset was made from)."""
    t = object_layer(image, scene, rng)
    oh, ow = t.shape
    longest = max(oh, ow) * rng.uniform(1.3, 2.0)
    other = longest * rng.uniform(0.65, 0.85)
    h, w = (longest, other) if rng.random() < 0.5 else (other, longest)
    h, w = max(round(h), oh + 8), max(round(w), ow + 8)
    if scene.edge:  # cut by up to 15% on one side, or just touching it
        side = rng.integers(4)
        cut = rng.uniform(0, 0.15)
        y, x = int(rng.integers(0, h - oh + 1)), int(rng.integers(0, w - ow + 1))
        if side == 0:
            y = -round(cut * oh)
        elif side == 1:
            y = h - oh + round(cut * oh)
        elif side == 2:
            x = -round(cut * ow)
        else:
            x = w - ow + round(cut * ow)
    else:
        y, x = int(rng.integers(2, h - oh - 1)), int(rng.integers(2, w - ow - 1))
    layer = np.zeros((h, w), np.float32)
    ys, xs = slice(max(y, 0), min(y + oh, h)), slice(max(x, 0), min(x + ow, w))
    layer[ys, xs] = t[ys.start - y : ys.stop - y, xs.start - x : xs.stop - x]

    ground = background(scene, (h, w), rng)
    ink = ink_colour(scene, ground, rng)
    photo = ground * (1 - layer[..., None]) + ink * layer[..., None]
    if scene.shadow:  # a soft copy of the silhouette, offset down and to one side, behind it
        silhouette = np.clip(layer / 0.3, 0, 1)  # opaque where the garment is, not its faint rim
        move = np.float32([[1, 0, rng.uniform(-0.08, 0.08) * ow], [0, 1, rng.uniform(0.02, 0.08) * oh]])
        shade = cv2.GaussianBlur(cv2.warpAffine(silhouette, move, (w, h)), (0, 0), 0.06 * max(oh, ow))
        photo *= (1 - scene.shadow * shade * (1 - silhouette))[..., None]

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    light = np.full((h, w), rng.uniform(0.92, 1.04), np.float32)
    if scene.gradient:
        angle = rng.uniform(0, 2 * np.pi)
        along = xx * np.cos(angle) + yy * np.sin(angle)
        along = (along - along.min()) / max(float(np.ptp(along)), 1.0)
        light *= 1 + scene.gradient * (along - 0.5)
    if scene.vignette:
        cy, cx = h * rng.uniform(0.4, 0.6), w * rng.uniform(0.4, 0.6)
        r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / (0.25 * (h * h + w * w))
        light *= 1 - scene.vignette * r2
    photo = photo * light[..., None] + rng.normal(0, rng.uniform(1, 3), (h, w, 3))
    pixels = np.clip(photo + 0.5, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=scene.quality)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- today's preparation

OBJECT_LEVEL = 0.05 * 255
WORK_SIZE = 512


def _quantile(values: np.ndarray, q: float) -> float:
    k = min(len(values) - 1, int(q * len(values)))
    return float(np.partition(values, k)[k])


def open_image_v1(data: bytes) -> Image.Image:
    """Today's decoding of a JPEG, for its timing: at a reduced scale, in grey only."""
    image = Image.open(io.BytesIO(data))
    image.draft("L", (WORK_SIZE, WORK_SIZE))
    image.load()
    return image


def prepare_image_v1(image: Image.Image) -> np.ndarray:
    """fmnist.inference.photo.prepare_image as it was before the background model (for comparison only):
    the median border pixel is the background, grey levels 13 above it are the object."""
    if max(image.size) > WORK_SIZE:
        image = image.copy()
        image.thumbnail((WORK_SIZE, WORK_SIZE), Image.Resampling.BOX)
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    background = _quantile(border, 0.5)
    if background > 127.5:
        grey = 255.0 - grey
        background = 255.0 - background
    level = np.maximum(grey - background, 0.0)
    above = level[level > OBJECT_LEVEL]
    if above.size:
        level *= 255.0 / max(_quantile(above, 0.995), 1.0)
    np.minimum(level, 255.0, out=level)
    mask = level > OBJECT_LEVEL
    h, w = mask.shape
    rows = np.flatnonzero(mask.sum(1) >= 1 + w // 256)
    cols = np.flatnonzero(mask.sum(0) >= 1 + h // 256)
    if rows.size and cols.size:
        level = level[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = level.shape
    scale = IMAGE_SIZE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = Image.fromarray(level, mode="F").resize(size, Image.Resampling.LANCZOS)
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    x0, y0 = (IMAGE_SIZE - size[0]) // 2, (IMAGE_SIZE - size[1]) // 2
    out[y0 : y0 + size[1], x0 : x0 + size[0]] = np.clip(np.asarray(small) + 0.5, 0, 255).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------- the benchmark


@dataclass
class Renders:
    """One condition's photos, as the two preparations made them ready for a model."""

    condition: str
    labels: np.ndarray
    indices: np.ndarray  # rows of the split the photos were rendered from
    today: np.ndarray  # uint8 (N, 28, 28)
    new: np.ndarray  # uint8 (N, 28, 28); zeros where the new preparation found no object
    no_object: np.ndarray  # bool (N,)
    photos: list[bytes]


def render_condition(condition: str, images: np.ndarray, labels: np.ndarray, n: int,
                     seed: int) -> Renders:
    rng = np.random.default_rng([seed, CONDITIONS.index(condition)])
    pool = np.flatnonzero(np.isin(labels, SHOE_CLASSES)) if condition == "pair" else np.arange(len(labels))
    indices = rng.choice(pool, size=min(n, len(pool)), replace=False)
    today, new, no_object, photos = [], [], [], []
    for i in indices:
        photo = render_photo(images[i], scene_for(condition, rng), rng)
        picture = open_image(photo)
        today.append(prepare_image_v1(picture))
        try:
            new.append(prepare_image(picture))
            no_object.append(False)
        except NoObject:
            new.append(np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8))
            no_object.append(True)
        photos.append(photo)
    return Renders(condition, labels[indices], indices, np.stack(today), np.stack(new),
                   np.array(no_object), photos)


def accuracy(predictor, images: np.ndarray, labels: np.ndarray, mirror: bool = False,
             no_object: np.ndarray | None = None) -> float:
    p = predictor.probabilities(images)
    if mirror:
        p = (p + predictor.probabilities(np.ascontiguousarray(images[:, :, ::-1]))) / 2
    right = p.argmax(1) == labels
    if no_object is not None:
        right &= ~no_object  # a photo with an object that is said to have none is a miss
    return float(right.mean())


def one_image_at_a_time(predictor) -> tuple[object, bool]:
    """(the predictor without the mirror averaging its model.json may ask for, whether it asked):
    the bench's `new` column is one image alone, `new+mirror` averages it with its mirror."""
    meta = predictor.meta
    if not getattr(meta, "tta", False):
        return predictor, False
    predictor.meta = dataclasses.replace(meta, tta=False)
    return predictor, True


def stated_accuracy(predictor) -> float:
    """The test accuracy the run folder's model.json records."""
    meta = predictor.meta
    metrics = meta["metrics"] if isinstance(meta, dict) else meta.metrics
    return float(metrics["test_accuracy"])


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timings(images: np.ndarray, repeats: int) -> list[tuple[str, float]]:
    """Median seconds to decode and prepare a 12-megapixel JPEG photo and a 28x28 PNG."""
    rng = np.random.default_rng(0)
    small = open_image(render_photo(images[0], Scene(background="wood", ink="colour"), rng))
    big = cv2.resize(np.asarray(small.convert("RGB")), (4000, 3000), interpolation=cv2.INTER_CUBIC)
    big = np.clip(big + rng.normal(0, 2, big.shape), 0, 255).astype(np.uint8)
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(big).save(jpeg, format="JPEG", quality=92)
    Image.fromarray(images[0]).save(png, format="PNG")
    jpeg, png = jpeg.getvalue(), png.getvalue()
    decoded_png = open_image(png)
    return [
        ("12 MP JPEG (4000x3000): decode + today's preparation",
         timed(lambda: prepare_image_v1(open_image_v1(jpeg)), repeats)),
        ("12 MP JPEG (4000x3000): decode + new preparation",
         timed(lambda: prepare_image(open_image(jpeg)), repeats)),
        ("12 MP JPEG (4000x3000): decode only", timed(lambda: open_image(jpeg), repeats)),
        ("28x28 PNG: decode + new preparation", timed(lambda: prepare_image(open_image(png)), 50 * repeats)),
        ("28x28 PNG: new preparation of the decoded image",
         timed(lambda: prepare_image(decoded_png), 50 * repeats)),
    ]


def save_examples(directory: Path, renders: list[Renders], predictor, count: int = 12) -> None:
    """Side by side: the photo, what today's preparation gave the model, what the new one gives;
    the cases the new preparation gets right and today's gets wrong, and a few it still misses."""
    directory.mkdir(parents=True, exist_ok=True)
    chosen = []
    for r in renders:
        today = predictor.probabilities(r.today).argmax(1)
        new = predictor.probabilities(r.new).argmax(1)
        fixed = np.flatnonzero((today != r.labels) & (new == r.labels))[:1]
        missed = np.flatnonzero((new != r.labels) | r.no_object)[:1]
        chosen += [(r, i, today[i], new[i]) for i in (*fixed, *missed)]
    for r, i, today, new in chosen[: 2 * count]:
        photo = np.asarray(open_image(r.photos[i]).convert("RGB"))
        height = 224
        photo = cv2.resize(photo, (round(photo.shape[1] * height / photo.shape[0]), height),
                           interpolation=cv2.INTER_AREA)
        panels = [photo] + [np.repeat(cv2.resize(p, (height, height), interpolation=cv2.INTER_NEAREST)[..., None], 3, 2)
                            for p in (r.today[i], r.new[i])]
        gap = np.full((height, 8, 3), 255, np.uint8)
        strip = np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)
        verdict = "no-object" if r.no_object[i] else CLASS_NAMES[new].replace("/", "-").replace(" ", "-")
        name = (f"{r.condition}-{r.indices[i]}-true-{CLASS_NAMES[r.labels[i]]}-today-{CLASS_NAMES[today]}"
                f"-new-{verdict}").replace("/", "-").replace(" ", "-")
        Image.fromarray(strip).save(directory / f"{name}.png")


def blank_photos(n: int, seed: int) -> tuple[int, int]:
    """(photos, photos said to hold no object) of n grounds with nothing on them."""
    rng = np.random.default_rng([seed, len(CONDITIONS)])
    grounds = [c for c in CONDITIONS if c not in ("mirror", "rotation", "pair", "edge")]
    nothing = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    said = 0
    for _ in range(n):
        photo = render_photo(nothing, scene_for(str(rng.choice(grounds)), rng), rng)
        try:
            prepare_image(open_image(photo))
        except NoObject:
            said += 1
    return n, said


Row = tuple[str, int, list[float], int]  # condition, photos, accuracies (today, new, +mirror), no object


def condition_rows(predictor, renders: list[Renders]) -> list[Row]:
    """Accuracy per condition and on average after today's and the new preparation, alone and
    averaged with the mirror image; a photo the new one says holds no object counts as a miss."""
    rows = []
    for r in renders:
        accuracies = [accuracy(predictor, r.today, r.labels),
                      accuracy(predictor, r.new, r.labels, no_object=r.no_object),
                      accuracy(predictor, r.today, r.labels, mirror=True),
                      accuracy(predictor, r.new, r.labels, mirror=True, no_object=r.no_object)]
        rows.append((r.condition, len(r.labels), accuracies, int(r.no_object.sum())))
    for name, chosen in (("mean", rows), ("mean without pair", [r for r in rows if r[0] != "pair"])):
        if len(chosen) > 1:
            n = sum(r[1] for r in chosen)
            mean = np.sum([np.array(r[2]) * r[1] for r in chosen], axis=0) / n
            rows.append((name, n, list(mean), sum(r[3] for r in chosen)))
    return rows


def print_table(rows: list[Row], mirror: bool) -> None:
    columns = ["today", "new"] + (["today+mirror", "new+mirror"] if mirror else [])
    print(f"{'condition':<18} {'photos':>6} " + " ".join(f"{c:>12}" for c in columns) + f" {'no object':>9}")
    for name, n, values, no_object in rows:
        values = values if mirror else values[:2]
        print(f"{name:<18} {n:>6} " + " ".join(f"{100 * v:>11.1f}%" for v in values) + f" {no_object:>9}")


def print_summary(models: list[tuple[str, bool, float, list[Row]]]) -> None:
    """The new preparation's column of every model side by side, each model used as its
    model.json asks (averaged with the mirror image where it says so), with its test accuracy."""
    print("\nthe new preparation, each model as its model.json asks (+mirror where it does)")
    for k, (run_dir, averaged, _, _) in enumerate(models, 1):
        print(f"  [{k}] {run_dir}{' (+mirror)' if averaged else ''}")
    print(f"{'condition':<18} " + " ".join(f"{f'[{k}]':>7}" for k in range(1, len(models) + 1)))
    print(f"{'test set':<18} " + " ".join(f"{100 * test:>6.2f}%" for _, _, test, _ in models))
    for i, (name, *_) in enumerate(models[0][3]):
        print(f"{name:<18} " + " ".join(f"{100 * rows[i][2][3 if averaged else 1]:>6.1f}%"
                                        for _, averaged, _, rows in models))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True, metavar="RUN_DIR",
                        help="run folders written by `fmnist train`")
    parser.add_argument("--per-condition", type=int, default=300, help="photos per condition")
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS,
                        help="which conditions to render (default: all)")
    parser.add_argument("--split", default="test", choices=("test", "train"),
                        help="render these images: train is for tuning the preparation, test for reporting")
    parser.add_argument("--seed", type=int, default=0, help="RNG seed of the renders")
    parser.add_argument("--mirror-average", action="store_true",
                        help="add a column: probabilities averaged with those of the mirrored 28x28")
    parser.add_argument("--average", action="store_true",
                        help="add the models' average (an ensemble: probabilities averaged) as one more model")
    parser.add_argument("--repeats", type=int, default=20, help="repeats of each timing (median)")
    parser.add_argument("--save-examples", type=Path, metavar="DIR",
                        help="write a few photos with the 28x28 images both preparations made, as PNGs")
    args = parser.parse_args()

    images, labels = load_split(args.split)
    start = time.perf_counter()
    renders = [render_condition(c, images, labels, args.per_condition, args.seed) for c in args.conditions]
    print(f"rendered and prepared {sum(len(r.labels) for r in renders)} photos of {args.split} images "
          f"(seed {args.seed}) in {time.perf_counter() - start:.0f} s")
    blanks, said = blank_photos(args.per_condition, args.seed)
    print(f"blank photos (the grounds of all conditions, nothing on them): the new preparation says "
          f"'no object' for {said} of {blanks}; today's gives each a class")
    test_images, test_labels = load_split("test")
    loaded = [(run_dir, *one_image_at_a_time(load_model(run_dir))) for run_dir in args.models]
    if args.average:
        if len(loaded) < 2:
            parser.error("--average needs at least two --models")
        # Each member one image alone; the +mirror column averages their probabilities with the mirror's.
        loaded.append(("average of " + " ".join(args.models), Averaged([p for _, p, _ in loaded]),
                       all(averaged for *_, averaged in loaded)))
    models = []
    for run_dir, predictor, averaged in loaded:
        plain = accuracy(predictor, test_images, test_labels)
        mirrored = accuracy(predictor, test_images, test_labels, mirror=True)
        stated = ("" if isinstance(predictor, Averaged)
                  else f" (model.json: {100 * stated_accuracy(predictor):.2f}%"
                  f"{', which asks for mirror averaging' if averaged else ''})")
        print(f"\n{run_dir}: test accuracy {100 * plain:.2f}%, averaged with the mirror images "
              f"{100 * mirrored:.2f}%{stated}")
        rows = condition_rows(predictor, renders)
        print_table(rows, args.mirror_average)
        models.append((run_dir, averaged, mirrored if averaged else plain, rows))
        if args.save_examples and run_dir == args.models[-1]:
            save_examples(args.save_examples, renders, predictor)
    if len(models) > 1:
        print_summary(models)

    print("\npreparation time (median of repeats)")
    for label, seconds in timings(test_images, args.repeats):
        print(f"  {label:<55} {1000 * seconds:8.3f} ms")


if __name__ == "__main__":
    main()
