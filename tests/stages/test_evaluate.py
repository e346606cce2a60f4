from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_train, write_params
from PIL import Image

from facesearch.data import manifest as M
from facesearch.data.packing import load_array
from facesearch.nets.models import load_model
from facesearch.params import load_params
from facesearch.retrieval import verification as V
from facesearch.retrieval.metrics import leave_one_out_metrics
from facesearch.tools.cli import evaluate_folder, replace_section, results_table
from facesearch.tools.cli import main as cli_main
from stages import embed, evaluate


@pytest.fixture(scope="module")
def evaluated(prepared):
    """A tiny trained model, its embeddings and its evaluation outputs."""
    run_train(prepared, "ev", {"epochs": 1, "keep": "last"})  # trained weights, whatever val says
    params = write_params(prepared / "ev.yaml", {"embed.batch": 8, "evaluate.ks": [2, 5], "evaluate.latency_queries": 3,
                                                  "evaluate.figure_queries": 2})  # fmt: skip
    cwd = os.getcwd()
    os.chdir(prepared)
    try:
        embed.main(["--model", "ev/model.pt", "--split", "data/split", "--arrays", "data/arrays", "--out", "ev/emb",
                    "--params", str(params)])  # fmt: skip
        evaluate.main(["--backbone", "mobilenet_v2",
                       "--embeddings", "ev/emb", "--split", "data/split", "--arrays", "data/arrays",
                       "--details", "ev/metrics/m.json", "--metrics-before", "ev/before.json",
                       "--metrics-after", "ev/after.json",
                       "--cmc", "ev/cmc.csv", "--roc", "ev/roc.csv", "--det", "ev/det.csv", "--figure", "ev/fig.png",
                       "--timing", "ev/timing.json", "--rerank", "ev/rerank", "--params", str(params)])  # fmt: skip
    finally:
        os.chdir(cwd)
    return prepared / "ev"


def test_embeddings_before_and_after(evaluated, prepared):
    query = pd.read_parquet(prepared / "data/split/query.parquet")
    for state in ("before", "after"):
        emb = np.load(evaluated / "emb" / f"{state}_query.npy")
        assert emb.shape == (len(query), 16) and emb.dtype == np.float32
        assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    assert list(pd.read_parquet(evaluated / "emb" / "query.parquet")["crop_path"]) == list(query["crop_path"])
    # The validation identities too (evaluate calibrates on them), and the model's threshold record.
    val = pd.read_parquet(prepared / "data/split/val.parquet")
    assert list(pd.read_parquet(evaluated / "emb" / "val.parquet")["crop_path"]) == list(val["crop_path"])
    assert np.load(evaluated / "emb" / "after_val.npy").shape == (len(val), 16)
    # "before" is the untrained twin: what the seeded network gives, not the trained one.
    _, payload = load_model(evaluated / "model.pt")
    twin = embed.untrained_twin(payload).eval()
    images = load_array(prepared / "data/arrays/query.npy")
    from facesearch.nets.inference import embed_array

    expected = embed_array(twin, images, 32, torch.device("cpu"), channels_last=True)
    assert np.allclose(np.load(evaluated / "emb" / "before_query.npy"), expected, atol=1e-5)
    assert not np.allclose(np.load(evaluated / "emb" / "after_query.npy"), expected, atol=1e-3)


def test_metrics_shape_cmc_and_figure(evaluated):
    metrics = json.loads((evaluated / "metrics" / "m.json").read_text())
    assert set(metrics) == {"before", "after"}
    for state in metrics.values():
        for key in ("rank1", "rank5", "rank10", "mAP", "recall@2", "recall@5", "attr_match@5", "n_queries",
                    "n_gallery"):  # fmt: skip
            assert key in state, key
        # Timings differ on every run: they would make every `dvc metrics diff` differ.
        assert not {k for k in state if k.endswith(("_s", "_ms_p50", "_ms_p99")) or k == "search_backend"}
        assert 0 <= state["mAP"] <= 1 and state["rank1"] <= state["rank5"] <= state["rank10"]
    timing = json.loads((evaluated / "timing.json").read_text())
    assert {"index_build_s", "eval_s", "query_ms_p50", "query_ms_p99"} <= set(timing["after"])
    cmc = pd.read_csv(evaluated / "cmc.csv")
    assert list(cmc.columns) == ["rank", "before", "after"]
    assert (np.diff(cmc["after"]) >= 0).all() and cmc["after"].iloc[-1] == 1.0
    assert Image.open(evaluated / "fig.png").size == (10 * 112, 2 * 112)
    table = results_table(str(evaluated / "metrics"), ["m"])
    assert table.count("\n") == 4 and "| m | fine-tuned |" in table and "| m | untrained (random weights) |" in table
    text = replace_section("a\n<!-- r:start -->\nold\n<!-- r:end -->\nb", "r", table)
    assert "old" not in text and table in text


