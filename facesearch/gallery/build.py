"""Building an index and keeping it up to date: ``index build``, ``add``, ``remove`` and ``info``.

``build`` indexes *every* face of every photo under ``--photos`` (recursively,
files in sorted order), found and cut with the model's own preprocessing
(``payload["preprocessing"]``, :func:`facesearch.nets.contract.model_preprocessing`)
and embedded by :mod:`facesearch.gallery.photos`, the code the app uses. A file that is
not a usable photo (hidden, not a regular file, not an image, truncated, a
decompression bomb, too small, no face ...) is a counted skip with its reason,
never a crash. Each content (SHA-256 of the file's bytes) is indexed once.

``add`` embeds only photos whose content the index has not seen, and follows the
files under the folder it scans: a photo whose content changed at an indexed
path is re-embedded (its old faces go, ``replaced``); an indexed content found at
a new path whose old path no longer holds it is ``moved`` (its path, and its
person, are updated; nothing is embedded again); an indexed photo under the
scanned folder whose file is gone is reported (``gone``) and dropped with
``--prune``. ``index info --check`` checks every indexed photo (missing, changed,
unreadable) and looks for the missing ones under the index's roots (moved);
``index remove --missing`` applies the moves it finds and drops the rest.
``remove PATH`` drops the photo at that path (a file, or every photo under a
folder), paths resolved like build's, a relative path taken from the current
folder; or, for an existing file, the photo with that file's content. All
refuse a model other than the index's, which the index identifies by its
fingerprint (SHA-256 of the model's config, preprocessing record and weights):
embeddings of two models cannot be compared.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from facesearch.data.celeba import DatasetError
from facesearch.data.images import ImageRejected
from facesearch.data.layouts import AUTO, FOLDERS, PhotoFile, Skip, assign_people, list_photo_files
from facesearch.data.manifest import Reason
from facesearch.faces.cropping import CropLimits
from facesearch.gallery.embedder import LIMITS, Embedder, PhotoIndexError, enrol_threshold, file_faces, read_file
from facesearch.gallery.people import enrol
from facesearch.gallery.store import (
    BOX_H,
    BOX_W,
    BOX_X,
    BOX_Y,
    CHANGED,
    DEFAULT_HNSW_THRESHOLD,
    DETECTOR,
    EF_SEARCH,
    FACE,
    FACE_DTYPES,
    FORMAT,
    HEIGHT,
    HNSW_M,
    MISSING,
    N_FACES,
    PERSON,
    PHOTO,
    PHOTO_DTYPES,
    POINTER,
    REASON,
    RECORD,
    ROOT,
    SHA256,
    UNREADABLE,
    WIDTH,
    PhotoIndex,
    _content,
    _index_entry,
    _join,
    _live,
    _rel_under,
    _stored_rel,
    _table,
    clean_stale,
    load_index,
    photo_path,
    resolve,
    search_graph,
    source_status,
    write_version,
    writing,
)
from facesearch.retrieval.verdict import Verdict, verdict

log = logging.getLogger(__name__)

EMBED_BATCH = 256  # crops gathered across photos before a forward pass (~36 MB at 218 px)
# Skip reasons that are not a photo's own (manifest Reason values are the rest).
DUPLICATE = "duplicate"  # the same bytes as an earlier file of this run
ALREADY_INDEXED = "already_indexed"  # add: the index holds this content already


@dataclass
class Batch:
    """What embedding a list of photo files produced: rows for both tables, embeddings, skips."""

    photo_rows: list[dict] = field(default_factory=list)
    face_rows: list[dict] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    hashed: dict[str, str] = field(default_factory=dict)  # rel -> SHA-256 of every file read, known ones too

    def vectors(self, dim: int) -> np.ndarray:
        return np.concatenate(self.embeddings) if self.embeddings else np.zeros((0, dim), np.float32)


def embed_files(
    files: Sequence[PhotoFile], root: str, embedder: Embedder, limits: CropLimits, known: frozenset[str] = frozenset()
) -> Batch:
    """Read, hash, decode, detect, crop and embed every face of ``files`` (under ``root``).

    A file whose content is in ``known`` (or repeats an earlier file) is skipped
    before decoding. Never raises for anything one file does: known failures are
    photo rows with a reason (content that is no photo stays "seen" for ``add``),
    unexpected ones (a detector bug a hostile file triggers) a logged ``error``
    skip, retried by the next ``add``. Faces are named after ``file.person`` for now;
    :func:`enrol` decides which one is the person.
    """
    out, seen, pending = Batch(), set(known), []

    def flush() -> None:
        if pending:
            out.embeddings.append(embedder.embed(np.concatenate(pending)))
            pending.clear()

    n_pending = 0
    for file in files:
        try:
            data, sha = read_file(file.path, limits)
        except ImageRejected as exc:
            out.skips.append(Skip(file.rel, str(exc.reason), exc.detail))
            continue
        out.hashed[file.rel] = sha
        if sha in seen:
            out.skips.append(Skip(file.rel, ALREADY_INDEXED if sha in known else DUPLICATE))
            continue
        seen.add(sha)
        row = {ROOT: root, PHOTO: file.rel, SHA256: sha, PERSON: file.person, WIDTH: None, HEIGHT: None,
               N_FACES: 0, REASON: None}  # fmt: skip
        try:
            (row[WIDTH], row[HEIGHT]), boxes, crops, detector = file_faces(data, embedder.settings, limits)
        except ImageRejected as exc:
            out.photo_rows.append(row | {REASON: str(exc.reason)})
            continue
        except Exception as exc:  # the point: one photo never ends the run
            log.warning("%s: unexpected %s: %s; skipped", file.rel, type(exc).__name__, exc)
            out.skips.append(Skip(file.rel, Reason.ERROR.value, f"{type(exc).__name__}: {exc}"))
            continue
        if not boxes:
            out.photo_rows.append(row | {REASON: Reason.NO_FACE.value})
            continue
        out.photo_rows.append(row | {N_FACES: len(boxes)})
        for number, (x, y, w, h) in enumerate(boxes, start=1):
            out.face_rows.append({ROOT: root, PHOTO: file.rel, SHA256: sha, FACE: number, PERSON: file.person,
                                  BOX_X: x, BOX_Y: y, BOX_W: w, BOX_H: h, DETECTOR: detector})  # fmt: skip
        pending.append(crops)
        n_pending += len(crops)
        if n_pending >= EMBED_BATCH:
            flush()
            n_pending = 0
    flush()
    return out


@dataclass
class FileCheck:
    """Indexed photos whose file is no longer what was indexed (:func:`check_files`); paths as shown."""

    checked: int = 0
    missing: list[str] = field(default_factory=list)  # no file at the path, and not found elsewhere
    changed: list[str] = field(default_factory=list)  # other content at the path, the indexed one not found
    unreadable: list[str] = field(default_factory=list)  # a file there that cannot be read
    moved: dict[str, tuple[str, str]] = field(default_factory=dict)  # sha -> (new root, new rel)
    moved_from: dict[str, str] = field(default_factory=dict)  # sha -> old path

    def problems(self) -> int:
        return len(self.missing) + len(self.changed) + len(self.unreadable) + len(self.moved)

    def as_dict(self) -> dict:
        return {"checked": self.checked, "missing": self.missing, "changed": self.changed,
                "unreadable": self.unreadable,
                "moved": [{"from": self.moved_from[s], "to": _join(*self.moved[s])} for s in self.moved]}  # fmt: skip


def check_files(index: PhotoIndex, limits: CropLimits = LIMITS, find_moves: bool = True) -> FileCheck:
    """Read every indexed photo back; look for the lost ones under the index's roots.

    Costs a read and SHA-256 of every indexed photo, and (``find_moves``, when some are
    missing or changed) of every photo under the index's roots that the index does not
    hold at its path (new photos not added yet, and moved ones).
    """
    out = FileCheck()
    p = index.photos
    lost: dict[str, str] = {}  # sha -> old path, for the photos not at their path
    for root, rel, sha in zip(p[ROOT], p[PHOTO], p[SHA256], strict=True):
        status = source_status(photo_path(root, rel), sha, limits)
        out.checked += 1
        if status in (MISSING, CHANGED):
            lost[sha] = _join(root, rel)
        elif status == UNREADABLE:
            out.unreadable.append(_join(root, rel))
    if lost and find_moves:
        out.moved = _find_moved(index, set(lost), limits)
    places = _places(index)
    for sha, path in lost.items():
        if sha in out.moved:
            out.moved_from[sha] = path
        elif os.path.lexists(photo_path(*places[sha])):
            out.changed.append(path)
        else:
            out.missing.append(path)
    return out


def _places(index: PhotoIndex) -> dict[str, tuple[str, str]]:
    """sha -> (root, rel) of every indexed photo."""
    p = index.photos
    return {sha: (str(r), str(ph)) for r, ph, sha in zip(p[ROOT], p[PHOTO], p[SHA256], strict=True)}


def _find_moved(index: PhotoIndex, lost: set[str], limits: CropLimits) -> dict[str, tuple[str, str]]:
    """sha -> (root, rel) of the lost contents found at a path the index does not hold, under its roots."""
    p = index.photos
    held = {_join(r, ph) for r, ph in zip(p[ROOT], p[PHOTO], strict=True)}
    found: dict[str, tuple[str, str]] = {}
    for root, layout in sorted(index.roots().items()):
        try:
            files, _ = list_photo_files(root, exclude=[os.path.realpath(index.folder)])
        except DatasetError:  # the root itself is gone
            continue
        for f in files:
            if _join(root, f.rel) in held or (layout == FOLDERS and f.rel.count("/") != 1):
                continue
            try:
                sha = read_file(f.path, limits)[1]
            except ImageRejected:
                continue
            if sha in lost and sha not in found:
                found[sha] = (root, f.rel)
    return found


def _person_at(rel: str, layout: str) -> str | None:
    return rel.split("/")[0] if layout == FOLDERS else None


@dataclass
class Report:
    """What a build/add/remove did, for the user."""

    faces: int  # in the index now
    photos: int  # photos with at least one indexed face, now
    people: int
    added_faces: int = 0
    added_photos: int = 0
    removed_photos: int = 0  # remove: photos dropped
    replaced_photos: int = 0  # add: photos whose path now holds other content (their faces went)
    moved_photos: int = 0  # add, remove --missing: photos whose path was updated
    without_faces: Counter = field(default_factory=Counter)  # reason -> photos read that gave no face, this run
    person_notes: Counter = field(default_factory=Counter)  # person_not_found / person_ambiguous -> photos
    skips: list[Skip] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)  # add: indexed photos under the folder whose file is gone
    pruned: bool = False  # add --prune: the gone photos were dropped
    unmatched: list[str] = field(default_factory=list)  # remove: targets that matched nothing
    version: str | None = None  # the version written; None when nothing changed

    def lines(self) -> list[str]:
        out = [f"index: {self.faces} faces in {self.photos} photos, {self.people} people"
               + (f" (version {self.version})" if self.version else " (unchanged)")]  # fmt: skip
        if self.added_photos or self.added_faces:
            out.append(f"added: {self.added_faces} faces from {self.added_photos} photos")
        if self.replaced_photos:
            out.append(f"replaced: {self.replaced_photos} photos whose file now holds other content (old faces gone)")
        if self.moved_photos:
            out.append(f"moved: {self.moved_photos} photos found at a new path (path updated)")
        if self.removed_photos:
            out.append(f"removed: {self.removed_photos} photos")
        if self.gone:
            shown = ", ".join(self.gone[:3]) + (", ..." if len(self.gone) > 3 else "")
            out.append(f"{'pruned' if self.pruned else 'gone'}: {len(self.gone)} indexed photos no longer there "
                       f"({shown})" + ("" if self.pruned else "; index add --prune drops them"))  # fmt: skip
        if self.person_notes:
            out.append("photos whose faces are all indexed unnamed: " + _counts(self.person_notes))
        if self.without_faces:
            out.append("photos without a usable face: " + _counts(self.without_faces))
        if self.skips:
            out.append(f"skipped {len(self.skips)} files: " + _counts(Counter(s.reason for s in self.skips)))
        for target in self.unmatched:
            out.append(f"not in the index: {target}")
        return out


def _counts(counter: Counter) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counter.items()))


def _people(faces: pd.DataFrame) -> int:
    return int(faces[PERSON].nunique())


def _report(index_faces: pd.DataFrame, photo_table: pd.DataFrame, **kw) -> Report:
    return Report(len(index_faces), int((photo_table[N_FACES] > 0).sum()), _people(index_faces), **kw)


def _log_skips(skips: list[Skip]) -> None:
    for s in skips:
        log.info("skipped %s: %s%s", s.photo, s.reason, f" ({s.detail})" if s.detail else "")


def _log_notes(photo_table: pd.DataFrame, notes: dict[str, str]) -> None:
    where = photo_table.set_index(SHA256)
    for sha, note in notes.items():
        log.info("%s: %s (%s); its faces are indexed unnamed", _join(where.at[sha, ROOT], where.at[sha, PHOTO]),
                 note, where.at[sha, PERSON])  # fmt: skip


@dataclass
class Scan:
    """The photo files under a folder given to build/add, as paths under their root."""

    root: str  # the indexed root they belong to (the folder itself, or an indexed root holding it)
    folder: str  # the folder scanned, resolved
    layout: str  # folders or plain
    files: list[PhotoFile]  # rel: relative to root
    skips: list[Skip]
    listed: set[str]  # rel of every regular file listed (read or not): present on disk


def _scan(photo_dir: str, layout: str, index_dir: Path, roots: dict[str, str] | None = None) -> Scan:
    """List ``photo_dir``; a folder inside an indexed root (of ``roots``) is listed as part of that root."""
    folder = resolve(photo_dir)
    if not os.path.isdir(folder):
        raise PhotoIndexError(f"photo folder {photo_dir} does not exist or is not a folder")
    root, prefix = folder, ""
    for r in sorted(roots or {}, key=len, reverse=True):
        rel = _stored_rel(folder, r)
        if rel is not None:
            root, prefix = r, rel
            break
    recorded = (roots or {}).get(root)
    if recorded and layout not in (AUTO, recorded):
        raise PhotoIndexError(f"{root} is indexed with layout {recorded}; --layout {layout} would name its photos "
                              "otherwise: leave --layout out, or rebuild the index")  # fmt: skip
    try:
        files, skips = list_photo_files(folder, exclude=[os.path.realpath(index_dir)])
        if prefix:
            files = [PhotoFile(f"{prefix}/{f.rel}", f.path) for f in files]
            skips = [Skip(f"{prefix}/{s.photo}", s.reason, s.detail) for s in skips]
        listed = {f.rel for f in files}
        files, outside, used = assign_people(files, recorded or layout)
    except DatasetError as exc:
        raise PhotoIndexError(str(exc)) from None
    log.info("%s: %d files, layout %s%s", folder, len(files), used, f" (in the indexed root {root})" * bool(prefix))
    return Scan(root, folder, used, files, skips + outside, listed)


@dataclass
class _Change:
    """A new version from the live one: photos dropped, moved, added (with their faces and embeddings)."""

    drop: set[str] = field(default_factory=set)  # SHA-256s of photos to drop
    moves: dict[str, tuple[str, str, str | None]] = field(default_factory=dict)  # sha -> (root, rel, person)
    batch: Batch | None = None

    def empty(self) -> bool:
        return not self.drop and not self.moves and not (self.batch and self.batch.photo_rows)


def _apply(old: PhotoIndex, change: _Change, threshold: float) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray,
                                                                       dict[str, str]]:  # fmt: skip
    """(faces, photos, embeddings, person notes) of ``old`` changed by ``change``; new faces go at the end."""
    keep_f = ~old.faces[SHA256].isin(change.drop).to_numpy()
    faces = old.faces[keep_f].reset_index(drop=True)
    photo_table = old.photos[~old.photos[SHA256].isin(change.drop)].reset_index(drop=True)
    embeddings = old.embeddings[keep_f]
    decide: set[str] = set()
    if change.moves:
        at = {sha: i for i, sha in enumerate(photo_table[SHA256])}
        for sha, (root, rel, person) in change.moves.items():
            i = at[sha]
            if not _same(photo_table.at[i, PERSON], person):
                decide.add(sha)  # into another person's folder (or out of one): who it is is decided again
            photo_table.loc[i, [ROOT, PHOTO, PERSON]] = [root, rel, person]
            faces.loc[(faces[SHA256] == sha).to_numpy(), [ROOT, PHOTO]] = [root, rel]
        photo_table = photo_table.astype(PHOTO_DTYPES)
        faces = faces.astype(FACE_DTYPES)
    if change.batch is not None and change.batch.photo_rows:
        b = change.batch
        photo_table = pd.concat([photo_table, _table(b.photo_rows, PHOTO_DTYPES)], ignore_index=True)
        faces = pd.concat([faces, _table(b.face_rows, FACE_DTYPES)], ignore_index=True)
        embeddings = np.concatenate([embeddings, b.vectors(old.dim)])
        decide |= {r[SHA256] for r in b.photo_rows}
    faces, notes = enrol(faces, photo_table, embeddings, decide, threshold)
    return faces, photo_table, np.ascontiguousarray(embeddings, np.float32), notes


def _same(a, b) -> bool:
    return (pd.isna(a) and b is None) or (not pd.isna(a) and a == b)


def build(
    model: str, photo_dir: str, out: str | os.PathLike, layout: str = AUTO,
    hnsw_threshold: int = DEFAULT_HNSW_THRESHOLD, force: bool = False, device: str = "cpu",
    limits: CropLimits = LIMITS,
) -> Report:  # fmt: skip
    """Index every face of every photo under ``photo_dir`` with ``model`` into the folder ``out``."""
    folder = Path(out)
    # A folder holding only a lock, version folders and a pointer's temporary file is a build that
    # was killed (or failed) before its first CURRENT.
    if folder.exists() and not (folder / POINTER).is_file() and not all(_index_entry(p.name) for p in folder.iterdir()):
        raise PhotoIndexError(f"{folder} exists and is not a photo index; choose a new folder")
    if (folder / POINTER).is_file() and not force:
        raise PhotoIndexError(f"{folder} is an index already: add photos with index add, or rebuild with --force")
    if hnsw_threshold < 1:
        raise PhotoIndexError(f"--hnsw-threshold must be at least 1, not {hnsw_threshold}")
    embedder = Embedder.load(model, device)
    scan = _scan(photo_dir, layout, folder)
    threshold, source = enrol_threshold(embedder)
    with writing(folder):
        clean_stale(folder)
        batch = embed_files(scan.files, scan.root, embedder, limits)
        faces, photo_table = _table(batch.face_rows, FACE_DTYPES), _table(batch.photo_rows, PHOTO_DTYPES)
        embeddings = batch.vectors(embedder.model.config.embedding_dim)
        faces, notes = enrol(faces, photo_table, embeddings, set(photo_table[SHA256]), threshold)
        record = {"format": FORMAT, "version": 1, "model": embedder.record(), "hnsw_threshold": int(hnsw_threshold),
                  "hnsw_m": HNSW_M, "ef_search": EF_SEARCH, "roots": {scan.root: scan.layout},
                  "people": {"threshold": threshold, "source": source}}  # fmt: skip
        live = _live(folder)
        if live:  # --force: a new version of the same folder
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                record["version"] = int(json.loads((folder / live / RECORD).read_text())["version"]) + 1
        graph = search_graph(embeddings, record, None, appended=False)
        version = write_version(folder, record, embeddings, faces, photo_table, graph)
    _log_skips(scan.skips + batch.skips)
    _log_notes(photo_table, notes)
    without = Counter(r[REASON] for r in batch.photo_rows if r[REASON] is not None)
    return _report(faces, photo_table, added_faces=len(faces), added_photos=int((photo_table[N_FACES] > 0).sum()),
                   without_faces=without, person_notes=Counter(notes.values()), skips=scan.skips + batch.skips,
                   version=version)  # fmt: skip


def add(index_dir: str | os.PathLike, photo_dir: str, layout: str = AUTO, model: str | None = None,
        device: str = "cpu", limits: CropLimits = LIMITS, prune: bool = False) -> Report:  # fmt: skip
    """Bring the index up to date with the photos under ``photo_dir`` (see the module doc).

    New content is embedded; content changed at an indexed path replaces the old; an
    indexed content at a new path, whose old path no longer holds it, is moved; indexed
    photos under ``photo_dir`` whose file is gone are reported, and dropped with ``prune``.
    """
    folder = Path(index_dir)
    with writing(folder):
        clean_stale(folder)
        old = load_index(folder)
        embedder = old.embedder(model, device)  # the same model: a new --model path is recorded as its place
        threshold, source = old.enrol_threshold(embedder)
        scan = _scan(photo_dir, layout, folder, old.roots())
        batch = embed_files(scan.files, scan.root, embedder, limits, known=frozenset(old.photos[SHA256]))
        change, gone = _follow(old, scan, batch, limits)
        replaced = len(change.drop)
        if prune:
            change.drop |= set(gone)
        skips = [s for s in scan.skips + batch.skips
                 if not (s.reason == ALREADY_INDEXED and batch.hashed.get(s.photo) in change.moves
                         and change.moves[batch.hashed[s.photo]][1] == s.photo)]  # fmt: skip
        _log_skips(skips)
        gone_paths = sorted(gone.values())
        without = Counter(r[REASON] for r in batch.photo_rows if r[REASON] is not None)
        if change.empty():
            return _report(old.faces, old.photos, skips=skips, gone=gone_paths)
        faces, photo_table, embeddings, notes = _apply(old, change, threshold)
        roots = old.roots()
        roots.setdefault(scan.root, scan.layout)
        record = old.record | {"version": old.record["version"] + 1, "model": embedder.record(), "roots": roots,
                               "people": {"threshold": threshold, "source": source}}  # fmt: skip
        appended = not change.drop  # moves and names change no embedding row: the graph takes the new rows
        graph = search_graph(embeddings, record, old, appended=appended)
        version = write_version(folder, record, embeddings, faces, photo_table, graph)
    _log_notes(photo_table, notes)
    new_photos = [r for r in batch.photo_rows if r[N_FACES] > 0]
    return _report(faces, photo_table, added_faces=len(batch.face_rows), added_photos=len(new_photos),
                   replaced_photos=replaced, moved_photos=len(change.moves), without_faces=without,
                   person_notes=Counter(notes.values()), skips=skips, gone=gone_paths, pruned=prune,
                   version=version)  # fmt: skip


def _follow(old: PhotoIndex, scan: Scan, batch: Batch, limits: CropLimits) -> tuple[_Change, dict[str, str]]:
    """What ``add`` changes: new content, moved and replaced photos; and {sha: path} of the gone ones."""
    places = _places(old)
    path_of = {sha: _join(*place) for sha, place in places.items()}
    person_of = {f.rel: f.person for f in scan.files}
    now = {_join(scan.root, rel): sha for rel, sha in batch.hashed.items()}  # what the scan read where
    change = _Change(batch=batch)
    for rel, sha in batch.hashed.items():
        here = _join(scan.root, rel)
        if sha not in path_of or path_of[sha] == here or sha in change.moves:
            continue
        before = path_of[sha]
        # Does the old path still hold it (then this is a copy)? Read there unless the scan read it.
        still = now[before] if before in now else _content(photo_path(*places[sha]), limits)
        if still != sha:  # the indexed content left its path and is here now
            change.moves[sha] = (scan.root, rel, person_of[rel])
    # A path the scan read other content at (new, moved in, or a copy of another indexed photo) no longer
    # holds what was indexed there: that photo goes, unless it moved. A path it could not read is left as is.
    change.drop = {sha for sha, path in path_of.items() if now.get(path, sha) != sha and sha not in change.moves}
    gone = {}
    for sha, path in path_of.items():
        rel = _rel_under(path, scan.root)
        if (sha not in change.moves and sha not in change.drop and _rel_under(path, scan.folder) is not None
                and rel not in scan.listed):  # fmt: skip
            gone[sha] = path
    return change, gone


def _targets(index: PhotoIndex, targets: Sequence[str], limits: CropLimits) -> tuple[np.ndarray, list[str]]:
    """(photos rows to remove, targets that matched none): by path (file or folder) or by a file's content.

    A path is resolved (:func:`resolve`: relative to the current folder) and means the photo
    at that path, or every photo under that folder, whichever root holds it.
    """
    p = index.photos
    roots, rels = p[ROOT].to_numpy(), p[PHOTO].astype(object).to_numpy()
    hit = np.zeros(len(p), bool)
    unmatched = []
    for target in targets:
        resolved = resolve(target)
        mine = np.zeros(len(p), bool)
        for root in set(roots):
            rel = _stored_rel(resolved, root)
            if rel is not None:  # the photo at rel under this root, or every photo under the folder rel
                mine |= (roots == root) & np.array([not rel or r == rel or r.startswith(rel + "/") for r in rels])
        if os.path.isfile(target):
            with contextlib.suppress(ImageRejected):
                mine |= (p[SHA256] == read_file(target, limits)[1]).to_numpy()
        if not mine.any():
            unmatched.append(target)
        hit |= mine
    return hit, unmatched


def remove(index_dir: str | os.PathLike, targets: Sequence[str] = (), limits: CropLimits = LIMITS,
           missing: bool = False) -> Report:  # fmt: skip
    """Remove the photos ``targets`` name (see :func:`_targets`) and their faces.

    ``missing``: also every photo whose file no longer holds the indexed content
    (:func:`check_files`); one found at a new path under the index's roots is moved there
    instead. Nobody else's name changes.
    """
    folder = Path(index_dir)
    with writing(folder):
        clean_stale(folder)
        old = load_index(folder)
        hit, unmatched = _targets(old, targets, limits)
        change = _Change(drop=set(old.photos.loc[hit, SHA256]))
        if missing:
            check = check_files(old, limits)
            sha_at = {_join(*place): sha for sha, place in _places(old).items()}
            change.drop |= {sha_at[path] for path in check.missing + check.changed}
            roots = old.roots()
            change.moves = {sha: (root, rel, _person_at(rel, roots[root])) for sha, (root, rel) in check.moved.items()
                            if sha not in change.drop}  # fmt: skip
        if change.empty():
            return _report(old.faces, old.photos, unmatched=unmatched)
        # Only a photo moved into another person's folder is enrolled again, at the index's threshold.
        threshold = old.enrol_threshold()[0] if change.moves else 0.0
        faces, photo_table, embeddings, notes = _apply(old, change, threshold)
        record = old.record | {"version": old.record["version"] + 1}
        graph = search_graph(embeddings, record, old, appended=not change.drop)  # HNSW cannot delete: rebuilt
        version = write_version(folder, record, embeddings, faces, photo_table, graph)
    _log_notes(photo_table, notes)
    return _report(faces, photo_table, removed_photos=len(change.drop), moved_photos=len(change.moves),
                   person_notes=Counter(notes.values()), unmatched=unmatched, version=version)  # fmt: skip


def info(index_dir: str | os.PathLike, check: bool = False, limits: CropLimits = LIMITS) -> dict:
    """People, faces, photos, the model (and whether its file is still the same model), the threshold.

    ``check``: also :func:`check_files` (reads every indexed photo), under ``"check"``.
    """
    index = load_index(index_dir)
    own = index.record["model"]
    model: dict = {k: own[k] for k in ("path", "backbone", "fingerprint", "embedding_dim")}
    model["problem"] = None
    threshold = None
    try:
        embedder = Embedder.load(own["path"])
        model["file_matches"] = embedder.fingerprint == own["fingerprint"]
        if model["file_matches"]:
            threshold = verdict_record(verdict(embedder.payload, len(index.faces)))
    except PhotoIndexError as exc:
        model["file_matches"], model["problem"] = None, str(exc)  # the file is gone, or no model
    p, f = index.photos, index.faces
    people = sorted(f[PERSON].dropna().unique())
    named_photos = set(f.loc[f[PERSON].notna(), SHA256])
    unnamed = int((p[PERSON].notna() & (p[N_FACES] > 0) & ~p[SHA256].isin(named_photos)).sum())
    out = {
        "index": str(index.folder), "version": index.version, "faces": len(f),
        "photos": int((p[N_FACES] > 0).sum()), "photos_without_faces": dict(Counter(p[REASON].dropna())),
        "people": len(people), "names": people, "person_not_found": unnamed, "roots": index.roots(),
        "model": model, "threshold": threshold,
        "search": {"structure": index.record["structure"], "hnsw_threshold": index.record["hnsw_threshold"]},
    }  # fmt: skip
    if check:
        out["check"] = check_files(index, limits).as_dict()
    return out


def info_lines(d: dict) -> list[str]:
    m, t = d["model"], d["threshold"]
    state = {True: "", False: " (the file there is now another model!)", None: f" ({m.get('problem')})"}
    names = ", ".join(d["names"][:10]) + (", ..." if len(d["names"]) > 10 else "")
    without = _counts(Counter(d["photos_without_faces"]))
    out = [
        f"index: {d['index']} (version {d['version']})",
        f"people: {d['people']}" + (f" ({names})" if names else ""),
        f"faces: {d['faces']}",
        f"photos: {d['photos']} with faces" + (f"; without: {without}" if without else "")
        + (f"; in a person's folder without that person: {d['person_not_found']}" if d["person_not_found"] else ""),
        "roots: " + ", ".join(f"{r} ({layout})" for r, layout in d["roots"].items()),
        f"model: {m['backbone']} {m['path']}{state[m['file_matches']]}, fingerprint {m['fingerprint'][:12]}",
        "threshold: " + (f"{t['similarity']:.4f} ({t['source']})" if t else "unknown (the model file is not usable)"),
        *([t["meaning"]] + ([t["warning"]] if t["warning"] else []) if t else []),
        f"search: {d['search']['structure']} (HNSW from {d['search']['hnsw_threshold']} faces)",
    ]  # fmt: skip
    c = d.get("check")
    if c is not None:
        if not (c["missing"] or c["changed"] or c["unreadable"] or c["moved"]):
            out.append(f"check: all {c['checked']} photos are where they were indexed, unchanged")
        for key, what in (("missing", "gone"), ("changed", "content changed"), ("unreadable", "cannot be read")):
            out += [f"check: {what}: {path}" for path in c[key]]
        out += [f"check: moved: {m['from']} -> {m['to']}" for m in c["moved"]]
        if c["missing"] or c["changed"] or c["moved"]:
            out.append("check: index add --photos FOLDER re-embeds changed and follows moved photos; "
                       "index remove --missing drops the gone ones (and follows the moved)")  # fmt: skip
    return out


def verdict_record(v: Verdict) -> dict:
    """A verdict as ``index info --json`` and ``search --json`` report it."""
    return {"similarity": v.similarity, "source": v.source, "fpir": v.fpir, "gallery_faces": v.gallery_faces,
            "calibrated_on": v.calibrated_on, "synthetic": v.synthetic, "meaning": v.meaning(),
            "warning": v.warning()}  # fmt: skip
