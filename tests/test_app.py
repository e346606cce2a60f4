"""The search app: its core logic, its Streamlit flows (AppTest), and one run in a real browser."""

from __future__ import annotations

import io
import json
import logging
import shutil
import socket
import struct
import subprocess
import sys
import time
import tomllib
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import bomb_png, jpeg_bytes, png_bytes, write_params
from PIL import Image

from facesearch import app_core as core
from facesearch import index as X
from facesearch import photos
from facesearch.detect import crop_square
from facesearch.images import ALLOWED_FORMATS
from facesearch.models import load_model, save_model
from facesearch.params import load_params

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "app" / "main.py"


def sample_faces(root: Path) -> list[Path]:
    """Photos of the tiny sample in which the pipeline found exactly one face."""
    import pandas as pd

    manifest = pd.read_parquet(root / "data" / "manifest.parquet")
    kept = manifest[(manifest["status"] == "kept") & (manifest["n_faces"] == 1)]
    data = root / "sample_link"
    return [data / p for p in kept["image_path"]]


@pytest.fixture(scope="module")
def root(app_root, sample_factory) -> Path:
    link = app_root / "sample_link"
    if not link.exists():
        link.symlink_to(sample_factory(identities=8, images_per_identity=5, seed=4))
    return app_root


# --- hostile files, built here -------------------------------------------------------------
def tiff_with_strip_offsets(kind: str) -> bytes:
    """An 8 x 8 grayscale TIFF whose StripOffsets tag is a DOUBLE or a RATIONAL instead of an integer."""
    ifd_offset, n_entries = 8, 8
    value_offset = ifd_offset + 2 + n_entries * 12 + 4
    pixels_offset = value_offset + 8
    if kind == "double":
        offsets = (12, struct.pack("<d", float(pixels_offset)))
    else:
        offsets = (5, struct.pack("<II", pixels_offset, 1))

    def short(tag: int, value: int) -> bytes:
        return struct.pack("<HHIHH", tag, 3, 1, value, 0)

    entries = [short(256, 8), short(257, 8), short(258, 8), short(259, 1), short(262, 1),
               struct.pack("<HHII", 273, offsets[0], 1, value_offset), short(278, 8),
               struct.pack("<HHII", 279, 4, 1, 64)]  # fmt: skip
    return (b"II*\0" + struct.pack("<IH", ifd_offset, n_entries) + b"".join(entries) + b"\0" * 4 + offsets[1]
            + bytes(range(64)))  # fmt: skip


def jpeg_with_bad_exif(width: int, height: int) -> bytes:
    """A JPEG whose EXIF says orientation 6 (rotate 90) and stores the SHORT tag ResolutionUnit as ASCII.

    PIL parses it, but rewriting that EXIF (as exif_transpose does) raises struct.error.
    """
    entries = [struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0), struct.pack("<HHI", 0x0128, 2, 2) + b"2\0\0\0"]
    exif = b"Exif\0\0II*\0" + struct.pack("<IH", 8, len(entries)) + b"".join(entries) + b"\0" * 4
    return jpeg_bytes(Image.new("RGB", (width, height), (100, 120, 140)), exif=exif)


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def hostile_uploads() -> dict[str, bytes]:
    """Uploads that used to raise out of read_upload / find_faces, or cost seconds and gigabytes."""
    return {
        "empty.jpg": b"",
        "text.jpg": b"this is not an image\n" * 20,
        "eleven_mb.jpg": b"\xff\xd8" + b"\0" * (11 * 2**20),
        "bomb.png": bomb_png(),
        "wide_40000x1000.jpg": jpeg_bytes(Image.new("RGB", (40_000, 1000), (120, 130, 140))),
        "line_100000x1.png": png_bytes(Image.new("RGB", (100_000, 1))),
        "strip_12000x32.png": png_bytes(Image.new("RGB", (12_000, 32))),
        "bad_exif.jpg": jpeg_with_bad_exif(64, 48),
        "strip_offsets_double.tif": tiff_with_strip_offsets("double"),
        "strip_offsets_rational.tif": tiff_with_strip_offsets("rational"),
    }


# --- core -----------------------------------------------------------------------------------
def test_uploads_are_checked_in_memory():
    with pytest.raises(core.UploadError, match="larger than 10 MB"):
        core.read_upload(b"\xff" * (core.MAX_UPLOAD_BYTES + 1))
    with pytest.raises(core.UploadError, match="megapixels"):
        core.read_upload(bomb_png())
    for bad in (b"", b"hello", b"\x89PNG\r\n\x1a\n"):
        with pytest.raises(core.UploadError):
            core.read_upload(bad)
    image = core.read_upload(jpeg_bytes(Image.new("RGB", (40, 30), (10, 20, 30))))
    assert (image.width, image.height) == (40, 30)


