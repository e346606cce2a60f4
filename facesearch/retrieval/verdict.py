"""The verdict a search's user gets: when its best result counts as "this person", and what that promises.

:func:`verdict` turns a model file's calibration (``payload["threshold"]``, written by the train
stage or ``python -m facesearch calibrate``; :func:`facesearch.retrieval.verification.threshold_record`
gives its keys) into the threshold for a gallery of a given size, and says in a sentence what a match
means there (:class:`Verdict`). ``facesearch search``, ``index info``, the app and ``pretrained`` use it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from facesearch.retrieval import verification as V

log = logging.getLogger(__name__)


# Verdict threshold for a model file without payload["threshold"]: FaceNet's (Schroff et al. 2015)
# squared-L2 threshold of 1.1 between unit embeddings, as a cosine (1 - 1.1 / 2). A guess for any
# other model, hence the warning; calibrate one instead (python -m facesearch calibrate).
FALLBACK_THRESHOLD = 0.45


@dataclass(frozen=True)
class Verdict:
    """When a search's best result counts as "this person", and what that promises, for one gallery.

    ``similarity``: a face matches at cosine similarity ``>=`` it. ``fpir``: the share of
    searches for someone *not* in a gallery of ``gallery_faces`` faces that end in a false
    match at this threshold (None when nothing is promised: a manual, fallback or 1:1
    threshold). ``calibrated_on`` names the photos it was measured on; ``synthetic`` is True
    when those were the built-in sample's cartoon faces.
    """

    similarity: float
    gallery_faces: int
    fpir: float | None
    source: str  # "model", "model (1:1)", "--threshold" (or another override's name), "fallback"
    calibrated_on: str | None = None
    synthetic: bool = False

    def meaning(self) -> str:
        """One plain sentence: what a match means in this gallery."""
        faces = f"{self.gallery_faces:,} face{'s' * (self.gallery_faces != 1)}"
        if self.fpir is not None:
            on = f" (calibrated on {self.calibrated_on})" if self.calibrated_on else ""
            return (f"A match means a similarity of at least {self.similarity:.3f}, set so that at most "
                    f"{_rate(self.fpir)} searches for someone who is not among these {faces} ends in a false "
                    f"match{on}.")  # fmt: skip
        if self.source == "model (1:1)":
            return (f"A match means a similarity of at least {self.similarity:.3f}, a threshold for comparing two "
                    f"faces: searched against {faces}, a stranger gets {self.gallery_faces:,} chances to clear it, "
                    "so the false-match rate grows with the gallery (calibrate the model for searches: python -m "
                    "facesearch calibrate).")  # fmt: skip
        if self.source == "fallback":
            return (f"A match means a similarity of at least {self.similarity:.3f}, a guess: the model carries no "
                    "calibrated threshold, so nothing is promised (python -m facesearch calibrate).")  # fmt: skip
        return (f"A match means a similarity of at least {self.similarity:.3f}, as set by {self.source}; nothing is "
                "promised.")  # fmt: skip

    def warning(self) -> str | None:
        """A loud line when the threshold must not be trusted on real photos; None otherwise."""
        if self.synthetic and self.source.startswith("model"):
            return ("WARNING: this model's threshold was calibrated on the synthetic sample's cartoon faces; on real "
                    "photos its verdicts mean nothing. Calibrate it on labelled real photos first: python -m "
                    "facesearch calibrate --model MODEL --data DIR.")  # fmt: skip
        return None


def _rate(p: float) -> str:
    """0.01 -> "1 in 100"; 0.003 -> "1 in 333"."""
    return f"1 in {round(1 / p):,}" if 0 < p < 1 else f"{p:g} of all"


def verdict(payload: dict, gallery_faces: int, override: float | None = None, override_name: str = "--threshold",
            fpir: float | None = None) -> Verdict:  # fmt: skip
    """The verdict of searches with ``payload``'s model in a gallery of ``gallery_faces`` faces.

    ``override`` (a threshold the user set) wins; else the model's identification calibration
    (:func:`facesearch.retrieval.verification.identification_threshold` at this size, at ``fpir`` or the
    calibrated target); else its older 1:1 threshold (said so); else :data:`FALLBACK_THRESHOLD`
    with a warning.
    """
    record = payload.get("threshold") or {}
    data = record.get("data") or {}
    calibrated_on, synthetic = data.get("description"), bool(data.get("synthetic", False))
    if override is not None:
        return Verdict(float(override), int(gallery_faces), None, override_name)
    found = V.verdict_threshold(record, gallery_faces, fpir)
    if found is not None and found[1] == "identification":
        target = float(record["identification"]["fpir"] if fpir is None else fpir)
        return Verdict(found[0], int(gallery_faces), target, "model", calibrated_on, synthetic)
    if found is not None:
        return Verdict(found[0], int(gallery_faces), None, "model (1:1)", calibrated_on, synthetic)
    log.warning("the model carries no verdict threshold (payload['threshold']): using the fallback %.2f; calibrate "
                "it with python -m facesearch calibrate, or pass --threshold", FALLBACK_THRESHOLD)  # fmt: skip
    return Verdict(FALLBACK_THRESHOLD, int(gallery_faces), None, "fallback")
