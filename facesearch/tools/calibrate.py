"""``python -m facesearch calibrate``: fit a model's "match / no match" verdict on any labelled folder.

    python -m facesearch calibrate --model models/dlib_resnet.pt --data ~/faces/labelled [--out calibrated.pt]

``DIR`` is a labelled folder (CelebA layout or one folder per person, as ``evaluate``
reads). Every photo of a person the model never trained or was selected on
(:mod:`facesearch.tools.labelled`: the rule is printed) is cut with the model's own
preprocessing and embedded with its test-time augmentation; then the verdict is
fitted on those people (:func:`facesearch.retrieval.verification.calibrate`):

- the identification threshold for a gallery of any size, at ``--fpir`` (default
  ``params.yaml: verification.fpir``): a search for someone who is not in the
  gallery ends in a false match at most that often, whether the gallery holds 10
  faces or a million;
- the 1:1 threshold at ``--far`` (two faces: same person?), with its TAR.

The record says what it was calibrated on (the folder's name, people and photos,
real or the synthetic sample's), and replaces the model file's ``threshold``
(``--out`` writes a new file instead). The weights are untouched, so an index built
with the model accepts the calibrated file as the same model. Calibrate on people
like those you will search (photos of the same kind), and never on the people you
will score the model on: ``evaluate`` on a folder should use other people.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np

from facesearch.data import manifest as M
from facesearch.data.layouts import AUTO, LABELLED_LAYOUTS, read_dataset, source_description
from facesearch.faces.cropping import image_guards
from facesearch.nets.contract import crop_settings
from facesearch.nets.models import load_model, resolve_device, save_model
from facesearch.params import load_params
from facesearch.retrieval import verification as V
from facesearch.retrieval.protocol import eligible_images
from facesearch.retrieval.verdict import verdict
from facesearch.tools.labelled import crop_entries, embed_crops, unseen_entries

log = logging.getLogger(__name__)

# Used when no params file is there (a model calibrated outside the repository).
DEFAULTS = {"fpir": 0.01, "far": 0.001, "fars": [0.01, 0.001], "impostor_pairs": 200000, "seed": 0}
SIZES = (10, 100, 1_000, 10_000, 100_000, 1_000_000)  # gallery sizes the summary shows thresholds for


def split_identities(split: str, parts: tuple[str, ...] = ("train", "val")) -> set[int]:
    """The identities of ``parts`` (train, val) of a pipeline split folder (never its test ones)."""
    import pandas as pd

    if not set(parts) <= {"train", "val"}:
        raise ValueError(f"split parts are train and val, never the test people: {parts}")
    folder = Path(split)
    tables = [folder / f"{name}.parquet" for name in parts]
    if not all(t.is_file() for t in tables):
        names = " and ".join(f"{p}.parquet" for p in parts)
        raise CalibrationError(f"--split {split} holds no {names} (a split stage output)")
    return {int(i) for t in tables for i in pd.read_parquet(t, columns=[M.IDENTITY])[M.IDENTITY].dropna()}


class CalibrationError(RuntimeError):
    """The folder cannot calibrate this model; the message says why, for the user."""


def settings(params_file: str | None, fpir: float | None, far: float | None) -> dict:
    """``verification`` settings: the params file's (defaults without one), ``--fpir``/``--far`` winning."""
    out = dict(DEFAULTS)
    if params_file and Path(params_file).is_file():
        out |= {k: v for k, v in load_params(params_file).get("verification", {}).items() if k in DEFAULTS}
    if fpir is not None:
        out["fpir"] = fpir
    if far is not None:
        out["far"] = far
    if not 0 < out["fpir"] < 1 or not 0 < out["far"] < 1:
        raise CalibrationError(f"--fpir and --far must lie strictly between 0 and 1, not {out['fpir']}, {out['far']}")
    return out


def folder_embeddings(
    model, payload: dict, data: str, *, layout: str = AUTO, trained_elsewhere: bool = False,
    crop_params: str | None = None, n_jobs: int = -1, device=None, split: str | None = None,
    parts: tuple[str, ...] = ("train", "val"), purpose: str = "calibrate",
) -> tuple[np.ndarray, np.ndarray, dict]:  # fmt: skip
    """(embeddings, identity labels, what they are) of every usable photo of ``data``'s unseen people.

    Each photo is cut with the model's own preprocessing (or ``crop_params``) and embedded with its
    test-time augmentation (:mod:`facesearch.tools.labelled`). ``split``: a split folder of the
    pipeline run on ``data``: only its identities of ``parts`` are used (never its test people).
    ``purpose``: the command asking (``calibrate``, ``fuse``), in the record and the progress bar.
    """
    dev = device if device is not None else resolve_device("auto")
    crop_block, face, size = crop_settings(payload, crop_params, override=crop_params is not None)
    dataset = read_dataset(data, layout)
    unseen = unseen_entries(payload, dataset, data, trained_elsewhere)
    entries = unseen.entries
    if split is not None:
        allowed = split_identities(split, parts)
        ids = dataset.annotations.identities
        entries = [e for e in entries if ids[e.name] in allowed]
        log.info("--split %s: %d photos of its %s identities (its test people are left out)",
                 split, len(entries), " and ".join(parts))  # fmt: skip
    with tempfile.TemporaryDirectory(prefix=f"facesearch-{purpose}-") as tmp:
        table = crop_entries(entries, dataset, face, image_guards(crop_block), Path(tmp), n_jobs)
        # Every kept photo counts: a person with one photo is still a stranger to everyone else.
        images = eligible_images(table, 1)
        if images[M.IDENTITY].nunique() < 2:
            raise CalibrationError(f"{data} has {images[M.IDENTITY].nunique()} unseen people with a usable face; "
                                   f"{purpose} needs at least two (better: dozens)")  # fmt: skip
        emb = embed_crops(model.to(dev), images[M.CROP_PATH], Path(tmp), purpose, size, dev, n_jobs)
    labels = images[M.IDENTITY].to_numpy()
    record = {"description": source_description(unseen.source, int(images[M.IDENTITY].nunique()), len(images)),
              "synthetic": bool(unseen.source.get("synthetic")),
              "identities": f"{purpose} --data" + (f" --split ({' and '.join(parts)} identities)" if split else ""),
              "seen_rule": unseen.seen.rule}  # fmt: skip
    return emb, labels, record


