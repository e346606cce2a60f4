"""``python -m facesearch tune``: choose a fine-tuning recipe on validation identities, over seeds.

    python -m facesearch tune --backbone dlib_resnet --grid recipes.yaml --seeds 0,1,2 --out tune.json

Each recipe of ``--grid`` (a YAML mapping ``name: {train param: value, ...}``,
overrides of ``params.yaml: train.<backbone>``) is trained once per seed by the
train stage itself, on the pipeline's ``data/split`` and ``data/arrays/<backbone>``. The
score of a run is what the train stage selects its best epoch on: retrieval
among the *validation* identities (disjoint from train and test). The untrained
network's validation score is reported beside them as ``zero-shot``. Test
identities (query/gallery) are never read here: the chosen recipe goes into
``params.yaml`` and is scored once, by ``dvc repro`` (evaluate).

Distillation recipes are chosen the same way: ``--teacher models/dlib_resnet.pt``
with recipes of ``loss: distill`` (see ``stages/train.py``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from facesearch.params import load_params

log = logging.getLogger(__name__)

SCORES = ("mAP", "rank1", "rank5")
# The kept weights' verdict thresholds, also on the validation identities: the 1:1 one at
# verification.far and the identification one for a gallery of TAIL_GALLERY faces. Near 1 they say
# different people crowd against the same-person bulk, whatever the ranking scores (issue 26).
THRESHOLDS = ("threshold", "threshold_id")
TAIL_GALLERY = 100


ZERO_SHOT = "zero-shot (untrained)"


def run_scores(payload: dict) -> dict[str, dict[str, float]]:
    """Validation scores of a trained model file: its best *trained* epoch, and the untrained network.

    Not the epoch the file kept: under ``keep: best`` that can be the start (epoch -1), and
    every recipe would then score the untrained network's figures, telling recipes apart by
    nothing. The start is the ``zero_shot`` row, compared with the recipes in the summary.
    """
    history = payload["history"]
    trained = [r for r in history if r["epoch"] >= 0] or history
    best = max(trained, key=lambda r: (r["val_mAP"], -r["epoch"]))  # the earliest of equal epochs
    pick = {"best": best, "zero_shot": next(r for r in history if r["epoch"] == -1)}
    return {name: {s: float(r[f"val_{s}"]) for s in SCORES} for name, r in pick.items()}


def thresholds(payload: dict) -> dict[str, float | None]:
    """:data:`THRESHOLDS` of a trained model file (None where its record lacks one)."""
    from facesearch.retrieval.verification import identification_threshold

    record = payload.get("threshold") or {}
    ident = record.get("identification")
    return {"threshold": record.get("similarity"),
            "threshold_id": identification_threshold(ident, TAIL_GALLERY) if ident else None}  # fmt: skip


def summarise(runs: dict[str, list[dict[str, float]]]) -> list[dict]:
    """Mean and sample standard deviation per recipe, best validation mAP first."""
    rows = []
    for name, scores in runs.items():
        row: dict = {"recipe": name, "seeds": len(scores)}
        for s in SCORES:
            values = np.array([sc[s] for sc in scores])
            row[f"{s}_mean"] = float(values.mean())
            row[f"{s}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else None  # JSON has no NaN
        for s in THRESHOLDS:
            values = [sc[s] for sc in scores if sc.get(s) is not None]
            row[f"{s}_mean"] = float(np.mean(values)) if values else None
        rows.append(row)
    # On a tie the untrained network wins: no fine-tuning is the cheaper choice.
    return sorted(rows, key=lambda r: (-r["mAP_mean"], -r["rank1_mean"], r["recipe"] != ZERO_SHOT, r["recipe"]))


def markdown(rows: list[dict]) -> str:
    lines = [f"| recipe | seeds | val mAP | val Rank-1 | val Rank-5 | val threshold at FAR | val threshold, "
             f"{TAIL_GALLERY} faces |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        cells = [f"{r[f'{s}_mean']:.4f} ± {r[f'{s}_sd'] or 0:.4f}" for s in SCORES]
        cells += ["—" if r.get(f"{s}_mean") is None else f"{r[f'{s}_mean']:.4f}" for s in THRESHOLDS]
        lines.append(f"| {r['recipe']} | {r['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check_grid(grid: dict[str, dict], base: dict, backbone: str, teacher: str | None) -> None:
    """Every recipe can run (or a SystemExit naming it), checked before the first of hours of training."""
    for name, overrides in grid.items():
        unknown = set(overrides) - set(base)
        if unknown:
            raise SystemExit(f"tune: recipe {name}: unknown train.{backbone} keys {sorted(unknown)}")
        if (overrides.get("loss", base.get("loss")) == "distill") != bool(teacher):
            raise SystemExit(f"tune: recipe {name}: " + ("--teacher trains only recipes of loss: distill" if teacher
                             else "loss: distill needs --teacher MODEL"))  # fmt: skip


def check_inputs(split: str, arrays: str, teacher: str | None) -> None:
    """The data folders exist and the teacher is a model (or a one-line failure naming ``tune``).

    Each run of the train stage would find out too, but say ``train: ...``, from inside the
    first recipe's run.
    """
    from facesearch.nets.models import load_model

    for folder in (split, arrays):
        if not Path(folder).is_dir():
            raise SystemExit(f"tune: data folder {folder} does not exist")
    if teacher is not None:
        load_model(teacher)  # ModelFileError or OSError: the command line words it as tune's


def tune(
    backbone: str, grid: dict[str, dict], seeds: list[int], params_path: str, split: str, arrays: str,
    teacher: str | None = None,
) -> dict:  # fmt: skip
    """Train every recipe of ``grid`` with every seed; returns the per-run and summary scores."""
    from stages import train  # the stage itself, so a recipe trains exactly as dvc repro trains it

    base = load_params(params_path)
    runs: dict[str, list[dict[str, float]]] = {}
    zero_shot: list[dict[str, float]] = []
    per_run = []
    check_grid(grid, base["train"][backbone], backbone, teacher)
    check_inputs(split, arrays, teacher)
    with tempfile.TemporaryDirectory(prefix="facesearch-tune-") as tmp:
        for name, overrides in grid.items():
            for seed in seeds:
                params = copy.deepcopy(base)
                params["train"][backbone].update(overrides, seed=seed)
                run_dir = Path(tmp) / f"{name}-{seed}"
                run_dir.mkdir()
                (run_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
                log.info("recipe %s, seed %d", name, seed)
                with contextlib.redirect_stderr(io.StringIO()):  # tqdm bars of every run: noise here
                    train.main(["--backbone", backbone, "--split", split, "--arrays", arrays,
                                "--out", str(run_dir / "model.pt"), "--checkpoint", str(run_dir / "ckpt"),
                                "--live", str(run_dir / "live"), "--params", str(run_dir / "params.yaml"),
                                *(["--teacher", teacher] if teacher else [])])  # fmt: skip
                payload = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
                scores = run_scores(payload)
                tail = thresholds(payload)
                runs.setdefault(name, []).append(scores["best"] | tail)
                per_run.append({"recipe": name, "seed": seed, "kept_epoch": payload["best_epoch"], **scores["best"],
                                **tail})  # fmt: skip
                if name == next(iter(grid)):
                    zero_shot.append(scores["zero_shot"])
                log.info(
                    "  val %s", {k: None if v is None else round(v, 4) for k, v in (scores["best"] | tail).items()}
                )
    summary = summarise({**runs, ZERO_SHOT: zero_shot})
    return {"backbone": backbone, "teacher": teacher, "seeds": seeds, "grid": grid, "runs": per_run, "summary": summary,
            "chosen": next(r["recipe"] for r in summary)}  # fmt: skip


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help=__doc__.splitlines()[0], description=__doc__,
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--backbone", required=True)
    p.add_argument("--grid", required=True, help="YAML: recipe name -> train.<backbone> overrides")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--split", default="data/split")
    p.add_argument("--arrays", default=None, help="the backbone's chip arrays (default: data/arrays/<backbone>)")
    p.add_argument("--out", required=True, help="JSON with every run and the summary")
    p.add_argument("--teacher", help="recipes of loss: distill distil this saved model (e.g. models/dlib_resnet.pt)")


def main(args) -> None:
    from facesearch.io import write_json_atomic

    grid = yaml.safe_load(Path(args.grid).read_text())
    if not isinstance(grid, dict) or not all(isinstance(v, dict) for v in grid.values()):
        raise SystemExit("tune: --grid must map recipe names to mappings of train params")
    result = tune(args.backbone, grid, [int(s) for s in args.seeds.split(",")], args.params, args.split,
                  args.arrays or f"data/arrays/{args.backbone}",
                  args.teacher)  # fmt: skip
    write_json_atomic(args.out, result)
    print(markdown(result["summary"]), end="")
    print(f"chosen on validation identities: {result['chosen']}")
