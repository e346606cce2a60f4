"""Who is who in person folders: which face of each photo is its folder's person.

People: with ``--layout folders`` (one folder per person, ``<photos>/<person>/*.jpg``)
a photo is *of* its folder's person, and the one face that is that person is
indexed under the name (:func:`find_person`); its other faces (bystanders) are
indexed unnamed. ``plain`` names nobody; ``auto`` (the default) is ``folders``
when every photo sits exactly one folder below the root, else ``plain`` (an
``add`` inside an indexed root takes that root's layout). Under ``folders`` a
photo outside a person folder is skipped (``not_in_a_person_folder``). Which face
is the person: the faces of the person's photos are compared (cosine similarity)
at the model's verdict threshold for a one-face gallery (:func:`enrol_threshold`,
recorded in the index as ``people.threshold``): the face most of the person's
other photos agree with seeds the person, then each photo's face most similar to
the mean of the person's other chosen faces is taken if it reaches the threshold.
A photo where none does (a bystander alone, a group without the person) is
counted ``person_not_found`` in the report and its faces stay unnamed. When no
two of a person's photos agree (a person with one photo, or photos that disagree)
there is nothing to check against: a lone face is taken, as the folder says, and
a photo with several faces names nobody (``person_ambiguous``). ``add`` compares
a person's new photos with the faces already enrolled under the name (and
re-decides that person's photos where the person was not found before); enrolled
faces never change name, and ``remove`` changes nobody else's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from facesearch.gallery.store import FACE, N_FACES, PERSON, SHA256

# Person folders: why a photo's faces are all indexed unnamed (counted in the build/add report).
PERSON_NOT_FOUND = "person_not_found"  # no face agrees with the person's other photos
PERSON_AMBIGUOUS = "person_ambiguous"  # several faces, and no other photo of the person to tell which


def find_person(anchors: np.ndarray, faces: Sequence[np.ndarray], threshold: float,
                rounds: int = 20) -> list[tuple[int | None, str | None]]:  # fmt: skip
    """Which face of each of one person's photos is that person: ``(face position or None, note)`` a photo.

    ``anchors``: unit embeddings (k, d) of faces already enrolled as the person (k may be 0);
    ``faces``: for each photo to decide, the unit embeddings (n_i >= 1, d) of its faces.
    Similarities are cosines, compared with ``threshold`` (:func:`enrol_threshold`).

    Without anchors the person is seeded by the face most of the other photos agree with
    (the most photos holding a face at ``threshold`` or more from it, then the highest sum
    of those similarities, then photo order). From the anchors or the seed, each photo takes
    its face most similar to the mean of the person's *other* chosen faces (the anchors and
    the other photos' choices: a photo never votes for itself) when that similarity reaches
    ``threshold``, else none (``person_not_found``); repeated until nothing changes. When
    there are no anchors and no two photos agree on any face, nothing contradicts the
    folder: a lone face is taken, and a photo with several faces names nobody
    (``person_ambiguous``).
    """
    m = len(faces)
    if not m:
        return []
    choice: list[int | None] = [None] * m
    if not len(anchors):
        seed = _seed(faces, threshold)
        if seed is None:
            return [(0, None) if len(f) == 1 else (None, PERSON_AMBIGUOUS) for f in faces]
        choice[seed[0]] = seed[1]
    base = np.asarray(anchors, np.float64).sum(0) if len(anchors) else np.zeros(faces[0].shape[1])
    for _ in range(rounds):
        chosen = [faces[i][c] for i, c in enumerate(choice) if c is not None]
        total = base + (np.sum(chosen, 0, dtype=np.float64) if chosen else 0.0)
        members = len(anchors) + len(chosen)
        new: list[int | None] = []
        for i, f in enumerate(faces):
            own = choice[i] is not None
            if members - own == 0:  # the seed alone: nothing else to hold it to
                new.append(choice[i])
                continue
            centre = total - (f[choice[i]] if own else 0.0)
            sims = f @ (centre / max(float(np.linalg.norm(centre)), 1e-12))
            j = int(np.argmax(sims))
            new.append(j if sims[j] >= threshold else None)
        if new == choice:
            break
        choice = new
    return [(c, None if c is not None else PERSON_NOT_FOUND) for c in choice]


def _seed(faces: Sequence[np.ndarray], threshold: float, block: int = 1024) -> tuple[int, int] | None:
    """(photo, face) that most other photos agree with (see :func:`find_person`); None when no two agree."""
    m = len(faces)
    if m < 2:
        return None
    stacked = np.concatenate(faces).astype(np.float32)
    sizes = np.array([len(f) for f in faces])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    owner = np.repeat(np.arange(m), sizes)
    best, best_key = None, 0.0
    for s in range(0, len(stacked), block):  # in blocks: a person with 10k faces would need 400 MB at once
        sims = stacked[s : s + block] @ stacked.T
        per_photo = np.maximum.reduceat(sims, starts, axis=1)  # each face's best match in each photo
        per_photo[np.arange(len(sims)), owner[s : s + block]] = -np.inf  # not its own photo
        agree = per_photo >= threshold
        # Photos agreeing first, their similarity second: the sum is below (m + 1), so it only breaks ties.
        key = agree.sum(1) * (m + 1.0) + np.where(agree, per_photo, 0.0).sum(1)
        r = int(np.argmax(key))
        if key[r] > best_key and agree[r].any():
            best, best_key = s + r, float(key[r])
    if best is None:
        return None
    photo = int(owner[best])
    return photo, int(best - starts[photo])


def enrol(faces: pd.DataFrame, photo_table: pd.DataFrame, embeddings: np.ndarray, decide: set[str],
          threshold: float) -> tuple[pd.DataFrame, dict[str, str]]:  # fmt: skip
    """Name the face that is its photo's person (:func:`find_person`) for the photos ``decide`` names.

    ``decide``: SHA-256s of photos (new, or moved to another person) whose faces are
    (re)named; every other named face keeps its name and is the person's anchor. A person
    with a photo to decide has their undecided older photos (person not found) decided
    again with them. Returns (faces with PERSON set, {sha: note} for the photos of
    ``decide`` where the person was not found or is ambiguous).
    """
    p = photo_table
    rows_of = faces.groupby(SHA256, sort=False).indices
    number = faces[FACE].to_numpy()
    person = np.array([None if pd.isna(x) else str(x) for x in faces[PERSON]], dtype=object)
    for sha in decide:
        if sha in rows_of:
            person[rows_of[sha]] = None
    with_faces = p[(p[N_FACES] > 0) & p[PERSON].notna()]
    people = sorted(set(with_faces.loc[with_faces[SHA256].isin(decide), PERSON]))
    shas_of = with_faces.groupby(PERSON, sort=False)[SHA256].agg(list)
    notes: dict[str, str] = {}
    for name in people:
        rows = {sha: rows_of[sha][np.argsort(number[rows_of[sha]])] for sha in shas_of[name]}
        anchor_rows = [r for sha in shas_of[name] for r in rows[sha] if person[r] == name]
        todo = [sha for sha in shas_of[name] if not any(person[r] == name for r in rows[sha])]
        answers = find_person(embeddings[anchor_rows], [embeddings[rows[sha]] for sha in todo], threshold)
        for sha, (chosen, note) in zip(todo, answers, strict=True):
            if chosen is not None:
                person[rows[sha][chosen]] = name
            elif sha in decide:
                notes[sha] = note
    return faces.assign(**{PERSON: pd.array(list(person), dtype="string")}), notes
