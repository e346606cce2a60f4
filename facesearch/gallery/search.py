"""Searching an index: the most similar faces to each face of a query photo, grouped by person.

``search`` answers, for each face of each query photo, the most similar indexed
faces (cosine similarity of L2-normalised embeddings) grouped by person: a
person's best face ranks the person, and their other faces among the candidates
follow under it (``"also"``, at most ``--also``); an unnamed face stands alone.
``--top N`` is N such entries (people or unnamed faces). The verdict is ``match``
when the best similarity reaches the model's threshold for a gallery of this
index's size (:func:`facesearch.retrieval.verdict.verdict`: calibrated so that a search for
someone not in the index matches at most at the model's target FPIR, see
:mod:`facesearch.retrieval.verification`), else ``no_match``; ``"person"`` names who matched
(the best face's person; ``null`` when that face is unnamed) or is ``"unknown"``
after ``no_match`` (read ``"verdict"`` first: a person folder may be called
"unknown"). A model without a calibration gets
:data:`facesearch.retrieval.verdict.FALLBACK_THRESHOLD` and a warning; ``--threshold``
overrides either. With ``--json``, one line per face::

    {"photo": "me.jpg", "box": [x, y, w, h], "verdict": "match" | "no_match", "person": "alice" | null | "unknown",
     "similarity": 0.91, "threshold": 0.87,
     "results": [{"rank": 1, "person": "alice", "similarity": 0.91, "photo": "/abs/alice/1.jpg", "box": [...],
                  "photo_status": "current", "also": [{"similarity": 0.88, "photo": ..., "box": ...,
                                                       "photo_status": "current"}, ...]}, ...]}

A query that cannot be searched gets one line with ``"box": null``, no results,
``"person": null``, a ``"reason"`` (the manifest reason) and its own verdict:
``missing`` (no such file), ``unreadable`` (not a regular file, not read, not an
image, broken) or ``no_face`` (a photo, but no usable face in it); ``search``
exits 2 when no query could be searched. ``"photo_status"`` says whether the file
at a result's path still holds the indexed content (:func:`source_status`:
``current``, ``changed``, ``missing`` or ``unreadable``); anything but
``current`` must not be shown as that face's photo. Only the photos of the
results listed are read and hashed, once per command (12-26 ms for a 5 MB photo on
a shared 2-core CPU), never the whole index. Boxes are in the photo's own pixels
(after EXIF orientation).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd

from facesearch.data.images import ImageRejected
from facesearch.data.manifest import Reason
from facesearch.faces.cropping import CropLimits
from facesearch.gallery.embedder import LIMITS, Embedder, PhotoIndexError, file_faces, read_file
from facesearch.gallery.store import (
    BOX_H,
    BOX_W,
    BOX_X,
    BOX_Y,
    CHANGED,
    CURRENT,
    MISSING,
    NO_FACE,
    PERSON,
    PHOTO,
    ROOT,
    SHA256,
    UNREADABLE,
    _join,
    load_index,
    photo_path,
    source_status,
)
from facesearch.retrieval.knn import CheckedIndex, cosine_similarity
from facesearch.retrieval.verdict import verdict

log = logging.getLogger(__name__)

ALSO = 4  # search: a person's other faces listed under their entry, at most


def group_by_person(persons: Sequence[str | None], top: int, also: int = ALSO) -> list[list[int]]:
    """Ranked faces grouped into at most ``top`` entries, one a person: the app's and ``search``'s grouping.

    ``persons``: the person of each candidate face, best first (None: unnamed). Returns
    entries in rank order, each a list of positions into ``persons``: the entry's best
    face, then up to ``also`` more faces of the same person, in rank order. An unnamed
    face is an entry of its own. Fewer than ``top`` entries when the candidates run out.
    """
    entries: list[list[int]] = []
    where: dict[str, int] = {}
    for pos, person in enumerate(persons):
        if person is None or pd.isna(person):
            if len(entries) < top:
                entries.append([pos])
        elif person in where:
            entry = entries[where[person]]
            if len(entry) <= also:
                entry.append(pos)
        elif len(entries) < top:
            where[person] = len(entries)
            entries.append([pos])
    return entries


def _query_faces(query: str, embedder: Embedder, limits: CropLimits) -> tuple[str | None, str | None, tuple, object]:
    """(None, None, boxes, crops) of a query photo's faces; (verdict, reason, (), None) when it cannot be searched."""
    try:
        _, boxes, crops, _ = file_faces(read_file(query, limits)[0], embedder.settings, limits)
    except ImageRejected as exc:
        if exc.reason == Reason.NOT_A_FILE and not os.path.exists(query):
            return MISSING, str(exc.reason), (), None
        shape = exc.reason in (Reason.TOO_SMALL, Reason.BAD_ASPECT)  # a photo, but nothing to search in it
        return (NO_FACE if shape else UNREADABLE), str(exc.reason), (), None
    except Exception as exc:  # a hostile query photo gets its line, like any other
        log.warning("%s: unexpected %s: %s", query, type(exc).__name__, exc)
        return UNREADABLE, Reason.ERROR.value, (), None
    if not boxes:
        return NO_FACE, Reason.NO_FACE.value, (), None
    return None, None, boxes, crops


