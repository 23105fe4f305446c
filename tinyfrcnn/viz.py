"""Drawing images, boxes and training curves with matplotlib.

Every function but ``save_detections`` (which makes its own figure and returns the
file's path) draws on an ``ax`` it is given and returns the artists it made, so a
caller can restyle or count them. Images are shown with ``extent=(0, W, H, 0)``, so
pixel (row i, col j) covers [j, j+1) x [i, i+1) and a box (x1, y1, x2, y2) in
continuous coordinates is the rectangle from (x1, y1) to (x2, y2) on screen, with no
half-pixel shift.
"""

import os

import numpy as np

from .checks import check_finite, check_positive_int
from .device import is_device_array, to_host

PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
           "#bfef45", "#fabed4", "#469990")


def class_color(label):
    """A fixed colour for class ``label`` (the same in every picture)."""
    return PALETTE[int(label) % len(PALETTE)]


def _host(x):
    return to_host(x) if is_device_array(x) else x


def show_image(ax, image):
    """Show a (3, H, W) (or (H, W)) float image in [0, 1]; returns the AxesImage."""
    image = np.asarray(_host(image))
    if image.ndim == 3 and image.shape[0] in (1, 3):
        image = image.transpose(1, 2, 0)  # (H, W, C)
        if image.shape[2] == 1:
            image = image[:, :, 0]  # (H, W)
    elif image.ndim != 2:
        raise ValueError(f"image must have shape (3, H, W), (1, H, W) or (H, W), got {image.shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"image must be a float array in [0, 1], got dtype {image.dtype}")
    H, W = image.shape[:2]
    kwargs = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0} if image.ndim == 2 else {}
    artist = ax.imshow(np.clip(image, 0.0, 1.0), extent=(0, W, H, 0), interpolation="nearest", **kwargs)
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    return artist


def _caption(label, score, class_names):
    parts = []
    if label is not None:
        parts.append(class_names[label] if class_names is not None else str(label))
    if score is not None:
        parts.append(f"{score:.2f}")
    return " ".join(parts)


CAPTION_FONTSIZE = 7  # points
CAPTION_POINTS = CAPTION_FONTSIZE + 4  # a caption's height: its line of text and its padding


def _room_above(ax, y):
    """Whether a caption fits between data height ``y`` and the top edge of ``ax``."""
    top = ax.transAxes.transform((0.0, 1.0))[1]  # display pixels, upward
    at = ax.transData.transform((0.0, y))[1]
    return top - at >= CAPTION_POINTS * ax.figure.dpi / 72


def draw_boxes(ax, boxes, labels=None, scores=None, class_names=None, color=None, linewidth=1.5,
               linestyle="-"):
    """Draw (N, 4) boxes (x1, y1, x2, y2) as rectangles, captioned with class and score.

    Colours follow the class (``class_color``) unless ``color`` is given. A caption sits
    on the box's top edge, or just inside it where the axes end above the box (draw the
    image first, so that the axes know where they end). Returns ``(rectangles,
    captions)``: lists of the Rectangle patches and Text artists.
    """
    from matplotlib.patches import Rectangle

    if not hasattr(ax, "add_patch"):
        raise ValueError(f"draw_boxes: ax must be a matplotlib Axes, got {type(ax).__name__}")
    boxes = np.asarray(_host(boxes), dtype=np.float64)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {boxes.shape}")
    check_finite(boxes, "boxes", "draw_boxes")  # a NaN corner would draw nothing, silently
    n = len(boxes)
    if labels is not None:
        labels = np.asarray(_host(labels)).reshape(-1)
        if len(labels) != n:
            raise ValueError(f"labels must have one entry per box ({n}), got {len(labels)}")
        if labels.dtype.kind not in "iu" and not (labels.dtype.kind == "f" and np.all(labels == np.round(labels))):
            raise ValueError(f"labels must be integer class indices, got {labels.tolist()}")
        if class_names is not None and n and not (0 <= labels.min() and labels.max() < len(class_names)):
            raise ValueError(f"labels must index class_names (0..{len(class_names) - 1}), got {labels.tolist()}")
    if scores is not None:
        scores = np.asarray(_host(scores), dtype=np.float64).reshape(-1)
        if len(scores) != n:
            raise ValueError(f"scores must have one entry per box ({n}), got {len(scores)}")
    rects, captions = [], []
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        label = None if labels is None else int(labels[i])
        score = None if scores is None else float(scores[i])
        c = color if color is not None else class_color(0 if label is None else label)
        rect = Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=c, linewidth=linewidth,
                         linestyle=linestyle)
        ax.add_patch(rect)
        rects.append(rect)
        text = _caption(label, score, class_names)
        if text:
            va = "bottom" if _room_above(ax, y1) else "top"
            captions.append(ax.text(x1, y1, text, fontsize=CAPTION_FONTSIZE, color="white", va=va, ha="left",
                                    bbox={"facecolor": c, "edgecolor": "none", "pad": 1, "alpha": 0.8},
                                    clip_on=True))
    return rects, captions


def running_mean(values, window):
    """Mean of the last ``window`` values at each step (fewer at the start)."""
    window = check_positive_int(window, "window", "running_mean")
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"running_mean: values must be a 1-D sequence, got shape {values.shape}")
    cumsum = np.concatenate([[0.0], np.cumsum(values)])  # (T + 1,)
    t = np.arange(1, len(values) + 1)
    start = np.maximum(t - window, 0)
    return (cumsum[t] - cumsum[start]) / (t - start)


def plot_curves(ax, curves, smooth=0, xlabel="step", ylabel=None, logy=False):
    """Plot ``curves`` (name -> sequence of values, or name -> (steps, values)).

    With ``smooth`` > 1 the raw values are drawn faintly under their running mean over
    ``smooth`` steps. Returns the main Line2D of each curve, in order.
    """
    if isinstance(smooth, bool) or not isinstance(smooth, (int, np.integer)) or smooth < 0:
        raise ValueError(f"smooth must be a non-negative integer window, got {smooth!r}")
    lines = []
    for i, (name, values) in enumerate(curves.items()):
        if isinstance(values, tuple) and len(values) == 2:
            steps, values = np.asarray(values[0]), np.asarray(values[1], dtype=np.float64)
        else:
            values = np.asarray(values, dtype=np.float64)
            steps = np.arange(len(values))
        if values.ndim != 1 or len(steps) != len(values):
            raise ValueError(f"curve {name!r} must be a 1-D sequence (or matching steps and values)")
        c = PALETTE[i % len(PALETTE)]
        if smooth > 1:
            ax.plot(steps, values, color=c, alpha=0.25, linewidth=0.8)
            (line,) = ax.plot(steps, running_mean(values, smooth), color=c, label=name)
        else:
            (line,) = ax.plot(steps, values, color=c, label=name)
        lines.append(line)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if lines:
        ax.legend(loc="best", fontsize=8)
    return lines


def save_detections(path, image, boxes, labels=None, scores=None, class_names=None, title=None, dpi=100):
    """Write a PNG of ``image`` with its detections drawn to ``path`` (which must end in
    .png; its folder is made if missing); returns ``path``.

    The figure is made without pyplot, so nothing stays open afterwards.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).lower().endswith(".png"):
        raise ValueError(f"save_detections: path must be a .png file name, got {path!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    show_image(ax, image)
    draw_boxes(ax, boxes, labels=labels, scores=scores, class_names=class_names)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
