"""The toy shapes dataset: circles, squares and triangles on a textured, noisy background.

Every image is generated on the fly from ``np.random.default_rng([seed, i])``, so item
``i`` is the same whatever order items are read in and nothing is ever downloaded.

How an image is made:

1. Background: a random base colour with a linear colour gradient across the image,
   plus a few low-frequency colour blobs (separable Gaussians) and one set of colour
   stripes (a slanted sinusoid), clipped to [0, 1].
2. Objects: the number is uniform on {1, 2, 3, 4}. Each object picks a class uniformly
   (circle, square, triangle), a size ``s`` uniform on the integers
   ``[12, image_size // 2]`` and a top-left corner uniform over the positions that
   keep its ``s x s`` window fully inside the image. A circle is the disc of diameter
   ``s`` inscribed in the window, a square fills the window, a triangle is the
   isosceles triangle with base and height ``s``, apex up, down, left or right.
   Masks are hard (a pixel belongs to the shape when its centre does), so boxes are
   exact.
3. Overlap rule: a placement is rejected when the tight box of the new shape has
   IoU > ``MAX_IOU`` with the tight box of an earlier shape, or their intersection
   covers more than ``MAX_CONTAINMENT`` of the smaller of the two boxes (no shape
   nested inside another), or drawing it would leave an earlier shape with less than
   ``MIN_VISIBLE`` of its own pixels visible.
   After ``MAX_TRIES`` placement attempts (accepted ones included) the image keeps the
   objects placed so far (the first object always fits, so every image has at least one).
4. Colour: among ``COLOR_TRIES`` random colours, the first whose RGB distance to every
   pixel already drawn in the window (sampled every other row and column) is at least
   ``MIN_CONTRAST`` is used (else the one with the largest such distance), so each
   object stands out from the local background and from neighbours it touches.
5. Later objects are drawn over earlier ones; each box is the tight box of the
   object's VISIBLE pixels: ``x1 = min col, x2 = max col + 1`` (pixel ``(i, j)`` covers
   ``[j, j+1) x [i, i+1)``).
6. Per-pixel noise, uniform on [-``NOISE``, ``NOISE``] for each channel, over the whole
   image, clipped to [0, 1]. It is bounded, so an object pixel and a background pixel the
   colour search compared it with differ by at least ``MIN_CONTRAST - 2 * sqrt(3) * NOISE``
   in RGB distance (when the search succeeded); the search samples every other row and
   column, so a few neighbours it skipped come slightly closer.
"""

import json
import os

import numpy as np

from .checks import (as_array, as_boxes, as_float_array, check_array_fits, check_finite, check_non_negative_int,
                     check_positive_int)

CLASS_NAMES = ("background", "circle", "square", "triangle")
NUM_CLASSES = len(CLASS_NAMES) - 1
SPLIT_SEEDS = {"train": 1000, "val": 2000, "test": 3000}
SPLIT_SIZES = {"train": 4000, "val": 200, "test": 500}

MIN_OBJECTS, MAX_OBJECTS = 1, 4
MIN_SIZE = 12
MAX_IOU = 0.1
MAX_CONTAINMENT = 0.5
MIN_VISIBLE = 0.85
MAX_TRIES = 30
COLOR_TRIES = 16
MIN_CONTRAST = 0.3
NOISE = 0.05
MIN_IMAGE_SIZE = 32


def _check_image_size(value, name="image_size", low=MIN_IMAGE_SIZE):
    value = check_positive_int(value, name)
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    check_array_fits((3, value, value), name)
    return value


