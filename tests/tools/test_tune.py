"""Recipe choice on validation identities, over seeds, without the test identities."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml
from conftest import TINY, TINY_CROP, run_train, write_params

from facesearch.tools.cli import main as cli_main
from facesearch.tools.tune import ZERO_SHOT, check_grid, summarise


def test_summary_is_mean_and_sd_best_first():
    rows = summarise({"a": [{"mAP": 0.5, "rank1": 0.5, "rank5": 1.0}, {"mAP": 0.7, "rank1": 0.5, "rank5": 1.0}],
                      "b": [{"mAP": 0.9, "rank1": 1.0, "rank5": 1.0}]})  # fmt: skip
    assert [r["recipe"] for r in rows] == ["b", "a"]
    assert abs(rows[1]["mAP_mean"] - 0.6) < 1e-12 and abs(rows[1]["mAP_sd"] - 0.1414213562) < 1e-9
    assert rows[0]["mAP_sd"] is None  # one seed: no spread to report


def test_tune_trains_every_recipe_and_seed_on_validation_only(prepared, tmp_path):
    # A copy without query/gallery: tuning cannot read the test identities.
    work = tmp_path / "work"
    for rel in ("data/split/train.parquet", "data/split/val.parquet", "data/split/triplets.parquet",
                "data/arrays/train.npy", "data/arrays/train.json", "data/arrays/val.npy",
                "data/arrays/val.json"):  # fmt: skip
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(prepared / rel, work / rel)
    # keep: last, so each run's score is what its recipe and seed trained (the start would tie them all).
    recipe = TINY | {"epochs": 1, "keep": "last"}
    write_params(work / "params.yaml", {f"train.mobilenet_v2.{k}": v for k, v in recipe.items()} | TINY_CROP)
    (work / "grid.yaml").write_text(yaml.safe_dump({"slow": {"lr": 1e-5}, "fast": {"lr": 3e-3}}))
    cwd = os.getcwd()
    os.chdir(work)
    try:
        cli_main(["tune", "--backbone", "mobilenet_v2", "--grid", "grid.yaml", "--seeds", "0,1", "--out", "t.json",
                  "--arrays", "data/arrays"])  # fmt: skip
    finally:
        os.chdir(cwd)
    result = json.loads((work / "t.json").read_text())
    assert sorted((r["recipe"], r["seed"]) for r in result["runs"]) == [("fast", 0), ("fast", 1), ("slow", 0),
                                                                        ("slow", 1)]  # fmt: skip
    assert {r["recipe"] for r in result["summary"]} == {"slow", "fast", "zero-shot (untrained)"}
    best = max(result["summary"], key=lambda r: r["mAP_mean"])
    assert result["chosen"] == best["recipe"]
    assert all(r["seeds"] == 2 for r in result["summary"])
    # Each run's verdict thresholds on the validation identities, beside its ranking scores.
    # (float32 cosines: a hair above 1 where the tiny runs put different people together)
    assert all(-1 <= r[k] <= 1 + 1e-5 for r in result["runs"] for k in ("threshold", "threshold_id"))
    assert result["summary"][0]["threshold_mean"] is not None or result["summary"][0]["recipe"] == ZERO_SHOT
    # Different seeds are different runs (else the spread would be meaningless).
    slow = [r for r in result["runs"] if r["recipe"] == "slow"]
    assert slow[0]["mAP"] != slow[1]["mAP"] or slow[0]["rank1"] != slow[1]["rank1"]


def test_a_run_scores_its_best_trained_epoch_even_when_the_start_was_kept():
    from facesearch.tools.tune import run_scores

    def rec(epoch, m):
        return {"epoch": epoch, "val_mAP": m, "val_rank1": m, "val_rank5": m}

    payload = {"best_epoch": -1, "history": [rec(-1, 0.9), rec(0, 0.7), rec(1, 0.8), rec(2, 0.8)]}
    scores = run_scores(payload)
    assert scores["best"]["mAP"] == 0.8 and scores["zero_shot"]["mAP"] == 0.9


def test_on_a_tie_no_fine_tuning_is_chosen():
    from facesearch.tools.tune import ZERO_SHOT

    same = [{"mAP": 0.9, "rank1": 1.0, "rank5": 1.0}]
    assert summarise({"a": same, ZERO_SHOT: same})[0]["recipe"] == ZERO_SHOT


def test_tune_chooses_distillation_recipes_with_the_teacher(prepared, tmp_path):
    teacher = run_train(prepared, "tune_teacher", {"epochs": 1, "seed": 1, "keep": "last"}) / "model.pt"
    recipe = TINY | {"epochs": 1, "keep": "last", "img_size": 24}
    params = write_params(tmp_path / "params.yaml", {f"train.mobilenet_v2.{k}": v for k, v in recipe.items()}
                          | TINY_CROP)  # fmt: skip
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({"distil": {"loss": "distill", "lr": 3e-3}}))
    cwd = os.getcwd()
    os.chdir(prepared)
    try:
        # A distill recipe trains only with a teacher (train exits otherwise): the run is the proof it got one.
        cli_main(["tune", "--backbone", "mobilenet_v2", "--grid", str(tmp_path / "grid.yaml"), "--seeds", "0",
                  "--params", str(params), "--teacher", str(teacher), "--out", str(tmp_path / "t.json"),
                  "--arrays", "data/arrays"])  # fmt: skip
    finally:
        os.chdir(cwd)
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["teacher"] == str(teacher) and [r["recipe"] for r in result["runs"]] == ["distil"]


def test_a_grid_that_cannot_run_is_refused_before_any_training():
    base = {"loss": "batch_hard", "lr": 1e-3}
    check_grid({"a": {"lr": 3e-3}}, base, "mobilenet_v2", None)
    check_grid({"d": {"loss": "distill"}}, base, "mobilenet_v2", "teacher.pt")
    with pytest.raises(SystemExit, match=r"recipe b: unknown train\.mobilenet_v2 keys"):
        check_grid({"a": {}, "b": {"lrr": 1}}, base, "mobilenet_v2", None)
    # A grid mixing distillation and plain recipes would stop at the first one it cannot train.
    with pytest.raises(SystemExit, match="recipe plain: --teacher trains only"):
        check_grid({"d": {"loss": "distill"}, "plain": {"lr": 3e-3}}, base, "mobilenet_v2", "teacher.pt")
    with pytest.raises(SystemExit, match="recipe d: loss: distill needs --teacher"):
        check_grid({"d": {"loss": "distill"}}, base, "mobilenet_v2", None)


def test_the_documented_distillation_grid_runs_on_params_yaml():
    # README's distillation result comes from docs/distill_grid.yaml: it must stay a grid tune can train.
    from conftest import REPO

    from facesearch.params import load_params

    grid = yaml.safe_load((REPO / "docs" / "distill_grid.yaml").read_text())
    check_grid(grid, load_params(REPO / "params.yaml")["train"]["mobilenet_v2"], "mobilenet_v2", "teacher.pt")
