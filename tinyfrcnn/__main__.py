"""Command line: ``python -m tinyfrcnn train | evaluate | detect``."""

import argparse
import json
import os
import sys

import numpy as np

DEFAULT_OUT = os.path.join("runs", "shapes")
MIN_SIDE = 16  # detect pads shorter sides to this: the backbone's stride is 8
MAX_SIDE = 1024  # detect's --size: a 3x3 conv's columns at 2048 px would need gigabytes


def _int_in(low, high=None):
    """An argparse type: an integer >= low (and <= high)."""
    what = ("a positive integer" if low == 1 else "a non-negative integer" if low == 0 else f"an integer >= {low}"
            ) if high is None else f"an integer from {low} to {high}"

    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < low or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


_positive_int = _int_in(1)
_non_negative_int = _int_in(0)


def _float_in(low, high, low_open=False):
    """An argparse type: a finite float in [low, high] ((low, high] with low_open)."""
    what = f"a number in {'(' if low_open else '['}{low}, {high}]"

    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (low < v <= high if low_open else low <= v <= high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


def _add_device(parser, default="cpu", help_default="cpu (default)"):
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default,
                        help=f"where the network runs: {help_default} or cuda (an NVIDIA GPU, via numba-cuda)")


def _check_device(name):
    from .device import check_device

    try:
        return check_device(name)
    except RuntimeError as e:
        raise SystemExit(f"error: --device {name}: {e}") from None


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m tinyfrcnn",
        description="Faster R-CNN from scratch in NumPy + Numba, trained on a toy shapes dataset.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate,detect}")

    t = sub.add_parser("train", help="train a detector on the shapes dataset",
                       description="Train Faster R-CNN (approximate joint training) on the built-in shapes "
                                   "dataset; writes checkpoint.npz, loss_curve.png and metrics.json into --out.")
    t.add_argument("--out", help=f"output folder (default {DEFAULT_OUT}; with --resume, the checkpoint's folder)")
    t.add_argument("--steps", type=_positive_int, help="SGD steps (default from TrainConfig)")
    t.add_argument("--batch-size", type=_positive_int, help="images per step")
    t.add_argument("--lr", type=_float_in(0, 10, low_open=True), help="base learning rate")
    t.add_argument("--seed", type=_non_negative_int, help="random seed (same seed, same run)")
    t.add_argument("--train-images", type=_positive_int, help="size of the training split")
    t.add_argument("--eval-every", type=_non_negative_int,
                   help="validation AP every N steps (0: never; joint schedule only)")
    t.add_argument("--pooling", choices=("roi_pool", "roi_align"), help="RoI pooling of the head")
    t.add_argument("--schedule", choices=("joint", "alternating"), default="joint",
                   help="approximate joint training (default) or the paper's 4-step alternating training")
    t.add_argument("--resume", metavar="CHECKPOINT",
                   help="continue a run from its checkpoint, with the run's own settings (only --steps, "
                        "--out and --device may be given)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, train refuses to)")
    t.add_argument("--test-images", type=_non_negative_int, default=500,
                   help="evaluate on this many test images at the end (0: skip; default 500)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_device(t, default=None, help_default="cpu (default; with --resume, the run's device)")

    e = sub.add_parser("evaluate", help="AP of a checkpoint on the test split",
                       description="COCO-style AP (overall and per class) of a checkpoint on the shapes test split.")
    e.add_argument("--checkpoint", required=True, help="a .npz checkpoint written by train")
    e.add_argument("--images", type=_positive_int, default=500, help="number of test images (default 500)")
    e.add_argument("--json", action="store_true", help="print one JSON object on one line")
    _add_device(e)

    d = sub.add_parser("detect", help="draw detections on images",
                       description="Run a checkpoint on PNG/JPEG images and write <name>_detections.png files. "
                                   "Images of any size are resized (aspect kept) so their longer side is "
                                   "--size pixels, the size the detector was trained at; boxes are mapped "
                                   "back to the original pixels.")
    d.add_argument("--checkpoint", required=True, help="a .npz checkpoint written by train")
    d.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    d.add_argument("--out", default=".", help="folder for the drawn images (default: current folder)")
    d.add_argument("--size", type=_int_in(MIN_SIDE, MAX_SIDE), default=128,
                   help=f"longer side after resizing (default 128, {MIN_SIDE} to {MAX_SIDE})")
    d.add_argument("--score-thresh", type=_float_in(0, 1), default=0.5,
                   help="draw detections with at least this score (default 0.5)")
    _add_device(d)
    return parser


def _ap_table(ap, class_names):
    lines = [f"{'':12s} {'AP':>7s} {'AP50':>7s} {'AP75':>7s}",
             f"{'all':12s} {ap['AP']:7.3f} {ap['AP50']:7.3f} {ap['AP75']:7.3f}"]
    for label, value in sorted(ap["per_class"].items()):
        lines.append(f"{class_names[int(label)]:12s} {value:7.3f}")
    return "\n".join(lines)


_RUN_SETTINGS = ("batch_size", "lr", "seed", "train_images", "eval_every")


def _resumed_trainer(args):
    """The Trainer (or AlternatingTrainer) that ``--resume`` continues, with the run's own settings."""
    from .train import resume_run

    given = [f"--{name.replace('_', '-')}" for name in _RUN_SETTINGS + ("pooling",) if getattr(args, name) is not None]
    if args.schedule == "alternating":
        given.append("--schedule alternating")
    if given:
        raise SystemExit(f"error: --resume continues the run with its own settings; drop {', '.join(given)}")
    _check_out(args.out)
    if args.out and not args.overwrite:
        _refuse_to_replace(args.out, keep=os.path.dirname(os.path.abspath(args.resume)))
    try:
        return resume_run(args.resume, out_dir=args.out, steps=args.steps,
                          device=None if args.device is None else _check_device(args.device))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    except RuntimeError as e:  # the run was on "cuda" and there is no GPU here
        raise SystemExit(f"error: {e}; to go on with the run on the CPU, add --device cpu") from None


def _check_out(out):
    if out is not None and not out.strip():
        raise SystemExit("error: --out must name a folder, got an empty string")


def _refuse_to_replace(out, keep=None):
    """Exit with an error if ``out`` holds a run's checkpoint (other than in folder ``keep``)."""
    path = os.path.join(out, "checkpoint.npz")
    if os.path.exists(path) and os.path.abspath(out) != keep:
        raise SystemExit(f"error: {out} already holds a run ({path}); continue it with --resume {path}, "
                         "choose another --out, or add --overwrite to replace it")


def _new_run(args):
    """``train`` or ``train_alternating`` with the configs the options ask for."""
    from functools import partial

    from .model import ModelConfig
    from .train import TrainConfig, train, train_alternating

    tc = TrainConfig(device=_check_device(args.device or "cpu"))
    for name in ("steps",) + _RUN_SETTINGS:
        value = getattr(args, name)
        if value is not None:
            setattr(tc, name, value)
    if tc.batch_size > tc.train_images:
        raise SystemExit(f"error: --batch-size {tc.batch_size} is larger than the training split "
                         f"(--train-images {tc.train_images})")
    if args.schedule == "alternating" and tc.steps < 4:
        raise SystemExit(f"error: --schedule alternating needs --steps of at least 4 (one per stage), got {tc.steps}")
    mc = ModelConfig()
    if args.pooling:
        mc.pooling = args.pooling
    _check_out(args.out)
    if not args.overwrite:
        _refuse_to_replace(args.out or DEFAULT_OUT)
    return partial(train_alternating if args.schedule == "alternating" else train, args.out or DEFAULT_OUT, mc, tc)


def cmd_train(args):
    from .model import NonFiniteLoss
    from .shapes import CLASS_NAMES, shapes_split
    from .train import evaluate_model

    run = _resumed_trainer(args).fit if args.resume else _new_run(args)
    try:
        trainer = run(progress=not args.no_progress)
    except KeyboardInterrupt:
        return 130
    except NonFiniteLoss as e:
        raise SystemExit(f"error: training diverged: {e}") from None
    print(f"checkpoint: {trainer.checkpoint_path()}")
    if args.test_images:
        test = shapes_split("test", args.test_images)
        ap = evaluate_model(trainer.model, test)[0]
        print(f"test split ({len(test)} images):")
        print(_ap_table(ap, CLASS_NAMES))
        path = os.path.join(trainer.out_dir, "metrics.json")
        if not os.path.exists(path):
            return 0
        with open(path) as f:
            metrics = json.load(f)
        metrics["test"] = {"images": len(test), "AP": ap["AP"], "AP50": ap["AP50"], "AP75": ap["AP75"],
                           "per_class": {CLASS_NAMES[int(k)]: v for k, v in ap["per_class"].items()}}
        with open(path, "w") as f:
            json.dump(metrics, f, indent=2)
    return 0


def _load_model(path, device="cpu"):
    from .model import FasterRCNN

    device = _check_device(device)
    try:
        return FasterRCNN.load(path, device=device)[0]
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _class_names(model):
    """The shapes dataset's class names for a model with its 3 classes; "class k" otherwise."""
    from .shapes import CLASS_NAMES, NUM_CLASSES

    n = model.config.num_classes
    return CLASS_NAMES if n == NUM_CLASSES else ("background",) + tuple(f"class {k}" for k in range(1, n + 1))


def cmd_evaluate(args):
    from .shapes import CLASS_NAMES, NUM_CLASSES, shapes_split
    from .train import evaluate_model

    model = _load_model(args.checkpoint, args.device)
    if model.config.num_classes != NUM_CLASSES:
        raise SystemExit(f"error: {args.checkpoint} detects {model.config.num_classes} classes; the shapes "
                         f"test split has {NUM_CLASSES}")
    test = shapes_split("test", args.images)
    ap = evaluate_model(model, test)[0]
    if args.json:
        print(json.dumps({"AP": ap["AP"], "AP50": ap["AP50"], "AP75": ap["AP75"],
                          "per_class": {CLASS_NAMES[int(k)]: v for k, v in ap["per_class"].items()}}))
    else:
        print(f"test split ({len(test)} images):")
        print(_ap_table(ap, CLASS_NAMES))
    return 0


def _as_rgb(im):
    """A PIL image as 8-bit RGB: 16-bit and 32-bit integer images are scaled down from
    the 16-bit range (PIL would clip them at 255), transparent pixels are put on white."""
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        values = np.asarray(im, dtype=np.float64) / 257.0  # (h, w), 0..65535 -> 0..255
        im = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    return im.convert("RGB")


def load_image(path, size):
    """Read a PNG/JPEG as (3, h, w) float32 in [0, 1], resized so its longer side is
    ``size``; returns (image, (sx, sy)) where original pixels = resized pixels / s."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise SystemExit(f"error: image {path!r} does not exist")
    try:
        with Image.open(path) as im:
            im = _as_rgb(im)
            w, h = im.size
            scale = size / max(w, h)
            nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
            im = im.resize((nw, nh), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0  # (h, w, 3)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise SystemExit(f"error: cannot read {path!r} as an image: {e}") from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1)), (nw / w, nh / h)


def pad_to_min_side(image, min_side=MIN_SIDE):
    """Repeat the last row and column of a (3, h, w) image until both sides are at least
    ``min_side``: a long thin image leaves too few rows for the backbone's stride."""
    _, h, w = image.shape
    return np.pad(image, ((0, 0), (0, max(0, min_side - h)), (0, max(0, min_side - w))), mode="edge")


def _detections_path(out, image_path):
    return os.path.join(out, os.path.splitext(os.path.basename(image_path))[0] + "_detections.png")


def cmd_detect(args):
    from .viz import save_detections

    _check_out(args.out)
    targets = {}
    for path in args.images:
        targets.setdefault(_detections_path(args.out, path), []).append(path)
    clashes = [f"{', '.join(paths)} -> {out}" for out, paths in targets.items() if len(paths) > 1]
    if clashes:
        raise SystemExit(f"error: images would write the same file: {'; '.join(clashes)}; run them in separate calls "
                         "with different --out folders")
    model = _load_model(args.checkpoint, args.device)
    class_names = _class_names(model)
    os.makedirs(args.out, exist_ok=True)
    for path in args.images:
        image, (sx, sy) = load_image(path, args.size)
        det = model.detect(pad_to_min_side(image)[None])[0]
        _, h, w = image.shape
        boxes = np.minimum(det["boxes"], np.array([w, h, w, h], dtype=np.float32))  # (D, 4), off the padding
        keep = (det["scores"] >= args.score_thresh) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes = boxes[keep] / np.array([sx, sy, sx, sy], dtype=np.float32)
        original, _ = load_image(path, max(round(w / sx), round(h / sy)))
        out = _detections_path(args.out, path)
        save_detections(out, original, boxes, det["labels"][keep], det["scores"][keep], class_names)
        print(f"{path}: {int(keep.sum())} detections -> {out}")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train, "evaluate": cmd_evaluate, "detect": cmd_detect}[args.command](args)
    except OSError as e:  # an output folder that cannot be made or written, a full disk
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