def test_hostile_uploads_get_a_message():
    messages = {}
    for name, data in hostile_uploads().items():
        try:
            image = core.read_upload(data)
        except core.UploadError as exc:
            messages[name] = str(exc)
            continue
        # The EXIF and TIFF files are damaged, not hostile: a decoder that learns to read them
        # (orientation 6 applied, or the strip found) may accept them, upright and small.
        assert name == "bad_exif.jpg" and (image.width, image.height) == (48, 64), name
    assert messages["empty.jpg"] == "The file is empty."
    assert messages["text.jpg"] == "This is not an image file we can read."
    assert messages["eleven_mb.jpg"] == "The file is larger than 10 MB."
    assert "megapixels" in messages["bomb.png"]
    for name in ("wide_40000x1000.jpg", "line_100000x1.png", "strip_12000x32.png"):
        assert "too long and narrow" in messages[name] and "10:1" in messages[name]
    assert set(messages) >= {"strip_offsets_double.tif", "strip_offsets_rational.tif"}
    assert all(m and "Traceback" not in m and "Error" not in m for m in messages.values())


def test_core_raises_only_upload_errors(monkeypatch, caplog):
    """Whatever the decoder, detector or model raise reaches the caller as UploadError, and the log."""
    photo = core.read_upload(jpeg_bytes(Image.new("RGB", (80, 60), (10, 20, 30))))

    def boom(*args, **kwargs):
        raise struct.error("required argument is not an integer")

    monkeypatch.setattr(core, "decode_image", boom)
    with pytest.raises(core.UploadError, match="cannot be read"), caplog.at_level(logging.ERROR):
        core.read_upload(jpeg_bytes(Image.new("RGB", (80, 60))))
    assert "struct.error" in caplog.text
    monkeypatch.setattr(photos, "find_faces", boom)
    with pytest.raises(core.UploadError, match="Looking for faces"):
        core.find_faces(photo, core.FaceConfig())
    monkeypatch.setattr(photos, "face_crop", boom)
    with pytest.raises(core.UploadError, match="Cutting the face"):
        core.crop_face(photo, (0, 0, 10, 10), core.FaceConfig())
    monkeypatch.setattr(photos, "embed_array", boom)
    with pytest.raises(core.UploadError, match="search failed"):
        core.search(SimpleNamespace(model=None, size=8), np.zeros((8, 8, 3), np.uint8))


def test_upload_formats_agree_with_the_decoder():
    assert set(core.UPLOAD_FORMATS) == ALLOWED_FORMATS  # a new decoder format needs its extensions here
    for fmt, (name, extensions) in core.UPLOAD_FORMATS.items():
        assert name in core.FORMATS_TEXT and name in core.REJECT_MESSAGES["unsupported_format"]
        assert set(extensions) <= set(core.UPLOAD_EXTENSIONS)
        img = Image.new("RGB", (40, 30), (200, 100, 50))
        data = encoded(img, fmt, **({"save_all": True, "append_images": [img]} if fmt == "MPO" else {}))
        assert Image.open(io.BytesIO(data)).format == fmt
        assert core.read_upload(data).rgb.shape == (30, 40, 3), fmt
    with pytest.raises(core.UploadError, match=core.FORMATS_TEXT):
        core.read_upload(encoded(Image.new("RGB", (40, 30)), "PPM"))


def test_large_photos_are_searched_at_working_resolution():
    """Decoded at reduced size and brought to WORK_SIDE, upright, in every pixel depth."""
    gradient = np.tile(np.linspace(0, 255, 3000), (2000, 1)).astype(np.uint8)  # dark left, bright right
    rgb = Image.fromarray(np.dstack([gradient] * 3))
    cases = {
        "jpeg": jpeg_bytes(rgb),
        "png": png_bytes(rgb),
        "palette": png_bytes(rgb.convert("P")),
        "sixteen": png_bytes(Image.fromarray(gradient.astype(np.uint16) * 257)),
        "bits": png_bytes(rgb.convert("1")),
    }
    for name, data in cases.items():
        image = core.read_upload(data)
        assert (image.width, image.height) == (core.WORK_SIDE, round(2000 * core.WORK_SIDE / 3000)), name
        assert image.rgb.dtype == np.uint8 and image.rgb.shape[2] == 3
        if name in ("jpeg", "png", "sixteen"):  # the gradient survives, the right way round
            assert image.rgb[:, :50].mean() < 60 and image.rgb[:, -50:].mean() > 190, name
    # EXIF orientation 6 is applied on the reduced path too (it is the one damaged tag the decoder skips).
    turned = core.read_upload(jpeg_with_bad_exif(3000, 2000))
    assert (turned.width, turned.height) == (round(2000 * core.WORK_SIDE / 3000), core.WORK_SIDE)