def test_headline_is_a_few_details_under_short_names(evaluated, prepared):
    """What `dvc metrics show` prints per state: the details' own values, one narrow row."""
    details = json.loads((evaluated / "metrics" / "m.json").read_text())
    long_names = {"rank1": "rank1", "mAP": "mAP", "loo_mAP": "loo_mAP", "val_mAP": "val_mAP",
                  "tpir@fpir1e-2": "openall_tpir@fpir1e-2", "fpir": "openall_fpir", "fnir": "openall_fnir",
                  "tar@far1e-3": "ver_tar@far1e-3"}  # fmt: skip
    # Each state says what it is: the tiny recipe starts from random weights (issue 26).
    assert json.loads((evaluated / "emb" / "states.json").read_text()) == {
        "before": "untrained (random weights)", "after": "fine-tuned"}  # fmt: skip
    assert (details["before"]["model"], details["after"]["model"]) == ("untrained (random weights)", "fine-tuned")
    for state in ("before", "after"):
        headline = json.loads((evaluated / f"{state}.json").read_text())
        assert headline == {short: details[state][long] for short, long in long_names.items()}, state
        # The validation identities scored as training scores its epochs (its own function, its embeddings).
        labels = pd.read_parquet(prepared / "data/split/val.parquet")[M.IDENTITY].to_numpy()
        val = leave_one_out_metrics(np.load(evaluated / "emb" / f"{state}_val.npy"), labels)
        assert (details[state]["val_mAP"], details[state]["val_rank1"]) == (round(val["mAP"], 4),
                                                                             round(val["rank1"], 4))  # fmt: skip
    # The operating points follow verification.fpir / far; one no metric reports is left out.
    other = {"rank1", "mAP", "loo_mAP", "val_mAP", "tpir@fpir1e-1", "fpir", "fnir", "tar@far1e-2"}
    assert set(evaluate.headline(details["after"], {"fpir": 0.1, "far": 0.01})) == other
    assert "tar@far1e-4" not in evaluate.headline(details["after"], {"fpir": 0.01, "far": 1e-4})


