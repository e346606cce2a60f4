"""``python -m facesearch evaluate``: score a trained model on any labelled folder.

    python -m facesearch evaluate --model models/resnet50.pt --data DIR --out OUT.json

``DIR`` is in either labelled layout (facesearch.data.layouts): CelebA, or one folder
per person (LFW, VGGFace2, CASIA-WebFace), detected or forced with ``--layout``.
The protocol is the pipeline's own: leave out the people the model was
trained or validated on, where this folder names people as the model's data
did (:mod:`facesearch.tools.labelled`: by number for data of the same CelebA
identity file, by person name for person folders; otherwise nobody, and
``seen_rule`` says which rule applied; counted as
``n_identities_excluded_seen``, named in ``excluded_seen_people`` under the
folder layout); ``--trained-elsewhere`` leaves nobody out. Then crop every other photo as the model's own
training crops were cut (its recorded preprocessing; ``--crop-params FILE``
overrides it with that file's ``crop`` block), keep identities with at least
two kept photos, pick one query per identity (seeded), put every other kept
photo in the gallery, embed with the model (with its test-time flip, when it
has one), search exactly, re-ranked as ``--params``' ``evaluate.rerank`` says for the
model's backbone (``params.yaml`` here by default; ``--rerank none`` turns it off), and write
Rank-1/5/10, mAP, Recall@k, leave-one-out Rank-k/mAP (``loo_*``: every kept
photo queries all the others, as the evaluate stage reports), open-set
identification as the stage reports it (``open<gallery>_*``: TPIR at FPIR 1e-2
and 1e-1, FNIR and FPIR at the model's own verdict for each gallery's size), the attribute
agreement (where the folder has attributes), the numbers of queries and
gallery images and the crop keep rate of the photos cropped.

At CelebA scale the photos are cropped and then packed (decoded, resized to the
model's input side) by ``--n-jobs`` worker processes into memory-mapped arrays
in a temporary folder (facesearch.data.packing, as the pack stage does), and
embedded a chunk at a time, so memory does not grow with the number of photos.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from facesearch.data import manifest as M
from facesearch.data.celeba import DatasetError
from facesearch.data.layouts import AUTO, FOLDERS, LABELLED_LAYOUTS, read_dataset
from facesearch.faces.cropping import image_guards
from facesearch.io import write_bytes_atomic, write_json_atomic
from facesearch.nets.contract import crop_settings
from facesearch.nets.models import ModelFileError, failure_line, load_model, resolve_device
from facesearch.params import load_params
from facesearch.retrieval import rerank as R
from facesearch.retrieval import verification as V
from facesearch.retrieval.metrics import attribute_matrix, evaluate, readable
from facesearch.retrieval.protocol import choose_queries, eligible_images
from facesearch.threads import use_usable_cpus
from facesearch.tools import calibrate, choose, fuse, index_cli, pretrained, tune
from facesearch.tools.labelled import crop_entries, embed_crops, unseen_entries

log = logging.getLogger(__name__)

# Open-set galleries (people) and FPIRs reported without a params file: params.yaml's defaults.
OPEN_SET_SIZES, OPEN_SET_FPIRS = (10, 100), (0.01, 0.1)


def evaluate_folder(
    model_path: str, data: str, crop_params: str | None = None, seed: int = 0, n_jobs: int = -1,
    ks: tuple[int, ...] = (10, 20, 50, 100, 1000), device: str = "auto", layout: str = AUTO,
    trained_elsewhere: bool = False, rerank: dict | None = None, params_file: str | None = None,
) -> dict:  # fmt: skip
    """Run the protocol above; returns the metrics dict written to OUT.json.

    ``rerank``: ``params.yaml: evaluate.rerank`` (the model's backbone picks its method); None: plain search.
    ``params_file``: its ``verification.open_set_sizes``/``open_set_fpirs`` shape the open-set report.
    """
    dev = resolve_device(device)
    model, payload = load_model(model_path, map_location=dev)
    if crop_params and not Path(crop_params).is_file():
        raise SystemExit(f"evaluate: --crop-params {crop_params} does not exist")
    crop_block, face, size = crop_settings(payload, crop_params, override=True)
    crop = image_guards(crop_block)
    dataset = read_dataset(data, layout)  # entry paths are absolute: a joblib worker may sit elsewhere
    # A score on people the model was trained or selected on would flatter it.
    unseen = unseen_entries(payload, dataset, data, trained_elsewhere)
    entries = unseen.entries
    if not entries and unseen.excluded_ids:
        raise SystemExit(f"evaluate: all {len(unseen.excluded_ids)} identities in {data} were seen by the model in "
                         f"training or validation ({unseen.seen.rule}); nothing unseen is left to score")  # fmt: skip
    n_all = len(entries)
    with tempfile.TemporaryDirectory(prefix="facesearch-eval-") as tmp:
        table = crop_entries(entries, dataset, face, crop, Path(tmp), n_jobs)
        images = eligible_images(table, 2)
        if images.empty:
            raise SystemExit(f"evaluate: no identity in {data} has two photos with a usable face")
        query, gallery = choose_queries(images, np.random.default_rng(seed))
        model.to(dev)
        emb = {name: embed_crops(model, t[M.CROP_PATH], Path(tmp), name, size, dev, n_jobs)
               for name, t in (("query", query), ("gallery", gallery))}  # fmt: skip
    q_emb, g_emb = emb["query"], emb["gallery"]

    q_labels, g_labels = query[M.IDENTITY].to_numpy(), gallery[M.IDENTITY].to_numpy()
    rr = R.RerankParams.from_dict(rerank, model.config.backbone)
    metrics, _, _ = evaluate(q_emb, q_labels, g_emb, g_labels, R.build_rerank_index(R.prepare(g_emb, rr)), ks=ks,
                             query_attrs=attribute_matrix(query), gallery_attrs=attribute_matrix(gallery))  # fmt: skip
    metrics.update(R.loo_metrics(q_emb, q_labels, g_emb, g_labels, rr))
    # Open-set identification as the evaluate stage reports it, at the verdict the model's users get.
    ver = load_params(params_file)["verification"] if params_file and Path(params_file).is_file() else {}
    open_set, _ = V.open_set_report(np.concatenate([q_emb, g_emb]), np.concatenate([q_labels, g_labels]),
                                    payload.get("threshold"), ver.get("open_set_sizes", OPEN_SET_SIZES),
                                    ver.get("open_set_fpirs", OPEN_SET_FPIRS), seed, 2)  # fmt: skip
    metrics.update(open_set)
    metrics["rerank"] = rr.as_params()
    metrics["flip_tta"] = model.config.flip_tta
    metrics["tta_jitters"] = model.config.tta_jitters
    kept = int((table[M.STATUS] == M.Status.KEPT).sum())
    metrics.update({
        "keep_rate": round(kept / n_all, 4) if n_all else 0.0, "n_images": n_all, "n_kept": kept,
        "n_identities": int(images[M.IDENTITY].nunique()), "n_identities_excluded_seen": len(unseen.excluded_ids),
        "model": str(model_path), "data": str(data), "layout": dataset.layout,
        "excluded_seen_people": unseen.excluded_people if dataset.layout == FOLDERS else None,
        "seen_rule": unseen.seen.rule, "backbone": model.config.backbone, "seed": seed,
        "crop": asdict(face), "crop_source": crop_params or "model",
    })  # fmt: skip
    return readable(metrics)


RESULT_COLUMNS = (("rank1", "Rank-1"), ("rank5", "Rank-5"), ("rank10", "Rank-10"), ("mAP", "mAP"),
                  ("recall@10", "Recall@10"), ("attr_match@10", "attr. match@10"))  # fmt: skip


def results_table(metrics_dir: str, backbones: list[str]) -> str:
    """Markdown table of ``<metrics_dir>/<backbone>.json``, before and after fine-tuning.

    Those are the evaluate stage's details (``metrics/details/``, every metric of both states),
    not its headline files: the table has Rank-5/10, Recall@10 and the protocol's size too.
    """
    lines = ["| backbone | model | " + " | ".join(t for _, t in RESULT_COLUMNS) + " | queries | gallery |",
             "| --- | --- | " + " | ".join("---" for _ in RESULT_COLUMNS) + " | --- | --- |"]  # fmt: skip
    for backbone in backbones:
        path = Path(metrics_dir) / f"{backbone}.json"
        try:
            m = json.loads(path.read_text())
            # Each state as the evaluate stage named it ("untrained (random weights)"), else generically.
            rows = {m[state].get("model", label): (m[state], m[state]["n_queries"], m[state]["n_gallery"])
                    for state, label in M.STATE_LABELS.items()}  # fmt: skip
        except (ValueError, KeyError, TypeError) as exc:  # not JSON, or not the evaluate stage's
            raise SystemExit(f"results: {path} is no metrics file of the evaluate stage ({exc!r})") from None
        for label, (row, n_queries, n_gallery) in rows.items():
            cells = [f"{row[k]:.3f}" if isinstance(row.get(k), float | int) else "—" for k, _ in RESULT_COLUMNS]
            lines.append(f"| {backbone} | {label} | " + " | ".join(cells) + f" | {n_queries} | {n_gallery} |")
    return "\n".join(lines) + "\n"


def metrics_show_block(repo: Path) -> str:
    """``dvc metrics show`` of ``repo``'s working tree as a fenced block, as the README shows it.

    DVC's own table (its column order and widths), lines stripped of the trailing spaces DVC pads
    them with; run by ``results --readme``, so the README's block is a command's output, not typed.
    """
    import os
    import subprocess

    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show"], cwd=repo, env=env, capture_output=True,
                         text=True)  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"results: dvc metrics show failed in {repo}: {out.stderr.strip()}")
    return "```text\n" + "".join(line.rstrip() + "\n" for line in out.stdout.splitlines()) + "```\n"


def replace_section(text: str, name: str, body: str) -> str:
    """Replace what lies between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"results: markers {start} / {end} not found")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}{end}{tail}"


