"""Robust image loading on real bad files written by Pillow, and dropping them from a dataset."""

from __future__ import annotations

import logging
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image
from torch.utils.data import DataLoader

from crossmetric.data.image_loading import SkippedImages, filter_unreadable, load_rgb_image
from crossmetric.data.sampler import ClassBalancedBatchSampler
from crossmetric.data.transforms import attach_transform, build_transform, collate_fn

PREPROCESSING = {
    "image_size": 16,
    "image_mean": (0.5,) * 3,
    "image_std": (0.5,) * 3,
    "interpolation": "bicubic",
    "crop_pct": 0.875,
}


def truncated_jpeg(path: Path, size: int = 600) -> Path:
    """A noise JPEG cut in half; 600 px so that draft decoding (at >= 256 px) really runs at half scale."""
    noise = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format="JPEG", quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG declaring width x height (8-bit RGB) with no pixel data: costs bytes, not gigabytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def test_unreadable_files_give_none_and_a_warning_naming_them(tmp_path, caplog):
    files = {
        "truncated": truncated_jpeg(tmp_path / "truncated.jpg"),
        "empty": tmp_path / "empty.jpg",
        "text": tmp_path / "notes.png",
        "missing": tmp_path / "missing.jpg",
    }
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not an image")
    skipped = SkippedImages()
    with caplog.at_level(logging.WARNING):
        for path in files.values():
            assert load_rgb_image(path, skipped) is None
    assert skipped.count == 4 and skipped.files == [str(p) for p in files.values()]
    for path in files.values():
        assert str(path) in caplog.text
    assert "Skipped 4 unreadable image(s)" in skipped.summary()


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    image = load_rgb_image(tmp_path / "cmyk.jpg")
    assert image.mode == "RGB"
    r, g, b = image.getpixel((4, 4))
    assert r > 230 and g < 25 and b < 25


def test_16_bit_png_is_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100], [257 * 200, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    image = load_rgb_image(tmp_path / "deep.png")
    assert image.mode == "RGB"
    assert np.asarray(image)[..., 0].tolist() == [[0, 100], [200, 255]]


def test_transparency_is_composited_on_white(tmp_path):
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.save(tmp_path / "palette.png", transparency=0)  # index 0 (black) is transparent
    image = load_rgb_image(tmp_path / "palette.png")
    assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((1, 1)) == (255, 0, 0)

    rgba = Image.new("RGBA", (2, 1), (0, 0, 255, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 0))
    rgba.save(tmp_path / "rgba.png")
    assert np.asarray(load_rgb_image(tmp_path / "rgba.png")).tolist() == [[[0, 0, 255], [255, 255, 255]]]

    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    assert load_rgb_image(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)
    Image.new("L", (2, 2), 77).save(tmp_path / "gray.png")
    assert load_rgb_image(tmp_path / "gray.png").getpixel((0, 0)) == (77, 77, 77)


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.new("RGB", (20, 10), (0, 128, 0)).save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert Image.open(tmp_path / "rotated.jpg").size == (20, 10)
    assert load_rgb_image(tmp_path / "rotated.jpg").size == (10, 20)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 6), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    image = load_rgb_image(tmp_path / "anim.gif")
    assert image.mode == "RGB" and image.getpixel((3, 3)) == (255, 0, 0)


def test_one_pixel_image_is_fine_and_upscaled(tmp_path):
    Image.new("RGB", (1, 1), (10, 20, 30)).save(tmp_path / "dot.png")
    image = load_rgb_image(tmp_path / "dot.png")
    assert image.size == (1, 1)
    for train in (True, False):
        assert build_transform(PREPROCESSING, train)(image).shape == (3, 16, 16)


def test_decompression_bombs_are_skipped(tmp_path, monkeypatch, caplog):
    huge = png_header_only(tmp_path / "huge.png", 20000, 20000)  # 4e8 pixels > 2 x default limit
    with caplog.at_level(logging.WARNING):
        assert load_rgb_image(huge) is None
    assert "huge.png" in caplog.text and "decompression bomb" in caplog.text
    # Between 1x and 2x the limit Pillow only warns; that is skipped too.
    Image.new("RGB", (12, 12)).save(tmp_path / "warned.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert load_rgb_image(tmp_path / "warned.png") is None


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read files with mode 000")
def test_permission_denied_gives_none(tmp_path):
    path = tmp_path / "locked.png"
    Image.new("RGB", (2, 2)).save(path)
    path.chmod(0)
    try:
        assert load_rgb_image(path) is None
    finally:
        path.chmod(0o644)


def make_dataset(tmp_path: Path) -> tuple[Dataset, list[str]]:
    """6 classes x 3 good images, plus a truncated, an empty and a non-image file in class 0."""
    paths, labels = [], []
    for c in range(6):
        for i in range(3):
            path = tmp_path / f"c{c}_{i}.jpg"
            Image.new("RGB", (10, 8), (40 * c, 10 * i, 0)).save(path)
            paths.append(str(path))
            labels.append(c)
    bad = [
        str(truncated_jpeg(tmp_path / "bad_truncated.jpg")),
        str(tmp_path / "bad_empty.jpg"),
        str(tmp_path / "bad_text.jpg"),
    ]
    Path(bad[1]).write_bytes(b"")
    Path(bad[2]).write_text("<html>not found</html>")
    features = Features({"image": ImageFeature(), "label": ClassLabel(num_classes=6)})
    return Dataset.from_dict({"image": paths + bad, "label": labels + [0, 0, 0]}, features=features), bad


def test_filter_unreadable_drops_bad_images(tmp_path):
    dataset, bad = make_dataset(tmp_path)
    kept, report = filter_unreadable(dataset, num_proc=2)
    assert len(kept) == 18 and report.count == 3 and sorted(report.files) == sorted(bad)
    assert any("truncated" in reason for reason in report.reasons)  # caught despite draft-mode decoding
    assert kept.features == dataset.features
    clean, again = filter_unreadable(kept)
    assert len(clean) == 18 and again.count == 0


def test_lazy_transform_loader_and_clear_error_on_bad_image(tmp_path):
    dataset, bad = make_dataset(tmp_path)
    kept, _ = filter_unreadable(dataset)
    train = attach_transform(kept, build_transform(PREPROCESSING, train=True))
    example = train[0]
    assert set(example) == {"pixel_values", "labels"} and example["pixel_values"].shape == (3, 16, 16)
    sampler = ClassBalancedBatchSampler(list(kept["label"]), batch_size=6, samples_per_class=3)
    loader = DataLoader(train, batch_sampler=sampler, collate_fn=collate_fn)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (6, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long and sorted(torch.bincount(batch["labels"]).tolist())[-2:] == [3, 3]

    workers = DataLoader(train, batch_sampler=sampler, collate_fn=collate_fn, num_workers=2)
    assert [b["labels"].tolist() for b in workers] == [b["labels"].tolist() for b in loader]
    # spawn/forkserver workers receive the dataset pickled, transform included
    assert torch.equal(pickle.loads(pickle.dumps(train))[0]["pixel_values"], train[0]["pixel_values"])

    unfiltered = attach_transform(dataset, build_transform(PREPROCESSING, train=False))
    with pytest.raises(ValueError, match="bad_truncated.jpg.*filter_unreadable"):
        unfiltered[18]
