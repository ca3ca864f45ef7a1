"""DataError rendering and image loading: RGB, min/max-pixel resize, header-only size, bomb guard."""

from __future__ import annotations

import pickle
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from vlrl.data.errors import DataError
from vlrl.data.images import check_image, image_size, load_image
from vlrl.data.resize import smart_resize


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR declares width x height (1-bit grey) followed by a tiny IDAT: cheap to write, and
    anything that decoded it would need width * height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )
    return path


def test_data_error_str_has_every_part() -> None:
    err = DataError("d/train.jsonl", 7, "conversations[0].value", "2 placeholders but 1 image")
    assert str(err) == "d/train.jsonl:7: field 'conversations[0].value': 2 placeholders but 1 image"
    assert (err.path, err.line, err.field, err.message) == (
        "d/train.jsonl",
        7,
        "conversations[0].value",
        "2 placeholders but 1 image",
    )
    assert isinstance(err, ValueError)


def test_data_error_str_omits_missing_parts() -> None:
    assert str(DataError("a.jsonl", None, None, "data file not found")) == "a.jsonl: data file not found"
    assert str(DataError("a.jsonl", 3, None, "invalid JSON")) == "a.jsonl:3: invalid JSON"
    assert str(DataError("a.yaml", None, "x.file", "missing")) == "a.yaml: field 'x.file': missing"
    assert str(DataError(None, None, None, "bad")) == "bad"


def test_data_error_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(DataError("f.jsonl", 2, "image", "missing")))
    assert (err.path, err.line, err.field, err.message) == ("f.jsonl", 2, "image", "missing")


def test_load_image_converts_to_rgb_and_keeps_size(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.new("L", (50, 30), 128).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (50, 30)
    assert image_size(path) == (50, 30)


def test_load_image_resizes_with_smart_resize(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 100), (10, 20, 30)).save(path)
    image = load_image(path, min_pixels=28 * 28, max_pixels=56 * 56 * 4)
    h, w = smart_resize(100, 300, 28, 28 * 28, 56 * 56 * 4)
    assert image.size == (w, h) and w % 28 == 0 and h % 28 == 0
    assert w * h <= 56 * 56 * 4
    up = load_image(path, min_pixels=400 * 400)  # only a lower bound: grows to it
    assert up.size[0] * up.size[1] >= 400 * 400 and up.size[0] % 28 == 0


def test_load_image_factor_32(tmp_path: Path) -> None:
    path = tmp_path / "sq.png"
    Image.new("RGB", (100, 100)).save(path)
    assert load_image(path, max_pixels=64 * 64, factor=32).size == (64, 64)


def test_missing_image_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="image file not found") as info:
        load_image(tmp_path / "nope.png")
    assert "nope.png" in str(info.value)


def test_garbage_png_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "garbage.png"
    path.write_bytes(b"this is not a png at all" * 10)
    for fn in (load_image, image_size, check_image):
        with pytest.raises(DataError, match="unreadable image") as info:
            fn(path)
        assert "garbage.png" in str(info.value)


def test_truncated_png_fails_check(tmp_path: Path) -> None:
    path = tmp_path / "trunc.png"
    Image.new("RGB", (64, 64), (200, 0, 0)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="unreadable"):
        check_image(path)
    with pytest.raises(DataError, match="unreadable"):
        load_image(path)


def test_bomb_refused_from_header_before_decoding(tmp_path: Path) -> None:
    # 9000 x 9000 = 81M pixels: above our default 64M, below PIL's own warning limit (~89M)
    path = png_header_only(tmp_path / "bomb.png", 9000, 9000)
    with pytest.raises(DataError, match="decompression bomb") as info:
        load_image(path)
    assert "bomb.png" in str(info.value) and "9000x9000" in str(info.value)
    with pytest.raises(DataError, match="decompression bomb"):
        image_size(path)
    with pytest.raises(DataError, match="decompression bomb"):
        check_image(path)


def test_pil_decompression_bomb_error_becomes_data_error(tmp_path: Path) -> None:
    # 100000 x 100000 is far above twice PIL's MAX_IMAGE_PIXELS: PIL itself raises in Image.open
    path = png_header_only(tmp_path / "huge.png", 100_000, 100_000)
    with pytest.raises(DataError, match="decompression bomb") as info:
        load_image(path, max_image_pixels=10**12)
    assert "huge.png" in str(info.value)


def test_pil_bomb_warning_becomes_data_error(tmp_path: Path) -> None:
    # between PIL's warning limit and twice it: with our limit not above PIL's, the warning is an error
    path = png_header_only(tmp_path / "warn.png", 10_000, 10_000)
    with pytest.raises(DataError, match="decompression bomb"):
        image_size(path, max_image_pixels=Image.MAX_IMAGE_PIXELS or 0)
    # a caller who raises the limit above PIL's on purpose gets the header read
    assert image_size(path, max_image_pixels=2 * 10**8) == (10_000, 10_000)


def test_small_limit_refuses_ordinary_image(tmp_path: Path) -> None:
    path = tmp_path / "ok.png"
    Image.new("RGB", (40, 40)).save(path)
    with pytest.raises(DataError, match="max_image_pixels=1000"):
        load_image(path, max_image_pixels=1000)
    assert load_image(path, max_image_pixels=1600).size == (40, 40)