def cli_rerank(params_file: str, method: str | None) -> dict | None:
    """``evaluate.rerank`` of ``params_file`` (None when there is none), ``method`` forcing the method."""
    rerank = load_params(params_file)["evaluate"]["rerank"] if Path(params_file).is_file() else {}
    if method is not None:
        rerank = {**rerank, "method": method, "method_by_backbone": {}}
    return rerank or None


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    # `facesearch ...` (the installed command) or `python -m facesearch ...`: usage lines say what was typed.
    prog = "facesearch" if Path(sys.argv[0]).name == "facesearch" else "python -m facesearch"
    parser = argparse.ArgumentParser(prog=prog, description="facesearch command line")
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help=__doc__.splitlines()[0], description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ev.add_argument("--model", required=True, help="a trained model, e.g. models/resnet50.pt")
    ev.add_argument("--data", required=True, help="labelled folder: CelebA layout or one folder per person")
    ev.add_argument(
        "--layout",
        choices=LABELLED_LAYOUTS,
        default=AUTO,
        help="celeba, folders (<data>/<person>/*.jpg) or auto (detect; default)",
    )
    ev.add_argument(
        "--trained-elsewhere",
        action="store_true",
        help="the model was trained on other data: its identity numbers mean other people here, "
        "so none is left out as seen",
    )
    ev.add_argument("--out", required=True, help="metrics JSON to write")
    ev.add_argument("--crop-params", default=None, metavar="FILE",
                    help="crop with this params file's crop block, not the model's recorded preprocessing")  # fmt: skip
    ev.add_argument("--seed", type=int, default=0, help="which photo of each identity is its query")
    ev.add_argument("--n-jobs", type=int, default=-1, help="crop and pack worker processes (-1: all cores)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--params", default="params.yaml",
                    help="its evaluate.rerank re-ranks the search (no file: plain search)")  # fmt: skip
    ev.add_argument("--rerank", default=None, choices=R.METHODS, help="this re-ranking method instead of the params'")
    ref = sub.add_parser("dlib-reference", help="dlib's own pipeline on the split's test or val set (needs dlib)")
    ref.add_argument("--data", required=True, help="the CelebA-layout folder the crop stage read (data.root)")
    ref.add_argument("--split", default="data/split", help="folder with query/gallery.parquet (test), val.parquet")
    ref.add_argument("--out", required=True, help="metrics JSON to write")
    ref.add_argument("--landmarks", type=int, default=68, choices=(5, 68), help="shape predictor")
    ref.add_argument("--set", default="test", choices=("test", "val"), help="test: the split's query/gallery "
                     "(default); val: the validation identities, one seeded query each")  # fmt: skip
    ref.add_argument("--seed", type=int, default=0, help="--set val: RNG seed of the query choice")
    ref.add_argument("--rerank", default="none", choices=R.METHODS,
                     help="search re-ranked by this method, with --params' other evaluate.rerank settings "
                     "(default none: dlib's plain search)")  # fmt: skip
    ref.add_argument("--params", default="params.yaml", help="evaluate.rerank settings for --rerank")
    ref.add_argument("--jitters", type=int, default=0, help="dlib's num_jitters: mean descriptor of N jittered "
                     "chips (0 and 1: the plain chip)")  # fmt: skip
    ref.add_argument("--save-embeddings", default=None, metavar="DIR", help="also write the raw descriptors: "
                     "DIR/<set>.npy and DIR/<set>.parquet (crop_path, identity, role)")  # fmt: skip
    chk = sub.add_parser("check-data", help="what a crop run would reject and why, without detecting; exit 1 if "
                         "DVC could not hash an entry (FIFO, socket, broken symlink)")  # fmt: skip
    chk.add_argument("dir", help="labelled folder: CelebA layout or one folder per person")
    chk.add_argument("--layout", choices=LABELLED_LAYOUTS, default=AUTO, help="celeba, folders or auto (default)")
    chk.add_argument("--params", default="params.yaml", help="crop limits (crop.max_file_bytes, max_pixels, ...; "
                     "the defaults when there is no such file)")  # fmt: skip
    chk.add_argument("--json", action="store_true", help="print the full report as JSON")
    tune.add_parser(sub)
    choose.add_parser(sub)
    calibrate.add_parser(sub)
    fuse.add_parser(sub)
    pretrained.add_parser(sub)
    index_cli.add_parsers(sub)  # index build|add|remove|info, search: your own photos (facesearch.gallery)
    res = sub.add_parser("results", help="Markdown results table from metrics/details/<backbone>.json")
    res.add_argument("--metrics", default="metrics/details", help="folder with the evaluate stage's <backbone>.json "
                     "details")  # fmt: skip
    res.add_argument("--backbones", default=None, help="comma-separated (default: params.yaml backbones)")
    res.add_argument("--params", default="params.yaml")
    res.add_argument("--readme", default=None, help="rewrite this file's marked section instead of printing")
    res.add_argument("--section", default="results-sample", help="marker name in the README")
    res.add_argument("--show-section", default="metrics-show", help="with --readme: marker name of the README's "
                     "`dvc metrics show` block, rewritten from this checkout ('' to leave it)")  # fmt: skip
    args = parser.parse_args(argv)
    # Every command that embeds (evaluate, calibrate, choose, index, search) does so with one thread
    # per CPU this process may use; tune's runs set training's fixed count themselves.
    use_usable_cpus()
    try:
        _run(args)
    except (DatasetError, ModelFileError, OSError) as exc:
        # The failures every command expects of the paths it is given (an unusable data folder,
        # a file that is no model, a missing or unreadable file or folder): one line saying why,
        # for the user, whichever command read it (index and search included), not a traceback.
        raise SystemExit(f"{args.command}: {failure_line(exc)}") from None