def test_verification_and_open_set_metrics_and_roc(evaluated, prepared):
    metrics = json.loads((evaluated / "metrics" / "m.json").read_text())
    _, payload = load_model(evaluated / "model.pt")
    assert json.loads((evaluated / "emb" / "threshold.json").read_text()) == payload["threshold"]
    val = pd.read_parquet(prepared / "data/split/val.parquet")[M.IDENTITY].to_numpy()
    test_ids = pd.read_parquet(prepared / "data/split/query.parquet")[M.IDENTITY].nunique()
    params = load_params(prepared / "ev.yaml")["verification"]
    for state, m in metrics.items():
        # On the validation identities, as brute force over their pairs gives.
        genuine, impostor = V.verification_scores(np.load(evaluated / "emb" / f"{state}_val.npy"), val,
                                                  params["impostor_pairs"], params["seed"])  # fmt: skip
        assert m["ver_genuine_pairs"] == len(genuine) > 0 and m["ver_impostor_pairs"] == len(impostor) > 0
        wins = (genuine[:, None] > impostor[None, :]) + 0.5 * (genuine[:, None] == impostor[None, :])
        assert m["ver_auc"] == pytest.approx(wins.mean(), abs=1e-4)
        for key in ("tar@far1e-2", "tar@far1e-3", "threshold@far1e-2", "threshold@far1e-3"):
            assert m[f"ver_{key}"] is None  # a few dozen impostor pairs cannot measure 1e-2
        # Open-set: the enrolled half of the test people (the sample's few: only the "all" gallery) searched
        # by every photo of theirs and of the other half.
        assert m["openall_mated"] + m["openall_nonmated"] == m["n_queries"] + m["n_gallery"]
        assert 0 <= m["openall_fnir"] <= 1 and 0 <= m["openall_fpir"] <= 1 and m["openall_verdict"] == "identification"
        assert not any(k.startswith("open10_") for k in m)  # no gallery of 10 people among test_ids // 2
    assert test_ids // 2 < 10
    # "after" at the model's own verdict for the gallery's size, "before" at one calibrated on val for the twin.
    faces = metrics["after"]["openall_faces"]
    assert metrics["after"]["openall_threshold"] == round(V.verdict_threshold(payload["threshold"], faces)[0], 4)
    before = V.calibrate(np.load(evaluated / "emb" / "before_val.npy"), val, params["far"], params["fars"],
                         params["impostor_pairs"], params["seed"], params["fpir"])  # fmt: skip
    assert metrics["before"]["openall_threshold"] == round(V.verdict_threshold(before, faces)[0], 4)
    det = pd.read_csv(evaluated / "det.csv")
    assert list(det.columns) == ["fpir", "before", "after"] and (np.diff(det["fpir"]) > 0).all()
    assert (
        det["fpir"].iloc[-1] == 1.0 and ((det[["before", "after"]] >= 0) & (det[["before", "after"]] <= 1)).all().all()
    )
    roc = pd.read_csv(evaluated / "roc.csv")
    assert list(roc.columns) == ["far", "before", "after"] and len(roc) > 10
    assert (np.diff(roc["far"]) > 0).all() and roc["far"].iloc[-1] == 1.0
    assert roc["far"].iloc[0] == pytest.approx(1 / metrics["after"]["ver_impostor_pairs"], rel=1e-4)
    assert (np.diff(roc["after"]) >= 0).all() and roc["after"].iloc[-1] == 1.0


def test_verdicts_are_cosines_whatever_the_embeddings_length(evaluated, prepared, tmp_path):
    # A normalize: false model's embeddings: the same directions at lengths 5-9. Its verification
    # and open-set figures are those of the unit rows (the index's and the app's), with cosine
    # thresholds, not figures of raw dot products that no verdict compares. Random directions:
    # the tiny model's embeddings lie within 1e-6 of one another, closer than float32 rescaling.
    rng = np.random.default_rng(0)
    unit, raw = tmp_path / "unit", tmp_path / "raw"
    for folder in (unit, raw):
        folder.mkdir()
    for f in (evaluated / "emb").iterdir():
        if f.suffix == ".npy":
            emb = rng.normal(size=np.load(f).shape)
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
            np.save(unit / f.name, emb.astype(np.float32))
            np.save(raw / f.name, (emb * rng.uniform(5, 9, size=(len(emb), 1))).astype(np.float32))
        else:
            for folder in (unit, raw):
                (folder / f.name).write_bytes(f.read_bytes())
    cwd = os.getcwd()
    os.chdir(prepared)
    try:
        for folder in (unit, raw):
            out = folder / "out"
            evaluate.main(["--backbone", "mobilenet_v2",
                           "--embeddings", str(folder), "--split", "data/split", "--arrays", "data/arrays",
                           "--details", str(out / "m.json"), "--metrics-before", str(out / "b.json"),
                           "--metrics-after", str(out / "a.json"), "--cmc", str(out / "c.csv"),
                           "--roc", str(out / "r.csv"), "--det", str(out / "d.csv"),
                           "--figure", str(out / "f.png"), "--timing", str(out / "t.json"),
                           "--rerank", str(out / "rr"), "--params", str(prepared / "ev.yaml")])  # fmt: skip
    finally:
        os.chdir(cwd)
    expected, got = (json.loads((folder / "out" / "m.json").read_text()) for folder in (unit, raw))
    for state in ("before", "after"):
        assert -1.0 <= got[state]["openall_threshold"] <= 1.0
        for key, value in expected[state].items():
            if key.startswith(("ver_", "open")):
                assert got[state][key] == (pytest.approx(value, abs=2e-4) if isinstance(value, float) else value), key
    assert pd.read_csv(raw / "out" / "r.csv").equals(pd.read_csv(unit / "out" / "r.csv"))


