import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tinyfrcnn import shapes
from tinyfrcnn.shapes import (CLASS_NAMES, SPLIT_SEEDS, SPLIT_SIZES, ShapesDataset, export_coco,
                              load_coco, shape_crops, shape_mask, shapes_split)


def tight_box(mask):
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def box_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter), inter / min(area_a, area_b)


@pytest.fixture(scope="module")
def ds():
    return ShapesDataset(40, image_size=128, seed=7)


@pytest.fixture(scope="module")
def renders(ds):
    return [ds.render(i) for i in range(len(ds))]


def test_class_names():
    assert CLASS_NAMES == ("background", "circle", "square", "triangle")
    assert ShapesDataset.class_names == CLASS_NAMES
    assert ShapesDataset.num_classes == 3


def test_same_seed_same_item_in_any_order():
    a = ShapesDataset(6, seed=3)
    b = ShapesDataset(6, seed=3)
    forward = [a[i] for i in range(6)]
    backward = [b[i] for i in reversed(range(6))][::-1]
    for x, y in zip(forward, backward):
        assert np.array_equal(x["image"], y["image"])
        assert np.array_equal(x["boxes"], y["boxes"])
        assert np.array_equal(x["labels"], y["labels"])


def test_different_seeds_and_items_differ():
    a, b = ShapesDataset(2, seed=0), ShapesDataset(2, seed=1)
    assert not np.array_equal(a[0]["image"], b[0]["image"])
    assert not np.array_equal(a[0]["image"], a[1]["image"])


def test_render_matches_getitem(ds, renders):
    for i in (0, 5):
        item = ds[i]
        for key in ("image", "boxes", "labels"):
            assert np.array_equal(item[key], renders[i][key])


def test_types_ranges_and_counts(renders):
    counts = []
    for r in renders:
        img, boxes, labels = r["image"], r["boxes"], r["labels"]
        assert img.dtype == np.float32 and img.shape == (3, 128, 128)
        assert img.min() >= 0.0 and img.max() <= 1.0
        assert boxes.dtype == np.float32 and boxes.shape == (len(labels), 4)
        assert labels.dtype == np.int64 and labels.ndim == 1
        assert ((labels >= 1) & (labels <= 3)).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 128).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        full = r["full_boxes"]
        side = np.maximum(full[:, 2] - full[:, 0], full[:, 3] - full[:, 1])
        assert (side >= shapes.MIN_SIZE).all() and (side <= 64).all()
        assert (np.minimum(full[:, 2] - full[:, 0], full[:, 3] - full[:, 1]) >= shapes.MIN_SIZE - 1).all()
        counts.append(len(labels))
    assert min(counts) >= 1 and max(counts) <= 4
    assert set(counts) == {1, 2, 3, 4}
    assert set(np.concatenate([r["labels"] for r in renders]).tolist()) == {1, 2, 3}


def test_boxes_are_tight_around_visible_pixels(renders):
    for r in renders:
        for k, mask in enumerate(r["masks"]):
            box = r["boxes"][k]
            assert np.array_equal(box, tight_box(mask))
            x1, y1, x2, y2 = box.astype(int)
            assert mask[y1, x1:x2].any() and mask[y2 - 1, x1:x2].any()
            assert mask[y1:y2, x1].any() and mask[y1:y2, x2 - 1].any()
            # the drawn pixels carry the object's colour, up to the bounded noise
            pixels = r["image"][:, mask]  # (3, P)
            assert np.abs(pixels - r["colors"][k][:, None]).max() <= shapes.NOISE + 1e-6


def test_box_edges_found_from_the_image_alone(renders):
    """Pixels within the noise of an object's colour, inside its window, span its box."""
    for r in renders[:15]:
        for k, box in enumerate(r["boxes"]):
            fx1, fy1, fx2, fy2 = r["full_boxes"][k].astype(int)
            window = r["image"][:, fy1:fy2, fx1:fx2]  # (3, h, w)
            close = np.abs(window - r["colors"][k][:, None, None]).max(axis=0) <= shapes.NOISE + 1e-6
            found = tight_box(close) + np.array([fx1, fy1, fx1, fy1], dtype=np.float32)
            assert np.array_equal(found, box)


def test_overlap_rule(renders):
    for r in renders:
        full = r["full_boxes"]
        for i in range(len(full)):
            for j in range(i):
                iou, contain = box_iou(full[i], full[j])
                assert iou <= shapes.MAX_IOU + 1e-9
                assert contain <= shapes.MAX_CONTAINMENT + 1e-9
        assert (r["visible_fraction"] >= shapes.MIN_VISIBLE).all()
    assert any((r["visible_fraction"] < 1).any() for r in renders)  # occlusion does happen


