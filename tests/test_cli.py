"""The command line: help, evaluate --json, detect on images of any size, clear errors."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from test_model import TINY
from test_train import tiny_train_config
from tinyfrcnn.__main__ import load_image, main
from tinyfrcnn.model import FasterRCNN
from tinyfrcnn.train import Trainer


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


@pytest.mark.parametrize("args", [
    ["--lr", "0"], ["--lr", "-0.1"], ["--lr", "nan"], ["--seed", "-1"], ["--test-images", "-3"],
    ["--eval-every", "-5"], ["--batch-size", "0"],
])
def test_train_rejects_bad_numbers_before_training(args, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--no-progress"] + args)
    assert stop.value.code == 2
    assert "expected a" in capsys.readouterr().err


def test_train_rejects_settings_that_cannot_work(tmp_path):
    with pytest.raises(SystemExit, match="--batch-size 8 is larger than the training split"):
        main(["train", "--batch-size", "8", "--train-images", "3"])
    with pytest.raises(SystemExit, match="at least 4"):
        main(["train", "--schedule", "alternating", "--steps", "2"])
    trainer = Trainer(TINY, tiny_train_config(), out_dir=str(tmp_path))
    trainer.train_step()
    trainer.train_step()
    path = trainer.save()
    with pytest.raises(SystemExit, match="own settings; drop --batch-size, --lr"):
        main(["train", "--resume", path, "--lr", "0.5", "--batch-size", "3"])
    with pytest.raises(SystemExit, match="at step 2 already"):
        main(["train", "--resume", path, "--steps", "1"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["train", "--resume", str(tmp_path / "nope.npz")])
    with pytest.raises(SystemExit, match="is a folder; give the .npz file in it"):
        main(["train", "--resume", str(tmp_path)])
    with pytest.raises(SystemExit, match="is a folder; give the .npz file in it"):
        main(["evaluate", "--checkpoint", str(tmp_path)])


def test_train_does_not_replace_a_run_unless_asked(tmp_path, capsys):
    quick = ["--steps", "1", "--train-images", "2", "--batch-size", "1", "--eval-every", "0", "--test-images", "0",
             "--no-progress"]
    other = tmp_path / "other"
    trainer = Trainer(TINY, tiny_train_config(steps=2), out_dir=str(other))
    trainer.train_step()
    other_run = trainer.save()
    before = open(other_run, "rb").read()
    with pytest.raises(SystemExit, match=f"{other} already holds a run .*--resume .*--overwrite to replace it"):
        main(["train", "--out", str(other)] + quick)
    resumable = Trainer(TINY, tiny_train_config(steps=2), out_dir=str(tmp_path / "mine")).save()
    with pytest.raises(SystemExit, match="already holds a run"):
        main(["train", "--resume", resumable, "--out", str(other)] + quick[-3:])
    assert open(other_run, "rb").read() == before
    assert main(["train", "--out", str(other), "--overwrite"] + quick) == 0
    assert open(other_run, "rb").read() != before
    assert main(["train", "--resume", resumable, "--no-progress", "--test-images", "0"]) == 0  # its own folder


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_train_says_when_it_diverged_and_cannot_write_out(tmp_path):
    for command in (["train"], ["detect", "--checkpoint", "x.npz", "img.png"]):
        with pytest.raises(SystemExit, match="--out must name a folder, got an empty string"):
            main(command + ["--out", ""])
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match="error: .*file"):
        main(["train", "--out", str(blocker / "run"), "--steps", "1", "--train-images", "1", "--batch-size", "1",
              "--eval-every", "0", "--test-images", "0", "--no-progress"])
    with pytest.raises(SystemExit, match="error: training diverged: step .*: the loss is"):
        main(["train", "--out", str(tmp_path / "run"), "--lr", "10", "--steps", "40", "--train-images", "16",
              "--batch-size", "2", "--eval-every", "0", "--test-images", "0", "--no-progress"])


def test_detect_refuses_images_that_would_write_one_file_and_reads_other_class_counts(tmp_path, capsys, monkeypatch):
    import PIL.Image

    a, b = tmp_path / "img.png", tmp_path / "sub" / "img.jpg"
    b.parent.mkdir()
    for path in (a, b):
        Image.fromarray(np.full((40, 40, 3), 100, np.uint8)).save(path)
    five = str(tmp_path / "five.npz")
    FasterRCNN(replace(TINY, num_classes=5), rng=np.random.default_rng(0)).save(five)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"images would write the same file: .*img.png, .*img.jpg -> .*img_detections"):
        main(["detect", "--checkpoint", five, "--out", str(out), str(a), str(b)])
    assert not out.exists()
    assert main(["detect", "--checkpoint", five, "--out", str(out), "--score-thresh", "0", str(a)]) == 0
    assert (out / "img_detections.png").is_file()
    with pytest.raises(SystemExit, match="detects 5 classes; the shapes test split has 3"):
        main(["evaluate", "--checkpoint", five, "--images", "2"])
    with pytest.raises(SystemExit) as stop:
        main(["detect", "--checkpoint", five, "--size", "100000", str(a)])
    assert stop.value.code == 2 and "an integer from 16 to 1024" in capsys.readouterr().err
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)  # 40 x 40 is then a "decompression bomb"
    with pytest.raises(SystemExit, match="cannot read .* as an image"):
        main(["detect", "--checkpoint", five, "--out", str(out), str(a)])


def test_resume_writes_into_the_runs_own_folder(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run1"
    trainer = Trainer(TINY, tiny_train_config(steps=2), out_dir=str(run))
    trainer.train_step()
    path = trainer.save()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", path, "--no-progress", "--test-images", "0"]) == 0
    assert f"checkpoint: {path}" in capsys.readouterr().out
    assert not (elsewhere / "runs").exists()
    assert (run / "metrics.json").is_file()
    assert Trainer.resume(path).step == 2


def test_resuming_a_gpu_run_without_a_gpu_says_how_to_go_on(tmp_path, monkeypatch):
    import tinyfrcnn.device as device_mod

    trainer = Trainer(TINY, tiny_train_config(steps=2, device="cuda"), out_dir=str(tmp_path))
    path = trainer.save()
    monkeypatch.setattr(device_mod, "cuda_available", lambda: False)
    with pytest.raises(SystemExit, match="asked for CUDA.*; to go on with the run on the CPU, add --device cpu"):
        main(["train", "--resume", path, "--no-progress", "--test-images", "0"])
    assert main(["train", "--resume", path, "--device", "cpu", "--no-progress", "--test-images", "0"]) == 0


def test_detect_pads_a_long_thin_image_and_rejects_a_tiny_size(checkpoint, tmp_path, capsys):
    src = tmp_path / "strip.png"
    Image.fromarray(np.full((20, 1000, 3), 200, dtype=np.uint8)).save(src)
    assert main(["detect", "--checkpoint", checkpoint, "--out", str(tmp_path), "--score-thresh", "0", str(src)]) == 0
    assert (tmp_path / "strip_detections.png").is_file()
    assert "detections" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["detect", "--checkpoint", checkpoint, "--size", "4", str(src)])


def test_load_image_scales_16_bit_images_and_puts_transparency_on_white(tmp_path):
    gray = np.linspace(0, 30000, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(gray).save(tmp_path / "gray16.png")
    image, _ = load_image(str(tmp_path / "gray16.png"), 64)
    assert image.shape == (3, 64, 64)
    np.testing.assert_allclose(image.max(), 30000 / 65535, atol=1 / 255)
    np.testing.assert_allclose(image[0, 0, 0], 0.0)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # black, fully transparent ...
    rgba[:4, :, 3] = 255  # ... except the top half, which is opaque black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    image, _ = load_image(str(tmp_path / "rgba.png"), 8)
    np.testing.assert_array_equal(image[:, :4], 0.0)
    np.testing.assert_array_equal(image[:, 4:], 1.0)
