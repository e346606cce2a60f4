"""facesearch demo: upload or take a photo, see the most similar faces of a gallery, grouped by person.

    streamlit run app/main.py

Galleries (the sidebar): the photo indexes (``python -m facesearch index build``) the
operator lists, then the pipeline's test gallery of each built model state (models/,
data/embeddings/, data/split/, data/crops/ of the repository root). The page opens on the
first: an index of real photos when there is one, else the fine-tuned model's test gallery,
with a note of whose faces it holds (the synthetic sample's cartoon people, by default).
The answer names who matched (or says "No match in this gallery"); each result
shows its cosine similarity and what it is: the match, the same person (another
photo of the matched person), or another person above or below the threshold.

What visitors may search is the operator's, set by environment variables:

- ``FACESEARCH_ROOT``: the repository whose pipeline outputs are served (default: this one).
- ``FACESEARCH_INDEXES``: folder(s), separated by ``os.pathsep`` (":"), whose index
  sub-folders the sidebar lists (default: ``indexes/`` of that root).
- ``FACESEARCH_ALLOW_PATHS``: ``1`` lets visitors type an index folder (default: off;
  only the listed galleries can be searched).
- ``FACESEARCH_ALLOWED_ROOTS``: folder(s), separated by ``os.pathsep``, that a typed folder
  must lie in once resolved, symlinks followed (default: the ``FACESEARCH_INDEXES`` folders).
  Any refusal of a typed folder is one message, whether or not the folder exists.
- ``FACESEARCH_THRESHOLD``: one threshold for every gallery instead of each model's own
  (demos and tests).

An index is not trusted further than its folder: a result's photo is shown only from
inside the index's own photo root, resolved, and only if its content is the one indexed.
Models and galleries load once per process and stay bounded: the pipeline's galleries
(st.cache_resource, a few entries) and the indexes (core.IndexGalleries: one live version
per index, a few indexes, a model file loaded once for every index built with it).
Uploads stay in memory. Every failure reaches the visitor as a message: core.UploadError's
own text, anything else a generic one (its traceback goes to the log, and
.streamlit/config.toml hides error details).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `streamlit run` puts app/ first on sys.path

from facesearch.gallery import app_core as core

ROOT = Path(os.environ.get("FACESEARCH_ROOT", Path(__file__).resolve().parents[1]))
ACCESS = core.Access.from_env(os.environ, ROOT)
THRESHOLD = float(os.environ["FACESEARCH_THRESHOLD"]) if os.environ.get("FACESEARCH_THRESHOLD") else None
log = logging.getLogger("facesearch.app")
UNEXPECTED = "Something went wrong while searching with this photo. Please try another photo, or try again later."
NO_MATCH = "No match in this gallery"
OTHER_INDEX = "another index folder…"
SIMILARITY_TEXT = (
    "Similarity is the cosine of the angle between two faces' embeddings (1: the same embedding). "
    "Each model, and each state of a model, spreads faces on its own scale, so the same two photos score "
    'differently under each, and each has its own threshold for "same person".'
)
# What each result is (core.group), as its caption says it.
VERDICT_TEXT = {core.MATCH: "same person (the match)", core.SAME_PERSON: "same person",
                core.ABOVE: "above threshold", core.BELOW: "below threshold"}  # fmt: skip
GOOD, MARKED = (255, 200, 0), (160, 160, 160)


@st.cache_resource(show_spinner="Loading the model and its gallery…", max_entries=8)
def pipeline_gallery(backbone: str, state: str, threshold: float | None) -> core.Gallery:
    return core.load_gallery(ROOT, backbone, state, threshold)


@st.cache_resource
def index_galleries() -> core.IndexGalleries:
    """The process's loaded indexes: one live version each, bounded (see core.IndexGalleries)."""
    return core.IndexGalleries()


