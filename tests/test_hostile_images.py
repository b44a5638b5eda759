"""A torture folder of hostile and messy images, built by the test: each one is decoded correctly
or skipped with its reason, and an extraction over the folder finishes and lists the skips."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extract.images import BadImage
from tests.conftest import MINI_ARGS, ROOT
from tests.helpers import open_image

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG header claiming width x height pixels, with no pixel data behind it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + b"\x00\x00\x00\x00IEND\xaeB`\x82")


def _halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2:] = BLUE
    return Image.fromarray(pixels)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return _encode(_halves(64, 32), "JPEG", quality=95, exif=exif)


def _palette_transparent() -> bytes:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.paste(0, (0, 0, 4, 8))  # index 0 is transparent: left half
    return _encode(image, "PNG", transparency=0)


def _grey16() -> bytes:
    values = np.full((8, 8), 65535, np.uint16)
    values[:, :4] = 0
    return _encode(Image.fromarray(values), "PNG")


def _grey_alpha() -> bytes:
    image = Image.new("LA", (8, 8), (0, 255))
    image.paste((0, 0), (0, 0, 4, 8))  # left half fully transparent
    return _encode(image, "PNG")


def _good() -> bytes:
    return _encode(_halves(32, 32), "PNG")


def _check_colour(expected: tuple[int, int, int], where: str = "all"):
    def check(image: Image.Image) -> None:
        pixels = np.asarray(image, dtype=int)
        region = {"all": pixels, "left": pixels[:, :2], "right": pixels[:, -2:],
                  "top": pixels[:2], "bottom": pixels[-2:]}[where]
        assert np.abs(region - np.array(expected)).max() <= 40, (where, region.mean(axis=(0, 1)))
    return check


def _check_size(image: Image.Image, size: tuple[int, int]) -> None:
    assert image.size == size, image.size


#: name -> (bytes, expected reason substring, or a check of the decoded RGB image)
GOOD_BYTES = _good()
CASES: dict[str, tuple[bytes, object]] = {
    "truncated.jpg": (_encode(Image.fromarray(np.random.default_rng(0).integers(
        0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")[:900], "truncated image file"),
    "zero-bytes.jpg": (b"", "empty file (0 bytes)"),
    "text.jpg": (b"this is not an image\n" * 20, "not an image file Pillow can read"),
    "bomb.png": (_png_claiming(100_000, 100_000), "too large to decode safely"),
    "huge-allowed.png": (_encode(Image.new("L", (6000, 6000), 128), "PNG"),
                         lambda im: (_check_size(im, (6000, 6000)),
                                     _check_colour((128, 128, 128))(im))),
    "cmyk.jpg": (_encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"),
                 _check_colour(RED)),
    "grey16.png": (_grey16(), lambda im: (_check_colour((0, 0, 0), "left")(im),
                                          _check_colour((255, 255, 255), "right")(im))),
    "grey-alpha.png": (_grey_alpha(), lambda im: (_check_colour((255, 255, 255), "left")(im),
                                                  _check_colour((0, 0, 0), "right")(im))),
    "palette-transparent.png": (_palette_transparent(),
                                lambda im: (_check_colour((255, 255, 255), "left")(im),
                                            _check_colour(RED, "right")(im))),
    "palette.gif": (_encode(Image.new("RGB", (8, 8), BLUE).convert("P"), "GIF"),
                    _check_colour(BLUE)),
    "animated.gif": (_animated_gif(), _check_colour(RED)),  # the first frame
    "exif-rotated.jpg": (_exif_rotated(), lambda im: (
        None if im.size == (32, 64) else pytest.fail(f"rotation not applied: {im.size}"),
        _check_colour(RED, "top")(im), _check_colour(BLUE, "bottom")(im))),
    "sp ace & 'quote\".png": (GOOD_BYTES, _check_colour(BLUE, "right")),
    "-leading-dash.png": (GOOD_BYTES, _check_colour(BLUE, "right")),
    "new\nline.png": (GOOD_BYTES, _check_colour(BLUE, "right")),
    "ünïcødé 猫 🐱.png": (GOOD_BYTES, _check_colour(BLUE, "right")),
    "UPPER.PNG": (GOOD_BYTES, _check_colour(BLUE, "right")),
}
NON_UTF8 = os.fsdecode(b"latin1-\xe9\xff.png")


def build_torture_folder(root: Path) -> dict[str, object]:
    """root/train/{hostile,plain}/..., root/test/{hostile,plain}/...; returns name -> expectation."""
    hostile = root / "train" / "hostile"
    hostile.mkdir(parents=True)
    expected = {}
    for name, (data, expectation) in CASES.items():
        (hostile / name).write_bytes(data)
        expected[name] = expectation
    (hostile / NON_UTF8).write_bytes(GOOD_BYTES)
    expected[NON_UTF8] = _check_colour(RED, "left")
    os.symlink("loop.jpg", hostile / "loop.jpg")  # a symlink to itself
    expected["loop.jpg"] = "Too many levels of symbolic links"
    os.symlink("no-such-file.png", hostile / "dangling.png")
    expected["dangling.png"] = "No such file or directory"
    os.symlink("..", hostile / "dir-loop")  # a folder symlink loop: never followed
    os.mkfifo(hostile / "fifo.jpg")  # reading it would block forever
    expected["fifo.jpg"] = "not a regular file"
    (hostile / "unreadable.png").write_bytes(GOOD_BYTES)
    os.chmod(hostile / "unreadable.png", 0)
    # root reads mode-000 files anyway; as anyone else this is "permission denied"
    expected["unreadable.png"] = (_check_colour(RED, "left") if os.geteuid() == 0
                                  else "permission denied")
    for split, count in (("train", 4), ("test", 2)):
        plain = root / split / "plain"
        plain.mkdir(parents=True)
        for index in range(count):
            (plain / f"{index}.png").write_bytes(GOOD_BYTES)
    (root / "test" / "hostile").mkdir()
    (root / "test" / "hostile" / "ok.png").write_bytes(GOOD_BYTES)
    return expected


@pytest.fixture(scope="module")
def torture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    root = tmp_path_factory.mktemp("torture")
    return root, build_torture_folder(root)


def test_each_hostile_file_is_decoded_correctly_or_refused_with_its_reason(torture) -> None:
    root, expected = torture
    for name, expectation in expected.items():
        path = root / "train" / "hostile" / name
        if isinstance(expectation, str):
            with pytest.raises(BadImage) as caught:
                open_image(path)
            assert expectation in str(caught.value), (name, str(caught.value))
        else:
            image = open_image(path)
            assert image.mode == "RGB", name
            expectation(image)


#: Run as root, then drop to user nobody (65534) before reading: nobody cannot start Python
#: itself here (the interpreter lives under /root, mode 700), so everything is imported first.
AS_NOBODY = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from PIL import Image
Image.init()
from extract.images import BadImage, read_pixels
read_pixels(Path(sys.argv[2]))  # warm up every lazy import while still root
os.setgroups([]); os.setgid(65534); os.setuid(65534)
answers = {"uid": os.geteuid()}
for name in sys.argv[2:]:
    try:
        answers[name] = "decoded %s" % (read_pixels(Path(name)).shape,)
    except BadImage as error:
        answers[name] = str(error)
print(json.dumps(answers))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="run as a normal user, the torture test covers it")
def test_unreadable_file_is_refused_for_a_normal_user(tmp_path_factory) -> None:
    """As root, mode 000 does not stop reading; read it again as user nobody, in a folder that
    nobody can reach (pytest's own temporary folders are mode 700), beside a readable file."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="headstart-nobody-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        readable, unreadable = folder / "readable.png", folder / "unreadable.png"
        readable.write_bytes(GOOD_BYTES)
        unreadable.write_bytes(GOOD_BYTES)
        readable.chmod(0o644)
        unreadable.chmod(0)
        done = subprocess.run([sys.executable, "-c", AS_NOBODY, str(ROOT), str(readable),
                               str(unreadable)], capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    assert answers["uid"] == 65534
    assert answers[str(readable)] == "decoded (32, 32, 3)"  # the folder is reachable for nobody
    assert "cannot be read (permission denied)" in answers[str(unreadable)], answers


def test_extract_over_the_torture_folder_finishes_and_lists_every_skip(torture, tmp_path) -> None:
    from typer.testing import CliRunner

    from cli import app
    from store.store import Store

    root, expected = torture
    result = CliRunner().invoke(app, ["extract", str(root), *MINI_ARGS, "--store", str(tmp_path)])
    assert result.exit_code == 0, result.output
    cache = Store(tmp_path).find_cache()
    refused = {k: v for k, v in expected.items() if isinstance(v, str)}
    skipped = {item["id"].split("/", 2)[-1]: item["reason"] for item in cache.skipped}
    assert set(skipped) == set(refused), skipped
    for name, reason in refused.items():
        assert reason in skipped[name]
    ids = set(cache.ids("train").tolist())
    assert len(ids) == cache.split_sizes["train"] == 4 + len(expected) - len(refused)
    assert "train/hostile/latin1-\\xe9\\xff.png" in ids  # non-UTF-8 bytes kept visible, not lost
    assert "train/hostile/new\nline.png" in ids
    assert np.isfinite(cache.features("train")).all()
    assert "Skipped" in result.output and "truncated image file" in result.output