def test_objects_contrast_with_their_surroundings(renders):
    """Background pixels just outside each object's window are far from its colour."""
    checked = 0
    for r in renders:
        others = r["masks"].any(axis=0)
        for k, (x1, y1, x2, y2) in enumerate(r["full_boxes"].astype(int)):
            ring = np.zeros(others.shape, dtype=bool)
            ring[max(y1 - 1, 0):y2 + 1, max(x1 - 1, 0):x2 + 1] = True
            ring[y1:y2, x1:x2] = False
            ring &= ~others
            if ring.any():
                d = np.sqrt(((r["image"][:, ring] - r["colors"][k][:, None]) ** 2).sum(axis=0))
                assert np.percentile(d, 5) >= 0.2
                checked += 1
    assert checked >= 50


def test_shape_masks_hand_worked():
    sq = shape_mask(2, 12)
    assert sq.shape == (12, 12) and sq.all()
    disc = shape_mask(1, 12)
    assert np.array_equal(tight_box(disc), [0, 0, 12, 12])
    assert abs(disc.sum() - np.pi * 36) < 12  # area of a disc of radius 6
    assert np.array_equal(disc, disc.T) and np.array_equal(disc, disc[::-1])
    odd = shape_mask(1, 13)
    assert np.array_equal(tight_box(odd), [0, 0, 13, 13])
    tri = shape_mask(3, 12)  # apex up: the bottom row is the full base
    assert tri[-1].all() and tri[0].sum() <= 1
    assert abs(tri.sum() - 72) <= 6
    assert np.array_equal(tri, tri[:, ::-1])
    assert tri.shape == (12, 12) and tight_box(tri)[2] - tight_box(tri)[0] == 12
    assert np.array_equal(shape_mask(3, 12, 2), tri[::-1])  # apex down
    assert shape_mask(3, 12, 1)[:, -1].all() and shape_mask(3, 12, 1)[:, 0].sum() <= 1  # apex left
    with pytest.raises(ValueError, match="label"):
        shape_mask(4, 12)


def test_indexing_errors():
    d = ShapesDataset(3)
    assert len(d) == 3
    for bad in (-1, 3, 100):
        with pytest.raises(IndexError):
            d[bad]
    with pytest.raises(TypeError):
        d[1.0]
    assert len(list(d)) == 3
    assert np.array_equal(d[np.int64(2)]["image"], d[2]["image"])


@pytest.mark.parametrize("kwargs, word", [
    ({"num_images": -1}, "num_images"), ({"num_images": 2.5}, "num_images"),
    ({"num_images": True}, "num_images"), ({"num_images": 2, "image_size": 16}, "image_size"),
    ({"num_images": 2, "image_size": 64.0}, "image_size"), ({"num_images": 2, "seed": -3}, "seed"),
])
def test_validation(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ShapesDataset(**kwargs)


@pytest.mark.parametrize("call, words", [
    (lambda: ShapesDataset(1, image_size=10**30), "image_size"),
    (lambda: shapes.render_scene(np.random.default_rng(0), 10**30), "image_size"),
    (lambda: shapes.render_scene(np.random.default_rng(0), 16), "image_size must be at least 32"),
    (lambda: shapes.shape_crops(10**30), r"\(num_images, 3, crop_size, crop_size\)"),
    (lambda: shapes.shape_mask(1, 10**30), "shape_mask: size"),
    (lambda: shapes.shape_mask(2, -3), "shape_mask: size must be a positive integer"),
    (lambda: shapes.shape_mask(4, 8), "shape_mask: label must be 1, 2 or 3"),
])
def test_sizes_are_checked_before_anything_is_allocated(call, words):
    with pytest.raises(ValueError, match=words):
        call()


def test_empty_dataset_and_batch():
    d = ShapesDataset(0)
    assert len(d) == 0
    images, boxes, labels = d.batch([])
    assert images.shape == (0, 3, 128, 128) and boxes == [] and labels == []
    d = ShapesDataset(5, image_size=64, seed=2)
    images, boxes, labels = d.batch([4, 1])
    assert images.shape == (2, 3, 64, 64) and images.dtype == np.float32
    assert np.array_equal(images[0], d[4]["image"]) and np.array_equal(boxes[1], d[1]["boxes"])
    assert np.array_equal(labels[0], d[4]["labels"])


def test_splits():
    assert len(set(SPLIT_SEEDS.values())) == 3
    assert SPLIT_SIZES == {"train": 4000, "val": 200, "test": 500}
    splits = {name: shapes_split(name) for name in ("train", "val", "test")}
    for name, d in splits.items():
        assert len(d) == SPLIT_SIZES[name] and d.seed == SPLIT_SEEDS[name]
    firsts = [splits[n][0]["image"] for n in splits]
    assert not np.array_equal(firsts[0], firsts[1]) and not np.array_equal(firsts[1], firsts[2])
    small = shapes_split("val", num_images=3, image_size=64)
    assert len(small) == 3 and small[0]["image"].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="name"):
        shapes_split("validation")


