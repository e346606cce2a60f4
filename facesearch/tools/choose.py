"""``python -m facesearch choose``: test-time augmentation and re-ranking, chosen on validation identities.

    python -m facesearch choose --model models/dlib_resnet.pt --split data/split --arrays data/arrays/dlib_resnet \\
        --out choices.json [--descriptors DIR ...] [--grid rerank.yaml] [--rounds 10] [--jitters 10]

The validation identities (``val.parquet``: never trained on, never tested on) are
embedded by the model as it is, without and with its test-time flip (``flip_tta``), and with
the flip and ``--jitters`` dlib-style jitters (``tta_jitters``), and each embedding set is
searched with every re-ranking setting of
``--grid`` (a YAML mapping ``name: {evaluate.rerank key: value}``, overrides of
``params.yaml: evaluate.rerank``; by default ``none``, adaptive ``dba_qe``, plain
``dba_qe`` and ``k_reciprocal``) on two kinds of validation gallery:

- ``all``: every query against all the other validation photos (the pipeline's
  test gallery is of this kind); scored by leave-one-out (every photo of a person
  with two or more queries the others, re-ranked leak-free:
  :func:`facesearch.rerank.leave_one_out_metrics`) and by query/gallery rounds;
- ``two``: at most two photos of each person in the gallery (LFW-like: where a
  fixed expansion hurts); scored by query/gallery rounds.

A round (:func:`rounds`, seeded) takes one query photo of every person with at least
two photos and searches a gallery of everything else (``two``: at most two of each
person's other photos); ``--rounds`` rounds average out which photo queries. The gallery
structure of re-ranking is built per round from that round's gallery alone.
``--descriptors DIR`` scores other embeddings of the same photos the same way
(``val.npy`` + ``val.parquet`` with ``crop_path``, e.g. dlib's own descriptors from
``python -m facesearch dlib-reference --set val --save-embeddings DIR``), so a
reference pipeline gets the same treatment. Verification (``ver_auc``,
``ver_tar@far1e-3`` on the validation pairs) is reported per embedding set: re-ranking
does not change pairs. Test identities are never read.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from facesearch.data import manifest as M
from facesearch.params import load_params
from facesearch.retrieval import rerank as R
from facesearch.retrieval import verification as V
from facesearch.retrieval.metrics import identity_metrics

log = logging.getLogger(__name__)

DEFAULT_GRID = {
    "none": {"method": "none"},
    "dba_qe adaptive": {"method": "dba_qe", "adaptive": True},
    "dba_qe plain": {"method": "dba_qe", "adaptive": False},
    "k_reciprocal": {"method": "k_reciprocal"},
}
GALLERIES = ("all", "two")


def rounds(labels: np.ndarray, n_rounds: int, seed: int, per_person: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(query indices, gallery indices) of each round, both ascending.

    Every person with two or more photos gives one query per round (seeded, photos taken in
    a seeded order so that successive rounds query different photos); the gallery is every
    other photo, or at most ``per_person`` of each person's others (seeded).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    people = {p: rng.permutation(np.flatnonzero(labels == p)) for p in np.unique(labels)}
    out = []
    for r in range(n_rounds):
        queries, gallery = [], []
        for photos in people.values():
            if len(photos) < 2:
                gallery.extend(photos[: per_person or len(photos)])
                continue
            q = photos[r % len(photos)]
            queries.append(q)
            rest = photos[photos != q]
            gallery.extend(rng.permutation(rest)[: per_person or len(rest)])
        out.append((np.sort(np.array(queries, np.int64)), np.sort(np.array(gallery, np.int64))))
    return out


def round_scores(emb: np.ndarray, labels: np.ndarray, plan: list, rerank: R.RerankParams) -> dict[str, float]:
    """Rank-1, Rank-5 and mAP over all queries of all rounds of ``plan`` (:func:`rounds`).

    Each query ranks its round's whole gallery through the re-ranking index, so mAP counts
    every relevant photo in its re-ranked place (a top-k search would leave the tail in
    plain order).
    """
    per_query = {"rank1": [], "rank5": [], "mAP": []}
    for q, g in plan:
        index = R.build_rerank_index(R.prepare(emb[g], rerank))
        _, order = index.search(emb[q], len(g))
        m = identity_metrics(order, labels[q], labels[g], ks=(1, 5))
        for key in per_query:
            per_query[key].append((m[key], len(q)))
    return {k: float(sum(v * n for v, n in rows) / sum(n for _, n in rows)) for k, rows in per_query.items()}


def score(emb: np.ndarray, labels: np.ndarray, rerank: R.RerankParams, n_rounds: int, seed: int) -> dict:
    """Every figure of one (embeddings, re-ranking) pair on both kinds of gallery."""
    out = {}
    loo = R.leave_one_out_metrics(emb, labels, rerank)
    if loo is not None:
        out |= {"all loo_rank1": loo["rank1"], "all loo_mAP": loo["mAP"]}
    for kind, per_person in (("all", None), ("two", 2)):
        for key, value in round_scores(emb, labels, rounds(labels, n_rounds, seed, per_person), rerank).items():
            out[f"{kind} {key}"] = value
    return out


def verification(emb: np.ndarray, labels: np.ndarray, params: dict) -> dict:
    genuine, impostor = V.verification_scores(emb, labels, params["impostor_pairs"], params["seed"])
    key = V.far_key(params["far"])
    m = V.verification_metrics(genuine, impostor, (params["far"],))
    # The threshold too: near 1 it says different people crowd against the same-person bulk (issue 26).
    return {"ver_auc": m["roc_auc"], f"ver_tar@far{key}": m[f"tar@far{key}"],
            f"ver_threshold@far{key}": m[f"threshold@far{key}"]}  # fmt: skip


def choose(results: list[dict], base: str) -> dict:
    """The row of embeddings ``base`` to adopt: highest ``all`` mAP whose ``two`` mAP is not below no re-ranking's.

    Leave-one-out mAP where it was measured, else the rounds'. A setting that helps the
    many-photos gallery but hurts the one-or-two-photos one is not safe as a default; on a
    tie, no re-ranking (the cheaper search) wins.
    """
    rows = [r for r in results if r["embeddings"] == base]
    safe = {r["embeddings"]: r["two mAP"] for r in rows if r["method"] == "none"}
    if not rows or set(safe) != {r["embeddings"] for r in rows}:
        raise ValueError("choose: the grid needs a setting with method none (the plain search to hold others against)")
    key = "all loo_mAP" if all("all loo_mAP" in r for r in rows) else "all mAP"
    ok = [r for r in rows if r["two mAP"] >= safe[r["embeddings"]] - 1e-12]
    return max(ok, key=lambda r: (round(r[key], 12), round(r["two mAP"], 12), r["method"] == "none"))


def best_of(chosen: list[dict]) -> dict:
    """Across embedding sets: the higher ``all`` mAP, then ``two`` mAP; on a tie the fewest forward passes."""
    return max(chosen, key=lambda r: (round(r.get("all loo_mAP", r["all mAP"]), 12), round(r["two mAP"], 12),
                                      -r.get("views", 1)))  # fmt: skip


def tta_variants(flip: bool, jitters: int, extra: list[int]) -> list[tuple[bool, int]]:
    """(flip_tta, tta_jitters) to embed with: as saved first, then no flip, flip, and flip with each of ``extra``."""
    out = [(flip, jitters)]
    for v in [(False, 0), (True, 0)] + [(True, n) for n in extra if n > 0]:
        if v not in out:
            out.append(v)
    return out


def tta_name(backbone: str, flip: bool, jitters: int) -> str:
    return f"{backbone} {'+ flip' if flip else 'no flip'}" + (f" + {jitters} jitters" if jitters else "")


def markdown(results: list[dict]) -> str:
    cols = ["all loo_rank1", "all loo_mAP", "all rank1", "all mAP", "two rank1", "two mAP", "ver_auc"]
    cols += sorted({k for r in results for k in r if k.startswith("ver_threshold@")})
    lines = ["| embeddings | re-ranking | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 2)]
    for r in results:
        cells = [f"{r[c]:.4f}" if isinstance(r.get(c), float) else "—" for c in cols]
        lines.append(f"| {r['embeddings']} | {r['rerank']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def model_embeddings(
    model_path: str, split: Path, arrays: Path | None, device: str, jitters: list[int],
) -> dict[str, tuple[np.ndarray, int]]:  # fmt: skip
    """The val embeddings and forward passes per photo of each :func:`tta_variants` of the model, by name."""
    from facesearch.data.packing import load_array
    from facesearch.nets.contract import model_preprocessing
    from facesearch.nets.inference import embed_array
    from facesearch.nets.models import load_model, resolve_device

    dev = resolve_device(device)
    model, payload = load_model(model_path, map_location=dev)
    face, size = model_preprocessing(payload)
    table = pd.read_parquet(split / "val.parquet")
    arrays = Path("data/arrays") / model.config.backbone if arrays is None else arrays  # the chips stage's
    images = load_array(arrays / "val.npy", len(table), crop_side=face.size, min_side=size)
    out = {}
    for flip, n in tta_variants(model.config.flip_tta, model.config.tta_jitters, jitters):
        model.config = dataclasses.replace(model.config, flip_tta=flip, tta_jitters=n)
        name = tta_name(model.config.backbone, flip, n)
        out[name] = embed_array(model, images, size, dev, desc=name), 1 + flip + n
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("choose", help=__doc__.splitlines()[0], description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", required=True, help="a trained model, e.g. models/dlib_resnet.pt")
    p.add_argument("--split", default="data/split", help="folder with val.parquet")
    p.add_argument(
        "--arrays", default=None, help="folder with the model's val.npy chips (default: data/arrays/<backbone>)"
    )
    p.add_argument("--descriptors", action="append", default=[], metavar="DIR",
                   help="also score DIR/val.npy (rows of DIR/val.parquet's crop_path); repeatable")  # fmt: skip
    p.add_argument("--grid", default=None, help="YAML: name -> evaluate.rerank overrides (default: the four methods)")
    p.add_argument("--rounds", type=int, default=10, help="query/gallery rounds per gallery kind")
    p.add_argument("--seed", type=int, default=0, help="which photos query and which two stay, per round")
    p.add_argument(
        "--jitters", default="10", help="comma-separated tta_jitters to try with the flip (dlib's 10; '' none)"
    )
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="JSON with every row and the choice")


def main(args) -> None:
    from facesearch.io import write_json_atomic

    params = load_params(args.params)
    grid = yaml.safe_load(Path(args.grid).read_text()) if args.grid else DEFAULT_GRID
    split = Path(args.split)
    val = pd.read_parquet(split / "val.parquet")
    labels = val[M.IDENTITY].to_numpy()
    jitters = [int(n) for n in args.jitters.split(",") if n.strip()]
    sets = model_embeddings(args.model, split, args.arrays and Path(args.arrays), args.device, jitters)
    candidates = list(sets)
    for folder in map(Path, args.descriptors):
        index = pd.read_parquet(folder / "val.parquet")
        if sorted(index[M.CROP_PATH]) != sorted(val[M.CROP_PATH]):
            raise SystemExit(f"choose: {folder}/val.parquet does not list this split's validation photos")
        row = {path: i for i, path in enumerate(index[M.CROP_PATH])}
        sets[folder.name] = np.load(folder / "val.npy").astype(np.float32)[[row[p] for p in val[M.CROP_PATH]]], None
    results = []
    for name, (emb, views) in sets.items():
        emb = np.ascontiguousarray(emb / np.linalg.norm(emb, axis=1, keepdims=True), dtype=np.float32)
        ver = verification(emb, labels, params["verification"])
        for setting, overrides in grid.items():
            rerank = R.RerankParams.from_dict(copy.deepcopy(params["evaluate"]["rerank"]) | dict(overrides))
            row = {"embeddings": name, "rerank": setting, "method": rerank.method, "views": views,
                   **score(emb, labels, rerank, args.rounds, args.seed), **ver}  # fmt: skip
            log.info("%s", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
            results.append(row)
    best = best_of([choose(results, name) for name in candidates])
    write_json_atomic(args.out, {"rows": results, "grid": grid, "rounds": args.rounds, "seed": args.seed,
                                 "chosen": best, "n_val_photos": len(labels),
                                 "n_val_identities": len(np.unique(labels))})  # fmt: skip
    print(markdown(results), end="")
    print(f"chosen on validation identities: {best['embeddings']}, re-ranking {best['rerank']}")
