"""Fused models: several face networks, each on its own chip of the same detected face, as one model.

Two networks that err on different faces do better together (issue 28: on celeba-dev's validation
identities dlib's ResNet and SFace averaged beat either alone). A fused model file holds its member
networks (their configs, weights and crop settings) and one weight per member, and is used like any
other model file: the photo index, ``search``, the app, ``python -m facesearch evaluate`` and
``calibrate`` load it with :func:`facesearch.nets.models.load_model` and feed it crops cut with its
crop settings, a :class:`facesearch.faces.sheet.ChipSheet` (each member's chip in its own cell of
one square image).

The embedding is the concatenation of each member's unit embedding (with that member's own
test-time augmentation) scaled by the square root of its weight, the weights summing to 1: so it
has length 1, and the cosine of two fused embeddings is the weighted mean of the members' cosines
(:func:`fuse`, the one formula, which the pipeline's fuse stage applies to embeddings the members
already exported). The weights are chosen on validation identities (:func:`choose_weights`); the
verdict threshold is calibrated on the fused embeddings, like any model's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from facesearch.faces.sheet import ChipSheet
from facesearch.nets.config import ModelConfig
from facesearch.nets.contract import model_preprocessing, preprocessing_record
from facesearch.nets.distances import unit_rows
from facesearch.nets.inference import with_tta
from facesearch.nets.transforms import resized

FUSED = "fused"  # ModelConfig.backbone of a fused model


def normalised_weights(weights: Sequence[float]) -> tuple[float, ...]:
    """``weights`` scaled to sum to 1; each must be >= 0 and one > 0."""
    w = [float(x) for x in weights]
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"fusion weights must be >= 0 with a positive sum, not {list(weights)}")
    total = sum(w)
    return tuple(x / total for x in w)


def fuse(embeddings: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Fused embeddings of the same faces: ``concat(sqrt(w_i) * unit(e_i))`` (unit rows, float32).

    Their dot product is ``sum(w_i * cos_i)``, the weighted mean of the members' cosines.
    """
    w = normalised_weights(weights)
    if len(embeddings) != len(w) or len({len(e) for e in embeddings}) != 1:
        raise ValueError("fuse needs one embedding array per weight, all of the same faces")
    parts = [math.sqrt(wi) * unit_rows(np.asarray(e, np.float64)) for e, wi in zip(embeddings, w, strict=True)]
    return np.concatenate(parts, axis=1).astype(np.float32)


def choose_weights(embeddings: Sequence[np.ndarray], labels: np.ndarray, score, step: float = 0.1) -> dict:
    """The member weights (a grid of ``step``, summing to 1) that maximise ``score(fused, labels)``.

    ``embeddings``: each member's embeddings of the same validation faces; ``score``: e.g. the
    leave-one-out mAP (:func:`facesearch.retrieval.metrics.leave_one_out_metrics`). Ties go to the
    most even weights. Returns ``{"weights", "score", "grid": [[weights, score], ...]}``.
    """
    k = len(embeddings)
    steps = round(1 / step)
    grid = list(_compositions(steps, k))
    scored = []
    for c in grid:
        w = tuple(x / steps for x in c)
        scored.append((float(score(fuse(embeddings, w), labels)), -max(w), w))
    best = max(scored)
    return {"weights": list(best[2]), "score": best[0], "grid": [[list(w), s] for s, _, w in scored]}


def _compositions(n: int, k: int):
    """Every k-tuple of non-negative ints summing to n, with at least one positive."""
    if k == 1:
        yield (n,)
        return
    for first in range(n + 1):
        for rest in _compositions(n - first, k - 1):
            yield (first, *rest)