def _run(args: argparse.Namespace) -> None:
    if args.command == "tune":
        return tune.main(args)
    if args.command == "choose":
        return choose.main(args)
    if args.command == "calibrate":
        return calibrate.main(args)
    if args.command == "fuse":
        return fuse.main(args)
    if args.command == "pretrained":
        return pretrained.main(args)
    if args.command in ("index", "search"):
        return index_cli.main(args)
    if args.command == "check-data":
        from facesearch.tools.checkdata import run

        raise SystemExit(run(args.dir, args.params, args.json, args.layout))
    if args.command == "results":
        from facesearch.params import load_params

        backbones = args.backbones.split(",") if args.backbones else load_params(args.params)["backbones"]
        table = results_table(args.metrics, backbones)
        if args.readme:
            path = Path(args.readme)
            text = replace_section(path.read_text(), args.section, table)
            if args.show_section:
                text = replace_section(text, args.show_section, metrics_show_block(Path.cwd()))
            write_bytes_atomic(path, text.encode())
        else:
            print(table, end="")
    elif args.command == "dlib-reference":
        from facesearch.tools.dlib_reference import reference_metrics, save_descriptors, set_tables

        if not Path(args.data).is_dir():  # else the first photo would say so, after dlib's models are read
            raise SystemExit(f"dlib-reference: data folder {args.data} does not exist")
        tables = set_tables(args.split, args.set, args.seed)
        rerank = cli_rerank(args.params, args.rerank)
        rr = R.RerankParams.from_dict(rerank)
        metrics, desc, table = reference_metrics(*tables, args.data, args.landmarks, args.jitters, rr)
        metrics["set"] = args.set
        if args.save_embeddings:
            save_descriptors(args.save_embeddings, args.set, desc, table)
        write_json_atomic(args.out, metrics)
        json.dump({k: metrics[k] for k in ("rank1", "rank5", "mAP", "loo_rank1", "loo_mAP")}, sys.stdout)
        print()
    elif args.command == "evaluate":
        metrics = evaluate_folder(
            args.model,
            args.data,
            args.crop_params,
            args.seed,
            args.n_jobs,
            device=args.device,
            layout=args.layout,
            trained_elsewhere=args.trained_elsewhere,
            rerank=cli_rerank(args.params, args.rerank),
            params_file=args.params,
        )
        write_json_atomic(args.out, metrics)
        json.dump({k: metrics.get(k) for k in ("rank1", "rank5", "rank10", "mAP", "loo_mAP", "openall_tpir@fpir1e-2",
                                               "openall_fnir", "openall_fpir", "n_queries", "n_gallery",
                                               "n_identities_excluded_seen", "keep_rate")}, sys.stdout)  # fmt: skip
        print()
        print(metrics["seen_rule"], file=sys.stderr)


if __name__ == "__main__":
    main()
