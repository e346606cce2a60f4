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

import numpy as np
import pytest
from conftest import bomb_png, jpeg_bytes, png_bytes, write_params
from PIL import Image

from facesearch import app_core as core
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
        core.search(None, None, np.zeros((8, 8, 3), np.uint8))


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
    results, _ = core.search(core.load_embedder(root, "mobilenet_v2", "after"), gallery, crop)
    assert [r.rank for r in results] == list(range(1, 10))
    sims = [r.similarity for r in results]
    assert sims == sorted(sims, reverse=True) and all(-1.001 <= s <= 1.001 for s in sims)
    assert all((root / r.crop_path).is_file() for r in results)
    whole = core.crop_face(image, None, settings)
    assert whole.shape == crop.shape


# --- Streamlit flows ------------------------------------------------------------------------
@pytest.fixture
def app(root, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("FACESEARCH_ROOT", str(root))
    return AppTest.from_file(str(APP), default_timeout=120).run()


def result_captions(at) -> list[str]:
    return [m.value for m in at.markdown if m.value.startswith("**#")]


def test_app_upload_to_nine_results(app, root):
    assert not app.exception
    assert "Upload a photo" in app.info[0].value
    options = app.sidebar.selectbox[0].options
    assert options == ["MobileNet-V2 (faster), fine-tuned", "MobileNet-V2 (faster), before fine-tuning"]
    app.file_uploader[0].upload("me.jpg", sample_faces(root)[0].read_bytes(), "image/jpeg").run()
    assert not app.exception and not app.error
    assert len(result_captions(app)) == 9
    app.sidebar.selectbox[0].select_index(1).run()  # before fine-tuning: another model, same flow
    assert not app.exception and len(result_captions(app)) == 9


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


def test_app_no_face_offers_whole_image(app):
    blank = jpeg_bytes(Image.fromarray(np.full((200, 200, 3), 128, np.uint8)))
    app.file_uploader[0].upload("wall.jpg", blank, "image/jpeg").run()
    assert "No face" in app.warning[0].value and not result_captions(app)
    app.checkbox[0].check().run()
    assert len(result_captions(app)) == 9


def test_app_several_faces_let_the_user_pick(app, root):
    settings = core.crop_settings(root, "mobilenet_v2")
    image = core.read_upload(sample_faces(root)[0].read_bytes())
    box = core.find_faces(image, settings).chosen
    face = crop_square(image.rgb, box, margin=0.3, size=160)
    canvas = np.full((200, 360, 3), 128, np.uint8)
    canvas[20:180, 10:170], canvas[20:180, 190:350] = face, face[:, ::-1]
    photo = jpeg_bytes(Image.fromarray(canvas), quality=95)
    assert len(core.find_faces(core.read_upload(photo), settings).boxes) == 2
    app.file_uploader[0].upload("two.jpg", photo, "image/jpeg").run()
    assert app.radio[0].options == ["face 1", "face 2"]
    app.radio[0].set_value(1).run()
    assert len(result_captions(app)) == 9 and not app.exception


# --- a real browser ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_browser_upload_shows_nine_faces(root, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed")
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("no chromium/chromedriver on this machine (apt-get install chromium chromium-driver)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    env = {**__import__("os").environ, "FACESEARCH_ROOT": str(root)}
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
        wait.until(lambda b: "#9 ·" in b.find_element(By.TAG_NAME, "body").text)
        text = browser.find_element(By.TAG_NAME, "body").text
        assert all(f"#{i} ·" in text for i in range(1, 10))
        browser.save_screenshot(str(tmp_path / "app.png"))
        assert (tmp_path / "app.png").stat().st_size > 10_000
        assert core.LIMITS_TEXT in text  # the limits are in view before anything is refused
        # Over the limit: refused in words on the page (Streamlit's own refusal is a tooltip), and
        # the previous photo's results are gone, so they cannot pass for this file's.
        big = tmp_path / "big.jpg"
        big.write_bytes(b"\xff\xd8" + b"\0" * (11 * 2**20))
        upload.send_keys(str(big))
        wait.until(lambda b: "The file is larger than 10 MB." in b.find_element(By.TAG_NAME, "body").text)
        assert "#1 ·" not in browser.find_element(By.TAG_NAME, "body").text
    finally:
        if browser is not None:
            browser.quit()
        server.terminate()
        server.wait(timeout=30)