def test_reduced_path_turns_photos_like_the_decoder():
    """Large photos (reduced path, its own orientation table) come out turned as small ones
    (decode_image, PIL's exif_transpose) do, for each of the 8 EXIF orientations."""
    for orientation in range(1, 9):
        where = []
        for w, h in ((3000, 2000), (300, 200)):
            pixels = np.zeros((h, w, 3), np.uint8)
            pixels[: h // 4, : w // 8] = 255  # a mark in the top-left corner, wider than tall
            exif = Image.Exif()
            exif[0x0112] = orientation
            image = core.read_upload(jpeg_bytes(Image.fromarray(pixels), exif=exif.tobytes()))
            ys, xs = np.nonzero(image.rgb[..., 0] > 128)
            where.append((image.width > image.height, xs.mean() / image.width > 0.5, ys.mean() / image.height > 0.5))
        assert where[0] == where[1], orientation


def test_whole_image_crop_shrinks_before_squaring():
    """The square around a 10:1 image is 10x its pixels: cut from a shrunk copy, it costs ~nothing."""
    wide = core.DecodedImage(rgb=np.full((205, 2048, 3), 90, np.uint8), width=2048, height=205, source_mode="RGB")
    settings = core.FaceConfig(size=218)
    tracemalloc.start()
    try:
        crop = core.crop_face(wide, None, settings)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert crop.shape == (218, 218, 3) and (crop == 90).all()
    assert peak < 2**20  # the padded 2048 x 2048 square alone would be 12.6 MB


@pytest.mark.slow
def test_hostile_uploads_cost_bounded_memory(tmp_path):
    """Peak RSS of check + decode + detect + whole-image crop, each upload in its own process.

    RSS rather than tracemalloc: PIL decodes outside Python's allocator. Before the caps the
    40000 x 1000 JPEG took 5.4 GB; what is accepted is at most 40 MP and costs < ~200 MB.
    """
    texture = np.asarray(Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8))
                         .resize((1000, 1000), Image.BILINEAR)) // 32 * 32  # fmt: skip
    uploads = {
        "normal": jpeg_bytes(Image.fromarray(texture).resize((800, 600))),
        "wide_40000x1000": jpeg_bytes(Image.fromarray(np.tile(texture, (1, 40, 1)))),
        "jpeg_20000x2000": jpeg_bytes(Image.fromarray(np.tile(texture, (2, 20, 1)))),
        "png_6000x6000": encoded(Image.fromarray(np.tile(texture, (6, 6, 1))), "PNG", compress_level=1),
        "png16_6000x6000": png_bytes(Image.fromarray(np.tile(texture[..., 0], (6, 6)).astype(np.uint16) * 257)),
    }
    for name, data in uploads.items():
        assert len(data) <= core.MAX_UPLOAD_BYTES, name
        (tmp_path / name).write_bytes(data)
    script = f"""
import importlib.util, json, sys
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
spec = importlib.util.spec_from_file_location("bench_app", {str(REPO / "bench" / "app.py")!r})
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
files = {{p.name: p.read_bytes() for p in Path({str(tmp_path)!r}).iterdir()}}
print(json.dumps(bench.upload_costs(files, files["normal"], bench.core.FaceConfig())))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    costs = json.loads(out.stdout.splitlines()[-1])
    assert costs["wide_40000x1000"][2].startswith("refused: ") and "10:1" in costs["wide_40000x1000"][2]
    for name in ("jpeg_20000x2000", "png_6000x6000", "png16_6000x6000"):
        assert costs[name][2].startswith("searched at 2048 x "), (name, costs[name])
    peaks = {name: mb for name, (_, mb, _) in costs.items()}
    assert all(mb < 220 for mb in peaks.values()), peaks
    assert peaks["jpeg_20000x2000"] < 20  # JPEG is decoded at 1/8 scale, never at 40 MP


def test_crop_settings_travel_with_the_model(app_root, tmp_path):
    """A model that carries preprocessing.crop is served with it; one that does not, with params.yaml's."""
    model, payload = load_model(app_root / "models" / "mobilenet_v2.pt")
    assert payload["preprocessing"]["crop"]["size"] == 40  # the train stage records the crops it saw
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    write_params(root / "params.yaml", {"crop.size": 218, "crop.margin": 0.2})
    # A model saved before models carried their preprocessing: params.yaml's crop settings.
    save_model(root / "models" / "mobilenet_v2.pt", model)
    params_crop = load_params(root / "params.yaml")["crop"]
    assert core.crop_settings(root, "mobilenet_v2") == core.FaceConfig.from_params(params_crop)
    own = {"size": 40, "margin": 0.5, "detector": "haar", "policy": "single", "haar": {"detect_side": 128}}
    extra = {"preprocessing": {"crop": own, "img_size": 32}, "identities": {"train": [1], "val": [2]}}
    save_model(root / "models" / "mobilenet_v2.pt", model, extra=extra)
    settings = core.crop_settings(root, "mobilenet_v2")
    assert (settings.size, settings.margin, settings.policy, settings.haar.detect_side) == (40, 0.5, "single", 128)
    photo = core.read_upload(jpeg_bytes(Image.new("RGB", (120, 100), (10, 20, 30))))
    assert core.crop_face(photo, (30, 30, 40, 40), settings).shape == (40, 40, 3)


def test_available_models_and_search(root):
    assert core.available(root) == [("mobilenet_v2", "after"), ("mobilenet_v2", "before")]
    settings = core.crop_settings(root, "mobilenet_v2")
    face = sample_faces(root)[0]
    image = core.read_upload(face.read_bytes())
    detection = core.find_faces(image, settings)
    crop = core.crop_face(image, detection.chosen, settings)
    assert crop.shape == (settings.size, settings.size, 3)
    gallery = core.load_gallery(root, "mobilenet_v2", "after")
    assert gallery.settings == settings and gallery.size == 32
    answer = core.search(gallery, crop)
    assert [r.rank for r in answer.results] == list(range(1, 10))
    sims = [r.similarity for r in answer.results]
    assert sims == sorted(sims, reverse=True) and all(-1.001 <= s <= 1.001 for s in sims)
    assert all(Path(r.crop_file).is_file() for r in answer.results)
    whole = core.crop_face(image, None, settings)
    assert whole.shape == crop.shape