def draw_boxes(rgb: np.ndarray, boxes, colours=None, labels=None) -> np.ndarray:
    out = rgb.copy()
    thick = max(2, round(max(rgb.shape[:2]) / 300))
    for i, (x, y, w, h) in enumerate(boxes):
        colour = colours[i] if colours else GOOD
        cv2.rectangle(out, (x, y), (x + w, y + h), colour, thick)
        label = labels[i] if labels else str(i + 1)
        cv2.putText(out, label, (x + 4, y + max(20, h // 6)), cv2.FONT_HERSHEY_SIMPLEX, max(0.8, h / 120),
                    colour, thick, cv2.LINE_AA)  # fmt: skip
    return out


def pair(a: float, b: float) -> tuple[str, str]:
    """Two similarities printed with the digits that tell them apart (3, or 6 when those read equal)."""
    return (f"{a:.3f}", f"{b:.3f}") if f"{a:.3f}" != f"{b:.3f}" else (f"{a:.6f}", f"{b:.6f}")


def gallery_options() -> dict[str, tuple[str, str, str | None]]:
    """Sidebar label -> (kind, backbone or folder, state): only what the operator serves.

    The most useful first, as the page opens on the first: the operator's photo indexes (their
    own photos), then the test galleries, each backbone fine-tuned before its untrained twin.
    """
    options = {}
    listed = ACCESS.listed()
    names = [p.name for p in listed]
    for p in listed:  # two listed folders may hold indexes of the same name
        label = f"Index · {p.name}" + (f" ({p.parent.name})" if names.count(p.name) > 1 else "")
        options[label] = ("index", str(p), None)
    options |= {f"Test gallery · {core.model_label(b, s)}": ("pipeline", b, s) for b, s in core.available(ROOT)}
    if ACCESS.allow_paths:
        options[OTHER_INDEX] = ("path", "", None)
    return options


def choose_gallery() -> core.Gallery | None:
    """The sidebar: which gallery to search, and what it holds."""
    options = gallery_options()
    if not options:
        st.sidebar.info("No gallery is available yet.")
        return None
    kind, where, state = options[st.sidebar.selectbox("Gallery", list(options), key="gallery")]
    if kind == "pipeline":
        gallery = pipeline_gallery(where, state, THRESHOLD)
    elif kind == "index":
        with st.spinner("Loading the index and its model…"):
            gallery = index_galleries().get(Path(where), THRESHOLD)
    else:
        text = st.sidebar.text_input("Index folder", key="index_path",
                                     help="A folder made by `python -m facesearch index build`, inside the folders "
                                          "this app's operator allows.")  # fmt: skip
        if not text:
            st.sidebar.info("Type the path of an index folder.")
            return None
        with st.spinner("Loading the index and its model…"):
            gallery = core.typed_index_gallery(ACCESS, index_galleries(), text, THRESHOLD)
    st.sidebar.markdown(f"Searching {gallery.title}: **{gallery.counts_text}**.")
    if gallery.note:
        st.sidebar.info(gallery.note)
    st.sidebar.markdown(f"Model: **{gallery.model_label}**. Same person at similarity ≥ "
                        f"**{gallery.threshold:.3f}** ({gallery.threshold_source}).")  # fmt: skip
    st.sidebar.caption(gallery.verdict.meaning())
    if gallery.verdict.warning():
        st.sidebar.warning(gallery.verdict.warning())
    st.sidebar.caption(SIMILARITY_TEXT)
    return gallery


def pick_face(image, detection) -> tuple[bool, tuple | None]:
    """(search?, box): the face to search with, chosen by the visitor among those found."""
    faces = core.face_choices(image, detection)
    if not faces:
        st.warning("No face was found in this photo.")
        st.image(image.rgb, width=320)
        whole = st.checkbox("Search with the whole image instead", key="whole_image")
        if whole:
            st.caption("The whole image is searched as if it were a face: the similarity of a non-face says "
                       "little, and the verdict below applies to it as to any face.")  # fmt: skip
        return whole, None
    small = [f for f in faces if not f.searchable]
    st.image(draw_boxes(image.rgb, [f.box for f in faces], [GOOD if f.searchable else MARKED for f in faces]),
             caption=f"{len(faces)} face{'s' * (len(faces) > 1)} found", width=480)  # fmt: skip
    if small:
        st.caption(f"Faces under {core.MIN_FACE_SIDE} px (boxed in grey) are too small to search.")
    default = core.default_face(faces)
    if len(faces) == 1 and default is not None:
        return True, faces[0].box

    def face_label(i: int) -> str:
        f = faces[i]
        return f"face {f.number}" + ("" if f.searchable else " (too small to search)")

    pick = st.radio("Which face?", list(range(len(faces))), horizontal=True, format_func=face_label, key="face",
                    index=None if default is None else faces.index(default))  # fmt: skip
    if pick is None:
        st.warning(f"No face in this photo is large enough to search (at least {core.MIN_FACE_SIDE} px).")
        return False, None
    if not faces[pick].searchable:
        w, h = faces[pick].box[2:]
        st.warning(f"Face {faces[pick].number} is too small to search ({w} x {h} px; at least "
                   f"{core.MIN_FACE_SIDE} px).")  # fmt: skip
        return False, None
    return True, faces[pick].box


def show_results(
    face: np.ndarray, answer: core.Answer, labels: dict[str, bool] | None, token: str, marked: np.ndarray | None = None
) -> None:
    best, cut = pair(answer.results[0].similarity if answer.results else float("nan"), answer.threshold)
    if answer.match:
        st.success(f"Same person found: {answer.who}. The best similarity {best} reaches the threshold {cut}.")
    else:
        st.warning(f"{NO_MATCH}: the best similarity {best} is below the threshold {cut}. "
                   "The faces below are the most similar ones, not the same person.")  # fmt: skip
    left, right = st.columns([1, 3])
    left.image(face, caption="Query face", width=200)
    if marked is not None:  # the detector's 5 landmarks (YuNet), which an ArcFace-aligned chip is cut from
        left.image(marked, caption="Its landmarks: eyes, nose tip, mouth corners", width=120)
    if labels is not None and any(r.attributes for r in answer.results):
        left.caption("This photo is in the pipeline's data: attributes marked ✓ are the ones a result shares "
                     "with its labels.")  # fmt: skip
    if any(r.name for r in answer.results):
        left.caption(("The matched person's other photos among the nearest faces come first, marked same person; "
                      if any(r.verdict == core.SAME_PERSON for r in answer.results) else "")
                     + "every other person is shown once, by their most similar face; # is the rank among the "
                       "nearest faces.")  # fmt: skip
    with right:
        for row in range(0, len(answer.results), 3):
            for col, res in zip(st.columns(3), answer.results[row : row + 3], strict=False):
                try:
                    col.image(core.result_face(res), width=180)
                except core.UploadError as exc:  # this result's photo only: the others still show
                    col.info(str(exc))
                col.markdown(f"**#{res.rank}** · similarity **{res.similarity:.3f}** · {VERDICT_TEXT[res.verdict]}"
                             + (f" · {res.name}" if res.name else ""))  # fmt: skip
                if res.attributes:
                    shown = [f"✓ **{a}**" if labels is not None and labels.get(a) else a
                             for a, v in res.attributes.items() if v]  # fmt: skip
                    col.caption("labels: " + (" · ".join(shown) or "no positive attributes"))
                if res.source_file is not None and col.button("Open photo", key=f"open{res.rank}"):
                    st.session_state["opened"] = (token, res.rank)
                elif res.source_file is None:
                    col.caption("source photo not known: the crop is shown")
    opened = st.session_state.get("opened")
    res = next((r for r in answer.results if opened and opened[0] == token and r.rank == opened[1]), None)
    if res is not None:
        try:
            rgb, box = core.source_photo(res)
        except core.UploadError as exc:
            st.warning(str(exc))
            return
        st.image(draw_boxes(rgb, [box], labels=[f"#{res.rank}"]), width=640)
        st.caption(f"#{res.rank} in its photo: {res.photo}" + (f" ({res.name})" if res.name else ""))


def page() -> None:
    gallery = choose_gallery()
    if gallery is None:
        return
    upload_tab, camera_tab = st.tabs(["Upload a photo", "Take a photo"])
    with upload_tab:
        # The same limit as the app's own check and Streamlit's server.maxUploadSize (core.MAX_UPLOAD_MB);
        # the uploader states it and the file types under its drop zone.
        upload = st.file_uploader("Photo", type=core.UPLOAD_EXTENSIONS, key="upload",
                                  max_upload_size=core.MAX_UPLOAD_MB)  # fmt: skip
        # In view, and only what the uploader's own line does not say: a refused file should not be a
        # surprise, and each limit is stated once.
        st.caption(core.LIMITS_TEXT)
    with camera_tab:
        shot = st.camera_input("Camera", key="camera")
    source = upload or shot
    if source is None:
        st.info("Upload a photo or take one to find the most similar faces in the gallery.")
        return
    data = source.getvalue()
    image = core.read_upload(data)
    detection = core.find_faces(image, gallery.settings)
    go, box = pick_face(image, detection)
    if not go:
        return
    points = detection.landmarks_of(box)  # None for detectors without landmarks, or the whole image
    face = core.crop_face(image, box, gallery.settings, points)
    answer = core.search(gallery, face)
    token = hashlib.sha256(data).hexdigest()[:16] + str(box)
    marked = None if points is None else core.landmarks_view(image, box, points)
    show_results(face, answer, core.query_labels(ROOT, data), token, marked)


def main() -> None:
    st.set_page_config(page_title="facesearch", layout="wide")
    st.title("facesearch")
    if not core.available(ROOT) and not ACCESS.listed():
        st.info("No test gallery has been built yet (run `dvc repro` or `dvc pull` in the repository)"
                + ("; you can still search a photo index by its folder." if ACCESS.allow_paths else "."))  # fmt: skip
    try:
        page()
    except core.UploadError as exc:
        st.error(str(exc))
    except Exception:  # Streamlit's rerun/stop signals are BaseExceptions and pass through
        log.exception("the search page failed")
        st.error(UNEXPECTED)


main()
