"""A labelled photo folder as a saved model sees it: whom it may score, their crops, their embeddings.

The one path of ``python -m facesearch evaluate`` (score a model on any folder) and
``python -m facesearch calibrate`` (fit a model's verdict on any folder), so both read a
folder alike:

1. :func:`unseen_entries`: the folder's usable, labelled entries, less the people the model
   trained or was selected on, decided by :func:`facesearch.nets.contract.seen_in` (by number for
   data of the same CelebA identity file, by name for person folders, nobody otherwise: and
   the rule is reported, never applied silently);
2. :func:`crop_entries`: every photo cut as the model's own training crops were (its recorded
   preprocessing, or ``--crop-params``), with the crop stage's guards, by ``n_jobs`` workers;
3. :func:`embed_crops`: the kept crops packed into a memory-mapped array at the model's input
   side (as the pack stage does) and embedded a chunk at a time, so memory does not grow with
   the number of photos.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from tqdm import tqdm

from facesearch.data import manifest as M
from facesearch.data.celeba import Entry
from facesearch.data.layouts import Dataset, dataset_source
from facesearch.data.packing import load_array, pack_crops
from facesearch.faces.config import FaceConfig
from facesearch.faces.cropping import crop_names, process_image
from facesearch.nets.contract import Seen, seen_in
from facesearch.nets.inference import embed_array

log = logging.getLogger(__name__)

# Packed images embedded per memory map: a map is dropped after its chunk, so the pages
# read stay out of this process's memory (1024 images at 150 px: 69 MB).
EMBED_CHUNK = 1024


@dataclass(frozen=True)
class Unseen:
    """The entries a model may be scored or calibrated on, and who was left out and why."""

    entries: list[Entry]
    seen: Seen
    excluded_ids: set[int]  # identity numbers of the folder left out as seen
    excluded_people: list[str]  # their person names (folder layout), sorted
    source: dict  # the folder's facesearch.data.layouts.dataset_source


def unseen_entries(payload: dict, dataset: Dataset, root: str | os.PathLike, trained_elsewhere: bool = False) -> Unseen:
    """The usable labelled entries of ``dataset`` whose person the model has not seen (see the module doc).

    ``trained_elsewhere``: the user says the model never saw anyone here: nobody is left out.
    """
    ids = dataset.annotations.identities
    labelled = [e for e in dataset.entries if e.problem is None and e.name in ids]
    source = dataset_source(root, dataset.layout)
    seen = Seen(frozenset(), frozenset(), "--trained-elsewhere: everyone is scored") if trained_elsewhere else \
        seen_in(payload, source)  # fmt: skip
    left_out = [e for e in labelled if ids[e.name] in seen.ids or (e.person is not None and e.person in seen.people)]
    gone = {id(e) for e in left_out}
    log.info("%s: %s", Path(root).name, seen.rule)
    return Unseen([e for e in labelled if id(e) not in gone], seen, {ids[e.name] for e in left_out},
                  sorted({e.person for e in left_out if e.person is not None}), source)  # fmt: skip


def crop_entries(
    entries: list[Entry], dataset: Dataset, face: FaceConfig, crop: dict, out_dir: Path, n_jobs: int
) -> pd.DataFrame:
    """Crop every entry into ``out_dir``: one row each (FILE_NAME, IDENTITY, PERSON, STATUS, CROP_PATH, attributes).

    ``crop``: the crop stage's file and image guards and chip format
    (:func:`facesearch.faces.cropping.image_guards`), so the chips are written as the pipeline writes them.
    """
    ids = dataset.annotations.identities
    files = [e.name for e in entries]
    names = crop_names(files, fmt=crop["format"])
    jobs = (delayed(process_image)(os.fsdecode(e.path), str(out_dir / names[e.name]), face, crop["jpeg_quality"],
                                   crop["max_pixels"], crop["min_image_side"], max_file_bytes=crop["max_file_bytes"],
                                   max_aspect=crop["max_aspect"], fmt=crop["format"])
            for e in entries)  # fmt: skip
    rows = list(tqdm(Parallel(n_jobs=n_jobs, return_as="generator")(jobs), total=len(files), desc="crop"))
    table = pd.DataFrame({
        M.FILE_NAME: files,
        M.IDENTITY: pd.array([ids[n] for n in files], dtype="Int64"),
        M.PERSON: pd.array([e.person for e in entries], dtype="string"),
        M.STATUS: [r[M.STATUS] for r in rows],
        M.CROP_PATH: [str(out_dir / names[n]) for n in files],
    })  # fmt: skip
    return table.join(dataset.annotations.attributes.reindex(table[M.FILE_NAME]).reset_index(drop=True))


def embed_packed(model, path: Path, size: int, device, desc: str, chunk: int = EMBED_CHUNK) -> np.ndarray:
    """Embeddings of the packed array at ``path``, ``chunk`` rows per memory map.

    A memory map keeps every page it has read resident (and counted in this
    process's RSS) until it is closed; one map per chunk keeps that to a chunk.
    """
    n = len(load_array(path))
    out = [np.zeros((0, model.config.embedding_dim), np.float32)]
    for start in range(0, n, chunk):
        images = load_array(path)
        out.append(embed_array(model, images[start : start + chunk], size, device, desc=desc))
        del images
    return np.concatenate(out)


def embed_crops(model, crop_paths: list[str], work: Path, name: str, size: int, device, n_jobs: int) -> np.ndarray:
    """Embeddings of the crop files ``crop_paths``, packed at the model's input side into ``work/<name>.npy``."""
    # The model's own input side: the pixels it trained on (see facesearch.data.packing).
    pack_crops(list(crop_paths), work / f"{name}.npy", side=size, n_jobs=n_jobs, desc=name)
    return embed_packed(model, work / f"{name}.npy", size, device, f"embed {name}", EMBED_CHUNK)