def brute_force(gallery: core.Gallery, crop: np.ndarray) -> np.ndarray:
    """Cosine similarity of a crop to every gallery face, by hand."""
    q = photos.embed(gallery.model, crop[None], gallery.size, batch=1)[0].astype(np.float64)
    g = gallery.embeddings.astype(np.float64)
    return g @ q / np.linalg.norm(g, axis=1) / np.linalg.norm(q)


def test_verdicts_against_the_threshold(root):
    """Each result is "same person" exactly when its similarity reaches the threshold; the answer is a
    match exactly when the best one does; whole-image queries get the same verdicts."""
    image = core.read_upload(sample_faces(root)[0].read_bytes())
    gallery = core.load_gallery(root, "mobilenet_v2", "after")
    for box in (core.find_faces(image, gallery.settings).chosen, None):  # a face, and the whole image
        crop = core.crop_face(image, box, gallery.settings)
        sims = np.sort(brute_force(gallery, crop))[::-1][:9]
        middle = float((sims[0] + sims[-1]) / 2)  # some results above, some below
        for cut in (middle, float(sims[0]) + 1e-4, -1.0):
            answer = core.search(core.load_gallery(root, "mobilenet_v2", "after", threshold=cut), crop)
            got = np.array([r.similarity for r in answer.results])
            np.testing.assert_allclose(got, sims, atol=1e-4)
            assert [r.same_person for r in answer.results] == [s >= cut for s in got]
            assert answer.match == (got[0] >= cut) and answer.threshold == cut
        assert not core.search(core.load_gallery(root, "mobilenet_v2", "after", 1.01), crop).match


def test_thresholds_are_each_states_own(root, caplog):
    """The model's calibrated threshold is the fine-tuned model's; the untrained twin gets the fallback."""
    calibrated = {"threshold": {"similarity": 0.61, "far": 1e-3, "source": "validation"}}
    assert core.state_threshold(calibrated, "after", None)[0] == 0.61
    with caplog.at_level(logging.WARNING):
        cut, source = core.state_threshold(calibrated, "before", None)
    assert cut == X.FALLBACK_THRESHOLD and "fallback" in source
    assert core.state_threshold(calibrated, "before", 0.3)[0] == 0.3
    gallery = core.load_gallery(root, "mobilenet_v2", "after")  # train calibrated it on val identities
    payload = torch.load(root / "models" / "mobilenet_v2.pt", map_location="cpu", weights_only=True)
    assert payload["threshold"]["source"] == "validation identities"
    assert (gallery.threshold, gallery.threshold_source) == X.verdict_threshold(payload)


def test_pipeline_gallery_counts_and_sources(root):
    import pandas as pd

    gallery = core.load_gallery(root, "mobilenet_v2", "before")
    split = pd.read_parquet(root / "data" / "split" / "gallery.parquet")
    manifest = pd.read_parquet(root / "data" / "manifest.parquet").set_index("crop_path")
    assert gallery.faces == len(split) == len(gallery.embeddings)
    assert gallery.people == split["identity"].nunique()
    assert gallery.photos == manifest.loc[split["crop_path"], "image_path"].nunique()
    assert gallery.counts_text == f"{gallery.people} people, {gallery.faces} faces, {gallery.photos} photos"
    assert gallery.model_label == "MobileNet-V2 (faster), before fine-tuning"
    # Each result knows its source photo and box, from the crop stage's manifest.
    crop = core.crop_face(core.read_upload(sample_faces(root)[0].read_bytes()), None, gallery.settings)
    res = core.search(gallery, crop).results[0]
    row = manifest.loc[str(Path(res.crop_file).relative_to(root))]
    assert res.name == f"identity {row['identity']}"
    assert res.box == tuple(int(row[c]) for c in core.BOX) and res.source_width == row["width"]
    assert res.source_file.endswith(row["image_path"])


def test_source_photo_boxes_the_face(root, tmp_path):
    """A result opens its photo, at working size, with its box scaled to it; a missing photo is a message."""
    rgb = np.zeros((3000, 4000, 3), np.uint8)
    rgb[1000:1400, 2000:2400] = 255
    (tmp_path / "big.png").write_bytes(png_bytes(Image.fromarray(rgb)))
    res = core.Result(1, 0.9, True, "x", None, str(tmp_path / "big.png"), (2000, 1000, 400, 400), 4000, {})
    photo, box = core.source_photo(res)
    assert photo.shape == (1536, 2048, 3) and box == (1024, 512, 205, 205)
    x, y, w, h = box
    assert photo[y + 5 : y + h - 5, x + 5 : x + w - 5].min() > 200  # the box is on the white square
    assert core.result_face(res).shape == (180, 180, 3)
    with pytest.raises(core.UploadError, match="no longer there"):
        core.source_photo(core.Result(1, 0.9, True, None, None, str(tmp_path / "gone.jpg"), (0, 0, 9, 9), 9, {}))
    with pytest.raises(core.UploadError, match="not known"):
        core.source_photo(core.Result(1, 0.9, True, None, "crop.jpg", None, None, None, {}))


def face(number: int, box, eyes=True, searchable=None) -> core.Face:
    searchable = min(box[2:]) >= core.MIN_FACE_SIDE if searchable is None else searchable
    return core.Face(number, box, searchable, eyes, box[0] <= 1 or box[1] <= 1)