def background(rng, height, width):
    """A smooth, textured random background (3, H, W) float32 in [0, 1] (no noise yet).

    Base colour + linear gradient + three Gaussian colour blobs + slanted colour
    stripes. Every term is a sum of separable products ``a_c * u(y) * v(x)``, so the
    whole image is one small matrix product: (3H, 8) @ (8, W).
    """
    y = (np.arange(height) + 0.5) / height  # (H,)
    x = (np.arange(width) + 0.5) / width  # (W,)
    ones_y, ones_x = np.ones(height), np.ones(width)
    amps, us, vs = [], [], []
    amps.append(rng.uniform(0.15, 0.85, size=3))
    us.append(ones_y), vs.append(ones_x)
    gx, gy = rng.uniform(-0.3, 0.3, size=(2, 3))
    amps += [gy, gx]
    us += [y - 0.5, ones_y]
    vs += [ones_x, x - 0.5]
    for _ in range(3):
        cy, cx = rng.uniform(0, 1, size=2)
        sigma = rng.uniform(0.08, 0.25)
        amps.append(rng.uniform(-0.2, 0.2, size=3))
        us.append(np.exp(-0.5 * ((y - cy) / sigma) ** 2))
        vs.append(np.exp(-0.5 * ((x - cx) / sigma) ** 2))
    freq = 2 * np.pi * rng.uniform(1.0, 4.0)
    angle = rng.uniform(0, np.pi)
    phase = rng.uniform(0, 2 * np.pi)
    amp = rng.uniform(-0.08, 0.08, size=3)
    ay, ax = freq * np.sin(angle) * y + phase, freq * np.cos(angle) * x
    amps += [amp, amp]  # sin(ax + ay) = sin(ax) cos(ay) + cos(ax) sin(ay)
    us += [np.cos(ay), np.sin(ay)]
    vs += [np.sin(ax), np.cos(ax)]
    amps, us, vs = np.array(amps), np.array(us), np.array(vs)  # (T, 3), (T, H), (T, W)
    left = (amps.T[:, None, :] * us.T[None, :, :]).reshape(3 * height, -1)  # (3H, T)
    img = (left @ vs).astype(np.float32).reshape(3, height, width)  # (3, H, W)
    return np.clip(img, 0.0, 1.0, out=img)


def _add_noise(rng, img):
    """Add uniform noise on [-NOISE, NOISE] to every pixel and channel, in place, clipped to [0, 1]."""
    noise = rng.random(img.shape, dtype=np.float32)  # (3, H, W)
    noise -= 0.5
    noise *= np.float32(2 * NOISE)
    img += noise
    return np.clip(img, 0.0, 1.0, out=img)


def shape_mask(label, size, orientation=0):
    """Hard (size, size) bool mask of a shape whose tight window is ``size x size``.

    ``label`` is 1 (circle), 2 (square) or 3 (triangle); ``orientation`` k in 0..3
    turns the apex-up triangle by k quarter turns. A pixel is in the shape when its
    centre is: inside the disc of radius size/2, or inside the triangle.
    """
    if label not in (1, 2, 3):
        raise ValueError(f"shape_mask: label must be 1, 2 or 3, got {label!r}")
    size = check_positive_int(size, "size", "shape_mask")
    check_array_fits((size, size), "size", "shape_mask")
    c = (np.arange(size, dtype=np.float32) + 0.5) - size / 2  # (s,) pixel centres from the window centre
    if label == 1:
        r = size / 2
        return c[:, None] ** 2 + c[None, :] ** 2 <= r * r  # (s, s)
    if label == 2:
        return np.ones((size, size), dtype=bool)
    depth = (np.arange(size, dtype=np.float32) + 0.5) / size  # (s,) fraction of the height below the apex (label 3)
    mask = np.abs(c)[None, :] <= depth[:, None] * (size / 2)  # (s, s) apex up
    return np.rot90(mask, orientation)


def _tight_box(mask, y0, x0):
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1], dtype=np.float32)


def _overlaps_too_much(a, b):
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return False
    inter = iw * ih
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return inter > MAX_IOU * (area_a + area_b - inter) or inter > MAX_CONTAINMENT * min(area_a, area_b)


def _pick_color(rng, window_pixels):
    """A colour at least MIN_CONTRAST (RGB distance) from every pixel in ``window_pixels`` (3, P), if one is found."""
    candidates = rng.uniform(0, 1, size=(COLOR_TRIES, 3)).astype(np.float32)
    diff = candidates[:, :, None] - window_pixels[None]  # (T, 3, P)
    contrast = np.sqrt((diff * diff).sum(axis=1)).min(axis=1)  # (T,)
    ok = np.flatnonzero(contrast >= MIN_CONTRAST)
    return candidates[ok[0] if ok.size else int(np.argmax(contrast))]


