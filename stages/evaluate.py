"""Stage ``evaluate@<backbone>``: retrieval and verification metrics before and after fine-tuning.

    python -m stages.evaluate --backbone resnet50 --embeddings data/embeddings/resnet50 --split data/split \
        --arrays data/arrays/resnet50 --details metrics/details/resnet50.json \
        --metrics-before metrics/before/resnet50.json \
        --metrics-after metrics/after/resnet50.json --cmc metrics/cmc/resnet50.csv \
        --roc metrics/roc/resnet50.csv --det metrics/det/resnet50.csv --figure reports/retrieval_resnet50.png \
        --timing reports/timing/resnet50.json --rerank data/rerank/resnet50

Reads ``params.yaml: evaluate`` and ``verification``. Every query (one photo of each held-out
identity) searches the gallery (all their other photos) with the
``evaluate.backend`` search index, re-ranked by ``evaluate.rerank`` (the method of
``--backbone`` in ``method_by_backbone``, else ``method``; :mod:`facesearch.retrieval.rerank`, whose
gallery structures go to ``--rerank``: built from the gallery alone, once). ``--details`` gets
``{"before": {...}, "after": {...}}`` with identity Rank-1/5/10 and mAP,
Recall@k, the report's attribute agreement at each k, and
``loo_*``: Rank-k and mAP with every held-out image in turn as the query
against all the others (more queries than identities, so finer-grained);
``val_*``: the same leave-one-out Rank-k and mAP on the *validation* identities, without
re-ranking, as training scores its epochs (the numbers to choose a recipe by: the test
identities are for reporting, never for choosing);
``ver_*``: verification ("same person?") on the *validation* identities' pairs
(all genuine pairs, ``verification.impostor_pairs`` seeded impostor pairs):
ROC AUC, and TAR and the similarity threshold at each of ``verification.fars``
(cosines of unit-length embeddings, as every verdict, also under ``normalize: false``);
``open<gallery>_*``: open-set identification on the test identities as NIST FRVT 1:N
reports it: a seeded half of them may be enrolled, the other half are strangers;
galleries of ``verification.open_set_sizes`` people and of the whole half (``openall``)
are searched by every photo of their people (mated searches) and of the strangers.
``tpir@fpir1e-2`` is the share of mated searches whose top result is right and clears the
threshold that lets 1% of stranger searches through; ``fnir``/``fpir`` are what the
verdict a user is told does at that gallery's size: "after" the model's own record
(``threshold.json`` from embed, calibrated by train on the validation identities),
"before" one calibrated here on the validation identities the same way. Nothing is
chosen on the test identities. ``--det`` gets the DET curve (FNIR at each FPIR) of the
largest gallery. ``--metrics-before`` and ``--metrics-after`` get each state's headline
(:func:`headline`: a few of those numbers under short names), the files dvc.yaml declares as
metrics, so that ``dvc metrics show`` prints one narrow row per backbone and state; the
details stay a plain output (``dvc metrics diff --all --targets <file>`` reads them).
Metrics only, so ``dvc metrics diff`` shows quality changes and nothing else.
``--timing`` gets the search timings (index build, batch search, one-query
p50/p99), which differ on every run and machine: not a DVC output at all (git-ignored),
so that a re-run on the same kind of machine leaves ``dvc.lock`` and the git tree as they were;
``--cmc`` the CMC curves and ``--roc`` the ROC curves (TAR at each FAR target,
validation identities; DVC plots); ``--figure`` a few seeded queries with
their 9 nearest gallery faces, correct identities framed green. The faces are
drawn from the packed query/gallery arrays (``--arrays``, the pixels the model
embedded), not from ``data/crops``: the figure is then a function of this
stage's deps alone, and DVC need not hash every crop file to know it is current
(the manifest does not capture a crop's pixels: its ``sha256`` is the source
photo's, and crop settings or code change the crop without changing it).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from facesearch.data import manifest as M
from facesearch.data.packing import load_array
from facesearch.io import atomic_dir, atomic_path, write_json_atomic
from facesearch.nets.distances import unit_rows
from facesearch.params import load_params
from facesearch.retrieval import rerank as R
from facesearch.retrieval import verification as V
from facesearch.retrieval.knn import cosine_similarity
from facesearch.retrieval.metrics import attribute_matrix, evaluate, leave_one_out_metrics, readable
from facesearch.viz import grid, tile

log = logging.getLogger("facesearch.evaluate")


def headline(metrics: dict, verification: dict) -> dict:
    """The numbers of one state that ``dvc metrics show`` prints, under short names (one narrow row).

    Rank-1 and mAP of the queries, leave-one-out mAP of the test and of the validation
    identities, and the two operating points the verdicts are calibrated for
    (``verification.fpir``, ``verification.far``): TPIR at that FPIR and the shipped verdict's
    FPIR / FNIR on the largest open-set gallery, and 1:1 TAR at that FAR. The details keep their
    long names (``openall_tpir@fpir1e-2`` here is ``tpir@fpir1e-2``). A point that
    ``verification.open_set_fpirs`` / ``fars`` does not report is left out, said in the log.
    """
    fpir, far = V.far_key(verification["fpir"]), V.far_key(verification["far"])
    names = {"rank1": "rank1", "mAP": "mAP", "loo_mAP": "loo_mAP", "val_mAP": "val_mAP",
             f"tpir@fpir{fpir}": f"openall_tpir@fpir{fpir}", "fpir": "openall_fpir", "fnir": "openall_fnir",
             f"tar@far{far}": f"ver_tar@far{far}"}  # fmt: skip
    missing = [long for long in names.values() if long not in metrics]
    if missing:
        log.warning("not in the metrics, so not in the headline: %s", missing)
    return {short: metrics[long] for short, long in names.items() if long in metrics}


def single_query_latency(index, queries: np.ndarray, n: int, k: int = 9) -> tuple[float, float]:
    """p50 and p99 of one-query searches (the app's case), in milliseconds."""
    times = []
    for q in queries[:n]:
        t0 = time.perf_counter()
        index.search(q[None, :], k)
        times.append((time.perf_counter() - t0) * 1000)
    return (float(np.percentile(times, 50)), float(np.percentile(times, 99))) if times else (float("nan"),) * 2


def evaluate_state(
    query, q_table, gallery, g_table, params, rerank: R.RerankParams
) -> tuple[dict, dict, np.ndarray, np.ndarray, R.GalleryStructure]:
    """Metrics, timings, CMC curve, top-K neighbours and the re-ranking structure for one model state.

    Every search is re-ranked by ``rerank`` (``evaluate.rerank``; ``none``: plain search), over
    a structure of the gallery alone, built once. Leave-one-out re-ranks too up to
    ``rerank.loo_max_photos`` photos (one structure per query, built without it), plain above
    (``loo_reranked`` says which).
    """
    start = time.perf_counter()
    structure = R.prepare(gallery, rerank)
    prepare_s = time.perf_counter() - start
    index = R.build_rerank_index(structure, params["backend"], faiss_index=params.get("faiss_index", "flat"))
    build_s = time.perf_counter() - start
    t0 = time.perf_counter()
    metrics, cmc, top = evaluate(
        query, q_table[M.IDENTITY].to_numpy(), gallery, g_table[M.IDENTITY].to_numpy(), index,
        ks=tuple(params["ks"]), query_attrs=attribute_matrix(q_table), gallery_attrs=attribute_matrix(g_table),
    )  # fmt: skip
    search_s = time.perf_counter() - t0
    q_labels, g_labels = q_table[M.IDENTITY].to_numpy(), g_table[M.IDENTITY].to_numpy()
    metrics.update(R.loo_metrics(query, q_labels, gallery, g_labels, rerank))
    if rerank.method != "none" and not metrics["loo_reranked"]:
        log.info("leave-one-out over %d photos > rerank.loo_max_photos: scored without re-ranking",
                 metrics["loo_queries"])  # fmt: skip
    p50, p99 = single_query_latency(index, query, params["latency_queries"])
    timing = {
        "search_backend": params["backend"], "rerank": rerank.method, "rerank_prepare_s": round(prepare_s, 4),
        "index_build_s": round(build_s, 4), "search_eval_s": round(search_s, 4),
        "eval_s": round(build_s + search_s, 4), "query_ms_p50": round(p50, 3), "query_ms_p99": round(p99, 3),
    }  # fmt: skip
    return metrics, timing, cmc, top, structure


def verification_state(val, val_labels, params: dict) -> tuple[dict, dict, dict]:
    """``ver_*`` metrics, the ROC curve and the verdict record (1:1 at ``far``, identification at ``fpir``)
    of one state's val embeddings."""
    genuine, impostor = V.verification_scores(val, val_labels, params["impostor_pairs"], params["seed"])
    fars = tuple(params["fars"])
    metrics = V.verification_metrics(genuine, impostor, fars)
    metrics["auc"] = metrics.pop("roc_auc")
    roc = V.roc_curve(genuine, impostor, params["roc_points"], fars)
    record = V.calibrate(val, val_labels, params["far"], fars, params["impostor_pairs"], params["seed"], params["fpir"])
    return {f"ver_{k}": v for k, v in metrics.items()}, roc, record


def retrieval_figure(
    q_table: pd.DataFrame, g_table: pd.DataFrame, q_images: np.ndarray, g_images: np.ndarray, query: np.ndarray,
    gallery: np.ndarray, top: np.ndarray, n_queries: int, seed: int, size: int = 112,
) -> np.ndarray:  # fmt: skip
    """Rows of: the query (blue), then its 9 nearest gallery faces (green: same identity, red: not).

    ``q_images``/``g_images``: the packed faces, row ``i`` of the table's row ``i`` (memory-mapped:
    only the rows shown are read).
    """
    rng = np.random.default_rng(seed)
    rows = sorted(rng.choice(len(q_table), size=min(n_queries, len(q_table)), replace=False))
    unit_query, unit_gallery = unit_rows(query), unit_rows(gallery)  # the label is a cosine (normalize: false too)
    tiles = []
    for r in rows:
        q_id = int(q_table[M.IDENTITY].iloc[r])
        tiles.append(tile(np.asarray(q_images[r]), f"query id {q_id}", size, (40, 90, 230)))
        for g in top[r, :9]:
            g_id = int(g_table[M.IDENTITY].iloc[g])
            sim = float(cosine_similarity(np.linalg.norm(unit_query[r] - unit_gallery[g])))
            colour = (40, 200, 40) if g_id == q_id else (220, 40, 40)
            tiles.append(tile(np.asarray(g_images[g]), f"{sim:.2f} id {g_id}", size, colour))
    return grid(tiles, cols=10)


def det_table(dets: dict) -> pd.DataFrame:
    """The DET curves of both states on one FPIR axis (each state's own grid; NaN where a state has none)."""
    frames = [pd.DataFrame({"fpir": d["fpir"], s: d["fnir"]}) for s, d in dets.items() if d is not None]
    if not frames:
        return pd.DataFrame(columns=["fpir", *M.STATES])
    table = frames[0]
    for f in frames[1:]:
        table = table.merge(f, on="fpir", how="outer")
    return table.reindex(columns=["fpir", *M.STATES]).sort_values("fpir")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", required=True, help="whose evaluate.rerank.method_by_backbone entry applies")
    parser.add_argument("--embeddings", required=True, help="folder written by the embed stage")
    parser.add_argument("--split", required=True, help="folder with query/gallery .parquet (identities, attributes)")
    parser.add_argument("--arrays", required=True, help="folder with the packed query/gallery .npy (the faces drawn)")
    parser.add_argument("--details", required=True, help="JSON of every metric, before and after (a plain output)")
    parser.add_argument("--metrics-before", required=True, help="JSON of the headline before fine-tuning (DVC metrics)")
    parser.add_argument("--metrics-after", required=True, help="JSON of the headline after fine-tuning (DVC metrics)")
    parser.add_argument("--cmc", required=True, help="CSV of the CMC curves (rank, before, after)")
    parser.add_argument("--roc", required=True, help="CSV of the ROC curves (far, before, after: TAR)")
    parser.add_argument("--det", required=True, help="CSV of the DET curves (fpir, before, after: FNIR) of the "
                        "largest open-set gallery")  # fmt: skip
    parser.add_argument("--figure", required=True, help="PNG of seeded queries and their top 9")
    parser.add_argument("--timing", required=True, help="JSON of the search timings (not a metrics file, not a "
                        "DVC output)")  # fmt: skip
    parser.add_argument("--rerank", required=True, help="folder for each state's gallery re-ranking structure")
    parser.add_argument("--params", default="params.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    all_params = load_params(args.params)
    params, ver_params = all_params["evaluate"], all_params["verification"]
    rerank = R.RerankParams.from_dict(params["rerank"], args.backbone)
    emb_dir, split = Path(args.embeddings), Path(args.split)
    tables = {name: pd.read_parquet(split / f"{name}.parquet") for name in ("query", "gallery", "val")}
    q_table, g_table = tables["query"], tables["gallery"]
    for name, table in tables.items():
        index = pd.read_parquet(emb_dir / f"{name}.parquet")
        if list(index[M.CROP_PATH]) != list(table[M.CROP_PATH]):
            raise SystemExit(f"evaluate: {emb_dir}/{name} embeddings are not of the current split; re-run embed")
    model_threshold = json.loads((emb_dir / "threshold.json").read_text())
    states_file = emb_dir / "states.json"  # what each state is (embed); older embeddings lack it
    labels = json.loads(states_file.read_text()) if states_file.is_file() else dict(M.STATE_LABELS)
    val_labels = tables["val"][M.IDENTITY].to_numpy()
    results, timings, curves, rocs, tops, embeddings, structures, dets = {}, {}, {}, {}, {}, {}, {}, {}
    for state in M.STATES:
        query = np.load(emb_dir / f"{state}_query.npy")
        gallery = np.load(emb_dir / f"{state}_gallery.npy")
        embeddings[state] = query, gallery
        results[state], timings[state], curves[state], tops[state], structures[state] = evaluate_state(
            query, q_table, gallery, g_table, params, rerank
        )
        # Verdicts are cosines of unit rows, as in the index and the app, also for a model saved
        # with normalize: false (its raw dot products are no cosine, and its threshold is one).
        ver, rocs[state], record = verification_state(unit_rows(np.load(emb_dir / f"{state}_val.npy")), val_labels,
                                                      ver_params)  # fmt: skip
        if state == "after" and model_threshold is not None:
            record = model_threshold  # the verdict `facesearch search` and the app give
        elif state == "after":
            log.warning("the model carries no verdict threshold: open-set uses the one calibrated here")
        test = unit_rows(np.concatenate([query, gallery]))
        test_labels = np.concatenate([q_table[M.IDENTITY].to_numpy(), g_table[M.IDENTITY].to_numpy()])
        open_set, dets[state] = V.open_set_report(test, test_labels, record, ver_params["open_set_sizes"],
                                                  ver_params["open_set_fpirs"], ver_params["seed"],
                                                  ver_params["roc_points"])  # fmt: skip
        # Scored as training scores its epochs (the same function, unit rows or not, no re-ranking):
        # "after" is the kept epoch's validation score, "before" the starting network's.
        val_loo = leave_one_out_metrics(np.load(emb_dir / f"{state}_val.npy"), val_labels)
        results[state] |= ver | open_set | {f"val_{k}": v for k, v in val_loo.items()}
    details = {s: {"model": labels[s]} | readable(m) for s, m in results.items()}
    write_json_atomic(args.details, details)
    for state, path in (("before", args.metrics_before), ("after", args.metrics_after)):
        numbers = headline(details[state], ver_params)
        write_json_atomic(path, numbers)
        log.info("%s (%s): %s", state, labels[state], numbers)
    with atomic_dir(args.rerank) as tmp:
        for state, structure in structures.items():
            structure.save(tmp / state)
    write_json_atomic(args.timing, timings)
    cmc = pd.DataFrame({"rank": np.arange(1, len(curves["after"]) + 1), **{s: curves[s] for s in M.STATES}})
    with atomic_path(args.cmc) as tmp:
        cmc.to_csv(tmp, index=False, float_format="%.6f")
    # Both states are scored on the same pairs (labels and seed), so they share the FAR axis.
    assert all(np.array_equal(rocs["after"]["far"], r["far"]) for r in rocs.values())
    roc = pd.DataFrame({"far": rocs["after"]["far"], **{s: rocs[s]["tar"] for s in M.STATES}})
    with atomic_path(args.roc) as tmp:
        roc.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(args.det) as tmp:
        det_table(dets).to_csv(tmp, index=False, float_format="%.6g")
    arrays = Path(args.arrays)
    images = [load_array(arrays / f"{name}.npy", len(t)) for name, t in (("query", q_table), ("gallery", g_table))]
    figure = retrieval_figure(q_table, g_table, *images, *embeddings["after"], tops["after"], params["figure_queries"],
                              params["seed"])  # fmt: skip
    with atomic_path(args.figure) as tmp:
        Image.fromarray(figure).save(tmp, format="PNG")


if __name__ == "__main__":
    main()
