"""Images that are not clothing, drawn from a seed: the examples the out-of-distribution score
learns to tell from clothing (`fmnist.inference.calibrate`), and some of bench/ood.py's sets.

    from fmnist.inference.outliers import draw_outliers
    sets = draw_outliers(fashion_images, per_kind=1000, seed=0)   # {kind: uint8 (n, 28, 28)}

Each kind is drawn light on black at 28x28 as a scan would arrive, and half of each (but the
canvases and the noise) cropped to what is drawn and fitted to the frame as `prepare_image` fits a
photo's object, so both ways a picture reaches the network are covered. bench/ood.py measures
the score on these kinds drawn from another seed and on kinds never drawn here (handwritten
digits, glyphs in TrueType fonts, filled shapes and symbols, smooth blobs, scribbles, bar codes,
charts, everyday things, grey patches of photographs).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fmnist.data import IMAGE_SIZE
from fmnist.inference.photo import _box, _fit_to_frame

SIZE = IMAGE_SIZE


def resize(a: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((SIZE, SIZE), Image.BILINEAR))


def noise(n: int, rng) -> np.ndarray:
    """Uniform, Gaussian, salt-and-pepper and blocky noise, in turn."""
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            a = rng.integers(0, 256, (SIZE, SIZE))
        elif kind == 1:
            a = np.clip(rng.normal(128, 64, (SIZE, SIZE)), 0, 255)
        elif kind == 2:
            a = (rng.random((SIZE, SIZE)) < rng.uniform(0.05, 0.5)) * 255
        else:
            a = resize(rng.integers(0, 256, (7, 7)).astype(np.uint8))
        out.append(np.asarray(a, dtype=np.uint8))
    return np.stack(out)


def blank(n: int, rng) -> np.ndarray:
    """Plain canvases, black to white."""
    return np.stack([np.full((SIZE, SIZE), v, np.uint8) for v in np.linspace(0, 255, n).astype(int)])


def gradients(n: int, rng) -> np.ndarray:
    """Canvases whose grey changes linearly across them, in any direction: light falling on a wall."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1) - 0.5
    out = []
    for _ in range(n):
        angle, (a, b) = rng.uniform(0, 2 * np.pi), np.sort(rng.uniform(0, 255, 2))
        ramp = np.cos(angle) * xx + np.sin(angle) * yy
        ramp = (ramp - ramp.min()) / np.ptp(ramp)
        out.append(np.round(a + (b - a) * ramp).astype(np.uint8))
    return np.stack(out)


WORDS = ["HELLO", "fmnist", "42", "CAT", "abc", "Zalando", "OK", "?", "A", "xy", "DOG", "777", "hi", "SALE", "%", "&"]
LETTERS = list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")


def text(n: int, rng) -> np.ndarray:
    """Words and characters in Pillow's default font, light on black."""
    out = []
    font = ImageFont.load_default(size=40)
    for i in range(n):
        word = WORDS[i] if i < len(WORDS) else "".join(rng.choice(LETTERS, rng.integers(1, 6)))
        left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), word, font=font)
        w, h = right - left, bottom - top
        side = int(max(w, h) * rng.uniform(1.1, 1.6)) + 2
        img = Image.new("L", (side, side), 0)
        ImageDraw.Draw(img).text(((side - w) / 2 - left, (side - h) / 2 - top), word,
                                 fill=int(rng.integers(150, 256)), font=font)
        out.append(resize(np.asarray(img)))
    return np.stack(out)


CANVAS = 112  # shapes are drawn at four times the size and shrunk, smooth as a scan


def sketched(n: int, rng, paint: Callable[[ImageDraw.ImageDraw, np.random.Generator], None]) -> np.ndarray:
    """n images, each painted by `paint(draw, rng)` light on a black CANVAS-square canvas and
    shrunk to 28x28."""
    out = []
    for _ in range(n):
        img = Image.new("L", (CANVAS, CANVAS), 0)
        paint(ImageDraw.Draw(img), rng)
        out.append(resize(np.asarray(img)))
    return np.stack(out)


def _shape(draw: ImageDraw.ImageDraw, rng) -> None:
    for _ in range(rng.integers(1, 4)):
        x0, y0 = rng.integers(5, 60, 2)
        x1, y1 = x0 + rng.integers(20, 50), y0 + rng.integers(20, 50)
        fill, width = int(rng.integers(100, 256)), int(rng.integers(2, 10))
        kind, solid = rng.integers(0, 4), rng.random() < 0.5
        paint = {"fill": fill} if solid else {"outline": fill, "width": width}
        if kind == 0:
            draw.ellipse([x0, y0, x1, y1], **paint)
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], **paint)
        elif kind == 2:
            draw.line([x0, y0, x1, y1], fill=fill, width=width * (3 if solid else 1))
        else:
            draw.polygon([(x0, y1), ((x0 + x1) / 2, y0), (x1, y1)], **paint)


def shapes(n: int, rng) -> np.ndarray:
    """One to three rectangles, ellipses, triangles and lines, each drawn as an outline or solid."""
    return sketched(n, rng, _shape)


def _silhouette(draw: ImageDraw.ImageDraw, rng) -> None:
    for _ in range(rng.integers(1, 3)):
        corners = rng.integers(3, 11)
        (cx, cy), size = rng.integers(30, 82, 2), rng.integers(15, 50)
        angles, radii = np.sort(rng.uniform(0, 2 * np.pi, corners)), size * rng.uniform(0.3, 1, corners)
        draw.polygon([(cx + r * np.cos(t), cy + r * np.sin(t)) for r, t in zip(radii, angles, strict=True)],
                     fill=int(rng.integers(90, 256)))