def render_scene(rng, image_size, with_record=False):
    """Draw one image; returns a dict with image, boxes and labels.

    With ``with_record``, also the drawing record: ``masks`` (K, H, W) bool visible
    pixels, ``full_boxes`` (K, 4) tight boxes before occlusion, ``colors`` (K, 3),
    ``visible_fraction`` (K,).
    """
    H = W = _check_image_size(image_size)
    img = background(rng, H, W)  # (3, H, W)
    owner = np.full((H, W), -1, dtype=np.int16)  # index of the object visible at each pixel
    full_count, visible_count, full_boxes, labels, colors = [], [], [], [], []
    num_objects = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    max_size = image_size // 2
    tries = 0
    while len(labels) < num_objects and tries < MAX_TRIES:
        tries += 1
        label = int(rng.integers(1, NUM_CLASSES + 1))
        s = int(rng.integers(MIN_SIZE, max_size + 1))
        y0 = int(rng.integers(0, H - s + 1))
        x0 = int(rng.integers(0, W - s + 1))
        mask = shape_mask(label, s, int(rng.integers(0, 4)))  # (s, s)
        box = _tight_box(mask, y0, x0)
        if any(_overlaps_too_much(box, b) for b in full_boxes):
            continue
        under = owner[y0:y0 + s, x0:x0 + s][mask]  # owners of the pixels this shape would cover
        hidden = np.bincount(under[under >= 0], minlength=len(labels))  # (K,)
        if any(visible_count[k] - hidden[k] < MIN_VISIBLE * full_count[k] for k in range(len(labels))):
            continue
        window = img[:, y0:y0 + s, x0:x0 + s]  # (3, s, s)
        color = _pick_color(rng, window[:, ::2, ::2].reshape(3, -1))
        window[:, mask] = color[:, None]
        for k in range(len(labels)):
            visible_count[k] -= int(hidden[k])
        owner[y0:y0 + s, x0:x0 + s][mask] = len(labels)
        full_count.append(int(mask.sum()))
        visible_count.append(full_count[-1])
        full_boxes.append(box)
        labels.append(label)
        colors.append(color)
    _add_noise(rng, img)
    K = len(labels)
    boxes = np.zeros((K, 4), dtype=np.float32)  # (K, 4)
    for k in range(K):
        x1, y1, x2, y2 = full_boxes[k].astype(np.int64)
        boxes[k] = _tight_box(owner[y1:y2, x1:x2] == k, y1, x1)
    item = {"image": img, "boxes": boxes, "labels": np.array(labels, dtype=np.int64)}
    if with_record:
        item["masks"] = owner[None] == np.arange(K, dtype=np.int16)[:, None, None]  # (K, H, W)
        item["full_boxes"] = np.array(full_boxes, dtype=np.float32).reshape(K, 4)
        item["colors"] = np.array(colors, dtype=np.float32).reshape(K, 3)
        item["visible_fraction"] = np.array(visible_count, dtype=np.float64) / np.maximum(full_count, 1)
    return item


class ShapesDataset:
    """``num_images`` generated images of circles, squares and triangles.

    ``ds[i]`` is a dict: ``image`` (3, H, W) float32 in [0, 1], ``boxes`` (K, 4) float32
    (x1, y1, x2, y2), ``labels`` (K,) int64 in 1..3 (``class_names[label]`` names it).
    """

    class_names = CLASS_NAMES
    num_classes = NUM_CLASSES

    def __init__(self, num_images, image_size=128, seed=0):
        self.num_images = check_non_negative_int(num_images, "num_images")
        self.image_size = _check_image_size(image_size)
        self.seed = check_non_negative_int(seed, "seed")

    def __len__(self):
        return self.num_images

    def _index(self, i):
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an integer, got {type(i).__name__}")
        if not 0 <= i < self.num_images:
            raise IndexError(f"index {i} out of range for a dataset of {self.num_images} images")
        return int(i)

    def render(self, i):
        """Item ``i`` with the drawing record (masks, full boxes, colours): see render_scene."""
        rng = np.random.default_rng([self.seed, self._index(i)])
        return render_scene(rng, self.image_size, with_record=True)

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, self._index(i)])
        return render_scene(rng, self.image_size)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def batch(self, indices):
        """(images (B, 3, H, W) float32, [boxes (K_b, 4)], [labels (K_b,)]) for ``indices``."""
        items = [self[i] for i in indices]
        s = self.image_size
        images = np.stack([it["image"] for it in items]) if items else np.zeros((0, 3, s, s), np.float32)
        return images, [it["boxes"] for it in items], [it["labels"] for it in items]

    def __repr__(self):
        return f"ShapesDataset(num_images={self.num_images}, image_size={self.image_size}, seed={self.seed})"