class FusedNet(nn.Module):
    """The member networks behind one sheet input: (N, 3, S, S) normalised sheets -> (N, sum d) unit rows.

    ``config`` is a :class:`facesearch.nets.config.ModelConfig` with backbone ``fused``, the sheet's
    side as ``img_size`` and no test-time augmentation of its own: each member applies its own
    (:func:`facesearch.nets.inference.with_tta`) on its own chip, so the sheet is never mirrored whole.
    """

    def __init__(self, members: Sequence[nn.Module], sheet: ChipSheet, weights: Sequence[float], config):
        super().__init__()
        if len(members) != len(sheet.members):
            raise ValueError(f"{len(members)} networks for a sheet of {len(sheet.members)} chips")
        self.members = nn.ModuleList(members)
        self.sheet = sheet
        self.weights = normalised_weights(weights)
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for net, (top, left, side), w in zip(self.members, self.sheet.regions(), self.weights, strict=True):
            chip = resized(x[:, :, top : top + side, left : left + side], net.config.img_size)
            emb = torch.nn.functional.normalize(with_tta(net, chip, net.config).float(), dim=1)
            parts.append(math.sqrt(w) * emb)
        return torch.cat(parts, dim=1)


def fused_config_fields(members: Sequence[nn.Module], sheet: ChipSheet) -> dict:
    """The ModelConfig fields of a fused model of ``members`` on ``sheet``."""
    return {"backbone": FUSED, "weights": "none", "embedding_dim": sum(m.config.embedding_dim for m in members),
            "normalize": True, "trainable_layers": 0, "img_size": sheet.size, "flip_tta": False,
            "tta_jitters": 0}  # fmt: skip


def member_records(payloads: Sequence[dict], names: Sequence[str]) -> list[dict]:
    """What a fused file keeps of each member file: its config and crop settings (weights go to the state dict)."""
    out = []
    for payload, name in zip(payloads, names, strict=True):
        face, size = model_preprocessing(payload)
        if isinstance(face, ChipSheet):
            raise ValueError(f"{name} is itself a fused model: fuse its members instead")
        out.append({"name": str(name), "config": dict(payload["config"]),
                    "preprocessing": preprocessing_record(face, size)})  # fmt: skip
    return out


def fused_identities(payloads: Sequence[dict]) -> dict | None:
    """The people any member saw (train and val) and their source: evaluate leaves them all out."""
    records = [p.get("identities") for p in payloads]
    if any(r is None for r in records):
        return None
    out: dict = {"train": sorted({i for r in records for i in r.get("train", [])}),
                 "val": sorted({i for r in records for i in r.get("val", [])})}  # fmt: skip
    sources = [r.get("source") for r in records if r.get("source") is not None]
    if sources:
        out["source"] = sources[0]
        if any(s != sources[0] for s in sources[1:]):
            out["sources"] = sources  # recorded, so a reader can see the members learnt from different data
    people = [r.get("people") for r in records if r.get("people")]
    if people:
        out["people"] = {k: sorted({p for r in people for p in r.get(k, [])}) for k in ("train", "val")}
    return out


def fused_payload(members: Sequence[nn.Module], payloads: Sequence[dict], names: Sequence[str],
                  weights: Sequence[float], chosen: dict | None = None) -> tuple[FusedNet, dict]:  # fmt: skip
    """(the fused network, the extras its file carries besides config and weights) of member models.

    ``members``/``payloads``: loaded member files (:func:`facesearch.nets.models.load_model`);
    ``chosen``: how the weights were chosen (data, score, grid), kept in the file.
    """
    records = member_records(payloads, names)
    sheet = ChipSheet(tuple(model_preprocessing(p)[0] for p in payloads))
    net = FusedNet(members, sheet, weights, ModelConfig(**fused_config_fields(members, sheet)))
    extra = {
        "fused": {"members": records, "weights": list(net.weights), **({"chosen": chosen} if chosen else {})},
        "preprocessing": preprocessing_record(sheet, sheet.size),
    }
    identities = fused_identities(payloads)
    if identities is not None:
        extra["identities"] = identities
    return net.eval(), extra


def rebuild(payload: dict, build_member) -> FusedNet:
    """The fused network a saved payload describes, its weights not yet loaded.

    ``build_member(config_dict)``: an untrained member network of that config
    (:func:`facesearch.nets.models.load_model` passes its own builder).
    """
    fused = payload["fused"]
    members = [build_member(m["config"]) for m in fused["members"]]
    sheet, _ = model_preprocessing(payload)
    if not isinstance(sheet, ChipSheet):
        raise ValueError("a fused model's preprocessing must be a chip sheet")
    return FusedNet(members, sheet, fused["weights"], ModelConfig(**payload["config"]))
