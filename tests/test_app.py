"""The search app: its core logic, its Streamlit flows (AppTest), and one run in a real browser."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import bomb_png, jpeg_bytes
from PIL import Image

from facesearch import app_core as core
from facesearch.detect import crop_square

APP = Path(__file__).resolve().parents[1] / "app" / "main.py"


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


def test_available_models_and_search(root):
    assert core.available(root) == [("mobilenet_v2", "after"), ("mobilenet_v2", "before")]
    settings = core.crop_settings(root)
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


def test_app_no_face_offers_whole_image(app):
    blank = jpeg_bytes(Image.fromarray(np.full((200, 200, 3), 128, np.uint8)))
    app.file_uploader[0].upload("wall.jpg", blank, "image/jpeg").run()
    assert "No face" in app.warning[0].value and not result_captions(app)
    app.checkbox[0].check().run()
    assert len(result_captions(app)) == 9


def test_app_several_faces_let_the_user_pick(app, root):
    settings = core.crop_settings(root)
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
    finally:
        if browser is not None:
            browser.quit()
        server.terminate()
        server.wait(timeout=30)
