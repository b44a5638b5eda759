"""store/fingerprint.py and store/selection.py on hand-worked values (no backbone, no TensorFlow).

Every expected digest below is either a published SHA-256 test vector or hashlib over a literal
written out here, never the module's own output.
"""

from __future__ import annotations

import builtins
import hashlib
import io
from pathlib import Path

import pytest

import store.fingerprint as fingerprint_module
from store.fingerprint import (EXTRACTION_VERSION, canonical_json, digest_file, digest_text,
                               fingerprint, unit_fraction)
from store.selection import matching

#: value -> its canonical JSON, written by hand.
CANONICAL = [
    ({"b": 1, "a": 2}, '{"a":2,"b":1}'),
    ({"z": {"y": [1, 2], "x": None}}, '{"z":{"x":null,"y":[1,2]}}'),
    ({"name": "café"}, '{"name":"café"}'),  # not \u00e9: ensure_ascii is off
    ([1.5, True, "a b"], '[1.5,true,"a b"]'),
]


@pytest.mark.parametrize(("value", "text"), CANONICAL)
def test_canonical_json_by_hand(value: object, text: str) -> None:
    assert canonical_json(value) == text


#: text -> SHA-256 (FIPS 180-2 vectors, and "café" as UTF-8 bytes 63 61 66 c3 a9).
SHA256 = [
    ("", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
    ("abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
    ("café", hashlib.sha256(bytes([0x63, 0x61, 0x66, 0xC3, 0xA9])).hexdigest()),
]


@pytest.mark.parametrize(("text", "expected"), SHA256)
def test_digest_text_is_sha256_of_utf8(text: str, expected: str) -> None:
    assert digest_text(text) == expected


@pytest.mark.parametrize("size", [0, 3, (1 << 20) - 1, 1 << 20, (1 << 20) + 7, 3 * (1 << 20) + 1])
def test_digest_file_reads_every_block(tmp_path: Path, size: int) -> None:
    data = (b"headstart" * (size // 9 + 1))[:size]
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    expected = ("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" if size == 0
                else hashlib.sha256(data).hexdigest())
    assert digest_file(path) == expected


def test_digest_file_reads_unbuffered_blocks_of_1_mib(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A weights file of hundreds of MB is never read whole, nor copied through a buffer."""
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 10_000)  # 2.44 MiB: two whole blocks and a part
    handles, sizes = [], []

    class Spy:
        def __init__(self, handle: io.RawIOBase) -> None:
            self.handle = handle

        def __enter__(self) -> "Spy":
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

        def read(self, size: int | None = -1) -> bytes:
            sizes.append(size)
            return self.handle.read(size)

    def spy_open(*args: object, **kwargs: object) -> Spy:
        handle = builtins.open(*args, **kwargs)
        handles.append(handle)
        return Spy(handle)

    monkeypatch.setattr(fingerprint_module, "open", spy_open, raising=False)
    assert digest_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [type(h) for h in handles] == [io.FileIO]  # buffering=0: the raw file
    assert sizes == [1 << 20] * 4  # 1 MiB, 1 MiB, the rest, then b"" at the end


def test_the_fingerprint_is_sha256_of_the_sorted_inputs() -> None:
    assert EXTRACTION_VERSION == 1
    expected = hashlib.sha256(b'{"a":1,"extraction_version":1,"z":"x"}').hexdigest()
    assert fingerprint({"z": "x", "a": 1}) == expected
    assert fingerprint({"a": 1, "z": "x"}) == expected
    assert fingerprint({}) == hashlib.sha256(b'{"extraction_version":1}').hexdigest()


def _fraction_by_hand(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) / 18446744073709551616


@pytest.mark.parametrize(("text", "salt"), [("x", ""), ("cat/0001.jpg", "headstart-test-split:"),
                                            ("", "s"), ("é", "")])
def test_unit_fraction_is_the_first_8_bytes_of_sha256(text: str, salt: str) -> None:
    value = unit_fraction(text, salt)
    assert value == _fraction_by_hand(salt + text)
    assert 0.0 <= value < 1.0
    if not salt:
        assert unit_fraction(text) == value


def test_unit_fraction_salt_comes_first() -> None:
    assert unit_fraction("t", "s") == unit_fraction("st") != unit_fraction("ts")


# --- store/selection.py -----------------------------------------------------------------------

ITEMS = [("pets", "abcd1234" + "0" * 56), ("birds", "ABCDEF99" + "1" * 56),
         ("beef", "beef0000" + "2" * 56), ("pets-2", "abcd9999" + "3" * 56)]

#: selector -> the names matched, in the items' order (worked out by hand from ITEMS).
SELECTIONS = [
    ("pets", ["pets"]),  # a name
    ("abcd", ["pets", "pets-2"]),  # a 4-digit prefix: both, in order
    ("ABCD12", ["pets"]),  # prefixes are case-insensitive (fingerprints are lower case)
    ("abc", []),  # 3 digits: too short to be a prefix
    ("abcd1234" + "0" * 56, ["pets"]),  # the whole 64 digits
    ("abcd1234" + "0" * 57, []),  # 65 digits: not a prefix
    ("beef", ["beef"]),  # a name that is also hex: the name wins over beef0000's prefix
    ("abcdx", []),  # not hex, no such name
    ("abcdef99", []),  # fingerprints are compared lower case: "ABCDEF99..." does not start with it
    ("", []),
]


@pytest.mark.parametrize(("selector", "names"), SELECTIONS)
def test_matching_by_hand(selector: str, names: list[str]) -> None:
    found = matching(ITEMS, selector, lambda item: item[0], lambda item: item[1])
    assert [name for name, _ in found] == names


def test_a_name_match_hides_prefix_matches() -> None:
    items = [("abcd", "ffff" * 16), ("other", "abcd" * 16)]
    assert matching(items, "abcd", lambda i: i[0], lambda i: i[1]) == [items[0]]
