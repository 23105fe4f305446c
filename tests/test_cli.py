"""The command line: help, evaluate --json, detect on images of any size, clear errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from test_model import TINY
from tinyfrcnn.__main__ import main
from tinyfrcnn.model import FasterRCNN


@pytest.fixture
def checkpoint(tmp_path):
    path = str(tmp_path / "tiny.npz")
    FasterRCNN(TINY, rng=np.random.default_rng(0)).save(path)
    return path


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "tinyfrcnn", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for word in ("train", "evaluate", "detect"):
        assert word in out.stdout


def test_evaluate_json_is_one_line_with_the_keys(checkpoint, capsys):
    assert main(["evaluate", "--checkpoint", checkpoint, "--images", "3", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) == {"AP", "AP50", "AP75", "per_class"}
    assert set(result["per_class"]) <= {"circle", "square", "triangle"}


def test_detect_writes_a_png_for_an_image_of_any_size(checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(0)
    src = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, (60, 100, 3), dtype=np.uint8)).save(src)
    out_dir = tmp_path / "out"
    assert main(["detect", "--checkpoint", checkpoint, "--out", str(out_dir), "--score-thresh", "0", str(src)]) == 0
    drawn = out_dir / "photo_detections.png"
    assert drawn.is_file()
    assert "detections" in capsys.readouterr().out


def test_clear_errors_for_missing_and_wrong_files(tmp_path, checkpoint):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["evaluate", "--checkpoint", str(tmp_path / "nope.npz")])
    junk = tmp_path / "junk.npz"
    junk.write_text("hello")
    with pytest.raises(SystemExit, match="not a tinyfrcnn checkpoint"):
        main(["evaluate", "--checkpoint", str(junk)])
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    with pytest.raises(SystemExit, match="cannot read"):
        main(["detect", "--checkpoint", checkpoint, str(not_image)])
    with pytest.raises(SystemExit):
        main(["train", "--steps", "0"])
