"""Decoding: every image mode becomes 8-bit RGB, and bad files become reasons, not crashes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract import images
from extract.images import BadImage, resize, to_rgb
from tests.conftest import MINI
from tests.helpers import mini_files, open_image


def _saved(tmp_path: Path, image: Image.Image, name: str, **kwargs: object) -> Path:
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    pixels = np.zeros((4, 4, 4), dtype=np.uint8)
    pixels[..., 0] = 255  # red ...
    pixels[:2, :, 3] = 255  # ... opaque in the top half, transparent below
    rgb = np.asarray(open_image(_saved(tmp_path, Image.fromarray(pixels, "RGBA"), "a.png")))
    assert rgb.shape == (4, 4, 3)
    assert (rgb[:2] == [255, 0, 0]).all() and (rgb[2:] == [255, 255, 255]).all()


def test_grey_becomes_three_equal_channels(tmp_path: Path) -> None:
    grey = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    rgb = np.asarray(open_image(_saved(tmp_path, Image.fromarray(grey, "L"), "g.png")))
    assert rgb.shape == (4, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], grey)


@pytest.mark.parametrize("peak", [65535, 200])
def test_16_bit_png_is_scaled_by_its_bit_depth(tmp_path: Path, peak: int) -> None:
    """16-bit values are out of 65535, however dark the image is."""
    values = np.linspace(0, peak, 16).astype(np.uint16).reshape(4, 4)
    path = _saved(tmp_path, Image.fromarray(values), "deep.png")
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # really decoded as 16-bit
    rgb = np.asarray(open_image(path)).astype(int)
    expected = np.round(values * (255 / 65535)).astype(int)
    assert np.abs(rgb[..., 0] - expected).max() <= 1


def test_palette_gif_and_bmp_decode(tmp_path: Path) -> None:
    source = Image.open(mini_files("train", "cat", 1)[0])
    for name in ("p.gif", "b.bmp", "c.webp"):
        rgb = np.asarray(open_image(_saved(tmp_path, source, name)))
        assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8 and rgb.std() > 0


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    wide = Image.new("RGB", (8, 4), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = _saved(tmp_path, wide, "r.jpg", exif=exif)
    assert open_image(path).size == (4, 8)


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_text("hello, I am text"), "not an image"),
    (lambda p: p.write_bytes(mini_files("train", "dog", 1)[0].read_bytes()[:300]), "truncated"),
])
def test_bad_files_raise_bad_image_with_a_reason(tmp_path: Path, make: object, reason: str
                                                 ) -> None:
    path = tmp_path / "bad.jpg"
    make(path)  # type: ignore[operator]
    with pytest.raises(BadImage, match=reason):
        open_image(path)


def test_images_above_the_pixel_limit_are_refused_before_decoding(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _saved(tmp_path, Image.new("RGB", (100, 100)), "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 5_000)
    with pytest.raises(BadImage, match="too large to decode safely"):
        open_image(path)


def test_resize_squashes_to_a_square() -> None:
    out = resize(to_rgb(Image.new("RGB", (50, 20), (1, 2, 3))), 16)
    assert out.shape == (16, 16, 3) and (out == [1, 2, 3]).all()


def _pillow_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def test_plain_jpegs_decode_to_exactly_pillows_pixels() -> None:
    """The fast libjpeg-turbo path must give Pillow's pixels, or it would change every cache."""
    real = [p.read_bytes() for split in ("train", "test")
            for p in sorted((MINI / split).rglob("*.jpg"))]
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (37, 23, 3), dtype=np.uint8)).resize((61, 45))
    made = []
    for image, options in [(photo, {"subsampling": 0}), (photo, {"subsampling": 1}),
                           (photo, {"subsampling": 2, "quality": 50}),
                           (photo, {"progressive": True, "optimize": True, "quality": 95}),
                           (photo.convert("L"), {})]:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", **options)
        made.append(buffer.getvalue())
    assert len(real) == 600
    for data in real + made:
        fast = images._plain_jpeg(data)
        assert fast is not None  # the fast path was taken: the comparison is not vacuous
        np.testing.assert_array_equal(fast, _pillow_pixels(data))
        np.testing.assert_array_equal(images.pixels_of_bytes(data), fast)


def test_jpegs_that_need_pillow_take_its_path() -> None:
    wide = Image.new("RGB", (8, 4), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    cases = {}
    for name, image, options in [("exif", wide, {"exif": exif}), ("cmyk", Image.new(
            "CMYK", (8, 4), (1, 2, 3, 4)), {}), ("png", wide, {"format": "PNG"})]:
        buffer = io.BytesIO()
        image.save(buffer, options.pop("format", "JPEG"), **options)
        cases[name] = buffer.getvalue()
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/'
           b'22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
           b'tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    buffer = io.BytesIO()
    wide.save(buffer, "JPEG", xmp=xmp)
    cases["xmp"] = buffer.getvalue()
    cases["truncated"] = mini_files("train", "dog", 1)[0].read_bytes()[:300]
    for name, data in cases.items():
        assert images._plain_jpeg(data) is None, name
    assert images.pixels_of_bytes(cases["exif"]).shape == (8, 4, 3)  # rotated by Pillow
    assert images.pixels_of_bytes(cases["xmp"]).shape == (8, 4, 3)  # XMP orientation too
    np.testing.assert_array_equal(images.pixels_of_bytes(cases["cmyk"]),
                                  _pillow_pixels(cases["cmyk"]))
    with pytest.raises(BadImage, match="truncated"):
        images.pixels_of_bytes(cases["truncated"])
