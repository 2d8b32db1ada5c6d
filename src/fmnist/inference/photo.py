"""Any picture as a Fashion-MNIST image: the photo preparation.

Fashion-MNIST was made from product photos: the edges close to the corner colour trimmed, the
longest side resized to 28, the short side padded, intensities negated, 8-bit grey. `prepare_image`
does the same to any picture, so the service, the CLI, training on photos and the tests share one
preprocessing. Real photos are not product photos: with OpenCV (the `photo` extra) a background
model finds the object on uneven light, coloured and textured grounds and under soft shadows, and a
picture with nothing on it raises NoObject (422) rather than getting a class. The docs' photo page
explains it; bench/photos.py and bench/real_photos.py measure it.

    python bench/photos.py --models runs/post --mirror-average
    python -m pytest tests/test_images.py
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from fmnist.data import IMAGE_SIZE
from fmnist.inference.decode import WORK_SIZE, ImageError, _luma, _to_rgb

OBJECT_LEVEL = 0.05 * 255  # the dataset's trim threshold: 5% of full intensity above background


def _opencv():
    """OpenCV when the `photo` extra is installed, else None: the simple preparation then serves."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2



# The background model. A photo's ground is rarely uniform: light falls off across it, corners
# darken, it has a colour and a texture, the object casts a shadow on it. So the ground's colour
# is modelled as a smooth surface (a quadratic in x and y per channel, fitted to the picture's
# border, then to all the ground that fit finds) and its remaining variation (noise, texture,
# JPEG) as a colour covariance. A pixel's level is its Mahalanobis distance from the ground: in
# colour, so a red shirt on brown wood of the same grey stands out, and in units of the ground's
# own variation, so wood grain does not. That distance is linear in the object's density over
# the ground, which is what the dataset's intensities are (a dark garment on white: 255 minus
# its grey). The thresholds below were tuned on renders of training images (bench/photos.py).
ANALYSIS_SIZE = 256  # pixels: photos are shrunk to this longest side for the background model
BORDER_BAND = 0.03  # of the shorter side: the band along the edges the ground is first fitted to
GROUND_SPREAD = 10.0  # RGB distance from the fitted ground always taken as ground when refitting
NOISE_FLOOR = 2.0  # grey levels added to the ground's spread: quantisation, noise-free PNGs
OBJECT_SIGMAS = 4.0  # ground spreads from the ground beyond which a pixel is object
LEVEL_FLOOR = 2.0  # ground spreads subtracted from every distance, so the ground turns black
MIN_OBJECT_AREA = 0.002  # of the picture: smaller blobs are specks of noise or texture
MIN_SOLIDITY = 0.5  # of a blob's pixels that must be far from the ground themselves, not specks
EQUAL_AREA = 0.8  # of a blob's area: blobs at least this large are its equals (a pair of shoes)
COPY_LIKENESS = 0.7  # overlap of two equal blobs' shapes above which one is a copy of the other
PART_GAP = 0.1  # of the object's longer side: a blob this close to its box is a part of it
SHADOW_LEVEL = 0.4  # of the object's median level: a fainter rim outside its core may be shadow
SHADOW_HUE = 0.9  # cosine between a pixel's darkening and the ground colour: above, shadow-like
SHADOW_SOFTNESS = 0.3  # a shadow's level changes by less than this fraction of itself per pixel
UPRIGHT_AREA = 0.95  # tilted object's tightest rectangle / its upright box below which it is turned
UPRIGHT_ANGLES = (4, 20)  # degrees: the tilts that are turned upright
FLAT_LEVELS = 3  # a 28x28 picture whose grey levels span fewer than this is blank


class NoObject(ImageError):
    """A picture in which nothing stands out from the background: blank, uniform, or noise."""

    status = 422


def _no_object(name: str) -> NoObject:
    return NoObject(f"{name}: no object found: the picture looks blank or uniform")