def search(index_dir: str | os.PathLike, queries: Sequence[str], top: int = 9, threshold: float | None = None,
           model: str | None = None, limits: CropLimits = LIMITS, also: int = ALSO,
           fpir: float | None = None) -> Iterator[dict]:  # fmt: skip
    """For each face of each query photo, the JSON-line object described in the module doc."""
    if top < 1:
        raise PhotoIndexError(f"--top must be at least 1, not {top}")
    if also < 0:
        raise PhotoIndexError(f"--also must be at least 0, not {also}")
    index = load_index(index_dir)
    embedder = index.embedder(model)
    if fpir is not None and not 0 < fpir < 1:
        raise PhotoIndexError(f"--fpir must lie strictly between 0 and 1, not {fpir}")
    answer = verdict(embedder.payload, len(index.faces), threshold, fpir=fpir)
    cut = answer.similarity
    log.info("%s", answer.meaning())
    if answer.warning():
        log.warning("%s", answer.warning())
    structure = index.structure()
    f = index.faces
    persons = [None if pd.isna(x) else str(x) for x in f[PERSON]]
    statuses: dict[tuple[str, str], str] = {}  # each shown photo read once a command

    def shown(i: int, similarity: float) -> dict:
        key = (str(f.at[i, ROOT]), str(f.at[i, PHOTO]))
        if key not in statuses:
            statuses[key] = source_status(photo_path(*key), str(f.at[i, SHA256]), limits)
        return {"similarity": round(float(similarity), 6), "photo": _join(*key), "box": _box(f, i),
                "photo_status": statuses[key]}  # fmt: skip

    for query in queries:
        failure, reason, boxes, crops = _query_faces(query, embedder, limits)
        if failure is not None:
            yield {"photo": query, "box": None, "verdict": failure, "person": None, "reason": reason, "results": []}
            continue
        found = _candidates(structure, embedder.embed(crops), persons, top, also)
        for box, (sims, ix) in zip(boxes, found, strict=True):
            groups = group_by_person([persons[i] for i in ix], top, also)
            results = [{"rank": rank, "person": persons[ix[g[0]]], **shown(ix[g[0]], sims[g[0]]),
                        "also": [shown(ix[j], sims[j]) for j in g[1:]]}
                       for rank, g in enumerate(groups, start=1)]  # fmt: skip
            best = float(sims[0]) if len(sims) else None
            # "match" at similarity >= threshold: facesearch.retrieval.verification's acceptance rule.
            matched = best is not None and best >= cut
            yield {"photo": query, "box": list(box), "verdict": "match" if matched else "no_match",
                   "person": results[0]["person"] if matched else "unknown",
                   "similarity": None if best is None else round(best, 6), "threshold": round(float(cut), 6),
                   "results": results}  # fmt: skip


def _candidates(structure: CheckedIndex | None, emb: np.ndarray, persons: list, top: int,
                also: int) -> list[tuple[np.ndarray, list[int]]]:  # fmt: skip
    """Per face: (similarities, face rows), best first, with enough candidates for ``top`` entries.

    Starts at ``top * (also + 1)`` faces and takes four times more while a face's candidates
    hold fewer than ``top`` entries (one person's many photos) and the index has more.
    """
    n = len(persons)
    if structure is None:
        return [(np.zeros(0), []) for _ in range(len(emb))]
    k = min(n, top * (also + 1))
    while True:
        dist, idx = structure.search(emb, k)
        short = any(len(group_by_person([persons[i] for i in row], top, 0)) < top for row in idx)
        if not short or k >= n:
            break
        k = min(n, k * 4)
    return [(cosine_similarity(d), ix.tolist()) for d, ix in zip(dist, idx, strict=True)]


def _box(faces: pd.DataFrame, i: int) -> list[int]:
    return [int(faces.at[i, c]) for c in (BOX_X, BOX_Y, BOX_W, BOX_H)]


_STALE = {CHANGED: "  [photo changed since indexed: not shown]", MISSING: "  [photo gone]",
          UNREADABLE: "  [photo unreadable]", CURRENT: ""}  # fmt: skip


def result_lines(line: dict) -> list[str]:
    if line["box"] is None:
        what = {MISSING: "no such file", UNREADABLE: "cannot be read as a photo", NO_FACE: "no usable face"}
        return [f"{line['photo']}: {what.get(line['verdict'], line['verdict'])} ({line['reason']})"]
    if line["verdict"] == "match":
        who = line["person"] if line["person"] is not None else "an unnamed face"
        head = f"match: {who} (similarity {line['similarity']:.3f} >= threshold {line['threshold']:.3f})"
    elif line["similarity"] is None:
        head = "no match: unknown (the index holds no faces)"
    else:
        head = f"no match: unknown (best similarity {line['similarity']:.3f} < threshold {line['threshold']:.3f})"
    out = [f"{line['photo']} face at {line['box']}: {head}"]
    for r in line["results"]:
        who = r["person"] if r["person"] is not None else "(unnamed face)"
        stale = _STALE[r["photo_status"]]
        out.append(f"  {r['rank']:>3}  {r['similarity']:.3f}  {who}  {r['photo']}  {r['box']}{stale}")
        for a in r["also"]:
            out.append(f"       {a['similarity']:.3f}  also {a['photo']}  {a['box']}{_STALE[a['photo_status']]}")
    return out
