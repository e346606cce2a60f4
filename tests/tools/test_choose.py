"""``python -m facesearch choose``: the validation rounds, their scores against brute force, the
choice rule, and one end-to-end run that never sees a test identity."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import run_train

from facesearch.data import manifest as M
from facesearch.retrieval.rerank import RerankParams
from facesearch.tools.choose import best_of, choose, round_scores, rounds, tta_name, tta_variants
from facesearch.tools.cli import main as cli_main


def test_each_round_queries_one_photo_of_every_person_against_the_rest():
    labels = np.array([0] * 5 + [1] * 3 + [2] + [3] * 2)
    plan = rounds(labels, 6, seed=0, per_person=None)
    again = rounds(labels, 6, seed=0, per_person=None)  # seeded: the same draw twice
    assert all(np.array_equal(a, c) and np.array_equal(b, d) for (a, b), (c, d) in zip(plan, again, strict=True))
    for q, g in plan:
        assert sorted(labels[q]) == [0, 1, 3]  # person 2 has one photo: gallery only
        assert np.intersect1d(q, g).size == 0 and sorted(np.concatenate([q, g])) == list(range(len(labels)))
    # successive rounds query different photos of a person while it has some left
    assert len({int(q[labels[q] == 0][0]) for q, _ in plan[:5]}) == 5


def test_two_keeps_at_most_two_other_photos_of_each_person():
    labels = np.repeat(np.arange(4), [6, 3, 1, 2])
    for q, g in rounds(labels, 4, seed=1, per_person=2):
        assert np.bincount(labels[g], minlength=4).max() <= 2
        assert np.bincount(labels[g], minlength=4)[1] == 2 and np.intersect1d(q, g).size == 0


def brute_scores(emb, labels, plan):
    """Rank-1 and mAP by ranking every gallery photo by cosine similarity, one query at a time."""
    first, ap = [], []
    for q, g in plan:
        for i in q:
            order = g[np.argsort(-(emb[g] @ emb[i]), kind="stable")]
            hits = np.flatnonzero(labels[order] == labels[i]) + 1
            first.append(hits[0] == 1)
            ap.append(np.mean(np.arange(1, len(hits) + 1) / hits))
    return np.mean(first), np.mean(ap)


def test_round_scores_without_re_ranking_equal_brute_force():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(12), rng.integers(1, 8, 12))
    emb = rng.normal(size=(len(labels), 8)) + 1.5 * np.eye(8)[labels % 8]  # some people look alike
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    plan = rounds(labels, 3, seed=2, per_person=None)
    got = round_scores(emb, labels, plan, RerankParams.from_dict({"method": "none"}))
    rank1, mean_ap = brute_scores(emb, labels, plan)
    assert got["rank1"] == pytest.approx(rank1) and got["mAP"] == pytest.approx(mean_ap, abs=1e-6)
    # mAP counts the whole ranking: re-ranking changes it even with more relevant photos than any top-10
    dba = round_scores(emb, labels, plan, RerankParams.from_dict({"method": "dba_qe", "adaptive": False}))
    assert dba["mAP"] != pytest.approx(got["mAP"], abs=1e-6)


def row(embeddings, setting, method, all_map, two_map, views=1):
    return {"embeddings": embeddings, "rerank": setting, "method": method, "all loo_mAP": all_map,
            "all mAP": all_map, "two mAP": two_map, "views": views}  # fmt: skip


def test_the_choice_is_the_best_setting_that_does_not_hurt_the_two_photo_gallery():
    rows = [row("m + flip", "plain", "none", 0.90, 0.80), row("m + flip", "greedy", "dba_qe", 0.99, 0.70),
            row("m + flip", "safe", "dba_qe", 0.95, 0.80), row("m + flip", "kr", "k_reciprocal", 0.93, 0.85),
            row("other", "x", "dba_qe", 1.0, 1.0), row("m + flip + 10 jitters", "x", "none", 1.0, 1.0)]  # fmt: skip
    assert choose(rows, "m + flip")["rerank"] == "safe"  # another set whose name starts alike is not m + flip
    # on a tie the plain search wins (cheaper); the baseline is found by its method, not its name
    assert choose([row("m", "plain", "none", 0.9, 0.8), row("m", "a", "dba_qe", 0.9, 0.8)], "m")["rerank"] == "plain"
    with pytest.raises(ValueError, match="method none"):
        choose([row("m", "a", "dba_qe", 0.9, 0.8)], "m")


def test_the_fewest_forward_passes_win_a_tie():
    flip, plain = row("m + flip", "a", "none", 0.9, 0.8, views=2), row("m no flip", "a", "none", 0.9, 0.8)
    jitter = row("m + flip + 10 jitters", "a", "none", 0.9, 0.8, views=12)
    assert best_of([jitter, flip, plain]) is plain
    assert best_of([jitter, flip | {"all loo_mAP": 0.91}, plain])["embeddings"] == "m + flip"
    assert best_of([jitter | {"two mAP": 0.81}, flip, plain]) is not plain


def test_tta_variants_put_the_saved_setting_first_and_never_twice():
    assert tta_variants(True, 0, [10]) == [(True, 0), (False, 0), (True, 10)]
    assert tta_variants(True, 10, [10, 0]) == [(True, 10), (False, 0), (True, 0)]
    assert tta_name("m", True, 10) == "m + flip + 10 jitters" and tta_name("m", False, 0) == "m no flip"


@pytest.mark.slow
def test_choose_scores_flip_and_descriptors_on_validation_identities_only(prepared, tmp_path):
    # A copy without query/gallery tables or arrays: choose cannot read the test identities.
    work = tmp_path / "work"
    for rel in ("data/split/train.parquet", "data/split/val.parquet", "data/split/triplets.parquet",
                "data/arrays/train.npy", "data/arrays/train.json", "data/arrays/val.npy",
                "data/arrays/val.json", "data/source.json", "params.yaml"):  # fmt: skip
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(prepared / rel, work / rel)
    model = run_train(work, "m", {"epochs": 1, "tta_jitters": 0}) / "model.pt"  # saved as flip, no jitter
    val = pd.read_parquet(work / "data/split/val.parquet")
    desc = work / "ref"
    desc.mkdir()
    # another pipeline's descriptors of the same photos, rows in another order
    shuffled = val[[M.CROP_PATH]].iloc[::-1].reset_index(drop=True)
    shuffled.to_parquet(desc / "val.parquet")
    np.save(desc / "val.npy", np.random.default_rng(0).normal(size=(len(val), 8)).astype(np.float32))
    cwd = os.getcwd()
    os.chdir(work)
    try:
        cli_main(["choose", "--model", str(model), "--descriptors", "ref", "--rounds", "2", "--jitters", "2",
                  "--out", "c.json", "--arrays", "data/arrays"])  # fmt: skip
        result = json.loads((work / "c.json").read_text())
        shuffled.iloc[1:].to_parquet(desc / "val.parquet")  # a photo missing: refused, not misaligned
        with pytest.raises(SystemExit, match="validation photos"):
            cli_main(["choose", "--model", str(model), "--descriptors", "ref", "--out", "d.json", "--arrays",
                      "data/arrays"])  # fmt: skip
    finally:
        os.chdir(cwd)
    names = {r["embeddings"] for r in result["rows"]}
    assert names == {"mobilenet_v2 + flip", "mobilenet_v2 no flip", "mobilenet_v2 + flip + 2 jitters", "ref"}
    assert len(result["rows"]) == 4 * 4 and result["chosen"] in result["rows"]
    assert {r["views"] for r in result["rows"] if r["embeddings"] != "ref"} == {1, 2, 4}
    assert result["chosen"]["embeddings"] != "ref"  # the choice is among the model's own settings
    assert result["n_val_photos"] == len(val)
    for r in result["rows"]:
        assert 0 <= r["two mAP"] <= 1 and "all loo_mAP" in r and "ver_auc" in r and "ver_threshold@far1e-3" in r