def _quantile(values: np.ndarray, q: float) -> float:
    """The q-quantile (nearest rank) of a 1-D array, cheaper than np.percentile on small ones."""
    k = min(len(values) - 1, int(q * len(values)))
    return float(np.partition(values, k)[k])


def _stretch(level: np.ndarray, object_pixels: np.ndarray) -> np.ndarray:
    """Levels scaled so the object's brightest pixels reach 255, as the dataset's objects do."""
    if object_pixels.size:
        level *= 255.0 / max(_quantile(object_pixels, 0.995), 1e-6)
    return np.minimum(level, 255.0, out=level)


def _box(mask: np.ndarray, specks: bool = False) -> tuple[slice, slice] | None:
    """The rows and columns holding object pixels. With `specks`, a row or column needs a few
    of them, so isolated noise specks do not stretch the box."""
    h, w = mask.shape
    rows = np.flatnonzero(mask.sum(1) >= (1 + w // 256 if specks else 1))
    cols = np.flatnonzero(mask.sum(0) >= (1 + h // 256 if specks else 1))
    if not rows.size or not cols.size:
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _fit_to_frame(level: np.ndarray) -> np.ndarray:
    """A cropped object as uint8 (28, 28): longest side resized to 28, centred on black."""
    h, w = level.shape
    scale = IMAGE_SIZE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = Image.fromarray(np.ascontiguousarray(level, dtype=np.float32), mode="F")
    small = np.asarray(small.resize(size, Image.Resampling.LANCZOS))
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    x0, y0 = (IMAGE_SIZE - size[0]) // 2, (IMAGE_SIZE - size[1]) // 2
    out[y0 : y0 + size[1], x0 : x0 + size[0]] = np.clip(small + 0.5, 0, 255).astype(np.uint8)
    return out


def _dataset_sized(image: Image.Image, name: str) -> np.ndarray:
    """A 28x28 picture, taken to be a Fashion-MNIST image already: negated when its ground is
    light, stretched when it is dim, nothing else."""
    grey = np.asarray(image) if image.mode == "L" else np.clip(_luma(_to_rgb(image)) + 0.5, 0, 255)
    grey = grey.astype(np.uint8)
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    if np.median(border) > 127.5:
        grey = 255 - grey
    peak = int(grey.max())
    if peak - int(grey.min()) < FLAT_LEVELS:
        raise _no_object(name)
    if peak >= 254:  # the dataset's objects peak at 254-255
        return grey
    return np.clip(grey * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)


def _grey_level(grey: np.ndarray) -> tuple[np.ndarray, tuple[slice, slice] | None]:
    """(level, box) the simple way, without OpenCV: the median border grey is the ground, grey
    levels more than OBJECT_LEVEL beyond it (on the side away from it) are the object."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    background = _quantile(border, 0.5)
    if background > 127.5:  # a dark object on a light ground: negate, as the dataset did
        grey = 255.0 - grey
        background = 255.0 - background
    level = np.maximum(grey - background, 0.0)
    level = _stretch(level, level[level > OBJECT_LEVEL])
    return level, _box(level > OBJECT_LEVEL, specks=True)


def _surface_basis(h: int, w: int) -> np.ndarray:
    """(H, W, 6): 1, x, y, x^2, xy, y^2 with x and y in -1..1, a quadratic surface's terms."""
    y, x = np.meshgrid(np.linspace(-1, 1, h, dtype=np.float32),
                       np.linspace(-1, 1, w, dtype=np.float32), indexing="ij")
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1)


def _fit_ground(rgb: np.ndarray, basis: np.ndarray,
                sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ground colour (H, W, 3), whitening matrix (3, 3)) fitted to the pixels in `sample`,
    leaving out those far from the fit (the object, where it reaches the border) in rounds."""
    a, b = basis[sample], rgb[sample]  # (n, 6), (n, 3)

    def ground_pixels(residual: np.ndarray) -> np.ndarray:
        distance = np.sqrt(np.einsum("nc,nc->n", residual, residual))
        return distance <= max(2.5 * float(np.median(distance)), GROUND_SPREAD)

    residual = b - np.median(b, axis=0)  # a first guess the object cannot pull: the median
    for terms in (3, 6, 6):  # a plane, then the quadratic
        fit = a[:, :terms] * ground_pixels(residual)[:, None]  # least squares, normal equations
        coef = np.linalg.solve(fit.T @ a[:, :terms] + 1e-6 * np.eye(terms), fit.T @ b)
        residual = b - a[:, :terms] @ coef
    residual = residual[ground_pixels(residual)]
    spread = np.cov(residual.T) if len(residual) > 3 else np.zeros((3, 3))  # a few-pixel picture
    covariance = spread + NOISE_FLOOR**2 * np.eye(3)
    values, vectors = np.linalg.eigh(covariance)
    whiten = (vectors / np.sqrt(values)) @ vectors.T  # covariance^(-1/2)
    return basis @ coef.astype(np.float32), whiten.astype(np.float32)


def _distance_from_ground(rgb: np.ndarray, basis: np.ndarray,
                          sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance (H, W), ground (H, W, 3)): each pixel's Mahalanobis distance from the ground
    fitted to the `sample` pixels, and that ground."""
    ground, whiten = _fit_ground(rgb, basis, sample)
    residual = (rgb - ground) @ whiten  # whiten is symmetric
    return np.sqrt(np.einsum("hwc,hwc->hw", residual, residual)), ground


def _shape(mask: np.ndarray, cv2) -> np.ndarray:
    """A blob's shape as float32 (24, 24): its box scaled to fill the square."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32)
    return cv2.resize(box, (24, 24), interpolation=cv2.INTER_AREA)


def _copies(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two blob shapes are copies of one another, as two shoes of a pair side by side
    are (likeness 0.81-1.00, median 0.96, in renders of training pairs), rather than mirror images, as the
    halves of one garment are (training images cut down the middle: 8% of trousers, 2% of bags
    and at most 1% of the other classes have halves that pass as copies)."""
    def likeness(a, b):
        return float(np.minimum(a, b).sum() / max(float(np.maximum(a, b).sum()), 1e-6))
    copy = likeness(a, b)
    return copy >= COPY_LIKENESS and copy >= likeness(a, b[:, ::-1])


def _boxes(stats: np.ndarray) -> np.ndarray:
    """(N, 4) x0, y0, x1, y1 (ends excluded) of OpenCV's component stats."""
    return np.concatenate([stats[:, :2], stats[:, :2] + stats[:, 2:4]], axis=1)


def _box_gaps(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """(N,) pixels between each box and one box: 0 when they touch or overlap."""
    dx = np.maximum(0, np.maximum(boxes[:, 0] - box[2], box[0] - boxes[:, 2]))
    dy = np.maximum(0, np.maximum(boxes[:, 1] - box[3], box[1] - boxes[:, 3]))
    return np.hypot(dx, dy)


def _keep_copies_apart(far: np.ndarray, closed: np.ndarray, cv2) -> None:
    """Cut the closed mask between the two largest blobs of `far` where they are copies side by
    side (a pair of shoes a few pixels apart), which the closing would otherwise join."""
    h, w = far.shape
    count, labels, stats, _ = cv2.connectedComponentsWithStats(far, connectivity=8)
    if count < 3:
        return
    a, b = 1 + np.argsort(-stats[1:, cv2.CC_STAT_AREA])[:2]
    if stats[b, cv2.CC_STAT_AREA] < max(EQUAL_AREA * stats[a, cv2.CC_STAT_AREA], MIN_OBJECT_AREA * h * w):
        return
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = _boxes(stats[[a, b]])
    if ax1 <= bx0 or bx1 <= ax0:  # side by side: cut the columns between them
        cut = np.s_[min(ay0, by0) : max(ay1, by1), min(ax1, bx1) : max(max(ax0, bx0), min(ax1, bx1) + 1)]
    elif ay1 <= by0 or by1 <= ay0:  # one above the other: cut the rows between them
        cut = np.s_[min(ay1, by1) : max(max(ay0, by0), min(ay1, by1) + 1), min(ax0, bx0) : max(ax1, bx1)]
    else:
        return
    if _copies(_shape(labels == a, cv2), _shape(labels == b, cv2)):
        closed[cut] = 0


def _object_blobs(far: np.ndarray, cv2) -> np.ndarray | None:
    """The object (bool (H, W)) among the blobs of pixels far from the ground, joined across
    small gaps; None when there is none. The object is the largest blob or, among blobs about
    as large, the one nearest the centre, with its parts: the blobs at or near its box (a handle
    cut off by a thin gap, a sleeve cut by a shadow line, a sole cut by a highlight), unless one
    is its copy: a pair of shoes gives one shoe, as the dataset has them."""
    h, w = far.shape
    far = far.astype(np.uint8)
    closed = cv2.morphologyEx(far, cv2.MORPH_CLOSE, _disc(5, cv2))
    _keep_copies_apart(far, closed, cv2)
    count, labels, stats, centres = cv2.connectedComponentsWithStats(closed, connectivity=8)
    areas, boxes = stats[:, cv2.CC_STAT_AREA], _boxes(stats)
    # Specks joined by the closing (noise, grain) make a blob that is mostly ground inside.
    solid = np.bincount(labels.ravel(), weights=far.ravel(), minlength=count)
    blobs = 1 + np.flatnonzero((solid[1:] >= MIN_SOLIDITY * areas[1:]) & (areas[1:] >= MIN_OBJECT_AREA * h * w))
    if not blobs.size:
        return None
    equals = blobs[areas[blobs] >= EQUAL_AREA * areas[blobs].max()]
    offsets = centres[equals] - ((w - 1) / 2, (h - 1) / 2)
    main = equals[np.argmin(np.hypot(offsets[:, 0], offsets[:, 1]))]
    shape = _shape(labels == main, cv2)
    others = [k for k in blobs if k != main and not (
        areas[k] >= EQUAL_AREA * areas[main] and _copies(shape, _shape(labels == k, cv2)))]
    kept, box, reach = [main], boxes[main], PART_GAP * max(stats[main, 2:4])  # pixels
    while others:  # parts of parts: a faint object in pieces grows its box piece by piece
        near = _box_gaps(boxes[others], box) <= reach
        if not near.any():
            break
        kept += [k for k, n in zip(others, near, strict=True) if n]
        others = [k for k, n in zip(others, near, strict=True) if not n]
        box = np.concatenate([boxes[kept, :2].min(0), boxes[kept, 2:].max(0)])
    return np.isin(labels, kept) & (far > 0)


def _disc(size: int, cv2) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def _fill_holes(mask: np.ndarray, cv2) -> np.ndarray:
    """The mask with every region it encloses added."""
    outside = np.pad(~mask, 1, constant_values=True).astype(np.uint8)
    _, labels = cv2.connectedComponents(outside, connectivity=4)
    return (labels != labels[0, 0])[1:-1, 1:-1]


def _without_shadow(level: np.ndarray, blobs: np.ndarray, shadowy: np.ndarray,
                    cv2) -> tuple[np.ndarray, np.ndarray]:
    """The level and blobs without the rim a soft cast shadow adds beside the object: regions
    outside the object's solid core, darker than the ground in the ground's own hue, and soft
    throughout and at their outer edge. (A faint part of the object itself, a light sole, a pale
    hem, ends in an edge. In renders of training images this rule removes 87% of the shadow
    regions and 2% of such parts.)"""
    core = _fill_holes(level > SHADOW_LEVEL * float(np.median(level[blobs])), cv2)
    if core.sum() < 0.5 * blobs.sum():  # no solid core (a faint or thin object): keep it all
        return level, blobs
    near_core = cv2.dilate(core.astype(np.uint8), _disc(5, cv2)) > 0  # its own soft edge stays
    rim = (blobs & shadowy & ~near_core).astype(np.uint8)
    count, labels = cv2.connectedComponents(rim, connectivity=8)
    if count == 1:
        return level, blobs
    dy, dx = np.gradient(level)
    steepness = np.hypot(dx, dy)
    edge = blobs & (cv2.erode(blobs.astype(np.uint8), _disc(3, cv2)) == 0)
    regions = labels.ravel()
    area = np.bincount(regions, minlength=count)
    edge_area = np.bincount(regions, edge.ravel(), count)
    mean_level = np.bincount(regions, level.ravel(), count) / np.maximum(area, 1)
    soft = np.bincount(regions, steepness.ravel(), count) / np.maximum(area, 1) < SHADOW_SOFTNESS * mean_level
    soft &= np.bincount(regions, (steepness * edge).ravel(), count) \
        < SHADOW_SOFTNESS * mean_level * np.maximum(edge_area, 1)
    soft[0] = False
    shadow = soft[labels]
    return np.where(shadow, 0.0, level), blobs & ~shadow


def _upright(level: np.ndarray, blobs: np.ndarray, cv2) -> tuple[np.ndarray, np.ndarray]:
    """The level and blobs turned upright when the object is visibly tilted (by 4-20 degrees):
    its tightest rectangle is turned and much smaller than its upright box. The dataset's
    objects stand upright: this turns 1 in 100 training images (sandals, sneakers: 3-4 in 100)
    and 4 in 5 of them tilted by 5-15 degrees."""
    points = cv2.findNonZero(blobs.astype(np.uint8))
    (cx, cy), (rw, rh), angle = cv2.minAreaRect(cv2.convexHull(points))
    angle = angle % 90  # OpenCV's angle convention changed in 4.5: reduce either to -45..45
    if angle > 45:
        angle -= 90
    _, _, bw, bh = cv2.boundingRect(points)
    if not UPRIGHT_ANGLES[0] <= abs(angle) <= UPRIGHT_ANGLES[1] or rw * rh > UPRIGHT_AREA * bw * bh:
        return level, blobs
    h, w = level.shape
    side = int(np.hypot(h, w)) + 2  # room for the corners
    turn = cv2.getRotationMatrix2D((cx, cy), angle, 1.0)
    turn[:, 2] += (side - w) / 2, (side - h) / 2
    level = cv2.warpAffine(level, turn, (side, side), flags=cv2.INTER_LINEAR)
    blobs = cv2.warpAffine(blobs.astype(np.uint8), turn, (side, side), flags=cv2.INTER_NEAREST)
    return level, blobs > 0


def _photo_level(rgb: np.ndarray, cv2) -> tuple[np.ndarray, tuple[slice, slice] | None]:
    """(level, box) of a photo with the background model; box None when there is no object."""
    h, w = rgb.shape[:2]
    basis = _surface_basis(h, w)
    band = max(1, round(BORDER_BAND * min(h, w)))
    border = np.zeros((h, w), dtype=bool)
    border[:band], border[-band:], border[:, :band], border[:, -band:] = True, True, True, True
    distance, _ = _distance_from_ground(rgb, basis, border)
    # Fitted again to all the ground that fit finds, away from anything object-like: the
    # border alone says little about the middle of a vignetted or textured ground.
    near = cv2.dilate((distance > OBJECT_SIGMAS).astype(np.uint8), _disc(max(3, max(h, w) // 50) | 1, cv2))
    sample = (near == 0) | border
    sample[1::2] = False  # every other row is plenty
    distance, ground = _distance_from_ground(rgb, basis, sample)

    blobs = _object_blobs(distance > OBJECT_SIGMAS, cv2)
    if blobs is None:
        return distance, None
    level = np.maximum(distance - LEVEL_FLOOR, 0.0) * (cv2.dilate(blobs.astype(np.uint8), _disc(5, cv2)) > 0)
    level = _stretch(level, level[blobs])
    # A shadow darkens the ground and keeps its hue: the pixel's darkening points along the ground.
    darkening = ground - rgb
    along = np.einsum("hwc,hwc->hw", darkening, ground)
    shadowy = along * np.abs(along) > SHADOW_HUE**2 * np.einsum("hwc,hwc->hw", darkening, darkening) \
        * np.einsum("hwc,hwc->hw", ground, ground)
    level, blobs = _without_shadow(level, blobs, shadowy, cv2)
    level, blobs = _upright(level, blobs, cv2)
    return level, _box(blobs)


def prepare_image(image: Image.Image | np.ndarray, *, name: str | None = None) -> np.ndarray:
    """A picture as a Fashion-MNIST image: uint8 (28, 28), a light object on black, centred,
    its longest side 28 pixels. Raises NoObject (a 422) when nothing stands out from the
    background; `name` names the picture in that message.

    EXIF orientation applied. A 28x28 picture is taken as a dataset image (only negated when its
    ground is light). Any other picture, with OpenCV (the `photo` extra): shrunk to 256 pixels,
    the ground modelled (see above), the level of each pixel its colour distance from the
    ground, the object the largest blob far from it with the blobs near it (its parts; not a
    copy of it: one shoe of a pair), less any cast shadow beside it, turned upright when tilted. Without OpenCV: the median border grey is the ground. Then the levels
    stretched so the object peaks at 255, cropped to the object, longest side resized to 28
    keeping the aspect ratio, padded to 28x28 around the centre.
    """
    name = name or "<image>"
    if isinstance(image, np.ndarray):  # pixel values 0..255, (H, W) grey or (H, W, 3|4) colour
        if image.dtype != np.uint8:
            image = np.clip(image, 0, 255).astype(np.uint8)
        image = Image.fromarray(np.ascontiguousarray(image))
    image = ImageOps.exif_transpose(image)
    if image.size == (IMAGE_SIZE, IMAGE_SIZE):
        return _dataset_sized(image, name)
    cv2 = _opencv()
    size = ANALYSIS_SIZE if cv2 is not None else WORK_SIZE
    if max(image.size) > size:
        image = image.copy()
        image.thumbnail((size, size), Image.Resampling.BOX)
    rgb = _to_rgb(image)
    if rgb.size == 0:
        raise ImageError(f"{name}: image has no pixels")
    level, box = _photo_level(rgb, cv2) if cv2 is not None else _grey_level(_luma(rgb))
    if box is None:
        raise _no_object(name)
    return _fit_to_frame(level[box])


def is_prepared(array: np.ndarray) -> bool:
    """Whether an array already holds Fashion-MNIST images: uint8, (28, 28) or (N, 28, 28)."""
    return array.dtype == np.uint8 and array.ndim in (2, 3) and array.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)


def prepare_batch(images) -> np.ndarray:
    """uint8 (N, 28, 28) from one or many PIL images or arrays. Arrays that already are
    Fashion-MNIST images (uint8, last two dimensions 28x28) are used as they are; anything else
    is a picture and goes through `prepare_image`."""
    if isinstance(images, Image.Image | np.ndarray):
        images = [images]
    prepared = []
    for image in images:
        if isinstance(image, np.ndarray) and is_prepared(image):
            prepared.extend(image.reshape(-1, IMAGE_SIZE, IMAGE_SIZE))
        elif isinstance(image, Image.Image | np.ndarray):
            prepared.append(prepare_image(image))
        else:
            raise TypeError(f"expected PIL images or numpy arrays, got {type(image).__name__}")
    if not prepared:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    return np.stack(prepared)


