"""dlib-reference: which images a set scores, how descriptors are scored and saved, dlib's jitter."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import fake_manifest
from PIL import Image

from facesearch.data import manifest as M
from facesearch.tools.cli import main as cli_main
from facesearch.tools.dlib_reference import ROLE, dlib_descriptors, save_descriptors, score, set_tables


def _split(tmp_path):
    df = fake_manifest({1: 3, 2: 4, 3: 2, 4: 5, 5: 3})
    kept = df[df[M.STATUS] == "kept"].reset_index(drop=True)
    split = tmp_path / "split"
    split.mkdir()
    kept[kept[M.IDENTITY] <= 3].to_parquet(split / "val.parquet")
    kept[kept[M.IDENTITY] == 4].head(1).to_parquet(split / "query.parquet")
    kept[kept[M.IDENTITY] >= 4].iloc[1:].to_parquet(split / "gallery.parquet")
    return split, kept


def test_val_set_is_one_seeded_query_per_identity_and_test_is_the_split(tmp_path):
    split, kept = _split(tmp_path)
    q, g = set_tables(split, "val", seed=0)
    val = kept[kept[M.IDENTITY] <= 3]
    assert sorted(q[M.IDENTITY]) == [1, 2, 3]
    assert sorted([*q[M.CROP_PATH], *g[M.CROP_PATH]]) == sorted(val[M.CROP_PATH])
    q_again, _ = set_tables(split, "val", seed=0)
    assert list(q_again[M.CROP_PATH]) == list(q[M.CROP_PATH])
    others = {tuple(set_tables(split, "val", seed=s)[0][M.CROP_PATH]) for s in range(8)}
    assert len(others) > 1  # the seed decides which image queries
    tq, tg = set_tables(split, "test")
    assert list(tq[M.CROP_PATH]) == list(pd.read_parquet(split / "query.parquet")[M.CROP_PATH])
    assert len(tg) == 4 + 3  # identity 4 less its query, and identity 5
    with pytest.raises(ValueError, match="set"):
        set_tables(split, "train")


def test_score_ignores_descriptor_norms_and_matches_brute_force():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    gl = np.repeat(np.arange(4), 5)
    ql = np.arange(4)
    g = centres[gl] + 0.9 * rng.normal(size=(20, 16))
    q = centres[ql] + 0.9 * rng.normal(size=(4, 16))
    scaled = score(q * rng.uniform(0.5, 2, (4, 1)), ql, g * rng.uniform(0.5, 2, (20, 1)), gl)
    assert scaled == pytest.approx(score(q, ql, g, gl))
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    assert scaled["rank1"] == pytest.approx(np.mean(gl[cos.argmax(1)] == ql))
    both, labels = np.concatenate([q, g]), np.concatenate([ql, gl])
    n = both / np.linalg.norm(both, axis=1, keepdims=True)
    sim = n @ n.T
    np.fill_diagonal(sim, -np.inf)
    assert scaled["loo_rank1"] == pytest.approx(np.mean(labels[sim.argmax(1)] == labels))
    assert scaled["rerank"] == "none"


def test_score_reranks_like_the_evaluate_stage():
    from facesearch.retrieval.rerank import RerankParams, loo_metrics

    rng = np.random.default_rng(1)
    gl, ql = np.repeat(np.arange(6), 6), np.arange(6)
    g, q = rng.normal(size=(36, 16)) + 3 * np.eye(16)[gl], rng.normal(size=(6, 16)) + 3 * np.eye(16)[ql]
    params = RerankParams.from_dict({"method": "dba_qe"})
    got = score(q, ql, g, gl, params)
    qn, gn = (a / np.linalg.norm(a, axis=1, keepdims=True) for a in (q, g))
    assert got["rerank"] == "dba_qe" and got["loo_reranked"] is True
    assert got["loo_mAP"] == pytest.approx(loo_metrics(qn, ql, gn, gl, params)["loo_mAP"])


def test_saved_descriptors_name_their_rows(tmp_path):
    split, _ = _split(tmp_path)
    q, g = set_tables(split, "val", seed=0)
    table = pd.concat([q.assign(**{ROLE: "query"}), g.assign(**{ROLE: "gallery"})], ignore_index=True)
    desc = np.random.default_rng(1).normal(size=(len(table), 128)).astype(np.float32)
    save_descriptors(tmp_path / "emb", "val", desc, table)
    assert np.array_equal(np.load(tmp_path / "emb" / "val.npy"), desc)
    saved = pd.read_parquet(tmp_path / "emb" / "val.parquet")
    assert list(saved.columns) == [M.CROP_PATH, M.IDENTITY, ROLE]
    assert list(saved[M.CROP_PATH]) == list(table[M.CROP_PATH])
    assert (saved[ROLE] == "query").sum() == 3


def _real_faces(celeba_dev, tmp_path, n=2):
    """A manifest-shaped table of the first celeba-dev photos dlib's HOG detector finds a face in."""
    from facesearch.faces.dlib_hog import detect_hog

    rows = []
    for path in sorted((celeba_dev / "img_celeba").glob("*.jpg")):
        det = detect_hog(np.asarray(Image.open(path).convert("RGB")), 1, "largest", 1024)
        if det.chosen is not None:
            x, y, w, h = det.chosen
            rows.append({M.IMAGE_PATH: f"img_celeba/{path.name}", M.BBOX_X: x, M.BBOX_Y: y, M.BBOX_W: w,
                         M.BBOX_H: h, M.IDENTITY: len(rows) // 2, M.CROP_PATH: f"crops/{path.stem}.png"})  # fmt: skip
        if len(rows) == n:
            return pd.DataFrame(rows)
    pytest.skip("no faces found in celeba-dev")


def test_jitters_0_and_1_are_the_plain_chip_more_average_jittered_copies(celeba_dev, tmp_path):
    pytest.importorskip("dlib", reason="dlib not installed: pip install -r requirements-face.txt")
    table = _real_faces(celeba_dev, tmp_path, 1)
    plain = dlib_descriptors(table, str(celeba_dev))
    assert np.array_equal(dlib_descriptors(table, str(celeba_dev), jitters=1), plain)
    jittered = dlib_descriptors(table, str(celeba_dev), jitters=3)
    assert not np.array_equal(jittered, plain)
    cos = float(jittered[0] @ plain[0] / np.linalg.norm(jittered[0]) / np.linalg.norm(plain[0]))
    assert cos > 0.95  # the same face: jitter moves the descriptor a little


def test_cli_scores_val_and_saves_its_descriptors(celeba_dev, tmp_path):
    pytest.importorskip("dlib", reason="dlib not installed: pip install -r requirements-face.txt")
    table = _real_faces(celeba_dev, tmp_path, 4)  # identities 0, 0, 1, 1
    split = tmp_path / "split"
    split.mkdir()
    table.to_parquet(split / "val.parquet")
    out, emb = tmp_path / "ref.json", tmp_path / "emb"
    cli_main(["dlib-reference", "--data", str(celeba_dev), "--split", str(split), "--set", "val", "--out",
              str(out), "--save-embeddings", str(emb)])  # fmt: skip
    metrics = json.loads(out.read_text())
    assert metrics["set"] == "val"
    assert metrics["n_queries"] == 2 and metrics["n_gallery"] == 2 and metrics["loo_queries"] == 4
    saved = pd.read_parquet(emb / "val.parquet")
    assert sorted(saved[M.CROP_PATH]) == sorted(table[M.CROP_PATH])
    assert np.load(emb / "val.npy").shape == (4, 128)
