"""One bad file never ends a run, and never sneaks in: hostile files, entries and names, unit by unit.

The whole-stage version (all of them in one folder with good photos) is in
tests/stages/test_crop.py; the generators are in tests/hostile.py.
"""

from __future__ import annotations

import io
import os
import random
import re
import signal
import threading
import time

import hostile as H
import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from facesearch.data import manifest as M
from facesearch.data.celeba import list_entries, raw_name, storable_name
from facesearch.data.images import ImageRejected, decode_image
from facesearch.faces import cropping
from facesearch.faces.config import FaceConfig
from facesearch.faces.cropping import CropLimits, crop_names, process_image, read_photo

MAX = 40_000_000


@pytest.fixture
def no_hang():
    """Fail (instead of hanging the suite) if the test blocks, e.g. on opening a FIFO."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def fail(*_):
        raise TimeoutError("blocked")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(10)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize(
    ("make", "exc"),
    [
        (lambda: H.jpeg_bad_exif(H.photo()), "error"),  # struct.error
        (lambda: H.tiff_strip_offsets("double"), "TypeError"),
        (lambda: H.tiff_strip_offsets("rational"), "TypeError"),
    ],
)
def test_bad_tags_are_corrupt_not_a_crash(make, exc):
    data = make()
    # The file really provokes the exception in PIL (else this test proves nothing).
    with pytest.raises(Exception) as raw:
        img = Image.open(io.BytesIO(data))
        img.load()
        ImageOps.exif_transpose(img)
    assert type(raw.value).__name__ == exc
    with pytest.raises(ImageRejected) as info:
        decode_image(data, MAX)
    assert info.value.reason == M.Reason.CORRUPT


def test_garbage_mid_scan_is_rejected_though_pil_decodes_it():
    good = H.jpeg(H.photo(1, (320, 240)), quality=90)
    bad = H.corrupt_mid_scan(good)
    assert len(bad) == len(good)
    Image.open(io.BytesIO(bad)).load()  # PIL: no error, no warning
    decode_image(good, MAX)
    with pytest.raises(ImageRejected) as info:
        decode_image(bad, MAX)
    assert info.value.reason == M.Reason.CORRUPT and "Corrupt JPEG data" in info.value.detail
    assert decode_image(bad, MAX, strict=False).width == 320  # the lenient decode the sheet uses


def test_decode_raises_only_image_rejected(monkeypatch):
    data = H.jpeg(H.photo())

    def boom(_img):
        raise KeyError("anything")

    monkeypatch.setattr(ImageOps, "exif_transpose", boom)
    with pytest.raises(ImageRejected, match="KeyError"):
        decode_image(data, MAX)

    def oom(_img):
        raise MemoryError

    monkeypatch.setattr(ImageOps, "exif_transpose", oom)
    with pytest.raises(ImageRejected) as info:
        decode_image(data, MAX)
    assert info.value.reason == M.Reason.TOO_LARGE


def test_read_photo_checks_before_reading(tmp_path, no_hang):
    H.make_sparse(tmp_path / "huge.jpg")
    start = time.perf_counter()
    with pytest.raises(ImageRejected) as info:
        read_photo(tmp_path / "huge.jpg", 1000)
    assert info.value.reason == M.Reason.FILE_TOO_LARGE
    assert time.perf_counter() - start < 1  # stat, not a 4 GB read
    H.make_fifo(tmp_path / "pipe.jpg")
    H.make_symlink_loop(tmp_path / "a.jpg", tmp_path / "b.jpg")
    (tmp_path / "dangling.jpg").symlink_to("nothing")
    (tmp_path / "dir.jpg").mkdir()
    for name in ("pipe.jpg", "a.jpg", "dangling.jpg", "dir.jpg"):
        with pytest.raises(ImageRejected) as info:
            read_photo(tmp_path / name, 1000)
        assert info.value.reason == M.Reason.NOT_A_FILE, name
    (tmp_path / "ok.jpg").write_bytes(b"x" * 1000)
    (tmp_path / "link.jpg").symlink_to("ok.jpg")
    assert read_photo(tmp_path / "ok.jpg", 1000) == b"x" * 1000  # exactly at the limit is fine
    assert read_photo(os.fsencode(tmp_path / "link.jpg"), 1000) == b"x" * 1000
    with pytest.raises(ImageRejected, match="file_too_large"):
        read_photo(tmp_path / "ok.jpg", 999)


def test_every_entry_is_listed_once_with_its_problem(tmp_path, no_hang):
    expected = H.hostile_folder(tmp_path / "img", H.jpeg(H.photo()))
    entries = {e.name: e for e in list_entries(tmp_path / "img")}
    assert set(entries) == set(expected)
    for name, reason in expected.items():
        problem = entries[name].problem
        if reason in ("not_a_file", "hidden_file", "bad_file_name"):
            assert problem == reason, name
        else:
            assert problem is None, name
    # The non-UTF-8 name is stored escaped and maps back to the bytes on disk.
    assert os.path.basename(entries["caf\\xe9-\\xff.jpg"].path) == H.NON_UTF8


def adversarial_names(rng: random.Random, n: int) -> list[bytes]:
    """File names as bytes, built to collide under naive schemes: dots, underscores, case, escapes, bad UTF-8."""
    pieces = [b"a", b"A", b"vcol", b".", b"_", b"-", b"jpg", b"png", b".jpg", b"_jpg", b"\\", b"\\x", b"\\xff",
              b"\xff", b"\xe9", "é".encode(), "²".encode(), "\u202e".encode(), b" ", b"\t", b"0", b"~",
              b"%"]  # fmt: skip
    out = set()
    while len(out) < n:
        name = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        if rng.random() < 0.05:
            name = (name * 300)[: rng.randint(200, 255)]  # near the 255-byte limit
        if b"/" not in name and b"\0" not in name and name not in (b".", b".."):
            out.add(name)
    return sorted(out)


def test_storable_names_are_injective_reversible_and_utf8():
    raws = adversarial_names(random.Random(11), 3000)
    stored = [storable_name(r) for r in raws]
    assert len(set(stored)) == len(raws)
    for r, s in zip(raws, stored, strict=True):
        s.encode("utf-8")  # no lone surrogates: Arrow can store it
        assert raw_name(s) == r


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crop_names_are_unique_safe_and_bounded(seed):
    names = [storable_name(r) for r in adversarial_names(random.Random(seed), 3000)]
    names += ["vcol.jpg", "vcol.png", "vcol_jpg.jpg", "vcol.JPG", "VCOL.jpg"]
    for digits in (16, 1):  # 1 hex digit: collisions galore, resolved by the full hash
        crops = crop_names(names, digits=digits)
        assert len(set(crops.values())) == len(crops) == len(set(names))
        # Unique even on a case-insensitive file system.
        assert len({c.lower() for c in crops.values()}) == len(crops)
        for c in crops.values():
            assert re.fullmatch(r"[A-Za-z0-9-]{0,40}_[0-9a-f]+\.jpg", c), c
            assert len(c.encode()) <= 255 and not c.startswith(".")


@pytest.fixture(scope="module")
def face_jpeg(sample_factory) -> bytes:
    from facesearch.faces.haar import DetectorConfig, detect_face

    root = sample_factory(identities=6, images_per_identity=4, seed=3)
    for p in sorted((root / "img_celeba").glob("*.jpg")):
        if detect_face(np.asarray(Image.open(p).convert("RGB")), DetectorConfig()).chosen:
            return p.read_bytes()
    raise AssertionError("no detectable face in the sample")


def _process(src, dst, **kw):
    return process_image(str(src), str(dst), FaceConfig(), 95, MAX, 32, **kw)


def test_process_image_turns_any_exception_into_error(tmp_path, face_jpeg, monkeypatch, caplog):
    src = tmp_path / "face.jpg"
    src.write_bytes(face_jpeg)
    assert _process(src, tmp_path / "ok.jpg")[M.STATUS] == "kept"

    def half_write(self, fp, *args, **kwargs):
        with open(fp, "wb") as fh:
            fh.write(b"\xff\xd8 half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", half_write)
    row = _process(src, tmp_path / "crop.jpg")
    assert row[M.STATUS] == "rejected" and row[M.REASON] == M.Reason.ERROR
    assert not (tmp_path / "crop.jpg").exists()  # the half-written crop is gone
    assert "face.jpg" in caplog.text
    monkeypatch.undo()

    def detector_bug(*args):
        raise IndexError("detector bug")

    monkeypatch.setattr(cropping, "find_faces", detector_bug)
    row = _process(src, tmp_path / "crop.jpg")
    assert row[M.REASON] == M.Reason.ERROR and row[M.WIDTH] > 0 and len(row[M.SHA256]) == 64


def test_strip_is_bad_aspect_and_never_crashes_detection(tmp_path):
    src = tmp_path / "strip.png"
    src.write_bytes(H.strip_png())
    assert _process(src, tmp_path / "c.jpg")[M.REASON] == M.Reason.BAD_ASPECT
    # Even with the cap lifted, the 12000 x 32 strip reaches detection without a cv2.error.
    row = _process(src, tmp_path / "c.jpg", max_aspect=1000)
    assert row[M.REASON] == M.Reason.NO_FACE


def test_crop_limits_come_from_params(repo_root):
    from facesearch.params import load_params

    limits = CropLimits.from_params(load_params(repo_root / "params.yaml")["crop"])
    assert limits.max_file_bytes > 10 * 2**20 and limits.max_aspect >= 4


def test_contact_sheet_survives_unreadable_rejects(tmp_path, no_hang):
    from stages import crop

    img = tmp_path / "img_celeba"
    img.mkdir()
    H.make_sparse(img / "huge.jpg")
    H.make_fifo(img / "pipe.jpg")
    (img / "gone.jpg").symlink_to("nothing")
    (img / "bad.jpg").write_bytes(H.corrupt_mid_scan(H.jpeg(H.photo(2, (200, 150)))))
    rows = [{M.IMAGE_PATH: f"img_celeba/{n}", M.FILE_NAME: n, M.STATUS: "rejected", M.REASON: "no_identity"}
            for n in ("bad.jpg", "gone.jpg", "huge.jpg", "pipe.jpg")]  # fmt: skip
    df = M.conform(pd.DataFrame(rows).reindex(columns=list(M.MANIFEST_COLUMNS)), M.MANIFEST_DTYPES)
    sheet = crop.contact_sheet(df, tmp_path, CropLimits(max_file_bytes=2**20))
    assert sheet.shape == (128, 8 * 128, 3)
    # The decodable (if corrupt) original is drawn; the others are blanks, never read.
    blank = np.full((100, 100, 3), 96, np.uint8)
    tiles = [sheet[10:110, 128 * i + 10 : 128 * i + 110] for i in range(4)]
    assert not np.array_equal(tiles[0], blank)
    assert all(np.array_equal(t, blank) for t in tiles[1:])
