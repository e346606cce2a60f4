"""What a model file promises its users: how its input was cut, and whom it has seen.

The train stage records it in the model file (``payload["preprocessing"]``,
``payload["identities"]`` and ``payload["threshold"]``); ``python -m facesearch
evaluate`` and the app read it back through :func:`model_preprocessing` and
:func:`seen_identities`, so a photo is cropped exactly as the model's training
crops were, and a score never counts people the model trained or was selected
on; the embed stage passes :func:`model_threshold` on to evaluate.

- ``payload["preprocessing"] = {"crop": {...}, "img_size": int}``: ``crop`` is
  shaped like ``params.yaml: crop`` (the keys :meth:`FaceConfig.from_params`
  reads, ``haar`` as a nested block), ``img_size`` the input side the network
  was trained at.
- ``payload["identities"] = {"train": [...], "val": [...]}``: sorted ints.
- ``payload["threshold"]``: the verdict threshold, chosen on the validation
  identities at a false-accept rate (:func:`facesearch.retrieval.verification.threshold_record`
  gives its keys): ``{"similarity": float, "far": float, "source": str, "tar": ...,
  "n_genuine": int, "n_impostor": int, "at_far": {"0.001": float, ...}, ...}``. Two
  faces are the same person when their cosine similarity is ``>= similarity``.
  :func:`facesearch.retrieval.verdict.verdict` gives the verdicts of ``facesearch search``
  from it (here in the nets room only the record is read: deciding a verdict is retrieval's).

Models saved before these keys existed fall back to the library defaults
(:class:`FaceConfig`) and to ``payload["config"]["img_size"]``; one without a
threshold has None from :func:`model_threshold`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from facesearch.faces.config import FaceConfig, chip_config
from facesearch.faces.sheet import ChipSheet

log = logging.getLogger(__name__)


def crop_params(face: FaceConfig) -> dict:
    """``face`` as a ``params.yaml: crop``-shaped dict: ``FaceConfig.from_params`` gives ``face`` back."""
    out = asdict(face)
    haar = out.pop("haar")
    out["policy"] = haar.pop("policy")  # params.yaml keeps the policy at crop.policy, not crop.haar
    out["haar"] = haar
    if face.detector != "yunet":
        # Its block changes nothing then; left out, a record (and so a model's fingerprint: the photo
        # index, the calibrations pretrained ships) stays what it was before the yunet detector existed.
        del out["yunet"]
    return out


def preprocessing_record(face: FaceConfig | ChipSheet, img_size: int) -> dict:
    """The ``payload["preprocessing"]`` entry of a model trained on ``face`` crops at ``img_size``.

    A fused model's (:class:`facesearch.faces.sheet.ChipSheet`) lists its members' crop settings.
    """
    if isinstance(face, ChipSheet):
        return {"sheet": [crop_params(m) for m in face.members], "img_size": int(img_size)}
    return {"crop": crop_params(face), "img_size": int(img_size)}


def identities_record(train: Iterable[int], val: Iterable[int], source: dict | None = None,
                      people: dict[str, Iterable[str]] | None = None) -> dict:  # fmt: skip
    """The ``payload["identities"]`` entry: sorted, de-duplicated plain ints (JSON- and torch-safe).

    ``source``: where the numbers come from (:func:`facesearch.data.layouts.dataset_source`);
    ``people``: under the folder layout, the person names of ``train`` and ``val``, which is
    what identifies a person across folders.
    """
    out: dict = {"train": sorted({int(i) for i in train}), "val": sorted({int(i) for i in val})}
    if source is not None:
        out["source"] = dict(source)
    if people is not None:
        out["people"] = {k: sorted({str(p) for p in v}) for k, v in people.items()}
    return out


def model_preprocessing(payload: dict, fallback: FaceConfig | None = None) -> tuple[FaceConfig | ChipSheet, int]:
    """(crop settings, input side in px) a saved model expects.

    A model without the record (saved before it existed) gets ``fallback`` (or the
    library defaults) and its config's ``img_size``, with a warning: its crops may
    not be the ones it was trained on.
    """
    record = payload.get("preprocessing")
    if record is None:
        log.warning("model has no preprocessing record (saved by an older version): using %s crop settings",
                    "the given" if fallback is not None else "the default")  # fmt: skip
        return fallback or FaceConfig(), int(payload["config"]["img_size"])
    if "sheet" in record:
        return ChipSheet(tuple(FaceConfig.from_params(m) for m in record["sheet"])), int(record["img_size"])
    return FaceConfig.from_params(record["crop"]), int(record["img_size"])


def crop_settings(
    payload: dict, params_file: str | os.PathLike | None = None, *, override: bool = False,
) -> tuple[dict, FaceConfig, int]:  # fmt: skip
    """(crop block, crop settings, input side in px) for cutting photos for a saved model.

    The one place that decides how a model's queries and galleries are cropped
    (``python -m facesearch evaluate``, the app, ``facesearch index``):

    - by default the model's own record (:func:`model_preprocessing`), and
      ``params_file``'s ``crop`` block only for a model without one (saved
      before models carried it);
    - with ``override`` (``evaluate --crop-params FILE``) ``params_file``'s crop
      block and image guards, whatever the model says.

    From a params file, a model's face settings are its backbone's: ``crop``'s detection joined with
    ``chips.<backbone>`` (:func:`facesearch.faces.config.chip_config`), as the train stage records
    them; a file without that block (written before the chips blocks) is read as one ``crop`` block.

    The input side is always the model's: the network was trained at it. The crop
    block is ``params_file``'s (empty when none is read): its file and image guards
    (:func:`facesearch.faces.cropping.image_guards`) are how a photo is read and written,
    not how the face is cut, so a model does not record them.
    """
    crop = None
    if params_file is not None and (override or payload.get("preprocessing") is None):
        from facesearch.params import load_params  # yaml only when a file is read

        if not Path(params_file).is_file():
            raise FileNotFoundError(f"crop settings file {params_file} does not exist")
        params = load_params(params_file)
        crop = params["crop"]
    if crop is None:
        return {}, *model_preprocessing(payload)
    if override and "sheet" in (payload.get("preprocessing") or {}):
        raise ValueError("a fused model cuts each member network's chip with its own settings: other crop "
                         "settings (--crop-params) cannot replace them")  # fmt: skip
    backbone = (payload.get("config") or {}).get("backbone")
    own_chip = backbone in (params.get("chips") or {})
    face = chip_config(params, backbone) if own_chip else FaceConfig.from_params(crop)
    if override:
        return dict(crop), face, model_preprocessing(payload, fallback=face)[1]
    return dict(crop), *model_preprocessing(payload, fallback=face)


def seen_identities(payload: dict) -> set[int]:
    """Identities a saved model was trained on or selected on (train + val); empty for older models."""
    record = payload.get("identities") or {}
    return {int(i) for key in ("train", "val") for i in record.get(key, [])}


@dataclass(frozen=True)
class Seen:
    """Whom to leave out when scoring a model on a folder: people it trained or was selected on."""

    ids: frozenset[int]  # identity numbers (CelebA data of the same identity file)
    people: frozenset[str]  # person names (folder layouts)
    rule: str  # why, in a sentence, for the output and the log


def seen_in(payload: dict, source: dict) -> Seen:
    """Who counts as seen in data from ``source`` (:func:`facesearch.data.layouts.dataset_source`).

    Only when the data names people the way the model's training data did
    (:func:`facesearch.data.layouts.same_source`): the same CelebA identity file (by number), or a
    folder layout (by person name). Otherwise numbers mean other people here, and everyone is
    scored: the rule says so, never silently.
    """
    from facesearch.data.layouts import same_source  # the data room, only when deciding

    record = payload.get("identities") or {}
    mine = record.get("source")
    if mine is None:
        return Seen(frozenset(), frozenset(), "the model does not record where its identities come from (an older "
                    "file): everyone is scored")  # fmt: skip
    if not same_source(mine, source):
        return Seen(frozenset(), frozenset(), f"the model's identities come from {mine.get('layout')} data "
                    f"{mine.get('name')!r}, not this data's identity source: everyone is scored")  # fmt: skip
    if source.get("layout") == "folders":
        people = record.get("people") or {}
        names = frozenset(p for key in ("train", "val") for p in people.get(key, []))
        return Seen(frozenset(), names, "folder layout: the model's train and validation people are left out by name")
    return Seen(frozenset(seen_identities(payload)), frozenset(), "the same CelebA identity file: the model's train "
                "and validation identities are left out by number")  # fmt: skip


def model_threshold(payload: dict) -> dict | None:
    """The model's verdict-threshold record (``payload["threshold"]``), or None for a model without one."""
    record = payload.get("threshold")
    return dict(record) if record else None