def test_rerank_reaches_every_metric_leak_free(evaluated, prepared, tmp_path):
    """evaluate.rerank: the metrics are those of the re-ranked search, the structures are outputs."""
    from facesearch.retrieval import rerank as R
    from facesearch.retrieval.metrics import evaluate as retrieval_evaluate

    rr = {"method": "dba_qe", "n": 2, "background": 4}
    params = write_params(tmp_path / "rr.yaml", {"evaluate.ks": [2, 5], "evaluate.latency_queries": 3,
                                                  "evaluate.figure_queries": 2,
                                                  **{f"evaluate.rerank.{k}": v for k, v in rr.items()}})  # fmt: skip
    out = tmp_path / "out"
    cwd = os.getcwd()
    os.chdir(prepared)
    try:
        evaluate.main(["--backbone", "mobilenet_v2",
                       "--embeddings", str(evaluated / "emb"), "--split", "data/split", "--arrays", "data/arrays",
                       "--details", str(out / "m.json"), "--metrics-before", str(out / "b.json"),
                       "--metrics-after", str(out / "a.json"), "--cmc", str(out / "c.csv"), "--roc", str(out / "r.csv"),
                       "--det", str(out / "d.csv"),
                       "--figure", str(out / "f.png"), "--timing", str(out / "t.json"), "--rerank", str(out / "rr"),
                       "--params", str(params)])  # fmt: skip
    finally:
        os.chdir(cwd)
    metrics = json.loads((out / "m.json").read_text())["after"]
    q = pd.read_parquet(prepared / "data/split/query.parquet")[M.IDENTITY].to_numpy()
    g = pd.read_parquet(prepared / "data/split/gallery.parquet")[M.IDENTITY].to_numpy()
    query, gallery = (np.load(evaluated / "emb" / f"after_{n}.npy") for n in ("query", "gallery"))
    rp = R.RerankParams.from_dict(load_params(params)["evaluate"]["rerank"])
    # The saved structure is the gallery's own, and gives the metrics written.
    saved = R.GalleryStructure.load(out / "rr" / "after")
    fresh = R.prepare(gallery, rp)
    assert saved.params == rp and np.array_equal(saved.expanded, fresh.expanded)
    expected, _, _ = retrieval_evaluate(query, q, gallery, g, R.build_rerank_index(saved), ks=(2, 5))
    for key in ("rank1", "mAP", "recall@2"):
        assert metrics[key] == round(expected[key], 4), key
    # Leave-one-out re-ranked too (a few dozen photos), as brute force: one fresh structure per query.
    emb, labels = np.concatenate([query, gallery]), np.concatenate([q, g])
    assert metrics["loo_reranked"] is True
    assert metrics["loo_mAP"] == round(R.leave_one_out_metrics(emb, labels, rp)["mAP"], 4)
    plain = json.loads((evaluated / "metrics" / "m.json").read_text())["after"]
    assert plain["loo_reranked"] is False and plain["ver_auc"] == metrics["ver_auc"]  # pairs are not searched
    assert json.loads((out / "t.json").read_text())["after"]["rerank"] == "dba_qe"


def test_open_set_metrics_follow_the_verdict(prepared):
    q = pd.read_parquet(prepared / "data/split/query.parquet")
    g = pd.read_parquet(prepared / "data/split/gallery.parquet")
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(q) + len(g), 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.concatenate([q[M.IDENTITY].to_numpy(), g[M.IDENTITY].to_numpy()])
    lax, det = V.open_set_report(emb, labels, {"similarity": -1.0}, [1], [0.5], seed=0, det_points=20)
    strict, _ = V.open_set_report(emb, labels, {"similarity": 1.01}, [1], [0.5], seed=0)
    assert lax["openall_fpir"] == 1.0 and strict["openall_fpir"] == 0.0  # every stranger matched / none
    assert strict["openall_fnir"] == 1.0 and lax["openall_threshold"] == -1.0 and lax["openall_verdict"] == "1:1"
    assert lax["open1_faces"] < lax["openall_faces"] and det["fpir"][-1] == 1.0