def silhouettes(n: int, rng) -> np.ndarray:
    """One or two solid polygons of 3 to 10 corners at random angles and distances from a
    centre: shapes with a garment's solidity but none of its outlines."""
    return sketched(n, rng, _silhouette)


def _smooth(points: np.ndarray, steps: int = 24) -> np.ndarray:
    """A Catmull-Rom curve through the points, `steps` samples per span, ending on the last."""
    p = np.concatenate([points[:1], points, points[-1:]])
    t = np.linspace(0, 1, steps, endpoint=False)[:, None]
    spans = [0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (3 * p1 - p0 - 3 * p2 + p3) * t**3)
             for p0, p1, p2, p3 in zip(p[:-3], p[1:-2], p[2:-1], p[3:], strict=True)]
    return np.concatenate([*spans, points[-1:]])


def _stroke(draw: ImageDraw.ImageDraw, rng) -> None:
    for _ in range(rng.integers(1, 4)):
        corners = rng.integers(2, 8)
        start = rng.uniform(10, CANVAS - 10, 2)
        moves = rng.normal(0, rng.uniform(10, 35), (corners - 1, 2))
        points = np.clip(np.concatenate([start[None], start + np.cumsum(moves, 0)]), 2, CANVAS - 2)
        if rng.random() < 0.6:
            points = _smooth(points)
        draw.line([tuple(p) for p in points], fill=int(rng.integers(100, 256)),
                  width=int(rng.integers(2, 12)), joint="curve")


def strokes(n: int, rng) -> np.ndarray:
    """One to three pen strokes of 2 to 7 random corners, drawn as straight zigzags or smooth
    curves through them, of any width: marks, ticks and doodles."""
    return sketched(n, rng, _stroke)


def _face(draw: ImageDraw.ImageDraw, rng) -> None:
    (cx, cy), r = rng.integers(45, 67, 2), int(rng.integers(30, 45))
    width, fill = int(rng.integers(2, 7)), int(rng.integers(150, 256))
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=width)
    e = r // 3
    for side in (-1, 1):
        draw.ellipse([cx + side * e - 4, cy - e - 4, cx + side * e + 4, cy - e + 4], fill=fill)
    draw.arc([cx - e - 5, cy, cx + e + 5, cy + e + 8], 20, 160, fill=fill, width=width)


def faces(n: int, rng) -> np.ndarray:
    """Smiley faces: line drawings."""
    return sketched(n, rng, _face)


def textures(n: int, rng) -> np.ndarray:
    """Stripes, checks and dots at any scale and angle, over the whole frame or a box of it:
    fabric, tiles, a keyboard, with no garment's outline."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    out = []
    for i in range(n):
        angle, period = rng.uniform(0, np.pi), rng.uniform(2.5, 10)
        u = (np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / period
        v = (-np.sin(angle) * xx + np.cos(angle) * yy) * 2 * np.pi / period
        kind = i % 3
        if kind == 0:
            wave = np.sin(u)
        elif kind == 1:
            wave = np.sign(np.sin(u) * np.sin(v))
        else:
            wave = np.cos(u) * np.cos(v)
        if rng.random() < 0.5:
            wave = np.sign(wave)
        low, high = np.sort(rng.uniform(0, 255, 2))
        a = low + (high - low) * (wave + 1) / 2
        if rng.random() < 0.5:  # a textured box on black
            y0, x0 = rng.integers(0, SIZE // 3, 2)
            y1, x1 = rng.integers(2 * SIZE // 3, SIZE + 1, 2)
            box = np.zeros_like(a)
            box[y0:y1, x0:x1] = 1
            a *= box
        out.append(np.round(a).astype(np.uint8))
    return np.stack(out)


def inverted(fashion: np.ndarray, n: int, rng) -> np.ndarray:
    """Fashion-MNIST images dark on light: a picture prepared without its background removed."""
    return 255 - fashion[rng.choice(len(fashion), min(n, len(fashion)), replace=False)]


def framed(images: np.ndarray) -> np.ndarray:
    """Each image cropped to what is drawn on it and fitted to the frame, as `prepare_image`
    fits a photo's object (longest side 28, centred); an image with nothing drawn stays."""
    out = images.copy()
    for i, image in enumerate(images):
        box = _box(image > 0.05 * 255)
        if box is not None:
            out[i] = _fit_to_frame(image[box].astype(np.float32))
    return out


DRAWN: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "noise": noise, "blank": blank, "gradients": gradients, "text": text, "shapes": shapes,
    "faces": faces, "textures": textures, "silhouettes": silhouettes, "strokes": strokes,
}
UNFRAMED = ("noise", "blank", "gradients")  # nothing to crop to


def draw_outliers(fashion: np.ndarray, per_kind: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """{kind: uint8 (n, 28, 28)}: per_kind images of each kind above (blank canvases: at most
    64) and of `fashion`'s images inverted; half of each drawn kind framed (see `framed`)."""
    rng = np.random.default_rng(seed)
    sets = {}
    for kind, draw in DRAWN.items():
        images = draw(min(per_kind, 64) if kind == "blank" else per_kind, rng)
        if kind not in UNFRAMED:
            images[1::2] = framed(images[1::2])
        sets[kind] = images
    sets["inverted"] = inverted(fashion, per_kind, rng)
    return sets
