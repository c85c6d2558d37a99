"""Decoding, orienting, converting and fitting single images."""

from __future__ import annotations

import io

import numpy as np
import pytest
import pyvips
from images import all_modes, rgb, tagged, with_orientation
from PIL import Image, ImageOps

from pipeline.fit import fit
from pipeline.imaging import (
    ENGINES,
    ORIENTED,
    _pillow_pixels,
    _vips_pixels,
    encode,
    fitted_image,
    read_header,
    to_rgb,
)


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


@pytest.mark.parametrize("extension", ["png", "bmp"])  # the libvips engine and the Pillow one
def test_an_enlarged_image_is_the_float_lanczos_picture_with_its_centres_in_place(extension):
    """A small image fitted to a larger bucket: close to a float Lanczos of it, not shifted by
    a fraction of a pixel (libvips' own upsizing was: 38.6 dB on a photo)."""
    y, x = np.mgrid[0:150, 0:200]
    smooth = np.stack(
        [128 + 90 * np.sin(x / 9.0), 128 + 90 * np.cos(y / 7.0), 128 + 60 * np.sin((x + y) / 13.0)],
        -1,
    ).astype(np.uint8)
    data = io.BytesIO()
    Image.fromarray(smooth).save(data, "PNG" if extension == "png" else "BMP")
    ours = np.asarray(fitted_image(data.getvalue(), (320, 256)).image, np.float64)
    size = fit(200, 150, 320, 256)
    channels = [
        Image.fromarray(smooth[..., c].astype(np.float32), "F").resize(
            size, Image.Resampling.LANCZOS
        )
        for c in range(3)
    ]
    reference = np.clip(np.stack([np.asarray(c) for c in channels], -1), 0, 255)
    assert ours.shape == reference.shape
    psnr = 10 * np.log10(255**2 / np.mean((ours - reference) ** 2))
    assert psnr > 45


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("size", [(512, 384), (1601, 1203), (333, 777), (4000, 3000)])
def test_the_jpeg_fast_path_gives_libvips_pixels(monkeypatch, size, mode, progressive):
    """simplejpeg's decode (odd sizes, DCT-scaled, grey, progressive) is only a faster way to
    the pixels libvips gives: the index and shards do not depend on which decoded a file."""
    data = io.BytesIO()
    rgb(*size).convert(mode).save(data, "JPEG", quality=90, progressive=progressive)
    for bucket in [(704, 512), (512, 512), (256, 384)]:
        fast = fitted_image(data.getvalue(), bucket).pixels
        with monkeypatch.context() as patch:
            patch.setitem(ENGINES, "JPEG", _vips_pixels)
            assert np.array_equal(fast, fitted_image(data.getvalue(), bucket).pixels)


def test_a_jpeg_libjpeg_warns_about_is_still_decoded_by_libvips():
    """Stray bytes before a marker make libjpeg warn, which simplejpeg treats as an error; the
    file decodes as it always has (libvips fails on errors only), not rejected."""
    data = io.BytesIO()
    rgb(64, 48).save(data, "JPEG", quality=90)
    stray = data.getvalue()[:-2] + b"\x12" + data.getvalue()[-2:]
    assert fitted_image(stray, (64, 64)).pixels.shape == (64, 85, 3)


def test_a_truncated_file_raises():
    data = io.BytesIO()
    rgb(800, 600).save(data, "JPEG")
    with pytest.raises((OSError, pyvips.Error)):
        fitted_image(data.getvalue()[:4000], (512, 512))


@pytest.mark.parametrize(
    "extension, pillow_format", [("jpg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")]
)
def test_encode_formats(extension, pillow_format):
    image = rgb(64, 48)
    decoded = Image.open(io.BytesIO(encode(image, extension, 90)))
    assert decoded.format == pillow_format and decoded.size == (64, 48)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_numpy_orientation_matches_pillows_transpose(orientation):
    stored = rgb(7, 5, orientation)
    expected = ImageOps.exif_transpose(tagged(stored, orientation))
    shown = ORIENTED[orientation](np.asarray(stored))
    assert np.array_equal(shown, np.asarray(expected))


def test_libvips_and_pillow_fit_every_mode_alike(tmp_path):
    """The two engines agree on every mode (alpha, palette, 16-bit, grey): same picture."""
    for name, path in all_modes(tmp_path).items():
        if name == "cmyk.jpg":  # libvips converts through a CMYK profile, Pillow naively
            continue
        with Image.open(path) as image:
            header = read_header(image)
        if header.format not in ENGINES:  # BMP: Pillow's alone
            continue
        bucket = (512, 768) if header.height > header.width else (768, 512)
        scaled = fit(header.width, header.height, *bucket)
        stored = scaled[::-1] if header.orientation in (5, 6, 7, 8) else scaled
        ours, _ = _vips_pixels(str(path), header, stored, (255, 255, 255))
        pillows, _ = _pillow_pixels(str(path), header, stored, (255, 255, 255))
        assert ours.shape == pillows.shape == (stored[1], stored[0], 3), name
        difference = np.abs(ours.astype(int) - pillows.astype(int)).mean()
        assert difference < 3, f"{name}: {difference:.2f} levels apart"


def test_an_icc_tagged_image_is_converted_through_its_profile():
    """Pure sRGB red stored in Display P3 (with its profile) comes back as sRGB red; without
    colour management it would stay the duller P3 numbers."""
    red = pyvips.Image.black(64, 64).new_from_image([255, 0, 0]).copy(interpretation="srgb")
    p3 = red.cast("uchar").icc_transform("p3", input_profile="srgb", embedded=False)
    data = p3.jpegsave_buffer(Q=95, keep="icc")
    stored_values = np.asarray(Image.open(io.BytesIO(data)))[32, 32]
    assert stored_values[0] < 245, "P3 numbers differ from sRGB's"
    fitted = fitted_image(data, (64, 64))
    red, green, blue = fitted.image.getpixel((32, 32))
    assert red > 248 and green < 12 and blue < 12
    assert "converted to sRGB" in fitted.note and "P3" in fitted.note


def test_cmyk_is_converted_through_a_profile_and_noted():
    buffer = io.BytesIO()
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(buffer, "JPEG", quality=95)
    fitted = fitted_image(buffer.getvalue(), (64, 64))
    assert "CMYK converted to sRGB" in fitted.note


def test_a_sixteen_bit_rgba_png_is_scaled_and_composited():
    pixels = np.zeros((32, 48, 4), np.uint16)
    pixels[..., 0] = 65535  # red, half transparent over white: pink
    pixels[..., 3] = 32768
    image = pyvips.Image.new_from_array(pixels).copy(interpretation="rgb16")
    fitted = fitted_image(image.pngsave_buffer(), (48, 32))
    red, green, blue = fitted.image.getpixel((24, 16))
    assert red > 250 and 120 < green < 135 and 120 < blue < 135
