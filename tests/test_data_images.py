"""Loading single images to RGB (every Pillow mode, EXIF, bad files) and the image transform."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from acpo_lightning.data import BadSampleError, ImageTransform, load_image, open_image, to_rgb

RED = (255, 0, 0)
WHITE = (255, 255, 255)


def _palette_with_transparent_index(path):
    """A P image: index 0 transparent, index 1 opaque red; the left half is transparent."""
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, *RED] + [0] * (256 * 3 - 6))
    image.paste(0, (0, 0, 4, 8))
    image.save(path, transparency=0)
    return path


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 77, (77, 77, 77)),
        ("1", 1, WHITE),
        ("LA", (0, 0), WHITE),  # fully transparent black: the white background shows
        ("LA", (0, 255), (0, 0, 0)),
        ("RGBA", (255, 0, 0, 0), WHITE),
        ("RGBA", (255, 0, 0, 255), RED),
        ("RGBA", (0, 0, 0, 128), (127, 127, 127)),  # half-transparent black over white
        ("CMYK", (0, 255, 255, 0), RED),
        ("RGB", RED, RED),
    ],
)
def test_modes_written_to_png_or_tiff_load_as_viewer_shows_them(tmp_path, mode, value, expected):
    path = tmp_path / ("image.tiff" if mode == "CMYK" else "image.png")
    Image.new(mode, (8, 8), value).save(path)
    assert Image.open(path).mode == mode
    image = open_image(path)
    assert image.mode == "RGB"
    assert image.getpixel((3, 3)) == expected


def test_palette_transparency_composites_on_white(tmp_path):
    path = _palette_with_transparent_index(tmp_path / "palette.png")
    assert Image.open(path).mode == "P" and "transparency" in Image.open(path).info
    image = open_image(path)
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((7, 0)) == RED


@pytest.mark.parametrize(("value16", "value8"), [(65535, 255), (128 * 257, 128), (0, 0)])
def test_16_bit_png_is_scaled_to_8_bits(tmp_path, value16, value8):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((6, 6), value16, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I;16")
    assert open_image(path).getpixel((0, 0)) == (value8,) * 3


def test_cmyk_jpeg_loads_as_rgb(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=100)
    assert Image.open(path).mode == "CMYK"
    red, green, blue = open_image(path).getpixel((8, 8))
    assert red > 240 and green < 15 and blue < 15


def test_in_memory_modes_without_a_file_format():
    assert to_rgb(Image.new("La", (2, 2), (100, 255))).getpixel((0, 0)) == (100, 100, 100)
    assert to_rgb(Image.new("I", (2, 2), 100 * 257)).getpixel((0, 0)) == (100, 100, 100)
    assert to_rgb(Image.new("I", (2, 2), 200)).getpixel((0, 0)) == (200, 200, 200)
    assert to_rgb(Image.new("F", (2, 2), 0.5)).getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_6_is_applied(tmp_path):
    """Orientation 6 = rotate 90 degrees clockwise to display: the left edge becomes the top."""
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste(RED, (0, 0, 10, 20))  # red left quarter
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif.tobytes(), quality=100)
    upright = open_image(path)
    assert upright.size == (20, 40)
    assert upright.getpixel((10, 2))[0] > 200  # top is red
    assert upright.getpixel((10, 37))[0] < 50  # bottom is black


def test_encoded_bytes_and_hf_style_dicts_load():
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), RED).save(buffer, format="PNG")
    assert open_image(buffer.getvalue()).getpixel((0, 0)) == RED
    assert open_image({"bytes": buffer.getvalue(), "path": None}).getpixel((0, 0)) == RED


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _noise_image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("name", "write", "reason"),
    [
        ("missing.png", lambda path: None, "file not found"),
        ("garbage.png", lambda path: path.write_bytes(b"not an image at all" * 8), "cannot decode"),
        (
            "cut.jpg",
            lambda path: _truncate(_noise_image().save(path, quality=95) or path),
            "truncated",
        ),
        ("cut.png", lambda path: _truncate(_noise_image().save(path) or path), "truncated"),
        ("empty.png", lambda path: path.write_bytes(b""), "cannot decode"),
    ],
)
def test_bad_files_raise_bad_sample_error_naming_file_and_row(tmp_path, name, write, reason):
    path = tmp_path / name
    write(path)
    with pytest.raises(BadSampleError) as caught:
        load_image(path, origin="manifest m.csv", row=7)
    message = str(caught.value)
    assert f"manifest m.csv, row 7 ({path})" in message
    assert reason in message
    assert "on_bad_sample: skip" in message
    assert caught.value.problems[0].row == 7


def test_bad_sample_error_survives_a_dataloader_worker_reraise():
    """PyTorch re-raises worker errors as ``type(error)(message)``: that must keep the type."""
    error = BadSampleError("manifest m.csv, row 1 (a.png): file not found")
    assert isinstance(type(error)(str(error)), BadSampleError)


def test_transform_resizes_crops_and_normalizes():
    image = Image.new("RGB", (64, 32), WHITE)
    image.paste(RED, (0, 0, 32, 32))
    center = ImageTransform(16, augment=False)(image)
    assert center.shape == (3, 16, 16) and center.dtype == torch.float32
    assert center.min() >= -1 and center.max() <= 1
    # 64x32 -> 32x16, centre crop: left half red, right half white.
    assert torch.allclose(center[:, 8, 2], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.allclose(center[:, 8, 13], torch.ones(3))
    unit = ImageTransform(16, augment=False, normalize="zero_one")(image)
    assert torch.allclose(unit, (center + 1) / 2, atol=1e-6)


def test_random_crop_and_flip_are_random_but_seeded():
    image = Image.fromarray(np.arange(48 * 32 * 3, dtype=np.uint8).reshape(32, 48, 3))
    transform = ImageTransform(32, random_flip=True)
    torch.manual_seed(0)
    first = [transform(image) for _ in range(6)]
    torch.manual_seed(0)
    again = [transform(image) for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert len({tuple(t[0, 0, :4].tolist()) for t in first}) > 1


def test_small_images_are_a_problem_unless_upscaling_is_allowed():
    small = Image.new("RGB", (20, 40))
    reason = ImageTransform(32).problem(small)
    assert reason is not None and "20x40" in reason and "upscale" in reason
    assert ImageTransform(32, upscale=True)(small).shape == (3, 32, 32)
    assert ImageTransform(16, resize=False).problem(small) is None
    with pytest.raises(ValueError, match="smaller than the 32x32 crop"):
        ImageTransform(32)(small)


def test_transform_rejects_bad_arguments():
    with pytest.raises(ValueError, match="resolution"):
        ImageTransform(0)
    with pytest.raises(ValueError, match="normalize"):
        ImageTransform(8, normalize="imagenet")
