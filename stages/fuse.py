"""Stage ``fuse@<name>``: two trained backbones as one model, weights chosen on the validation identities.

    python -m stages.fuse --name resnet50_mobilenet_v2 --models models/resnet50.pt models/mobilenet_v2.pt \
        --embeddings data/embeddings/resnet50 data/embeddings/mobilenet_v2 \
        --out models/resnet50_mobilenet_v2.pt --embeddings-out data/embeddings/resnet50_mobilenet_v2

``params.yaml: fusions.<name>`` names the members; each keeps its own chip of the one detected
face, its own input side and test-time augmentation (:mod:`facesearch.nets.fused`). Nothing is
re-embedded: the members' exported embeddings (stage ``embed``) are fused with
:func:`facesearch.nets.fused.fuse`, the same formula the fused network computes from photos. The
member weights are the grid point (``fusions.<name>.step``) of best leave-one-out mAP on the
members' trained ("after") validation embeddings, and the verdict is calibrated on the fused
validation embeddings, as train calibrates each backbone's; the test identities are not read.

Writes the fused model file and ``data/embeddings/<name>/`` in the embed stage's layout
(``{before,after}_{query,gallery,val}.npy``, the row tables, ``threshold.json``), so ``evaluate``
scores it like any backbone ("before": the members' starting networks fused with the same weights).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from facesearch.data import manifest as M
from facesearch.io import atomic_dir, write_json_atomic, write_parquet_atomic
from facesearch.nets import fused as FU
from facesearch.nets.models import ModelFileError, failure_line, load_model, save_model
from facesearch.params import load_params
from facesearch.retrieval.metrics import leave_one_out_map
from facesearch.retrieval.verification import calibrate

log = logging.getLogger("facesearch.fuse")

SETS = ("query", "gallery", "val")  # the embed stage's
STATES = ("before", "after")


def read_member(folder: Path) -> dict:
    """A member's exported embeddings: ``{(state, set): array}``, its row tables and its threshold record."""
    out = {"tables": {s: pd.read_parquet(folder / f"{s}.parquet") for s in SETS},
           "threshold": json.loads((folder / "threshold.json").read_text())}  # fmt: skip
    out["emb"] = {(state, s): np.load(folder / f"{state}_{s}.npy") for state in STATES for s in SETS}
    return out


def check_same_faces(members: list[dict], names: list[str]) -> None:
    """Every member embedded the same rows (one detection per photo): else fused rows would mix faces."""
    for name, member in zip(names[1:], members[1:], strict=True):
        for s in SETS:
            if not member["tables"][s].equals(members[0]["tables"][s]):
                raise SystemExit(f"fuse: {name}'s {s} rows are not {names[0]}'s: members must embed the same faces")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="the params.yaml fusions entry")
    parser.add_argument("--models", nargs="+", required=True, help="the members' model files, in fusions order")
    parser.add_argument("--embeddings", nargs="+", required=True, help="the members' embed stage folders")
    parser.add_argument("--out", required=True, help="the fused model file")
    parser.add_argument("--embeddings-out", required=True, help="folder for the fused embeddings")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    spec = (params.get("fusions") or {}).get(args.name)
    if spec is None:
        raise SystemExit(f"fuse: params.yaml has no fusions.{args.name}")
    if len(args.models) != len(spec["members"]) or len(args.embeddings) != len(spec["members"]):
        raise SystemExit(f"fuse: fusions.{args.name} lists {len(spec['members'])} members")
    loaded = []
    for path in args.models:
        try:
            loaded.append(load_model(path))
        except (ModelFileError, OSError) as exc:
            raise SystemExit(f"fuse: {failure_line(exc)}") from None
    names = list(spec["members"])
    members = [read_member(Path(folder)) for folder in args.embeddings]
    check_same_faces(members, names)
    labels = {s: members[0]["tables"][s][M.IDENTITY].to_numpy() for s in SETS}

    val = [m["emb"][("after", "val")] for m in members]
    for name, emb in zip(names, val, strict=True):
        log.info("%s alone: validation LOO mAP %.4f", name, leave_one_out_map(emb, labels["val"]))
    chosen = FU.choose_weights(val, labels["val"], leave_one_out_map, float(spec["step"]))
    log.info("weights %s: validation LOO mAP %.4f", chosen["weights"], chosen["score"])

    verification = params["verification"]
    data = dict((members[0]["threshold"] or {}).get("data") or {})
    data["identities"] = "validation (the member weights were chosen on them too)"
    fused_emb = {key: FU.fuse([m["emb"][key] for m in members], chosen["weights"]) for key in members[0]["emb"]}
    threshold = calibrate(fused_emb[("after", "val")], labels["val"], verification["far"], verification["fars"],
                          verification["impostor_pairs"], verification["seed"], verification["fpir"], data)  # fmt: skip
    net, extra = FU.fused_payload([m for m, _ in loaded], [p for _, p in loaded], names, chosen["weights"],
                                  chosen={"on": "validation identities", "score": "leave-one-out mAP",
                                          **chosen})  # fmt: skip
    if threshold is not None:
        extra["threshold"] = threshold
    save_model(args.out, net, extra=extra)
    with atomic_dir(args.embeddings_out) as tmp:
        write_json_atomic(tmp / "threshold.json", threshold)
        for s in SETS:
            write_parquet_atomic(tmp / f"{s}.parquet", members[0]["tables"][s])
        for (state, s), emb in fused_emb.items():
            np.save(tmp / f"{state}_{s}.npy", emb)
    log.info("wrote %s and %s", args.out, args.embeddings_out)


if __name__ == "__main__":
    main()
