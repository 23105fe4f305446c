import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from tinyfrcnn import viz  # noqa: E402
from tinyfrcnn.shapes import CLASS_NAMES, ShapesDataset  # noqa: E402


@pytest.fixture
def ax():
    fig, ax = plt.subplots()
    yield ax
    plt.close(fig)


def test_show_image_pixel_extent(ax):
    image = np.zeros((3, 4, 6), dtype=np.float32)
    image[0, 1, 2] = 1.0
    artist = viz.show_image(ax, image)
    assert artist.get_extent() == [0, 6, 4, 0]
    assert artist.get_array().shape == (4, 6, 3)
    assert artist.get_array()[1, 2, 0] == 1.0
    assert ax.get_xlim() == (0, 6) and ax.get_ylim() == (4, 0)
    gray = viz.show_image(ax, np.full((5, 5), 2.0))
    assert gray.get_array().max() == 1.0  # clipped to [0, 1]
    with pytest.raises(ValueError, match="image"):
        viz.show_image(ax, np.zeros((4, 5, 6)))
    with pytest.raises(ValueError, match="image"):
        viz.show_image(ax, np.zeros((3, 5, 6), dtype=np.uint8))


def test_draw_boxes_positions_and_captions(ax):
    boxes = np.array([[1, 2, 11, 7], [20.5, 3, 30, 40]], dtype=np.float32)
    rects, captions = viz.draw_boxes(ax, boxes, labels=[1, 3], scores=[0.9, 0.25],
                                     class_names=CLASS_NAMES)
    assert len(rects) == 2 and len(ax.patches) == 2
    assert rects[0].get_xy() == (1, 2) and rects[0].get_width() == 10 and rects[0].get_height() == 5
    assert rects[1].get_xy() == (20.5, 3) and rects[1].get_width() == 9.5 and rects[1].get_height() == 37
    assert [t.get_text() for t in captions] == ["circle 0.90", "triangle 0.25"]
    assert captions[1].get_position() == (20.5, 3)
    assert rects[0].get_edgecolor() == to_rgba(viz.class_color(1))
    assert rects[0].get_edgecolor() != rects[1].get_edgecolor()


def test_caption_goes_inside_a_box_at_the_top_edge(ax):
    viz.show_image(ax, np.zeros((3, 128, 128), np.float32))
    _, captions = viz.draw_boxes(ax, [[10, 0, 50, 40], [10, 1, 50, 40], [60, 30, 90, 60]], labels=[1, 2, 3])
    assert [t.get_va() for t in captions] == ["top", "top", "bottom"]
    fig = ax.figure
    fig.canvas.draw()
    axes_box = ax.get_window_extent()
    for t in captions:  # every caption lies wholly inside the axes, none clipped away
        box = t.get_window_extent()
        assert box.y1 <= axes_box.y1 + 0.5 and box.y0 >= axes_box.y0 - 0.5


def test_draw_boxes_options(ax):
    rects, captions = viz.draw_boxes(ax, [[0, 0, 5, 5]], color="k", linestyle="--", linewidth=3)
    assert captions == [] and rects[0].get_edgecolor() == to_rgba("k")
    assert rects[0].get_linestyle() == "--" and rects[0].get_linewidth() == 3
    rects, captions = viz.draw_boxes(ax, np.zeros((2, 4)), labels=np.array([2, 2]))
    assert [t.get_text() for t in captions] == ["2", "2"]
    rects, captions = viz.draw_boxes(ax, np.zeros((1, 4)), scores=[0.5])
    assert [t.get_text() for t in captions] == ["0.50"]
    assert viz.draw_boxes(ax, np.zeros((0, 4))) == ([], [])
    assert viz.draw_boxes(ax, []) == ([], [])
    assert len(ax.patches) == 4


@pytest.mark.parametrize("kwargs, word", [
    ({"boxes": np.zeros((2, 3))}, "boxes"),
    ({"boxes": np.zeros((2, 4)), "labels": [1]}, "labels"),
    ({"boxes": np.zeros((2, 4)), "scores": [1, 2, 3]}, "scores"),
    ({"boxes": np.zeros((1, 4)), "labels": [4], "class_names": CLASS_NAMES}, "labels"),
    ({"boxes": [[0, 0, np.nan, 4]]}, r"draw_boxes: boxes holds NaN or inf \(first at index \(0, 2\)\)"),
    ({"boxes": np.zeros((1, 4)), "labels": [1.5]}, r"labels must be integer class indices, got \[1.5\]"),
    ({"boxes": np.zeros((1, 4)), "labels": ["circle"]}, "labels must be integer class indices"),
])
def test_draw_boxes_validation(ax, kwargs, word):
    with pytest.raises(ValueError, match=word):
        viz.draw_boxes(ax, **kwargs)


def test_draw_boxes_needs_axes(ax):
    with pytest.raises(ValueError, match="draw_boxes: ax must be a matplotlib Axes, got NoneType"):
        viz.draw_boxes(None, [[0, 0, 2, 2]])
    rects, _ = viz.draw_boxes(ax, [[0, 0, 2, 2]], labels=np.array([2.0]))  # integral floats are fine
    assert len(rects) == 1


def test_running_mean():
    assert np.allclose(viz.running_mean([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
    assert np.allclose(viz.running_mean([4, 0, 2], 1), [4, 0, 2])
    assert np.allclose(viz.running_mean([3, 1, 2], 10), [3, 2, 2])
    for window in (0, -1, 1.5):
        with pytest.raises(ValueError, match="running_mean: window must be a positive integer"):
            viz.running_mean([1, 2], window)
    with pytest.raises(ValueError, match="running_mean: values must be a 1-D sequence"):
        viz.running_mean([[1, 2], [3, 4]], 2)


def test_plot_curves(ax):
    lines = viz.plot_curves(ax, {"loss": [3, 2, 1, 1], "acc": ([0, 10], [0.2, 0.9])})
    assert len(lines) == 2 and len(ax.lines) == 2
    assert np.allclose(lines[0].get_ydata(), [3, 2, 1, 1])
    assert np.allclose(lines[1].get_xdata(), [0, 10])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["loss", "acc"]


def test_plot_curves_smoothing(ax):
    lines = viz.plot_curves(ax, {"loss": [4, 2, 0, 2]}, smooth=2)
    assert len(lines) == 1 and len(ax.lines) == 2  # faint raw curve + running mean
    assert np.allclose(lines[0].get_ydata(), [4, 3, 1, 1])
    with pytest.raises(ValueError, match="smooth"):
        viz.plot_curves(ax, {"loss": [1]}, smooth=-1)
    with pytest.raises(ValueError, match="loss"):
        viz.plot_curves(ax, {"loss": [[1, 2]]})


def test_save_detections_writes_png_and_closes(tmp_path):
    from PIL import Image

    item = ShapesDataset(1, image_size=64, seed=1)[0]
    before = plt.get_fignums()
    path = viz.save_detections(str(tmp_path / "det.png"), item["image"], item["boxes"], item["labels"],
                               np.ones(len(item["labels"])), CLASS_NAMES, title="ground truth")
    assert plt.get_fignums() == before
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 64
    nested = tmp_path / "new" / "folder" / "det.png"
    assert viz.save_detections(str(nested), item["image"], item["boxes"]) == str(nested) and nested.is_file()
    for bad in (str(tmp_path / "noext"), str(tmp_path), None):
        with pytest.raises(ValueError, match="save_detections: path must be a .png file name"):
            viz.save_detections(bad, item["image"], item["boxes"])