def test_coco_round_trip(tmp_path):
    from pycocotools.coco import COCO

    d = ShapesDataset(4, image_size=64, seed=11)
    path = export_coco(d, str(tmp_path))
    assert (tmp_path / "images" / "000000.png").exists()
    coco = COCO(path)
    assert sorted(coco.getImgIds()) == [0, 1, 2, 3]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["circle", "square", "triangle"]
    total = sum(len(d[i]["labels"]) for i in range(len(d)))
    assert len(coco.getAnnIds()) == total
    ann = coco.loadAnns(coco.getAnnIds(imgIds=0))[0]
    x1, y1, x2, y2 = d[0]["boxes"][0]
    assert ann["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
    assert ann["area"] == pytest.approx((x2 - x1) * (y2 - y1)) and ann["iscrowd"] == 0
    with open(path) as f:
        raw = json.load(f)
    assert min(a["id"] for a in raw["annotations"]) == 1
    items = load_coco(path)
    assert len(items) == len(d)
    for i, item in enumerate(items):
        ref = d[i]
        assert np.array_equal(item["boxes"], ref["boxes"])
        assert np.array_equal(item["labels"], ref["labels"]) and item["labels"].dtype == np.int64
        assert item["image"].shape == ref["image"].shape
        assert np.abs(item["image"] - ref["image"]).max() <= 0.5 / 255 + 1e-6


class OneItem:
    """A one-image dataset with the shapes classes, holding ``item``."""

    class_names = CLASS_NAMES

    def __init__(self, **item):
        self.item = {"image": np.full((3, 8, 8), 0.5, np.float32), "boxes": np.array([[1, 1, 4, 4]], np.float32),
                     "labels": np.array([1]), **item}

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return self.item


@pytest.mark.parametrize("item, match", [
    ({"image": np.full((3, 8, 8), 2.0, np.float32)}, r"image values must lie in \[0, 1\], got min 2.0 and max 2.0"),
    ({"image": np.full((3, 8, 8), -0.5, np.float32)}, r"image values must lie in \[0, 1\]"),
    ({"image": np.full((3, 8, 8), np.nan, np.float32)}, "image holds NaN or inf"),
    ({"image": np.full((8, 8, 3), 0.5, np.float32)},
     r"image must be \(3, H, W\) RGB, channels first, got shape \(8, 8, 3\)"),
    ({"image": np.full((3, 8, 8), 128, np.uint8)}, "image must be float32 or float64, got uint8"),
    ({"labels": np.array([4])}, r"labels\[0\] = 4 is not one of the dataset's classes 1..3"),
    ({"labels": np.array([0])}, r"labels\[0\] = 0 is not one of the dataset's classes 1..3"),
    ({"labels": np.array([1.0])}, "labels must be integers, got dtype float64"),
    ({"labels": np.array([1, 2])}, "labels has 2 entries but boxes has 1"),
    ({"boxes": np.array([[4, 1, 1, 4]], np.float32)}, r"boxes\[0\] = \[4.0, 1.0, 1.0, 4.0\] has x2 < x1"),
])
def test_export_coco_rejects_bad_items(tmp_path, item, match):
    with pytest.raises(ValueError, match=r"export_coco: dataset\[0\]: " + match):
        export_coco(OneItem(**item), str(tmp_path))
    assert not (tmp_path / "annotations.json").exists()


def test_export_coco_empty_item_and_integer_boxes(tmp_path):
    items = load_coco(export_coco(OneItem(boxes=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64)),
                                  str(tmp_path / "empty")))
    assert items[0]["boxes"].shape == (0, 4) and items[0]["labels"].shape == (0,)
    items = load_coco(export_coco(OneItem(boxes=np.array([[1, 2, 4, 6]])), str(tmp_path / "ints")))
    assert items[0]["boxes"].tolist() == [[1, 2, 4, 6]]


