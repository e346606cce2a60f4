"""``python -m facesearch fuse``: one model file from several, each network on its own chip of a face.

    python -m facesearch fuse --models models/dlib_resnet.pt models/sface.pt --out models/fused.pt \\
        --data ~/faces/labelled [--split data/split]
    python -m facesearch fuse --models a.pt b.pt --weights 0.6,0.4 --out fused.pt

The members must find faces alike (one detection per face: the same detector settings); each
keeps its own chip, input side and test-time augmentation (:mod:`facesearch.nets.fused`). The
result is a model file like any other: ``index build``, ``search``, the app, ``evaluate`` and
``calibrate`` take it.

With ``--data`` (a labelled folder, as ``calibrate`` reads) the member weights are chosen there,
on a grid of ``--step``, by leave-one-out mAP of the fused embeddings, and the verdict is then
calibrated on the same people: so choose on people you will not score the model on. With
``--split`` (the pipeline's split of ``--data``) only its **validation** identities are used, the
people the members were selected on but never trained on. With ``--weights`` instead, the weights
are yours and the file has no calibrated verdict until ``calibrate`` gives it one.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict

import numpy as np

from facesearch.data.layouts import AUTO, LABELLED_LAYOUTS
from facesearch.nets import fused as FU
from facesearch.nets.models import ModelFileError, failure_line, load_model, resolve_device, save_model
from facesearch.retrieval.metrics import leave_one_out_map
from facesearch.tools.calibrate import CalibrationError, folder_embeddings, settings, summary_lines, verdict_record

log = logging.getLogger(__name__)


class FuseError(RuntimeError):
    """The models cannot be fused as asked; the message says why, for the user."""


def parse_weights(text: str, n: int) -> list[float]:
    try:
        weights = [float(x) for x in text.split(",")]
    except ValueError:
        raise FuseError(f"--weights {text!r}: comma-separated numbers, one per model") from None
    if len(weights) != n:
        raise FuseError(f"--weights gives {len(weights)} numbers for {n} models")
    try:
        return list(FU.normalised_weights(weights))
    except ValueError as exc:
        raise FuseError(str(exc)) from None


def member_parts(fused: np.ndarray, dims: list[int], weights: list[float]) -> list[np.ndarray]:
    """Each member's unit embeddings back from fused ones (every weight > 0)."""
    bounds = np.cumsum([0, *dims])
    return [fused[:, a:b] / np.sqrt(w) for a, b, w in zip(bounds[:-1], bounds[1:], weights, strict=True)]


def fuse_models(
    models: list[str], out: str, weights: str | None = None, data: str | None = None, split: str | None = None,
    step: float = 0.1, params_file: str | None = "params.yaml", layout: str = AUTO, n_jobs: int = -1,
    device: str = "auto", trained_elsewhere: bool = False,
) -> dict:  # fmt: skip
    """Write the fused model of ``models`` to ``out``; returns its ``fused`` record (and ``threshold``)."""
    if len(models) < 2:
        raise FuseError("a fused model needs two or more model files")
    if (weights is None) == (data is None):
        raise FuseError("give either --data (choose the weights there) or --weights")
    loaded = []
    for path in models:
        try:
            loaded.append(load_model(path))
        except (ModelFileError, OSError) as exc:
            raise FuseError(failure_line(exc)) from None
    names = [m.config.backbone for m, _ in loaded]
    start = parse_weights(weights, len(models)) if weights else [1 / len(models)] * len(models)
    try:
        net, extra = FU.fused_payload([m for m, _ in loaded], [p for _, p in loaded], names, start)
    except ValueError as exc:
        raise FuseError(str(exc)) from None
    if data is not None:
        cfg = settings(params_file, None, None)
        dev = resolve_device(device)
        # One pass over the folder with equal weights gives every member's embeddings at once.
        payload = {"config": asdict(net.config), **extra}
        emb, labels, record = folder_embeddings(
            net, payload, data, layout=layout, trained_elsewhere=trained_elsewhere, n_jobs=n_jobs, device=dev,
            split=split, parts=("val",), purpose="fuse",
        )  # fmt: skip
        parts = member_parts(emb, [m.config.embedding_dim for m in net.members], list(net.weights))
        chosen = FU.choose_weights(parts, labels, leave_one_out_map, step)
        for name, part in zip(names, parts, strict=True):
            log.info("fuse: %s alone, LOO mAP %.4f", name, leave_one_out_map(part, labels))
        log.info("fuse: weights %s, LOO mAP %.4f on %s", chosen["weights"], chosen["score"], record["description"])
        net, extra = FU.fused_payload([m for m, _ in loaded], [p for _, p in loaded], names, chosen["weights"],
                                      chosen={"on": record, "score": "leave-one-out mAP", **chosen})  # fmt: skip
        extra["threshold"] = verdict_record(FU.fuse(parts, chosen["weights"]), labels, cfg, record, data)
    save_model(out, net.cpu(), extra=extra)
    return {"fused": extra["fused"], **({"threshold": extra["threshold"]} if "threshold" in extra else {})}


def add_parser(sub) -> None:
    p = sub.add_parser("fuse", help=__doc__.splitlines()[0], description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--models", nargs="+", required=True, metavar="MODEL.pt", help="two or more model files")
    p.add_argument("--out", required=True, help="the fused model file to write")
    p.add_argument("--weights", default=None, help="comma-separated member weights (instead of --data)")
    p.add_argument("--data", default=None, help="labelled folder to choose the weights and calibrate on")
    p.add_argument("--split", default=None, metavar="DIR",
                   help="the pipeline's split of --data: use only its validation identities")  # fmt: skip
    p.add_argument("--step", type=float, default=0.1, help="weight grid step (default 0.1)")
    p.add_argument("--params", default="params.yaml", help="its verification block gives the calibration settings")
    p.add_argument("--layout", choices=LABELLED_LAYOUTS, default=AUTO)
    p.add_argument("--trained-elsewhere", action="store_true",
                   help="no member saw anyone in --data: nobody is left out")  # fmt: skip
    p.add_argument("--n-jobs", type=int, default=-1, help="crop and pack worker processes (-1: all cores)")
    p.add_argument("--device", default="auto")


def main(args: argparse.Namespace) -> None:
    if not 0 < args.step <= 0.5 or abs(round(1 / args.step) * args.step - 1) > 1e-9:
        raise SystemExit(f"fuse: --step must divide 1 (0.1, 0.05, 0.25, ...), not {args.step}")
    try:
        record = fuse_models(args.models, args.out, args.weights, args.data, args.split, args.step, args.params,
                             args.layout, args.n_jobs, args.device, args.trained_elsewhere)  # fmt: skip
    except (FuseError, CalibrationError) as exc:
        raise SystemExit(f"fuse: {exc}") from None
    fused = record["fused"]
    members = ", ".join(f"{m['name']} {w:.2f}" for m, w in zip(fused["members"], fused["weights"], strict=True))
    print(f"wrote {args.out}: {members}")
    if "threshold" in record:
        print("\n".join(summary_lines(record["threshold"], args.out)[1:]))
    else:
        print("no verdict calibrated yet: python -m facesearch calibrate --model", args.out, "--data DIR")
