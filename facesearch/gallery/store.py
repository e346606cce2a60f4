"""An index of your own photos on disk: a versioned folder, its tables and their checks.

Paths: a photo is its absolute path with the folders resolved (``os.path.realpath``
of the folder given, then the path below it as listed; symlinked folders are not
followed, a symlinked file keeps its own name). Each folder given to build/add is a
*root*, recorded with its layout; a folder given to ``add`` that lies inside an
indexed root is scanned as part of that root, so ``root/alice/x.jpg`` is the same
photo whether added through ``root`` or ``root/alice``.

The index is a folder::

    INDEX/CURRENT             the name of the live version (one line), replaced atomically
    INDEX/v000003-<hex>/      a version, never modified once CURRENT names it
        embeddings.npy        (faces, d) float32, L2-normalised; row i <-> faces.parquet row i
        faces.parquet         FACE_DTYPES: photo, content hash, face number, box, person (the named face only)
        photos.parquet        PHOTO_DTYPES: every photo read (those without faces too, with why)
        index.json            format, version, previous version, the model (path, fingerprint, preprocessing),
                              roots and their layouts, the enrolment threshold, search settings
        hnsw.faiss            the HNSW graph (faiss.write_index), present when faces >= hnsw_threshold

``add`` and ``remove`` write a whole new version beside the live one, then
replace ``CURRENT`` (``os.replace``): killed at any point, the index is the old
version, complete. A write that fails (a full disk) deletes its half-written
version and says so in one line; a version left by a killed writer is deleted
by the next build/add/remove. The version before the live one is kept, so a
search that read ``CURRENT`` just before a switch still finds its files.
Writers take an exclusive lock (``INDEX/.lock``); readers take none.

Search structure: exact brute force (:class:`facesearch.retrieval.knn.ExactIndex`)
below ``hnsw_threshold`` faces, FAISS HNSW (approximate) from there on. At
100k faces exact search takes ~1.2 ms a query on a 2-core CPU and HNSW ~0.4 ms
at recall@10 ~0.91 (``bench/index.py``), so the default keeps search exact up
to a million faces. ``add`` inserts the new faces into the stored graph;
``remove`` (and an ``add`` that drops photos) rebuilds it (HNSW cannot delete).

"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from facesearch.data import manifest as M
from facesearch.data.celeba import raw_name, storable_name
from facesearch.data.images import ImageRejected
from facesearch.data.layouts import FOLDERS, PLAIN
from facesearch.data.manifest import Reason, SchemaError
from facesearch.data.manifest import _check_columns as check_columns  # the manifest's column and dtype check
from facesearch.faces.cropping import CropLimits
from facesearch.gallery.embedder import LIMITS, Embedder, PhotoIndexError, enrol_threshold, read_file
from facesearch.io import normal_permissions, write_bytes_atomic, write_json_atomic, write_parquet_atomic
from facesearch.retrieval.knn import CheckedIndex, FaissIndex, build_index

log = logging.getLogger(__name__)

# index.json "format": bumped when the folder's layout or meaning changes. 2: one face per photo named
# after its person (1 named every face), roots resolved, the roots' layouts and the previous version recorded.
FORMAT = 2
POINTER = "CURRENT"
LOCK = ".lock"
EMBEDDINGS, FACES, PHOTOS = "embeddings.npy", "faces.parquet", "photos.parquet"
RECORD, GRAPH = "index.json", "hnsw.faiss"
VERSION_NAME = re.compile(r"v\d{6,}-[0-9a-f]{8}")  # write_version's folder names
# Faces from which the index searches with HNSW instead of exactly. Exact search grows linearly,
# ~1.2 ms a query at 100k faces on a 2-core CPU (bench/index.py), so ~12 ms at a million: still
# instant next to loading the index, and exact. HNSW is only ~3x faster at 100k and misses ~9% of
# the true top 10; it pays off beyond a million faces.
DEFAULT_HNSW_THRESHOLD = 1_000_000
HNSW_M, EF_SEARCH = 32, 64  # FaissIndex's defaults: graph links per node, candidates explored per search

# Search verdicts of a query that could not be searched (never "no_match": that is a stranger's).
MISSING, UNREADABLE, NO_FACE = "missing", "unreadable", "no_face"
# Whether the file at an indexed path still holds the indexed content (source_status).
CURRENT, CHANGED = "current", "changed"

# The tables.
ROOT = "root"  # the folder given to build/add, absolute and resolved (os.path.realpath)
PHOTO = "photo"  # path relative to root, "/"-separated (each part a facesearch.data.celeba.storable_name)
SHA256 = M.SHA256  # content hash of the photo file's bytes
# photos: the person folder's name under layout folders, null otherwise; faces: that name on the one
# face that is the person (find_person), null on every other face.
PERSON = "person"
WIDTH, HEIGHT = M.WIDTH, M.HEIGHT  # decoded size (after EXIF orientation), px; null when not decoded
N_FACES = M.N_FACES  # faces indexed from this photo
REASON = M.REASON  # why a photo has no indexed face (a manifest Reason); null when it has some
FACE = "face"  # face number within its photo, 1-based, in photo order (facesearch.gallery.photos.detect)
BOX_X, BOX_Y, BOX_W, BOX_H = M.BBOX_X, M.BBOX_Y, M.BBOX_W, M.BBOX_H  # face box in the photo's pixels
DETECTOR = M.DETECTOR

PHOTO_DTYPES: dict[str, str] = {
    ROOT: "string", PHOTO: "string", SHA256: "string", PERSON: "string", WIDTH: "Int32", HEIGHT: "Int32",
    N_FACES: "Int16", REASON: "string",
}  # fmt: skip
FACE_DTYPES: dict[str, str] = {
    ROOT: "string", PHOTO: "string", SHA256: "string", FACE: "Int16", PERSON: "string",
    BOX_X: "Int32", BOX_Y: "Int32", BOX_W: "Int32", BOX_H: "Int32", DETECTOR: "string",
}  # fmt: skip
_HEX = set("0123456789abcdef")


def validate_index(faces: pd.DataFrame, photo_table: pd.DataFrame, embeddings: np.ndarray, dim: int) -> None:
    """Check an index version's tables and embeddings against their schema and each other.

    Called before every write (and on every load), so a bug cannot leave an index
    whose rows and embeddings disagree.
    """
    check_columns(faces, FACE_DTYPES, "faces")
    check_columns(photo_table, PHOTO_DTYPES, "photos")
    if embeddings.dtype != np.float32 or embeddings.shape != (len(faces), dim):
        raise SchemaError(f"embeddings: {embeddings.dtype} {embeddings.shape}, expected float32 {(len(faces), dim)}")
    if len(embeddings):
        if not np.isfinite(embeddings).all():
            raise SchemaError("embeddings: not all finite")
        if np.abs(np.linalg.norm(embeddings, axis=1) - 1).max() > 1e-3:
            raise SchemaError("embeddings: not L2-normalised")
    p = photo_table
    for col in (ROOT, PHOTO, SHA256, N_FACES):
        if p[col].isna().any():
            raise SchemaError(f"photos: {col} must be present")
    if not all(len(h) == 64 and set(h) <= _HEX for h in p[SHA256]):
        raise SchemaError("photos: sha256 must be 64 lower-case hex digits")
    if p[SHA256].duplicated().any():
        raise SchemaError("photos: a content is indexed twice")
    full = pd.Series([_join(r, ph) for r, ph in zip(p[ROOT], p[PHOTO], strict=True)], dtype=object)
    if full.duplicated().any():
        raise SchemaError("photos: a path is indexed twice")
    if not all(os.path.isabs(r) and os.path.normpath(r) == r for r in p[ROOT]):
        raise SchemaError("photos: root must be an absolute, normalised path")
    # The folder walk lists only real entries below the root: a ".." or empty part would point elsewhere.
    if not all(all(part not in ("", ".", "..") for part in rel.split("/")) for rel in p[PHOTO]):
        raise SchemaError("photos: a photo path must lie below its root (no empty, '.' or '..' parts)")
    has_faces = p[N_FACES] > 0
    if (p[N_FACES] < 0).any() or p.loc[has_faces, REASON].notna().any() or p.loc[~has_faces, REASON].isna().any():
        raise SchemaError("photos: a photo has faces or a reason, never both")
    unknown = set(p[REASON].dropna()) - {r.value for r in Reason}
    if unknown:
        raise SchemaError(f"photos: unknown reasons {sorted(unknown)}")
    f = faces
    for col in FACE_DTYPES:
        if col != PERSON and f[col].isna().any():
            raise SchemaError(f"faces: {col} must be present")
    if (f[BOX_W] <= 0).any() or (f[BOX_H] <= 0).any():
        raise SchemaError("faces: boxes must have positive size")
    # Each photo's faces are numbered 1..n_faces, and agree with the photo's row.
    expected = p.loc[has_faces, [SHA256, N_FACES]].set_index(SHA256)[N_FACES]
    counts = f.groupby(SHA256, sort=False)[FACE].agg(["count", "min", "max"])
    counts = counts.reindex(expected.index)
    if (
        len(counts) != f[SHA256].nunique()
        or counts.isna().any().any()
        or not ((counts["count"] == expected) & (counts["min"] == 1) & (counts["max"] == expected)).all()
    ):
        raise SchemaError("faces: each photo's faces must be numbered 1..n_faces, once each")
    joined = f.merge(p, on=SHA256, how="left", suffixes=("", "_photo"))
    for col in (ROOT, PHOTO):
        if not joined[col].equals(joined[f"{col}_photo"]):
            raise SchemaError(f"faces: {col} disagrees with the photo's row")
    # A face is named after its photo's person or not at all, and one face a photo at most.
    named = joined[PERSON].notna()
    if not (joined.loc[named, PERSON] == joined.loc[named, f"{PERSON}_photo"]).all():
        raise SchemaError("faces: a face is named after someone other than its photo's person")
    if joined.loc[named, SHA256].duplicated().any():
        raise SchemaError("faces: more than one face of a photo is named after its person")


def _join(root: str, rel: str) -> str:
    """The absolute path of an indexed photo as shown (``rel``'s parts as stored)."""
    return f"{root.rstrip('/')}/{rel}"


def photo_path(root: str, rel: str) -> bytes:
    """The path that opens an indexed photo (a stored part that escapes a non-UTF-8 byte is unescaped)."""
    return os.path.join(os.fsencode(root), raw_name(rel))


def _rel_under(path: str, root: str) -> str | None:
    """``path`` relative to ``root``, "/"-separated ("" for the root itself); None outside it. Strings only."""
    if path == root:
        return ""
    prefix = root.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else None


def _stored_rel(path: str, root: str) -> str | None:
    """A file system path's place under ``root`` as the index stores it (:func:`storable_name` parts)."""
    rel = _rel_under(path, root)
    return None if rel is None else "/".join(storable_name(os.fsencode(part)) for part in rel.split("/") if part)


def resolve(path: str | os.PathLike) -> str:
    """``path`` as the index stores it: absolute (relative to the current folder), its folders resolved.

    A folder resolves whole; a file keeps its own name (a symlinked photo is indexed at the
    link's path, as the folder walk lists it) below its resolved folder.
    """
    absolute = os.path.abspath(path)
    if os.path.isdir(absolute):
        return os.path.realpath(absolute)
    head, tail = os.path.split(absolute)
    return os.path.join(os.path.realpath(head), tail)


def _content(path: bytes, limits: CropLimits) -> str | None:
    """The SHA-256 of the file at ``path``, or None when there is none or it cannot be read."""
    try:
        return read_file(path, limits)[1]
    except ImageRejected:
        return None


def source_status(path: str | bytes | os.PathLike, sha256: str, limits: CropLimits = LIMITS) -> str:
    """Whether the file at an indexed photo's path still holds the indexed content.

    ``"current"`` (the same SHA-256), ``"changed"`` (other bytes), ``"missing"`` (no
    regular file there) or ``"unreadable"`` (there, but it cannot be read). Reads and
    hashes the whole file (12-26 ms for 5 MB on a shared 2-core CPU): call it for the photos
    about to be shown, not for a whole index. Anything but ``"current"`` must not be shown as the photo
    of the indexed face (its box is the old content's).
    """
    try:
        _, sha = read_file(path, limits)
    except ImageRejected as exc:
        if exc.reason == Reason.NOT_A_FILE:
            return MISSING
        if exc.reason == Reason.FILE_TOO_LARGE:  # the indexed content was within the limit
            return CHANGED
        return UNREADABLE
    return CURRENT if sha == sha256 else CHANGED


def photo_is_current(root: str, photo: str, sha256: str, limits: CropLimits = LIMITS) -> bool:
    """Whether the indexed photo ``photo`` (a faces/photos row's ROOT, PHOTO, SHA256) may be shown."""
    return source_status(photo_path(root, photo), sha256, limits) == CURRENT


def _table(rows: list[dict], dtypes: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(dtypes)).astype(dtypes)


@dataclass
class PhotoIndex:
    """One version of an index, loaded."""

    folder: Path
    version: str  # the version folder's name
    record: dict  # index.json
    embeddings: np.ndarray
    faces: pd.DataFrame
    photos: pd.DataFrame
    graph: object | None = None  # the stored faiss HNSW graph, when there is one

    @property
    def dim(self) -> int:
        return int(self.record["model"]["embedding_dim"])

    def structure(self) -> CheckedIndex | None:
        """The search structure: the stored HNSW graph, or exact search; None for an empty index."""
        if not len(self.faces):
            return None
        if self.graph is not None:
            return CheckedIndex(StoredHNSW(self.graph, self.record["ef_search"]), len(self.faces))
        return build_index(self.embeddings, "exact")

    def roots(self) -> dict[str, str]:
        """Each root (folder given to build/add) and its layout (folders or plain)."""
        roots = dict(self.record.get("roots") or {})
        for root, named in self.photos.groupby(ROOT, sort=True)[PERSON].agg(lambda s: s.notna().any()).items():
            roots.setdefault(str(root), FOLDERS if named else PLAIN)  # a version written without the record
        return roots

    def enrol_threshold(self, embedder: Embedder | None = None) -> tuple[float, str]:
        """The threshold this index enrols people at: the one it was built with, so decisions stay alike.

        A version written without one (``bench/index.py``'s) takes the model's (loaded when not given).
        """
        people = self.record.get("people") or {}
        if people.get("threshold") is not None:
            return float(people["threshold"]), str(people.get("source", "recorded"))
        return enrol_threshold(embedder or self.embedder())

    def embedder(self, model: str | None = None, device: str = "cpu") -> Embedder:
        """``model`` (default: the one the index was built from), refused unless it is the index's model."""
        path = model or self.record["model"]["path"]
        if not Path(path).is_file():
            raise PhotoIndexError(f"model file {path} does not exist" + ("" if model else
                                  " (the index's model): pass --model where it is now"))  # fmt: skip
        embedder = Embedder.load(path, device)
        self.check_model(embedder)
        return embedder

    def check_model(self, embedder: Embedder) -> None:
        """Refuse a model other than the one this index was built with."""
        own = self.record["model"]
        if embedder.fingerprint != own["fingerprint"]:
            raise PhotoIndexError(
                f"{embedder.path} is not the model this index was built with: its fingerprint is "
                f"{embedder.fingerprint[:12]}, the index's {own['fingerprint'][:12]} ({own['backbone']}, built from "
                f"{own['path']}). Embeddings of different models cannot be compared: use that model, or build "
                "a new index with this one (index build)."
            )


class StoredHNSW(FaissIndex):
    """:class:`FaissIndex` over an HNSW graph read back from disk instead of built.

    FaissIndex builds its graph in ``__init__``; this sets the attributes its
    ``search`` reads (kind, size, ef_search, the faiss module and index), so a
    stored graph answers through the same code (budget, short-answer retries).
    """

    def __init__(self, graph, ef_search: int):
        import faiss

        self.faiss, self.kind, self.n, self.ef_search, self.index = faiss, "hnsw", int(graph.ntotal), ef_search, graph


def _read_pointer(folder: Path) -> str:
    try:
        name = (folder / POINTER).read_text().strip()
    except FileNotFoundError:
        raise PhotoIndexError(f"{folder} is not a photo index (no {POINTER} file); make one with index build") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PhotoIndexError(f"{folder}/{POINTER} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    if not name or "/" in name or not (folder / name).is_dir():
        raise PhotoIndexError(f"{folder}/{POINTER} names {name!r}, which is not a version of this index")
    return name


def _live(folder: Path) -> str | None:
    """The name CURRENT holds, or None (no index yet, or unreadable)."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return (folder / POINTER).read_text().strip() or None
    return None


def load_index(folder: str | os.PathLike) -> PhotoIndex:
    """The live version of the index in ``folder``, checked; :class:`PhotoIndexError` when it cannot be read."""
    folder = Path(folder)
    name = _read_pointer(folder)
    vdir = folder / name
    try:
        record = json.loads((vdir / RECORD).read_text())
        if not isinstance(record, dict):
            raise SchemaError(f"{RECORD} holds no record")
    except (OSError, ValueError) as exc:
        raise PhotoIndexError(f"{vdir} cannot be read ({type(exc).__name__}: {_first_line(exc)})") from None
    if record.get("format") == 1:
        raise PhotoIndexError(
            f"{folder} was written by an earlier facesearch (index format 1: every face of a person's photo named "
            f"after the person, paths as typed); rebuild it: python -m facesearch index build --model MODEL "
            f"--photos DIR --out {folder} --force"
        )
    if record.get("format") != FORMAT:
        raise PhotoIndexError(f"{folder}: index format {record.get('format')}, this version reads {FORMAT}")
    try:
        embeddings = np.load(vdir / EMBEDDINGS, allow_pickle=False)
        faces, photo_table = pd.read_parquet(vdir / FACES), pd.read_parquet(vdir / PHOTOS)
        validate_index(faces, photo_table, embeddings, int(record["model"]["embedding_dim"]))
        graph = None
        if record["structure"] == "hnsw":
            import faiss

            graph = faiss.read_index(str(vdir / GRAPH))
            if graph.ntotal != len(faces):
                raise SchemaError(f"{vdir / GRAPH}: {graph.ntotal} vectors for {len(faces)} faces")
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # a damaged version: faiss raises RuntimeError
        raise PhotoIndexError(f"{vdir} cannot be read ({type(exc).__name__}: {_first_line(exc)})") from None
    return PhotoIndex(folder, name, record, embeddings, faces, photo_table, graph)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


@contextlib.contextmanager
def writing(folder: Path) -> Iterator[None]:
    """An exclusive lock on the index folder for one writer (build into it, add, remove)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PhotoIndexError(f"{folder} is being changed by another index command; try again") from None
        yield


def clean_stale(folder: Path) -> list[str]:
    """Delete what no reader can be using: versions other than the live one and the one before it.

    Those are versions a killed or failed writer left half-written (or finished but never
    named by CURRENT), and a killed pointer write's temporary file. Caller holds
    :func:`writing`. A live version written without a ``previous`` record keeps every
    complete version (one of them may be it). Returns the names deleted.
    """
    keep: set[str] = set()
    live = _live(folder)
    complete_too = False  # no live version: no reader can be using any
    if live:
        keep.add(live)
        try:
            previous = json.loads((folder / live / RECORD).read_text()).get("previous", ...)
        except (OSError, ValueError, AttributeError):
            previous = ...
        if previous is ...:
            complete_too = True
        elif previous:
            keep.add(previous)
    gone = []
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink() and VERSION_NAME.fullmatch(entry.name):
            if entry.name in keep or (complete_too and (entry / RECORD).is_file()):
                continue
        elif not (entry.is_file() and entry.name.startswith(f".{POINTER}.") and entry.name.endswith(".tmp")):
            continue
        (shutil.rmtree if entry.is_dir() else os.unlink)(entry)
        gone.append(entry.name)
    if gone:
        log.info("%s: deleted %d unfinished or unused versions: %s", folder, len(gone), ", ".join(sorted(gone)))
    return gone


def search_graph(embeddings: np.ndarray, record: dict, previous: PhotoIndex | None, appended: bool):
    """The HNSW graph for ``embeddings`` (None below the threshold).

    ``appended``: ``embeddings`` are the previous version's plus new rows at the end,
    so the previous graph (in memory; its file is not touched) takes just the new rows.
    """
    if len(embeddings) < record["hnsw_threshold"]:
        return None
    if appended and previous is not None and previous.graph is not None:
        graph = previous.graph
        graph.add(np.ascontiguousarray(embeddings[graph.ntotal :]))
        return graph
    built = FaissIndex(embeddings, "hnsw", hnsw_m=record["hnsw_m"], ef_search=record["ef_search"])
    return built.index


def write_version(folder: Path, record: dict, embeddings: np.ndarray, faces: pd.DataFrame,
                  photo_table: pd.DataFrame, graph) -> str:  # fmt: skip
    """Write a complete new version beside the live one, then switch ``CURRENT`` to it atomically.

    Caller holds :func:`writing`. Returns the new version's name. A write that fails
    (a full disk, a read-only folder) deletes what it wrote and raises
    :class:`PhotoIndexError` saying so in one line; the live version is untouched.
    """
    validate_index(faces, photo_table, embeddings, int(record["model"]["embedding_dim"]))
    live = _live(folder)
    record = record | {"structure": "exact" if graph is None else "hnsw", "faces": len(faces), "previous": live}
    name = f"v{record['version']:06d}-{secrets.token_hex(4)}"
    vdir = folder / name
    try:
        vdir.mkdir()  # invisible until CURRENT names it
        normal_permissions(vdir, directory=True)
        np.save(vdir / EMBEDDINGS, embeddings)
        normal_permissions(vdir / EMBEDDINGS)
        write_parquet_atomic(vdir / FACES, faces)
        write_parquet_atomic(vdir / PHOTOS, photo_table)
        if graph is not None:
            _write_graph(graph, vdir / GRAPH)
        write_json_atomic(vdir / RECORD, record)
        write_bytes_atomic(folder / POINTER, (name + "\n").encode())
    except Exception as exc:  # a kill (KeyboardInterrupt, a signal) leaves it to the next writer's clean_stale
        if _live(folder) != name:  # written in full but for the pointer's directory entry: it is live, keep it
            shutil.rmtree(vdir, ignore_errors=True)
        if isinstance(exc, OSError):
            state = f"the index is unchanged (version {live})" if live else "nothing was written"
            raise PhotoIndexError(f"cannot write a new version of {folder}: {exc.strerror or exc}; {state}") from None
        raise
    # Keep the live version and the one before it (a reader may still be opening it); the rest,
    # finished or killed half-way, goes.
    clean_stale(folder)
    return name


def _write_graph(graph, path: Path) -> None:
    import faiss

    try:
        faiss.write_index(graph, str(path))
    except RuntimeError as exc:  # faiss reports a failed write (a full disk) as RuntimeError
        raise OSError(errno.EIO, f"the search graph could not be written ({_first_line(exc)})") from None
    normal_permissions(path)


def _index_entry(name: str) -> bool:
    """Whether a name in an index folder is the index's own (lock, pointer or its temporary file, a version)."""
    return name in (LOCK, POINTER) or bool(VERSION_NAME.fullmatch(name)) or name.startswith(f".{POINTER}.")