def test_default_face_is_the_most_face_like_large_one():
    person, logo = face(1, (100, 100, 80, 80)), face(2, (0, 0, 120, 120), eyes=False)  # logo: larger, at the edge
    assert core.default_face([person, logo]) == person
    assert core.default_face([face(1, (300, 0, 120, 120)), person]) == person  # at the edge, eyes or not
    bigger = face(2, (300, 100, 100, 100))
    assert core.default_face([person, bigger]) == bigger  # else the larger
    bystander = face(1, (10, 10, 30, 30))
    assert not bystander.searchable and core.default_face([bystander, person]) == person
    assert core.default_face([bystander]) is None  # never a face too small to search


def test_face_choices_mark_small_faces_and_edges(root):
    """On a real photo: the sample face found, a 30 px copy of it pasted in the corner marked too small."""
    settings = core.crop_settings(root, "mobilenet_v2")
    image = core.read_upload(sample_faces(root)[0].read_bytes())
    box = core.find_faces(image, settings).chosen
    detection = core.Detection((box, (0, 0, 30, 30)), "haar_frontal", box, None)
    faces = core.face_choices(image, detection)
    assert [f.number for f in faces] == [1, 2] and [f.box for f in faces] == [box, (0, 0, 30, 30)]
    assert faces[0].searchable == (min(box[2:]) >= core.MIN_FACE_SIDE) and not faces[1].searchable
    assert faces[1].at_edge and not faces[0].at_edge
    expected = faces[0] if faces[0].searchable else None
    assert core.default_face(faces) == expected


def test_query_labels_only_for_the_pipelines_photos(root):
    import pandas as pd

    photo = sample_faces(root)[0]
    manifest = pd.read_parquet(root / "data" / "manifest.parquet")
    row = manifest[manifest["image_path"] == str(photo.relative_to(root / "sample_link"))].iloc[0]
    labels = core.query_labels(root, photo.read_bytes())
    assert labels == {a: bool(row[a]) for a in core.ATTRIBUTE_NAMES}
    # A visitor's photo (other bytes, even of the same face) has no labels: nothing is claimed for it.
    assert core.query_labels(root, jpeg_bytes(Image.open(photo), quality=80)) is None


# --- a photo index ------------------------------------------------------------------------
def people_folder(root: Path, out: Path, leave_out: int) -> tuple[Path, list[Path]]:
    """One folder per sample identity but ``leave_out`` (a stranger to the index); returns it and her photos."""
    import pandas as pd

    manifest = pd.read_parquet(root / "data" / "manifest.parquet")
    kept = manifest[(manifest["status"] == "kept") & (manifest["n_faces"] == 1)]
    stranger = []
    for ident, path in zip(kept["identity"], kept["image_path"], strict=True):
        src = root / "sample_link" / path
        if ident == leave_out:
            stranger.append(src)
            continue
        (out / f"person{ident}").mkdir(parents=True, exist_ok=True)
        shutil.copy(src, out / f"person{ident}" / src.name)
    return out, stranger


@pytest.fixture(scope="module")
def people_index(root, tmp_path_factory):
    """An index (facesearch.index) of the sample's people but one, under an indexes/ folder; and the stranger."""
    import pandas as pd

    base = tmp_path_factory.mktemp("indexes")
    identities = pd.read_parquet(root / "data" / "manifest.parquet")["identity"].dropna()
    folder, stranger = people_folder(root, base / "photos", int(identities.max()))
    X.build(str(root / "models" / "mobilenet_v2.pt"), str(folder), base / "indexes" / "people")
    return base / "indexes" / "people", folder, stranger


def test_index_gallery(root, people_index):
    index_dir, folder, stranger = people_index
    assert core.find_indexes(index_dir.parent) == [index_dir] and core.find_indexes(folder) == []
    gallery = core.load_index_gallery(index_dir)
    info = X.info(index_dir)
    assert (gallery.people, gallery.faces, gallery.photos) == (info["people"], info["faces"], info["photos"])
    assert gallery.model_label == "MobileNet-V2 (faster)" and gallery.attributes is None
    # The index's model's own threshold (calibrated by train), as `index search` uses.
    own = info["threshold"]
    assert (gallery.threshold, gallery.threshold_source) == (own["similarity"], own["source"])
    # A photo of the index finds itself first, with its name, photo and box; as `index search` does.
    photo = sorted(folder.glob("person*/*.jpg"))[0]
    image = core.read_upload(photo.read_bytes())
    box = core.default_face(core.face_choices(image, core.find_faces(image, gallery.settings))).box
    answer = core.search(gallery, core.crop_face(image, box, gallery.settings))
    top = answer.results[0]
    assert top.similarity > 0.9999 and top.name == photo.parent.name and top.source_file == str(photo)
    assert top.crop_file is None and top.attributes == {}
    line = next(X.search(index_dir, [str(photo)]))
    assert [r["photo"] for r in line["results"]] == [r.source_file for r in answer.results]
    np.testing.assert_allclose([r["similarity"] for r in line["results"]], [r.similarity for r in answer.results],
                               atol=1e-4)  # fmt: skip
    assert top.box == tuple(line["results"][0]["box"])
    rgb, shown = core.source_photo(top)
    assert shown == top.box and rgb.shape[:2] == (image.height, image.width)
    # The stranger is in no folder of the index: her results are all somebody else.
    image = core.read_upload(stranger[0].read_bytes())
    crop = core.crop_face(image, core.find_faces(image, gallery.settings).chosen, gallery.settings)
    people = {p.name for p in folder.iterdir()}
    assert {r.name for r in core.search(gallery, crop).results} <= people