def verdict_record(emb: np.ndarray, labels: np.ndarray, cfg: dict, data_record: dict, data: str) -> dict:
    """The ``payload["threshold"]`` record fitted on these embeddings (:func:`V.calibrate`)."""
    try:
        record = V.calibrate(emb, labels, cfg["far"], cfg["fars"], cfg["impostor_pairs"], cfg["seed"], cfg["fpir"],
                             data_record)  # fmt: skip
    except ValueError as exc:  # too few stranger comparisons for a tail
        raise CalibrationError(f"{data}: {exc}") from None
    if record is None:
        raise CalibrationError(f"{data} gives no pair of different people to calibrate on")
    return record


def calibrate_on_folder(
    model_path: str, data: str, out: str | None = None, fpir: float | None = None, far: float | None = None,
    params_file: str | None = "params.yaml", layout: str = AUTO, trained_elsewhere: bool = False,
    crop_params: str | None = None, n_jobs: int = -1, device: str = "auto", split: str | None = None,
) -> dict:  # fmt: skip
    """Fit the verdict of ``model_path`` on ``data`` and write the model to ``out`` (default: in place).

    ``split``: a split folder of the pipeline run on ``data`` (``data/split``): only its train and
    validation identities are used, never its test people, whom ``evaluate`` scores. Returns
    the new ``payload["threshold"]`` record.
    """
    cfg = settings(params_file, fpir, far)
    dev = resolve_device(device)
    model, payload = load_model(model_path, map_location=dev)
    emb, labels, data_record = folder_embeddings(model, payload, data, layout=layout,
                                                 trained_elsewhere=trained_elsewhere, crop_params=crop_params,
                                                 n_jobs=n_jobs, device=dev, split=split)  # fmt: skip
    record = verdict_record(emb, labels, cfg, data_record, data)
    extra = {k: v for k, v in payload.items() if k not in ("config", "state_dict")}
    extra["threshold"] = record
    save_model(out or model_path, model.cpu(), extra=extra)
    return record


def summary_lines(record: dict, out: str) -> list[str]:
    payload = {"threshold": record}
    lines = [f"calibrated on {record['data']['description']}; wrote {out}"]
    for n in SIZES:
        lines.append(f"  gallery of {n:>9,} faces: match at similarity >= {verdict(payload, n).similarity:.4f}")
    tar = "n/a" if record["tar"] is None else f"{record['tar']:.4f}"
    lines.append(f"  1:1 (two faces): {record['similarity']:.4f} at FAR {record['far']:g} (TAR {tar}"
                 + ("" if record["resolved"] else "; too few impostor pairs to measure this FAR") + ")")  # fmt: skip
    lines.append(verdict(payload, 1000).meaning())
    if verdict(payload, 1000).warning():
        lines.append(verdict(payload, 1000).warning())
    return lines


def add_parser(sub) -> None:
    c = sub.add_parser("calibrate", help=__doc__.splitlines()[0], description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    c.add_argument("--model", required=True, help="the model file to calibrate")
    c.add_argument("--data", required=True, help="labelled folder: CelebA layout or one folder per person")
    c.add_argument("--out", default=None, help="write the calibrated model here (default: replace --model)")
    c.add_argument("--fpir", type=float, default=None, help="false matches per stranger search to allow "
                   "(default: params.yaml verification.fpir, else 0.01)")  # fmt: skip
    c.add_argument("--far", type=float, default=None, help="1:1 false-accept rate (default: verification.far)")
    c.add_argument("--params", default="params.yaml", help="its verification block gives the defaults")
    c.add_argument("--layout", choices=LABELLED_LAYOUTS, default=AUTO)
    c.add_argument("--trained-elsewhere", action="store_true",
                   help="the model never saw anyone in this folder: nobody is left out")  # fmt: skip
    c.add_argument("--crop-params", default=None, metavar="FILE",
                   help="crop with this params file's crop block, not the model's recorded preprocessing")  # fmt: skip
    c.add_argument("--split", default=None, metavar="DIR", help="the pipeline's split of --data (data/split): "
                   "calibrate on its train and validation identities only, never its test people")  # fmt: skip
    c.add_argument("--n-jobs", type=int, default=-1, help="crop and pack worker processes (-1: all cores)")
    c.add_argument("--device", default="auto")


def main(args: argparse.Namespace) -> None:
    try:
        record = calibrate_on_folder(args.model, args.data, args.out, args.fpir, args.far, args.params, args.layout,
                                     args.trained_elsewhere, args.crop_params, args.n_jobs, args.device,
                                     args.split)  # fmt: skip
    except CalibrationError as exc:
        raise SystemExit(f"calibrate: {exc}") from None
    print("\n".join(summary_lines(record, args.out or args.model)))
