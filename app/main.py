"""facesearch demo: upload or take a photo, see the 9 most similar faces of the gallery.

    streamlit run app/main.py

Reads what the pipeline built (models/, data/embeddings/, data/split/, data/crops/)
from the repository root, or from $FACESEARCH_ROOT. Models, galleries and search
indexes load once per process (st.cache_resource), never per query. Uploads stay
in memory; the only files read are the pipeline's own. Every failure reaches the
visitor as a message: core.UploadError's own text, anything else a generic one
(its traceback goes to the log, and .streamlit/config.toml hides error details).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `streamlit run` puts app/ first on sys.path

from facesearch import app_core as core
from facesearch import manifest as M

ROOT = Path(os.environ.get("FACESEARCH_ROOT", Path(__file__).resolve().parents[1]))
log = logging.getLogger("facesearch.app")
UNEXPECTED = "Something went wrong while searching with this photo. Please try another photo, or try again later."


@st.cache_resource(show_spinner="Loading the model…")
def embedder(backbone: str, state: str):
    return core.load_embedder(ROOT, backbone, state)


@st.cache_resource(show_spinner="Loading the gallery…")
def gallery(backbone: str, state: str) -> core.Gallery:
    return core.load_gallery(ROOT, backbone, state)


@st.cache_resource
def settings(backbone: str) -> core.FaceConfig:
    return core.crop_settings(ROOT, backbone)


def draw_boxes(rgb: np.ndarray, boxes) -> np.ndarray:
    out = rgb.copy()
    thick = max(2, round(max(rgb.shape[:2]) / 300))
    for i, (x, y, w, h) in enumerate(boxes, start=1):
        cv2.rectangle(out, (x, y), (x + w, y + h), (255, 200, 0), thick)
        cv2.putText(out, str(i), (x + 4, y + max(20, h // 6)), cv2.FONT_HERSHEY_SIMPLEX, max(0.8, h / 120),
                    (255, 200, 0), thick, cv2.LINE_AA)  # fmt: skip
    return out


def model_label(choice: tuple[str, str]) -> str:
    backbone, state = choice
    return f"{core.BACKBONE_LABELS.get(backbone, backbone)}, {M.STATE_LABELS[state]}"


def show_results(face: np.ndarray, results: list[core.Result]) -> None:
    left, right = st.columns([1, 3])
    left.image(face, caption="Query face", width=200)
    left.caption("Attributes marked ✓ are shared with the query (estimated from its 9 results).")
    with right:
        for row in range(0, len(results), 3):
            for col, res in zip(st.columns(3), results[row : row + 3], strict=False):
                col.image(str(ROOT / res.crop_path), width=180)
                col.markdown(f"**#{res.rank}** · similarity **{res.similarity:.3f}** · identity `{res.identity}`")
                if res.attributes:
                    shown = [f"✓ **{a}**" if a in res.shared else a for a, v in res.attributes.items() if v]
                    col.caption(" · ".join(shown) or "no positive attributes")


def page() -> None:
    choices = core.available(ROOT)
    if not choices:
        st.error("No search index has been built yet: run `dvc repro` (or `dvc pull`) in the repository first.")
        return
    choice = st.sidebar.selectbox("Model", choices, format_func=model_label)
    st.sidebar.caption("ResNet-50 is the more accurate, MobileNet-V2 the faster backbone.")
    upload_tab, camera_tab = st.tabs(["Upload a photo", "Take a photo"])
    with upload_tab:
        upload = st.file_uploader("Photo", type=core.UPLOAD_EXTENSIONS, key="upload")
        # In view, not only in the uploader's tooltip: a refused file should not be a surprise.
        st.caption(core.LIMITS_TEXT)
    with camera_tab:
        shot = st.camera_input("Camera", key="camera")
    source = upload or shot
    if source is None:
        st.info("Upload a photo or take one to find the most similar faces in the gallery.")
        return
    image = core.read_upload(source.getvalue())
    crop = settings(choice[0])
    detection = core.find_faces(image, crop)
    box = None
    if not detection.boxes:
        st.warning("No face was found in this photo.")
        st.image(image.rgb, width=320)
        if not st.checkbox("Search with the whole image instead", key="whole_image"):
            return
    elif len(detection.boxes) > 1:
        st.image(draw_boxes(image.rgb, detection.boxes), caption=f"{len(detection.boxes)} faces found", width=480)
        default = detection.boxes.index(detection.chosen) if detection.chosen in detection.boxes else 0
        pick = st.radio("Which face?", list(range(len(detection.boxes))), index=default, horizontal=True,
                        format_func=lambda i: f"face {i + 1}", key="face")  # fmt: skip
        box = detection.boxes[pick]
    else:
        box = detection.boxes[0]
    face = core.crop_face(image, box, crop)
    results, _ = core.search(embedder(*choice), gallery(*choice), face)
    show_results(face, results)


def main() -> None:
    st.set_page_config(page_title="facesearch", layout="wide")
    st.title("facesearch")
    try:
        page()
    except core.UploadError as exc:
        st.error(str(exc))
    except Exception:  # Streamlit's rerun/stop signals are BaseExceptions and pass through
        log.exception("the search page failed")
        st.error(UNEXPECTED)


main()