def test_index_gallery_failures_are_messages(tmp_path):
    with pytest.raises(core.UploadError, match="cannot be searched"):
        core.load_index_gallery(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "CURRENT").write_text("v000001-gone\n")
    with pytest.raises(core.UploadError, match="cannot be searched"):
        core.load_index_gallery(tmp_path / "bad")


def stranger_threshold(root: Path, people_index) -> float:
    """A threshold just above the stranger's best similarity in the index.

    A calibrated model's own threshold (FAR 1e-3 on validation identities) is what
    puts a stranger below it; the sample's one-step model embeds every cartoon face
    alike (similarity 1 - 4e-8 between any two here), so no threshold separates
    people on it. The stranger checks therefore set this one, measured here, and
    check what the app does with a best result below the threshold, whatever the
    tiny model learnt.
    """
    index_dir, _, stranger = people_index
    gallery = core.load_index_gallery(index_dir)
    image = core.read_upload(stranger[0].read_bytes())
    crop = core.crop_face(image, core.find_faces(image, gallery.settings).chosen, gallery.settings)
    return core.search(gallery, crop).results[0].similarity + 1e-6


# --- Streamlit flows ------------------------------------------------------------------------
@pytest.fixture
def app(root, monkeypatch, tmp_path):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("FACESEARCH_ROOT", str(root))
    monkeypatch.setenv("FACESEARCH_INDEXES", str(tmp_path / "no_indexes"))
    monkeypatch.delenv("FACESEARCH_THRESHOLD", raising=False)
    return AppTest.from_file(str(APP), default_timeout=120).run()


def result_captions(at) -> list[str]:
    return [m.value for m in at.markdown if m.value.startswith("**#")]


def sidebar_text(at) -> str:
    return " ".join(m.value for m in [*at.sidebar.markdown, *at.sidebar.caption])


def test_app_upload_to_nine_results(app, root):
    assert not app.exception
    assert "Upload a photo" in app.info[0].value
    options = app.sidebar.selectbox[0].options
    assert options == ["Test gallery · MobileNet-V2 (faster), fine-tuned",
                       "Test gallery · MobileNet-V2 (faster), before fine-tuning", "another index folder…"]  # fmt: skip
    gallery = core.load_gallery(root, "mobilenet_v2", "after")
    text = sidebar_text(app)
    assert gallery.counts_text in text and "MobileNet-V2 (faster), fine-tuned" in text
    assert f"{gallery.threshold:.3f}" in text and "own threshold" in text
    assert "ResNet" not in text  # no backbone the gallery list does not offer
    app.file_uploader[0].upload("me.jpg", sample_faces(root)[0].read_bytes(), "image/jpeg").run()
    assert not app.exception and not app.error
    captions = result_captions(app)
    assert len(captions) == 9 and all("similarity **" in c and "identity " in c for c in captions)
    app.sidebar.selectbox[0].select_index(1).run()  # before fine-tuning: another model, same flow
    assert not app.exception and len(result_captions(app)) == 9
    assert "before fine-tuning" in sidebar_text(app) and "fallback" in sidebar_text(app)


def test_app_says_no_match(app, root, monkeypatch):
    """Above every similarity: "No match in this gallery", and the nine results all marked below it."""
    monkeypatch.setenv("FACESEARCH_THRESHOLD", "1.01")
    app.file_uploader[0].upload("me.jpg", sample_faces(root)[0].read_bytes(), "image/jpeg").run()
    assert not app.exception and not app.error
    assert any(w.value.startswith("No match in this gallery") for w in app.warning)
    captions = result_captions(app)
    assert len(captions) == 9 and all("below threshold" in c for c in captions)
    monkeypatch.setenv("FACESEARCH_THRESHOLD", "-1")  # below every similarity: all the same person
    app.run()
    assert not any(w.value.startswith("No match") for w in app.warning) and app.success
    assert all("same person" in c for c in result_captions(app))


def test_app_attributes_only_for_labelled_queries(app, root):
    """A photo of the pipeline's data has labels: ✓ marks; the same face re-encoded has none: no ✓ at all."""
    photo = sample_faces(root)[0]
    app.file_uploader[0].upload("me.jpg", photo.read_bytes(), "image/jpeg").run()
    assert any("attributes marked ✓" in c.value for c in app.caption)
    app.file_uploader[0].upload("mine.jpg", jpeg_bytes(Image.open(photo), quality=80), "image/jpeg").run()
    assert len(result_captions(app)) == 9
    assert not any("✓" in c.value for c in app.caption)


def test_app_camera_photo(app, root):
    app.camera_input[0].upload("camera.jpg", sample_faces(root)[1].read_bytes()).run()
    assert not app.exception and not app.error
    assert len(result_captions(app)) == 9


def test_app_bad_uploads_get_a_message(app):
    app.file_uploader[0].upload("x.jpg", b"not an image at all", "image/jpeg").run()
    assert app.error[0].value == "This is not an image file we can read." and not app.exception
    app.file_uploader[0].upload("bomb.png", bomb_png(), "image/png").run()
    assert "megapixels" in app.error[0].value and not app.exception


