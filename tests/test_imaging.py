"""Decoding, orienting, converting and fitting single images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from images import all_modes, rgb, with_orientation
from PIL import Image, ImageOps

from pipeline.fit import fit
from pipeline.imaging import encode, fitted_image, to_rgb


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillows_exif_transpose(orientation):
    data = with_orientation(rgb(1200, 800, orientation), orientation)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    bucket = (512, 768) if orientation >= 5 else (768, 512)
    ours = fitted_image(data, bucket).image
    assert ours.size == fit(*expected.size, *bucket)
    reference = np.asarray(expected.resize(ours.size, Image.Resampling.LANCZOS), np.float64)
    assert np.abs(np.asarray(ours, np.float64) - reference).mean() < 4, "same picture, same way up"


def test_every_mode_ends_as_rgb(tmp_path):
    for name, path in all_modes(tmp_path).items():
        image = to_rgb(Image.open(path))
        assert image.mode == "RGB", name


def test_alpha_and_palette_transparency_are_composited_on_the_background():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(rgba, (0, 0, 0)).getpixel((0, 0)) == (0, 0, 0)
    half = Image.new("LA", (4, 4), (0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    assert to_rgb(palette, (10, 20, 30)).getpixel((0, 0)) == (10, 20, 30)


def test_sixteen_bit_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 256, dtype=np.uint16).reshape(16, 16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, "PNG")
    image = to_rgb(Image.open(buffer))
    values = np.asarray(image)[..., 0]
    assert values.min() == 0 and values.max() == 255
    assert np.all(np.diff(values.ravel().astype(int)) >= 0), "monotone: no wrap-around or clipping"


def test_cmyk_converts_to_the_right_colour():
    buffer = io.BytesIO()
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(buffer, "JPEG", quality=95)
    red, green, blue = fitted_image(buffer.getvalue(), (64, 64)).image.getpixel((32, 32))
    assert red > 200 and green < 60 and blue < 60


def test_draft_decoding_keeps_the_quality_of_a_full_decode():
    data = io.BytesIO()
    rgb(4000, 3000, 5).save(data, "JPEG", quality=92)
    ours = np.asarray(fitted_image(data.getvalue(), (704, 512)).image, np.float64)
    full = Image.open(io.BytesIO(data.getvalue())).convert("RGB")
    reference = np.asarray(
        full.resize(fit(4000, 3000, 704, 512), Image.Resampling.LANCZOS), np.float64
    )
    psnr = 10 * np.log10(255**2 / np.mean((ours - reference) ** 2))
    assert psnr > 30


def test_a_truncated_file_raises():
    data = io.BytesIO()
    rgb(800, 600).save(data, "JPEG")
    with pytest.raises(OSError):
        fitted_image(data.getvalue()[:4000], (512, 512))


@pytest.mark.parametrize(
    "extension, pillow_format", [("jpg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")]
)
def test_encode_formats(extension, pillow_format):
    image = rgb(64, 48)
    decoded = Image.open(io.BytesIO(encode(image, extension, 90)))
    assert decoded.format == pillow_format and decoded.size == (64, 48)