@pytest.mark.parametrize("change, match", [
    ({"image_id": 7}, "image_id 7 is not the id of an image in the file"),
    ({"bbox": [1, 1, -3, 3]}, r"bbox must be \[x, y, width, height\], finite in float32 with width, height >= 0, "
                              r"got \[1, 1, -3, 3\]"),
    ({"bbox": [1, 1, 3, -0.5]}, "bbox must be"),
    ({"bbox": [1, 1, 3]}, "bbox must be"),
    ({"bbox": [1, 1, 1e300, 3]}, "bbox must be"),
    ({"bbox": [1, 1, "3", 3]}, "bbox must be"),
    ({"category_id": 1.5}, r"category_id must be an integer >= 1 \(0 is background\), got 1.5"),
    ({"category_id": "square"}, "category_id must be an integer >= 1"),
    ({"category_id": 0}, "category_id must be an integer >= 1"),
    ({"category_id": 9}, r"category_id 9 is not the id of a category in the file \(\[1, 2, 3\]\)"),
])
def test_load_coco_rejects_bad_annotations(tmp_path, change, match):
    path = export_coco(OneItem(boxes=np.array([[1, 1, 4, 4], [2, 2, 5, 5]], np.float32), labels=np.array([1, 2])),
                       str(tmp_path))
    with open(path) as f:
        coco = json.load(f)
    coco["annotations"][1].update(change)
    with open(path, "w") as f:
        json.dump(coco, f)
    with pytest.raises(ValueError, match=r"load_coco: .*annotations.json: annotations\[1\] \(id 2\): " + match):
        load_coco(path)


@pytest.mark.parametrize("damage, match", [
    (lambda c: c.pop("annotations"), r"annotations must be a list of objects with keys \['id', 'image_id', 'bbox'"),
    (lambda c: c["annotations"][0].pop("category_id"), "annotations must be a list of objects"),
    (lambda c: c["images"][0].pop("file_name"), r"images must be a list of objects with keys \['id', 'file_name'\]"),
])
def test_load_coco_rejects_missing_keys(tmp_path, damage, match):
    path = export_coco(OneItem(), str(tmp_path))
    with open(path) as f:
        coco = json.load(f)
    damage(coco)
    with open(path, "w") as f:
        json.dump(coco, f)
    with pytest.raises(ValueError, match=r"load_coco: .*annotations.json: " + match):
        load_coco(path)


def test_shape_crops():
    images, labels = shape_crops(60, crop_size=32, seed=4)
    assert images.shape == (60, 3, 32, 32) and images.dtype == np.float32
    assert labels.shape == (60,) and labels.dtype == np.int64
    assert set(labels.tolist()) == {0, 1, 2}
    assert images.min() >= 0 and images.max() <= 1
    again, labels_again = shape_crops(60, crop_size=32, seed=4)
    assert np.array_equal(images, again) and np.array_equal(labels, labels_again)
    other, _ = shape_crops(60, crop_size=32, seed=5)
    assert not np.array_equal(images, other)
    # the shape sits near the middle: the centre pixel is (almost always) object-coloured,
    # i.e. part of a large region of near-identical colour
    centre = images[:, :, 16, 16][:, :, None, None]  # (N, 3, 1, 1)
    same = (np.abs(images - centre).max(axis=1) <= 2 * shapes.NOISE + 1e-6).sum(axis=(1, 2))  # (N,)
    assert np.median(same) >= 0.1 * 32 * 32
    empty, empty_labels = shape_crops(0)
    assert empty.shape == (0, 3, 32, 32) and empty_labels.shape == (0,)
    with pytest.raises(ValueError, match="crop_size"):
        shape_crops(3, crop_size=8)
    with pytest.raises(ValueError, match="num_images"):
        shape_crops(-2)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), index=st.integers(0, 999), size=st.integers(32, 96))
def test_invariants_hold_for_any_seed(seed, index, size):
    r = ShapesDataset(1000, image_size=size, seed=seed).render(index)
    assert 1 <= len(r["labels"]) <= 4
    assert r["image"].shape == (3, size, size)
    for k, mask in enumerate(r["masks"]):
        assert np.array_equal(r["boxes"][k], tight_box(mask))
    assert (r["visible_fraction"] >= shapes.MIN_VISIBLE).all()