def test_app_hostile_uploads_get_a_message(app):
    for name, data in hostile_uploads().items():
        app.file_uploader[0].upload(name, data, "application/octet-stream").run()
        assert not app.exception, name
        if name == "bad_exif.jpg" and not app.error:  # a decoder that reads it: searched, not refused
            assert app.warning and "No face" in app.warning[0].value
            continue
        assert len(app.error) == 1 and app.error[0].value, name
        assert "Traceback" not in app.error[0].value and "Error" not in app.error[0].value, name


def test_app_unexpected_failure_is_a_generic_message(app, root, monkeypatch, caplog):
    """A bug below the app shows a generic message, not the exception; the log has the traceback."""

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail /srv/models")

    monkeypatch.setattr(core, "search", broken)  # (loaders are cached across tests: search is not)
    with caplog.at_level(logging.ERROR):
        app.file_uploader[0].upload("me.jpg", sample_faces(root)[0].read_bytes(), "image/jpeg").run()
    assert not app.exception
    assert [e.value for e in app.error] == ["Something went wrong while searching with this photo. Please try "
                                            "another photo, or try again later."]  # fmt: skip
    assert "secret detail" in caplog.text and "the search page failed" in caplog.text
    shown = " ".join(str(getattr(e, "value", "")) for e in app.main)
    assert "secret detail" not in shown


def test_app_states_its_limits_and_formats(app):
    """The uploader takes what the decoder takes, and the limits are in view, not only in a tooltip."""
    assert {t.lstrip(".") for t in app.file_uploader[0].proto.type} == set(core.UPLOAD_EXTENSIONS)
    assert core.LIMITS_TEXT in [c.value for c in app.caption]
    assert "10 MB" in core.LIMITS_TEXT and "40 megapixels" in core.LIMITS_TEXT and "10 times" in core.LIMITS_TEXT
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["client"]["showErrorDetails"] == "none"  # an uncaught error would show no traceback either
    # Over 10 MB, the app's own refusal is the one visitors see (Streamlit's is a tooltip).
    assert config["server"]["maxUploadSize"] * 2**20 > 2 * core.MAX_UPLOAD_BYTES
    app.file_uploader[0].upload("big.jpg", b"\xff\xd8" + b"\0" * (11 * 2**20), "image/jpeg").run()
    assert [e.value for e in app.error] == ["The file is larger than 10 MB."]


def test_app_no_face_offers_whole_image(app):
    blank = jpeg_bytes(Image.fromarray(np.full((200, 200, 3), 128, np.uint8)))
    app.file_uploader[0].upload("wall.jpg", blank, "image/jpeg").run()
    assert "No face" in app.warning[0].value and not result_captions(app)
    app.checkbox[0].check().run()
    assert len(result_captions(app)) == 9
    assert any("verdict" in c.value for c in app.caption)  # a non-face gets the verdict, said so


def two_faces_photo(root: Path, second: int = 160) -> bytes:
    """The sample's first face at 160 px, and its mirror image at ``second`` px, side by side."""
    settings = core.crop_settings(root, "mobilenet_v2")
    image = core.read_upload(sample_faces(root)[0].read_bytes())
    box = core.find_faces(image, settings).chosen
    canvas = np.full((200, 360, 3), 128, np.uint8)
    canvas[20:180, 10:170] = crop_square(image.rgb, box, margin=0.3, size=160)
    canvas[20 : 20 + second, 190 : 190 + second] = crop_square(image.rgb, box, margin=0.3, size=second)[:, ::-1]
    return jpeg_bytes(Image.fromarray(canvas), quality=95)


def test_app_several_faces_let_the_user_pick(app, root):
    settings = core.crop_settings(root, "mobilenet_v2")
    photo = two_faces_photo(root)
    assert len(core.find_faces(core.read_upload(photo), settings).boxes) == 2
    app.file_uploader[0].upload("two.jpg", photo, "image/jpeg").run()
    assert app.radio[0].options == ["face 1", "face 2"]
    app.radio[0].set_value(1).run()
    assert len(result_captions(app)) == 9 and not app.exception


def test_app_small_faces_are_marked_not_chosen(app, root, monkeypatch):
    """A face under MIN_FACE_SIDE is listed as too small, never pre-selected; picked, it is refused in words."""
    photo = two_faces_photo(root)
    boxes = core.find_faces(core.read_upload(photo), core.crop_settings(root, "mobilenet_v2")).boxes
    small = (boxes[1][0], boxes[1][1], 30, 30)

    def with_bystander(image, settings):  # the detector also "finds" a 30 px face
        return core.Detection((boxes[0], small), "haar_frontal", boxes[0], None)

    monkeypatch.setattr(core, "find_faces", with_bystander)
    app.file_uploader[0].upload("two.jpg", photo, "image/jpeg").run()
    assert app.radio[0].options == ["face 1", "face 2 (too small to search)"] and app.radio[0].index == 0
    assert len(result_captions(app)) == 9
    app.radio[0].set_value(1).run()
    assert not result_captions(app) and "too small to search" in app.warning[0].value and not app.exception