def shapes_split(name, num_images=None, image_size=128):
    """The fixed ``train`` / ``val`` / ``test`` split (seeds SPLIT_SEEDS, sizes SPLIT_SIZES)."""
    if name not in SPLIT_SEEDS:
        raise ValueError(f"name must be one of {tuple(SPLIT_SEEDS)}, got {name!r}")
    n = SPLIT_SIZES[name] if num_images is None else num_images
    return ShapesDataset(n, image_size=image_size, seed=SPLIT_SEEDS[name])


def shape_crops(num_images, crop_size=32, seed=0):
    """Classification crops: (images (N, 3, S, S) float32, labels (N,) int64 in 0..2).

    One shape per crop (0 circle, 1 square, 2 triangle), side uniform on
    [0.35 S, 0.8 S], placed near the centre (within 3 px), on the same textured
    background with the same contrast rule and pixel noise as the detection images.
    """
    n = check_non_negative_int(num_images, "num_images")
    S = _check_image_size(crop_size, "crop_size", low=16)
    seed = check_non_negative_int(seed, "seed")
    check_array_fits((n, 3, S, S), "(num_images, 3, crop_size, crop_size)")
    rng = np.random.default_rng([seed, S])
    images = np.empty((n, 3, S, S), dtype=np.float32)  # (N, 3, S, S)
    labels = rng.integers(0, NUM_CLASSES, size=n).astype(np.int64)  # (N,)
    lo, hi = max(4, int(round(0.35 * S))), int(round(0.8 * S))
    for k in range(n):
        img = background(rng, S, S)  # (3, S, S)
        s = int(rng.integers(lo, hi + 1))
        centre = (S - s) // 2
        y0, x0 = np.clip(centre + rng.integers(-3, 4, size=2), 0, S - s)
        mask = shape_mask(int(labels[k]) + 1, s, int(rng.integers(0, 4)))  # (s, s)
        window = img[:, y0:y0 + s, x0:x0 + s]  # (3, s, s)
        window[:, mask] = _pick_color(rng, window[:, ::2, ::2].reshape(3, -1))[:, None]
        images[k] = _add_noise(rng, img)
    return images, labels


def _check_export_item(item, i, num_classes):
    """The image (3, H, W) in [0, 1], boxes (K, 4) and labels (K,) in 1..num_classes of ``dataset[i]``."""
    where = f"export_coco: dataset[{i}]"
    image = as_float_array(item["image"], "image", ndim=3, where=where)
    if image.shape[0] != 3:
        raise ValueError(f"{where}: image must be (3, H, W) RGB, channels first, got shape {image.shape}")
    check_finite(image, "image", where)
    if image.size and (image.min() < 0 or image.max() > 1):
        raise ValueError(f"{where}: image values must lie in [0, 1], got min {image.min()} and max {image.max()}")
    boxes = as_boxes(item["boxes"], "boxes", where)
    labels = as_array(item["labels"], "labels", ndim=1, where=where)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers, got dtype {labels.dtype.name}")
    if labels.shape[0] != boxes.shape[0]:
        raise ValueError(f"{where}: labels has {labels.shape[0]} entries but boxes has {boxes.shape[0]}")
    bad = (labels < 1) | (labels > num_classes)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{where}: labels[{j}] = {int(labels[j])} is not one of the dataset's classes "
                         f"1..{num_classes}")
    return image, boxes, labels