def test_figure_draws_the_packed_faces(prepared):
    # The faces come from the arrays the stage depends on (not data/crops): each row a flat colour here.
    q_table = pd.read_parquet(prepared / "data/split/query.parquet").iloc[:2]
    g_table = pd.read_parquet(prepared / "data/split/gallery.parquet").iloc[:9]
    q_images = np.stack([np.full((40, 40, 3), 10 * (i + 1), np.uint8) for i in range(2)])
    g_images = np.stack([np.full((40, 40, 3), 100 + 10 * i, np.uint8) for i in range(9)])
    emb_q, emb_g = np.eye(2, 4, dtype=np.float32), np.eye(9, 4, dtype=np.float32)
    top = np.tile(np.arange(9)[::-1], (2, 1))
    fig = evaluate.retrieval_figure(q_table, g_table, q_images, g_images, emb_q, emb_g, top, 2, seed=0, size=112)
    assert fig.shape == (2 * 112, 10 * 112, 3)
    for row in range(2):
        assert (fig[row * 112 + 50, 56] == 10 * (row + 1)).all()  # the query's centre
        for col in range(1, 10):
            assert (fig[row * 112 + 50, col * 112 + 56] == 100 + 10 * top[row, col - 1]).all()


def test_embed_refuses_arrays_of_other_crops(evaluated, prepared, tmp_path):
    # The model records the crops it was trained on; arrays packed from others would embed silently wrong.
    payload = torch.load(evaluated / "model.pt", map_location="cpu", weights_only=True)
    payload["preprocessing"]["crop"]["size"] += 8
    torch.save(payload, tmp_path / "other.pt")
    cwd = os.getcwd()
    os.chdir(prepared)
    try:
        with pytest.raises(ValueError, match="chip size is 48"):
            embed.main(["--model", str(tmp_path / "other.pt"), "--split", "data/split", "--arrays", "data/arrays",
                        "--out", str(tmp_path / "emb"), "--params", str(prepared / "ev.yaml")])  # fmt: skip
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "emb").exists()  # nothing half-written


def test_stale_embeddings_are_refused(evaluated, prepared, tmp_path):
    bad = tmp_path / "emb"
    bad.mkdir()
    for f in (evaluated / "emb").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    q = pd.read_parquet(bad / "query.parquet")
    q.iloc[::-1].to_parquet(bad / "query.parquet")
    cwd = os.getcwd()
    os.chdir(prepared)
    try:
        with pytest.raises(SystemExit, match="re-run embed"):
            evaluate.main(["--backbone", "mobilenet_v2",
                       "--embeddings", str(bad), "--split", "data/split", "--arrays", "data/arrays",
                           "--details", str(tmp_path / "m.json"), "--metrics-before", str(tmp_path / "b.json"),
                           "--metrics-after", str(tmp_path / "a.json"),
                           "--cmc", str(tmp_path / "c.csv"), "--roc", str(tmp_path / "r.csv"),
                           "--det", str(tmp_path / "d.csv"), "--figure", str(tmp_path / "f.png"),
                           "--timing", str(tmp_path / "t.json"), "--rerank", str(tmp_path / "rr"),
                           "--params", str(prepared / "ev.yaml")])  # fmt: skip
    finally:
        os.chdir(cwd)


def test_cli_evaluates_any_folder(evaluated, sample_factory, tmp_path):
    data = sample_factory(identities=8, images_per_identity=5, seed=4)
    m = evaluate_folder(str(evaluated / "model.pt"), str(data), n_jobs=1)
    assert {"rank1", "rank5", "rank10", "mAP", "loo_mAP", "n_queries", "n_gallery", "keep_rate"} <= set(m)
    # The model's train + val identities (4 of the 8) are left out of the score: the test ones remain.
    assert m["n_identities_excluded_seen"] == 4 and m["n_queries"] == m["n_identities"] <= 4
    assert m["n_queries"] + m["n_gallery"] == m["n_kept"] and m["crop"]["size"] == 40  # the model's crops
    assert 0.8 <= m["keep_rate"] <= 1.0
    out = tmp_path / "o.json"
    cli_main(["evaluate", "--model", str(evaluated / "model.pt"), "--data", str(data), "--out", str(out),
              "--n-jobs", "1"])  # fmt: skip
    assert json.loads(out.read_text())["mAP"] == m["mAP"]