def test_app_searches_an_index_and_opens_the_photo(app, root, people_index, monkeypatch):
    index_dir, folder, _ = people_index
    monkeypatch.setenv("FACESEARCH_INDEXES", str(index_dir.parent))
    app.run()
    labels = app.sidebar.selectbox[0].options
    assert "Index · people" in labels
    app.sidebar.selectbox[0].select_index(labels.index("Index · people")).run()
    gallery = core.load_index_gallery(index_dir)
    assert gallery.counts_text in sidebar_text(app) and "the photo index people" in sidebar_text(app)
    photo = sorted(folder.glob("person*/*.jpg"))[0]
    app.file_uploader[0].upload("me.jpg", photo.read_bytes(), "image/jpeg").run()
    captions = result_captions(app)
    assert not app.exception and not app.error and len(captions) == min(9, gallery.faces)
    assert captions[0].endswith(f"· {photo.parent.name}")
    app.button(key="open1").click().run()
    assert f"#1 in its photo: {photo} ({photo.parent.name})" in [c.value for c in app.caption]
    # A folder typed in: the same index; a folder that is none, a message.
    app.sidebar.selectbox[0].select_index(len(labels) - 1).run()
    app.sidebar.text_input(key="index_path").input(str(index_dir)).run()
    assert gallery.counts_text in sidebar_text(app) and not app.error
    app.sidebar.text_input(key="index_path").input(str(folder)).run()
    assert app.error and "cannot be searched" in app.error[0].value and not app.exception


def test_app_stranger_gets_no_match(app, root, people_index, monkeypatch):
    index_dir, _, stranger = people_index
    monkeypatch.setenv("FACESEARCH_INDEXES", str(index_dir.parent))
    monkeypatch.setenv("FACESEARCH_THRESHOLD", str(stranger_threshold(root, people_index)))
    app.run()
    app.sidebar.selectbox[0].select_index(app.sidebar.selectbox[0].options.index("Index · people")).run()
    app.file_uploader[0].upload("stranger.jpg", stranger[0].read_bytes(), "image/jpeg").run()
    assert any(w.value.startswith("No match in this gallery") for w in app.warning)
    captions = result_captions(app)
    assert len(captions) == 9 and all("below threshold" in c for c in captions)  # shown, marked


# --- a real browser ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_browser_upload_shows_nine_faces(root, people_index, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed")
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("no chromium/chromedriver on this machine (apt-get install chromium chromium-driver)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    index_dir, _, stranger = people_index
    port = free_port()
    # A threshold just above the stranger's best (see stranger_threshold).
    env = {**__import__("os").environ, "FACESEARCH_ROOT": str(root), "FACESEARCH_INDEXES": str(index_dir.parent),
           "FACESEARCH_THRESHOLD": str(stranger_threshold(root, people_index))}  # fmt: skip
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", "127.0.0.1", "--server.port",
         str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1600", f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        options.add_argument(flag)
    browser = None

    def body() -> str:
        return browser.find_element(By.TAG_NAME, "body").text

    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # wait for the server to listen
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
        browser.get(f"http://127.0.0.1:{port}")
        wait = WebDriverWait(browser, 90)
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]")))
        upload.send_keys(str(sample_faces(root)[0]))
        wait.until(lambda b: "#9 ·" in body())
        text = body()
        assert all(f"#{i} ·" in text for i in range(1, 10))
        assert "people," in text and "faces," in text and "Same person at similarity" in text
        browser.save_screenshot(str(tmp_path / "app.png"))
        assert (tmp_path / "app.png").stat().st_size > 10_000
        assert core.LIMITS_TEXT in text  # the limits are in view before anything is refused
        # Over the limit: refused in words on the page (Streamlit's own refusal is a tooltip), and
        # the previous photo's results are gone, so they cannot pass for this file's.
        big = tmp_path / "big.jpg"
        big.write_bytes(b"\xff\xd8" + b"\0" * (11 * 2**20))
        upload.send_keys(str(big))
        wait.until(lambda b: "The file is larger than 10 MB." in body())
        assert "#1 ·" not in body()
        # The photo index: chosen in the sidebar's gallery list, then a stranger's photo.
        choose = browser.find_element(By.CSS_SELECTOR, "[data-testid=stSidebar] [data-testid=stSelectbox] input")
        choose.click()
        choose.send_keys("Index · people", Keys.ENTER)  # the select's own filter, as a visitor may type
        wait.until(lambda b: "the photo index people" in body())
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]")))
        upload.send_keys(str(stranger[0]))
        wait.until(lambda b: "No match in this gallery" in body() and "#1 ·" in body())
        assert "below threshold" in body() and "#9 ·" in body() and "same person ·" not in body()
        browser.save_screenshot(str(tmp_path / "index.png"))
    finally:
        if browser is not None:
            browser.quit()
        server.terminate()
        server.wait(timeout=30)


def test_gallery_index_uses_the_stages_rerank_structure_only_when_current(tmp_path):
    from facesearch import rerank as R
    from facesearch.search import ExactIndex

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(30, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    R.prepare(emb, {"method": "dba_qe", "background": 5}).save(tmp_path / "after")
    index = core.gallery_index(tmp_path / "after", emb)
    assert isinstance(index.index, R.RerankIndex) and index.index.p.method == "dba_qe"
    assert isinstance(core.gallery_index(tmp_path / "after", emb[::-1].copy()), ExactIndex)  # stale: plain
    assert isinstance(core.gallery_index(tmp_path / "absent", emb), ExactIndex)