def export_coco(dataset, out_dir):
    """Write ``out_dir/images/NNNNNN.png`` and ``out_dir/annotations.json`` (COCO format).

    Image ids are dataset indices; annotation ids start at 1. ``bbox`` is
    ``[x1, y1, x2 - x1, y2 - y1]``: COCO boxes are continuous, like ours. Items are
    checked as they are written: image (3, H, W) float in [0, 1], boxes (K, 4), labels
    (K,) in 1..len(class_names) - 1; the json file is written last. Returns its path.
    """
    from PIL import Image

    names = getattr(dataset, "class_names", CLASS_NAMES)
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for i in range(len(dataset)):
        image, boxes, labels = _check_export_item(dataset[i], i, len(names) - 1)
        _, H, W = image.shape
        file_name = f"{i:06d}.png"
        pixels = np.round(image.transpose(1, 2, 0) * 255).astype(np.uint8)  # (H, W, 3)
        Image.fromarray(pixels).save(os.path.join(image_dir, file_name))
        images.append({"id": i, "file_name": file_name, "width": int(W), "height": int(H)})
        for box, label in zip(boxes.tolist(), labels.tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({
                "id": len(annotations) + 1, "image_id": i, "category_id": int(label),
                "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0,
            })
    coco = {
        "info": {"description": "tinyfrcnn toy shapes", "version": "1.0"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": names[c], "supercategory": "shape"} for c in range(1, len(names))],
    }
    path = os.path.join(out_dir, "annotations.json")
    with open(path, "w") as f:
        json.dump(coco, f)
    return path


def _check_annotation(ann, where, image_ids, category_ids=None):
    """An annotation's image_id is one of ``image_ids``, its category_id an integer >= 1 (one
    of ``category_ids`` when the file lists its categories) and its bbox [x, y, w, h]
    finite with w, h >= 0."""
    if ann.get("image_id") not in image_ids:
        raise ValueError(f"{where}: image_id {ann.get('image_id')!r} is not the id of an image in the file")
    category = ann.get("category_id")
    if isinstance(category, bool) or not isinstance(category, int) or category < 1:
        raise ValueError(f"{where}: category_id must be an integer >= 1 (0 is background), got {category!r}")
    if category_ids is not None and category not in category_ids:
        raise ValueError(f"{where}: category_id {category} is not the id of a category in the file "
                         f"({sorted(category_ids)})")
    bbox = ann.get("bbox")
    xywh = None
    if (isinstance(bbox, list) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        try:
            with np.errstate(over="ignore"):
                xywh = np.array(bbox, dtype=np.float32)  # (4,)
        except OverflowError:  # an int beyond float64
            pass
    if xywh is None or not np.isfinite(xywh).all() or xywh[2] < 0 or xywh[3] < 0:
        raise ValueError(f"{where}: bbox must be [x, y, width, height], finite in float32 with "
                         f"width, height >= 0, got {bbox!r}")


def load_coco(json_path):
    """Read an ``export_coco`` folder back: a list of {"image", "boxes", "labels"} by image id."""
    from PIL import Image

    with open(json_path) as f:
        coco = json.load(f)
    where = f"load_coco: {json_path}"
    for key, needs in (("images", ("id", "file_name")), ("annotations", ("id", "image_id", "bbox", "category_id"))):
        entries = coco.get(key) if isinstance(coco, dict) else None
        if not isinstance(entries, list) or not all(isinstance(e, dict) and all(k in e for k in needs)
                                                    for e in entries):
            raise ValueError(f"{where}: {key} must be a list of objects with keys {list(needs)}")
    root = os.path.join(os.path.dirname(json_path), "images")
    by_image = {img["id"]: [] for img in coco["images"]}
    categories = coco.get("categories")
    category_ids = ({c["id"] for c in categories if isinstance(c, dict) and "id" in c}
                    if isinstance(categories, list) else None)
    for k, ann in enumerate(coco["annotations"]):
        _check_annotation(ann, f"{where}: annotations[{k}] (id {ann['id']!r})", by_image, category_ids)
        by_image[ann["image_id"]].append(ann)
    items = []
    for img in sorted(coco["images"], key=lambda d: d["id"]):
        pixels = np.asarray(Image.open(os.path.join(root, img["file_name"])).convert("RGB"))  # (H, W, 3)
        anns = sorted(by_image[img["id"]], key=lambda a: a["id"])
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)  # (K, 4)
        items.append({
            "image": pixels.transpose(2, 0, 1).astype(np.float32) / 255.0,
            "boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
            "labels": np.array([a["category_id"] for a in anns], dtype=np.int64),
        })
    return items
