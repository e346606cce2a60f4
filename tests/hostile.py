"""Generators of hostile inputs: files and folder entries that once ended or fooled a run.

Every generator builds its input from scratch in a test's tmp_path (nothing is
downloaded or copied from real data). :func:`hostile_folder` puts all of them
into one image folder, with the reason the crop stage must give each.
"""

from __future__ import annotations

import io
import os
import socket
import struct
from pathlib import Path

import numpy as np
from PIL import Image

SPARSE_BYTES = 4 * 2**30  # "4 GB" .jpg: sparse, so it costs no disk


def photo(seed: int = 0, size: tuple[int, int] = (80, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def jpeg(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def _ifd_entry(tag: int, typ: int, count: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag, typ, count) + value.ljust(4, b"\0")


def exif_short_as_ascii(orientation: int = 6) -> bytes:
    """A raw EXIF block: Orientation ``orientation`` plus ResolutionUnit (a SHORT tag) stored as ASCII.

    PIL's ``exif_transpose`` re-serialises the EXIF after rotating, and packing the
    string as a SHORT raises ``struct.error``.
    """
    entries = [_ifd_entry(0x0112, 3, 1, struct.pack("<H", orientation)), _ifd_entry(0x0128, 2, 4, b"abc\0")]
    ifd = struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    return b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + ifd


def jpeg_bad_exif(img: Image.Image) -> bytes:
    return jpeg(img, exif=exif_short_as_ascii())


def tiff_strip_offsets(kind: str = "double", width: int = 40, height: int = 40) -> bytes:
    """An 8-bit grayscale TIFF whose StripOffsets tag is DOUBLE (12) or RATIONAL (5) instead of LONG."""
    pixels = bytes(range(256)) * (width * height // 256 + 1)
    pixels = pixels[: width * height]
    n_entries = 8
    ifd_size = 2 + 12 * n_entries + 4
    extra_at = 8 + ifd_size
    data_at = extra_at + 8
    if kind == "double":
        offset_entry = _ifd_entry(273, 12, 1, struct.pack("<I", extra_at))
        extra = struct.pack("<d", float(data_at))
    else:
        offset_entry = _ifd_entry(273, 5, 1, struct.pack("<I", extra_at))
        extra = struct.pack("<II", data_at, 1)
    entries = [
        _ifd_entry(256, 3, 1, struct.pack("<H", width)),
        _ifd_entry(257, 3, 1, struct.pack("<H", height)),
        _ifd_entry(258, 3, 1, struct.pack("<H", 8)),
        _ifd_entry(259, 3, 1, struct.pack("<H", 1)),
        _ifd_entry(262, 3, 1, struct.pack("<H", 1)),
        offset_entry,
        _ifd_entry(278, 3, 1, struct.pack("<H", height)),
        _ifd_entry(279, 4, 1, struct.pack("<I", len(pixels))),
    ]
    assert len(entries) == n_entries
    ifd = struct.pack("<H", n_entries) + b"".join(entries) + struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", 8) + ifd + extra + pixels


def strip_png(width: int = 12000, height: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 90, 60)).save(buf, format="PNG")
    return buf.getvalue()


def scan_start(data: bytes) -> int:
    """Offset of the entropy-coded data after the first SOS segment."""
    sos = data.index(b"\xff\xda")
    return sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0]


def corrupt_mid_scan(data: bytes, n: int = 64) -> bytes:
    """``data`` with ``n`` bytes zeroed in the middle of its scan: same length, valid markers.

    PIL decodes it without a word (and a smeared band). libjpeg warns "Corrupt JPEG data"
    when the damaged scan no longer ends where its data does, which is the usual case but
    not every one: garbage that happens to decode into as many blocks as it replaced is
    a valid JPEG stream of wrong pixels (on 100 real CelebA photos with 64 bytes
    replaced at random scan offsets, 67 to 75 were reported). The photo the tests use,
    ``jpeg(photo(1, (320, 240)), quality=90)``, is one libjpeg reports.
    """
    start = scan_start(data)
    mid = (start + len(data) - 2) // 2
    return data[:mid] + b"\0" * n + data[mid + n :]


def make_fifo(path: Path) -> None:
    os.mkfifo(path)


def make_socket(path: Path) -> bool:
    """A Unix socket entry; False where the path is too long for AF_UNIX."""
    if len(os.fsencode(path)) >= 100:
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(path))
    finally:
        s.close()
    return True


def make_symlink_loop(a: Path, b: Path) -> None:
    a.symlink_to(b.name)
    b.symlink_to(a.name)


def make_sparse(path: Path, size: int = SPARSE_BYTES, head: bytes = b"\xff\xd8\xff\xe0") -> None:
    """A file of ``size`` bytes that occupies (almost) no disk: a JPEG signature, then a hole."""
    with open(path, "wb") as fh:
        fh.write(head)
    os.truncate(path, size)


NON_UTF8 = b"caf\xe9-\xff.jpg"  # Latin-1 e-acute and a stray 0xff: not UTF-8
LONG_NAME = "L" * 251 + ".jpg"  # 255 bytes: the longest name Linux allows


def hostile_folder(img_dir: Path, good: bytes) -> dict[str, str]:
    """Write every hostile entry into ``img_dir``; returns {entry name (storable): expected reason}.

    Names a test must also give an identity row get it via :func:`identity_names`;
    ``good`` is the bytes of a photo with a detectable face (for the long name and the link).
    """
    img_dir.mkdir(parents=True, exist_ok=True)
    face = Image.open(io.BytesIO(good)).convert("RGB")
    expected: dict[str, str] = {}

    def put(name: str, data: bytes, reason: str) -> None:
        (img_dir / name).write_bytes(data)
        expected[name] = reason

    put("exif_short_ascii.jpg", jpeg_bad_exif(face), "corrupt")
    put("tiff_double.tif", tiff_strip_offsets("double"), "corrupt")
    put("tiff_rational.tif", tiff_strip_offsets("rational"), "corrupt")
    put("strip.png", strip_png(), "bad_aspect")
    put("scan_garbage.jpg", corrupt_mid_scan(jpeg(photo(1, (320, 240)), quality=90)), "corrupt")
    put(".DS_Store", b"\0\0\0\1Bud1", "hidden_file")
    put(LONG_NAME, good, "kept")
    make_sparse(img_dir / "huge.jpg")
    expected["huge.jpg"] = "file_too_large"
    make_fifo(img_dir / "pipe.jpg")
    expected["pipe.jpg"] = "not_a_file"
    if make_socket(img_dir / "sock.jpg"):
        expected["sock.jpg"] = "not_a_file"
    make_symlink_loop(img_dir / "loop_a.jpg", img_dir / "loop_b.jpg")
    expected["loop_a.jpg"] = expected["loop_b.jpg"] = "not_a_file"
    (img_dir / "dangling.jpg").symlink_to("does-not-exist.jpg")
    expected["dangling.jpg"] = "not_a_file"
    (img_dir / "subdir.jpg").mkdir()
    expected["subdir.jpg"] = "not_a_file"
    (img_dir / "link_to_good.jpg").symlink_to(LONG_NAME)  # a link to a regular file is followed
    expected["link_to_good.jpg"] = "kept"
    (img_dir / os.fsdecode(NON_UTF8)).write_bytes(good)
    expected["caf\\xe9-\\xff.jpg"] = "bad_file_name"
    put("with space.jpg", good, "bad_file_name")
    return expected


def identity_names(expected: dict[str, str]) -> list[str]:
    """The hostile entries that get an identity row (so the stage really opens them)."""
    return [n for n in expected if " " not in n and "\\" not in n]
