"""``python -m facesearch evaluate`` follows the model's contract: its crops, only unseen identities."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import person_folders, write_params

from facesearch.data.celeba import read_annotations
from facesearch.data.layouts import dataset_source, person_identity
from facesearch.faces.config import FaceConfig
from facesearch.nets.contract import identities_record, model_preprocessing, preprocessing_record
from facesearch.nets.inference import embed_array
from facesearch.nets.models import get_model, save_model
from facesearch.tools import cli, labelled
from facesearch.tools.cli import evaluate_folder
from facesearch.tools.labelled import embed_packed


@pytest.fixture(scope="module")
def folder(sample_factory):
    return sample_factory(identities=6, images_per_identity=4, seed=3)


def tiny_model(path, seen: list[int], size: int = 48, record: bool = True, source: dict | None = None,
               people: dict | None = None):  # fmt: skip
    torch.manual_seed(0)
    model = get_model("mobilenet_v2", weights="none", embedding_dim=8, img_size=32)
    extra = {"preprocessing": preprocessing_record(FaceConfig(size=size), 32),
             "identities": identities_record(seen[:1], seen[1:], source, people)} if record else {}  # fmt: skip
    save_model(path, model, extra=extra)
    return str(path)


def test_seen_identities_are_excluded_and_counted(folder, tmp_path):
    ids = sorted(set(read_annotations(folder).identities.values()))
    source = dataset_source(folder, "celeba")  # trained on this very identity file
    m = evaluate_folder(tiny_model(tmp_path / "m.pt", ids[:2], source=source), str(folder), n_jobs=1)
    assert m["n_identities_excluded_seen"] == 2 and m["n_identities"] <= len(ids) - 2
    assert "same CelebA identity file" in m["seen_rule"]
    # Open-set identification, as the stage reports it (no verdict record in this model: FNIR/FPIR unknown).
    assert m["openall_verdict"] == "none" and m["openall_fnir"] is None and m["openall_mated"] > 0
    assert m["crop"]["size"] == 48 and m["crop_source"] == "model"
    assert 0 <= m["loo_mAP"] <= 1 and m["loo_queries"] == m["n_queries"] + m["n_gallery"]
    with pytest.raises(SystemExit, match=r"all 6 identities .* were seen"):
        evaluate_folder(tiny_model(tmp_path / "all.pt", ids, source=source), str(folder), n_jobs=1)


def test_numbers_from_another_source_or_none_exclude_nobody_and_say_so(folder, tmp_path, caplog):
    ids = sorted(set(read_annotations(folder).identities.values()))
    other = dataset_source(folder, "celeba") | {"identity_file_sha256": "0" * 64, "name": "elsewhere"}
    caplog.set_level(logging.INFO)
    m = evaluate_folder(tiny_model(tmp_path / "o.pt", ids, source=other), str(folder), n_jobs=1)
    assert m["n_identities_excluded_seen"] == 0 and m["n_identities"] == len(ids)
    assert "'elsewhere'" in m["seen_rule"] and "everyone is scored" in m["seen_rule"]
    assert m["seen_rule"] in caplog.text  # in the log too, never silent
    old = evaluate_folder(tiny_model(tmp_path / "n.pt", ids), str(folder), n_jobs=1)  # no source recorded
    assert old["n_identities_excluded_seen"] == 0 and "does not record" in old["seen_rule"]


def test_crop_params_file_overrides_the_model(folder, tmp_path):
    # The model's backbone's chip (crop's detection + chips.mobilenet_v2), not crop's display size.
    params = write_params(tmp_path / "p.yaml", {"crop.size": 40, "chips.mobilenet_v2.size": 56})
    m = evaluate_folder(tiny_model(tmp_path / "m.pt", []), str(folder), crop_params=str(params), n_jobs=1)
    assert m["crop"]["size"] == 56 and m["crop_source"] == str(params) and m["n_identities_excluded_seen"] == 0
    with pytest.raises(SystemExit, match="does not exist"):
        evaluate_folder(tiny_model(tmp_path / "m.pt", []), str(folder), crop_params=str(tmp_path / "no.yaml"))


def test_chips_are_written_and_guarded_as_the_crop_stage_does(folder, tmp_path, monkeypatch):
    # crop.format and the file/shape guards of the params file reach every chip, not only the face settings.
    seen, process = [], labelled.process_image

    def spy(src, dst, *args, **kw):
        seen.append((dst, kw))
        return process(src, dst, *args, **kw)

    monkeypatch.setattr(labelled, "process_image", spy)
    params = write_params(tmp_path / "p.yaml", {"crop.format": "png", "crop.max_aspect": 3.0,
                                                "crop.max_file_bytes": 10**6})  # fmt: skip
    m = evaluate_folder(tiny_model(tmp_path / "m.pt", []), str(folder), crop_params=str(params), n_jobs=1)
    assert seen and all(dst.endswith(".png") and kw == {"fmt": "png", "max_aspect": 3.0, "max_file_bytes": 10**6}
                        for dst, kw in seen)  # fmt: skip
    assert m["n_queries"] > 0


def test_old_models_fall_back_with_a_warning(tmp_path, caplog):
    from facesearch.nets.models import load_model

    _, payload = load_model(tiny_model(tmp_path / "old.pt", [], record=False))
    caplog.set_level(logging.WARNING)
    assert model_preprocessing(payload) == (FaceConfig(), 32)
    assert model_preprocessing(payload, fallback=FaceConfig(size=99))[0].size == 99
    assert "no preprocessing record" in caplog.text


def test_record_round_trips_through_params_shape():
    face = FaceConfig.from_params({"size": 150, "detector": "dlib_hog", "align": "landmarks", "landmarks": 68,
                                   "policy": "single", "haar": {"detect_side": 200}})  # fmt: skip
    assert model_preprocessing({"preprocessing": preprocessing_record(face, 150)}) == (face, 150)


def test_workers_and_chunks_change_nothing(folder, tmp_path, monkeypatch):
    # Crops packed by 2 workers, embedded 3 at a time (a fresh memory map each): the same scores.
    model = tiny_model(tmp_path / "m.pt", [])
    one = evaluate_folder(model, str(folder), n_jobs=1)
    monkeypatch.setattr(labelled, "EMBED_CHUNK", 3)
    assert evaluate_folder(model, str(folder), n_jobs=2) == one


def test_embed_packed_equals_one_pass(tmp_path):
    torch.manual_seed(0)
    model = get_model("mobilenet_v2", weights="none", embedding_dim=8, img_size=32).eval()
    images = np.random.default_rng(0).integers(0, 256, (7, 40, 40, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", images)
    whole = embed_array(model, images, 32, torch.device("cpu"))
    chunked = embed_packed(model, tmp_path / "a.npy", 32, torch.device("cpu"), desc=None, chunk=3)
    assert chunked.shape == (7, 8) and np.allclose(chunked, whole, atol=1e-5)


def test_folder_layout_scores_like_celeba_and_names_people(folder, tmp_path):
    # The same photos one folder per person: the same protocol, the same scores; seen people named.
    people = person_folders(folder, tmp_path / "people")
    celeba_ids = sorted(set(read_annotations(folder).identities.values()))
    model = tiny_model(tmp_path / "m.pt", [])
    celeba = evaluate_folder(model, str(folder), n_jobs=1)
    folders = evaluate_folder(model, str(people), n_jobs=1)
    assert folders["layout"] == "folders" and celeba["layout"] == "celeba" and celeba["excluded_seen_people"] is None
    # The same photos kept and counted. Scores may differ: crop names (so the order of photos, the
    # seeded query choice and the float sums) follow the file paths, and an untrained model ranks on noise.
    same = ("n_queries", "n_gallery", "n_kept", "keep_rate", "n_identities", "n_images", "loo_queries")
    assert {k: folders[k] for k in same} == {k: celeba[k] for k in same}
    assert folders["attr_queries"] == 0 < celeba["attr_queries"]  # no attributes in the folder layout
    # Under the folder layout a person is a name: a model trained on person folders left out by name.
    names = [f"Person_{i:05d}" for i in celeba_ids[:2]]
    by_name = tiny_model(tmp_path / "s.pt", [person_identity(n) for n in names], source={"layout": "folders"},
                         people={"train": names[:1], "val": names[1:]})  # fmt: skip
    seen = evaluate_folder(by_name, str(people), n_jobs=1, layout="folders")
    assert seen["excluded_seen_people"] == names and seen["n_identities_excluded_seen"] == 2
    assert "by name" in seen["seen_rule"]
    elsewhere = evaluate_folder(by_name, str(people), n_jobs=1, trained_elsewhere=True)
    assert elsewhere["n_identities_excluded_seen"] == 0 and elsewhere["excluded_seen_people"] == []
    # The same model on the CelebA layout of these photos: numbers of another source, nobody left out.
    assert evaluate_folder(by_name, str(folder), n_jobs=1)["n_identities_excluded_seen"] == 0
    everyone = [f"Person_{i:05d}" for i in celeba_ids]
    with pytest.raises(SystemExit, match="were seen"):
        evaluate_folder(tiny_model(tmp_path / "all.pt", [], source={"layout": "folders"},
                                   people={"train": everyone, "val": []}), str(people), n_jobs=1)  # fmt: skip


def test_cli_refuses_unlabelled_folder(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.jpg").write_bytes(b"x")
    with pytest.raises(SystemExit, match=r"evaluate: .*needs labelled photos"):
        cli.main(["evaluate", "--model", tiny_model(tmp_path / "m.pt", []), "--data", str(tmp_path / "plain"),
                  "--out", str(tmp_path / "o.json")])  # fmt: skip


def test_the_backbones_rerank_method_applies(folder, tmp_path):
    model = tiny_model(tmp_path / "m.pt", [])
    by_backbone = {"method": "none", "method_by_backbone": {"mobilenet_v2": "dba_qe"}}
    m = evaluate_folder(model, str(folder), n_jobs=1, rerank=by_backbone)
    assert m["rerank"]["method"] == "dba_qe" and m["loo_reranked"] is True
    plain = evaluate_folder(model, str(folder), n_jobs=1)
    assert plain["rerank"]["method"] == "none" and plain["loo_reranked"] is False
    assert m["n_queries"] == plain["n_queries"] and m["flip_tta"] is False


def test_cli_rerank_reads_the_params_or_is_forced(tmp_path):
    params = write_params(tmp_path / "p.yaml", {"evaluate.rerank.method": "k_reciprocal"})
    assert cli.cli_rerank(str(params), None)["method"] == "k_reciprocal"
    forced = cli.cli_rerank(str(params), "none")
    assert forced["method"] == "none" and forced["method_by_backbone"] == {}
    assert cli.cli_rerank(str(tmp_path / "absent.yaml"), None) is None
