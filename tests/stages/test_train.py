from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import BAD_MODELS, REPO, TINY, TINY_CROP, bad_model_files, run_train, write_params

from facesearch.data import manifest as M
from facesearch.data.packing import load_array
from facesearch.faces.config import chip_config
from facesearch.nets import training
from facesearch.nets.contract import model_preprocessing, model_threshold, seen_identities
from facesearch.nets.distances import unit_rows
from facesearch.nets.inference import embed_array
from facesearch.nets.models import load_model
from facesearch.nets.transforms import to_model_input
from facesearch.params import load_params
from facesearch.provenance import module_closure
from facesearch.retrieval import verification as V
from facesearch.retrieval.verdict import verdict
from stages import embed, train


def test_outputs_curves_contract_and_no_leftover_checkpoint(prepared):
    out = run_train(prepared, "basic")
    model, payload = load_model(out / "model.pt")
    assert model.config.backbone == "mobilenet_v2" and model.config.img_size == 32
    assert [h["epoch"] for h in payload["history"]] == [-1, 0, 1]  # untrained baseline, then each epoch
    assert payload["best_epoch"] == training.best_epoch(payload["history"])
    metrics = json.loads((out / "live" / "metrics.json").read_text())
    assert metrics["step"] == 2 and "rank1" in metrics["val"]
    assert metrics["best"]["epoch"] == payload["best_epoch"] and "mAP" in metrics["best"]["val"]
    loss_curve = (out / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert len(loss_curve) == 1 + 2  # header + one row per epoch
    assert not (out / "ckpt" / "last.ckpt").exists()  # a finished run leaves no stale state
    # The model carries its contract: how its crops were cut, its input side, whom it has seen.
    face, size = model_preprocessing(payload)
    params = load_params(prepared / "basic.yaml")
    assert face == chip_config(params, "mobilenet_v2") and size == 32
    assert face.size == TINY_CROP["chips.mobilenet_v2.size"]
    split = prepared / "data" / "split"
    train_ids = sorted(pd.read_parquet(split / "train.parquet")[M.IDENTITY].unique().tolist())
    val_ids = sorted(pd.read_parquet(split / "val.parquet")[M.IDENTITY].unique().tolist())
    source = json.loads((prepared / "data" / "source.json").read_text())
    assert payload["identities"] == {"train": train_ids, "val": val_ids, "source": source} and val_ids
    assert source["layout"] == "celeba" and source["synthetic"] is True  # the sample generator's photos
    assert seen_identities(payload) == set(train_ids) | set(val_ids)
    assert not seen_identities(payload) & set(pd.read_parquet(split / "query.parquet")[M.IDENTITY])
    # Its verdict threshold: too few validation impostor pairs to measure 1e-3, so every one is rejected.
    record = model_threshold(payload)
    assert record["far"] == params["verification"]["far"] == 1e-3 and record["n_impostor"] < 1000
    assert not record["resolved"] and record["far_measured"] == 0.0
    # The verdict `facesearch search` gives: calibrated for searches (FPIR at any gallery size), loudly
    # flagged as the synthetic sample's.
    v = verdict(payload, 100)
    assert v.source == "model" and v.fpir == params["verification"]["fpir"] and v.synthetic and v.warning()
    assert record["data"]["synthetic"] and "cartoon faces" in record["data"]["description"]
    assert v.similarity == V.identification_threshold(record["identification"], 100)


def test_the_verdict_threshold_is_chosen_on_the_validation_identities(prepared):
    ver = {"verification.far": 0.2, "verification.fars": [0.5, 0.2], "verification.seed": 4}
    model, payload = load_model(run_train(prepared, "thr", {"epochs": 1}, params=ver) / "model.pt")
    record = payload["threshold"]
    val = pd.read_parquet(prepared / "data" / "split" / "val.parquet")
    emb = embed_array(model, load_array(prepared / "data" / "arrays" / "val.npy"), 32, torch.device("cpu"))
    emb = unit_rows(emb.astype(np.float64))  # as calibrate
    params = load_params(prepared / "thr.yaml")["verification"]
    genuine, impostor = V.verification_scores(emb, val[M.IDENTITY].to_numpy(), params["impostor_pairs"], 4)
    assert record["n_impostor"] == len(impostor) >= 5 and record["n_genuine"] == len(genuine) > 0
    assert record["far"] == 0.2 and record["resolved"] and record["source"] == "validation identities"
    # At the stored threshold, at most the target share of the validation impostor pairs pass.
    assert V.accept_rate(impostor, record["similarity"]) <= 0.2
    assert record["similarity"] == pytest.approx(V.threshold_at_far(impostor, 0.2), abs=1e-5)
    assert record["tar"] == pytest.approx(V.accept_rate(genuine, record["similarity"]))
    assert set(record["at_far"]) == {"0.5", "0.2"} and record["at_far"]["0.2"] == record["similarity"]
    assert record["at_far"]["0.5"] <= record["similarity"]
    # The identification verdict rests on the same validation people's stranger comparisons.
    ident = record["identification"]
    assert ident["images"] == len(val) and ident["identities"] == val[M.IDENTITY].nunique()


def test_a_model_that_does_not_normalise_gets_a_cosine_threshold(prepared):
    # normalize: false embeds at lengths far from 1; the index and the app compare unit rows, so
    # the threshold must be a cosine of those, not of raw dot products (62.5 on norms of 5-9).
    ver = {"verification.far": 0.2, "verification.fars": [0.5, 0.2], "verification.seed": 4}
    model, payload = load_model(run_train(prepared, "raw", {"epochs": 1, "normalize": False}, params=ver) / "model.pt")
    record = payload["threshold"]
    val = pd.read_parquet(prepared / "data" / "split" / "val.parquet")[M.IDENTITY].to_numpy()
    emb = embed_array(model, load_array(prepared / "data" / "arrays" / "val.npy"), 32, torch.device("cpu"))
    assert not np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=0.05)
    params = load_params(prepared / "raw.yaml")["verification"]
    # calibrate scales the rows to length 1 itself: the record is that of the unit rows.
    expected = V.calibrate(emb, val, params["far"], params["fars"], params["impostor_pairs"], params["seed"])
    assert -1.0 <= record["similarity"] <= 1.0 + 1e-9 and record["resolved"]  # just above 1: rejects ties at 1
    assert record["similarity"] == pytest.approx(expected["similarity"], abs=1e-5)
    assert record["tar"] == pytest.approx(expected["tar"]) and record["far_measured"] <= 0.2
    # What the raw dot products would have given: no cosine.
    _, impostor = V.verification_scores(emb, val, params["impostor_pairs"], params["seed"])
    assert abs(V.threshold_at_far(impostor, params["far"]) - record["similarity"]) > 1e-3


def test_best_validation_epoch_is_the_model_saved(prepared, monkeypatch):
    scores = iter([0.1, 0.9, 0.5, 0.3])  # baseline, then epochs 0..2: epoch 0 is best
    real_metrics = train.leave_one_out_metrics
    monkeypatch.setattr(train, "leave_one_out_metrics", lambda *a, **k: {**real_metrics(*a, **k), "mAP": next(scores)})
    states = {}
    real_save = train.save_checkpoint

    def recording(path, model, *args, **kwargs):
        states[args[2]] = {k: v.clone() for k, v in model.state_dict().items()}  # args[2]: the epoch
        real_save(path, model, *args, **kwargs)

    monkeypatch.setattr(train, "save_checkpoint", recording)
    model, payload = load_model(run_train(prepared, "best", {"epochs": 3}) / "model.pt")
    assert payload["best_epoch"] == 0 and [h["val_mAP"] for h in payload["history"]] == [0.1, 0.9, 0.5, 0.3]
    for name, value in model.state_dict().items():
        assert torch.equal(value, states[0][name]), name
    assert any(not torch.equal(v, states[2][k]) for k, v in model.state_dict().items())


def test_the_start_is_kept_when_no_epoch_improves_validation(prepared, monkeypatch):
    scores = iter([0.9, 0.5, 0.3])  # baseline, then epochs 0..1: fine-tuning only hurts
    real_metrics = train.leave_one_out_metrics
    monkeypatch.setattr(train, "leave_one_out_metrics", lambda *a, **k: {**real_metrics(*a, **k), "mAP": next(scores)})
    model, payload = load_model(run_train(prepared, "start", {"epochs": 2}) / "model.pt")
    assert payload["best_epoch"] == -1
    twin = embed.untrained_twin(payload)
    for name, value in model.state_dict().items():
        assert torch.equal(value, twin.state_dict()[name]), name


def shipped_block(backbone: str = "mobilenet_v2") -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())["train"][backbone]


def test_a_bad_keep_fails_when_the_config_is_read():
    with pytest.raises(ValueError, match="keep"):
        train.TrainConfig.from_params(shipped_block() | {"keep": "latest"})


@pytest.mark.parametrize("backbone", ["resnet50", "mobilenet_v2", "dlib_resnet"])
def test_every_value_comes_from_params_yaml(backbone):
    """No dataclass default can disagree with params.yaml: there are none, each key must be there."""
    block = shipped_block(backbone)
    cfg = train.TrainConfig.from_params(block)
    as_yaml = json.loads(json.dumps(asdict(cfg)))  # tuples -> lists, as YAML has them
    assert as_yaml == block
    with pytest.raises(TypeError):
        train.TrainConfig()  # no defaults
    without_lr = {k: v for k, v in block.items() if k != "lr"}
    with pytest.raises(ValueError, match=r"missing train params \['lr'\]"):
        train.TrainConfig.from_params(without_lr)
    partial_augment = block | {"augment": {k: v for k, v in block["augment"].items() if k != "erase_p"}}
    with pytest.raises(ValueError, match=r"missing train params \['augment.erase_p'\]"):
        train.TrainConfig.from_params(partial_augment)
    with pytest.raises(ValueError, match=r"unknown train params \['augment.blur'\]"):
        train.TrainConfig.from_params(block | {"augment": block["augment"] | {"blur": 1}})


def test_train_never_reads_the_test_identities(prepared):
    """Only train/val/triplets tables and train/val arrays exist here: query/gallery cannot be opened."""
    work = prepared / "no_test"
    for rel in ("data/source.json", "data/split/train.parquet", "data/split/val.parquet", "data/split/triplets.parquet",
                "data/arrays/train.npy", "data/arrays/train.json", "data/arrays/val.npy",
                "data/arrays/val.json"):  # fmt: skip
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(prepared / rel, work / rel)
    _, payload = load_model(run_train(work, "m", {"epochs": 1}) / "model.pt")
    assert len(payload["history"]) == 2


def test_changed_code_does_not_resume(prepared, monkeypatch, tmp_path, caplog):
    """The resume key covers the code: an edited loss function means training from scratch."""
    code = tmp_path / "code"
    for rel in module_closure(train.SCRIPT, train.CODE_ROOT):
        (code / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(train.CODE_ROOT / rel, code / rel)
    monkeypatch.setattr(train, "CODE_ROOT", code)
    kill_after_first_epoch(prepared, "coded", {"epochs": 2}, monkeypatch)
    losses = code / "facesearch" / "nets" / "losses.py"
    edited = losses.read_text().replace("clamp_min(0)", "clamp_min(0.0)", 1)
    assert edited != losses.read_text()
    losses.write_text(edited)
    caplog.set_level("INFO")
    run_train(prepared, "coded", {"epochs": 2})
    assert "starting fresh" in caplog.text and "resuming" not in caplog.text


def test_killed_run_resumes_to_the_same_model(prepared, monkeypatch):
    reference, _ = load_model(run_train(prepared, "straight", {"epochs": 3}) / "model.pt")

    calls = {"n": 0}
    real = training.pk_batch

    def dies_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2 * TINY["steps_per_epoch"]:  # first batch of the third epoch
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "pk_batch", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        run_train(prepared, "resumed", {"epochs": 3})
    assert not (prepared / "resumed" / "model.pt").exists()
    assert torch.load(prepared / "resumed" / "ckpt" / "last.ckpt", weights_only=False)["epoch"] == 1
    monkeypatch.setattr(training, "pk_batch", real)
    resumed_dir = run_train(prepared, "resumed", {"epochs": 3})
    resumed, payload = load_model(resumed_dir / "model.pt")
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [h["epoch"] for h in payload["history"]] == [-1, 0, 1, 2]
    assert len((resumed_dir / "live/plots/metrics/train/loss.tsv").read_text().splitlines()) == 1 + 3
    assert not (resumed_dir / "ckpt" / "last.ckpt").exists()


def kill_after_first_epoch(prepared, name: str, overrides: dict, monkeypatch) -> None:
    """Run ``name`` and kill it in its second epoch: its checkpoint holds epoch 0."""
    real, calls = training.pk_batch, {"n": 0}

    def dies_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > TINY["steps_per_epoch"]:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(training, "pk_batch", dies_in_epoch_two)
        with pytest.raises(KeyboardInterrupt):
            run_train(prepared, name, overrides)
    assert torch.load(prepared / name / "ckpt" / "last.ckpt", weights_only=False)["epoch"] == 0


def test_changed_params_do_not_resume(prepared, monkeypatch, caplog):
    kill_after_first_epoch(prepared, "changing", {"epochs": 2}, monkeypatch)
    caplog.set_level("INFO")
    run_train(prepared, "changing", {"epochs": 2, "lr": 0.01})
    assert "starting fresh" in caplog.text and "resuming" not in caplog.text


def test_offline_triplets_and_batch_hard_guard(prepared):
    _, payload = load_model(run_train(prepared, "triplet", {"loss": "triplet", "epochs": 1}) / "model.pt")
    assert payload["history"][-1]["fallback"] == 0.0
    # An always-tripping guard: every batch-hard step falls back to semi-hard, and says so.
    hard = run_train(
        prepared, "guard", {"loss": "batch_hard", "semi_hard_epochs": 0, "collapse_spread": 10.0, "epochs": 1}
    )
    _, payload = load_model(hard / "model.pt")
    assert payload["history"][-1]["fallback"] == 1.0


def test_the_spread_out_term_is_added_on_pairs_of_different_people():
    from dataclasses import replace

    from facesearch.nets.losses import negative_pairs, spread_out_loss

    params = load_params(REPO / "params.yaml")["train"]["mobilenet_v2"]
    cfg = replace(train.TrainConfig.from_params(params), loss="semi_hard", spread_weight=0.0)
    emb = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    net = torch.nn.Identity()
    plain, stats = train.compute_loss(net, emb, labels, cfg, 0, False)
    spread, _ = train.compute_loss(net, emb, labels, replace(cfg, spread_weight=2.0), 0, False)
    assert torch.isclose(spread - plain, 2.0 * spread_out_loss(emb, negative_pairs(labels)))
    assert set(stats) == {"active", "spread", "fallback"}
    # Offline triplets (anchor, positive, negative thirds): only each anchor and its own negative.
    mask = train.triplet_negatives(2, torch.device("cpu"))
    assert {tuple(ij) for ij in mask.nonzero().tolist()} == {(0, 4), (4, 0), (1, 5), (5, 1)}


def test_unknown_params_are_rejected(prepared):
    with pytest.raises(ValueError, match="unknown train params"):
        run_train(prepared, "typo", {"learning_rate": 0.1})


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(prepared):
    """torchrun, two gloo processes: one epoch of steps_per_epoch 0 is one pass over the images in all."""
    pk = {"steps_per_epoch": 0, "p_identities": 2, "k_images": 2}
    images = len(pd.read_parquet(prepared / "data" / "split" / "train.parquet"))
    steps = training.epoch_steps(images, 2 * 2, world=2)
    assert steps == images // (2 * 2 * 2) and steps < images // (2 * 2)  # half a single process's steps
    overrides = TINY_CROP | {f"train.mobilenet_v2.{k}": v for k, v in (TINY | pk).items()}
    params = write_params(prepared / "ddp.yaml", overrides)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "stages.train",
        "--backbone",
        "mobilenet_v2",
        "--split",
        "data/split",
        "--arrays",
        "data/arrays",
        "--out",
        "ddp/model.pt",
        "--checkpoint",
        "ddp/last.ckpt",
        "--live",
        "ddp/live",
        "--params",
        str(params),
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=prepared, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f" {steps} steps/epoch on cpu x2" in done.stderr
    _, payload = load_model(prepared / "ddp" / "model.pt")
    assert len(payload["history"]) == 3


def test_train_params_read_exponent_floats_yaml_leaves_as_strings(tmp_path):
    text = yaml.safe_dump({"train": shipped_block() | {"lr": 0.5}}).replace("lr: 0.5", "lr: 1e-5")
    (tmp_path / "p.yaml").write_text(text)
    assert "lr: 1e-5\n" in text  # unquoted: YAML 1.1 reads it as a string, load_params as a number
    assert train.TrainConfig.from_params(load_params(tmp_path / "p.yaml")["train"]).lr == 1e-5
    with pytest.raises(ValueError, match="lr: 'fast' is not a number"):
        train.TrainConfig.from_params(shipped_block() | {"lr": "fast"})


# ------------------------------------------------------------- distillation ---
DISTILL = {
    "loss": "distill",
    "img_size": 24,
    "epochs": 3,
    "steps_per_epoch": 4,
    "lr": 0.003,
    "keep": "last",
    "distill_centre": True,
    # The sample recipe's head batch norm (issue 26) re-centres the student's output each batch: its
    # agreement with raw teacher targets is not what this test measures.
    "head_bn": False,
}


@pytest.fixture(scope="module")
def teacher_file(prepared) -> Path:
    """A trained tiny model, its identity record widened by one person the split does not hold."""
    # Another seed than the students' and its trained weights: a teacher equal to the
    # student's start would leave nothing to learn.
    path = run_train(prepared, "teacher", {"epochs": 1, "seed": 1, "keep": "last"}) / "model.pt"
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload["identities"]["train"] = [*payload["identities"]["train"], 999_999]
    torch.save(payload, path)
    return path


def agreement(student, teacher, images: torch.Tensor, centre=None) -> float:
    """Mean cosine of the student's and the teacher's raw embeddings (each at its own side); ``centre``:
    the teacher's less it, the targets a ``distill_centre`` student learns."""
    with torch.no_grad():
        s = student.eval()(to_model_input(images, student.config.img_size, "cpu"))
        t = teacher.eval()(to_model_input(images, teacher.config.img_size, "cpu"))
    if centre is not None:
        t = t - torch.as_tensor(centre, dtype=t.dtype)
    return float(torch.nn.functional.cosine_similarity(s, t).mean())


def test_a_distilled_student_learns_its_teacher_and_inherits_whom_it_saw(prepared, teacher_file):
    out = run_train(prepared, "student", DISTILL, args=("--teacher", str(teacher_file)))
    student, payload = load_model(out / "model.pt")
    teacher, teacher_payload = load_model(teacher_file)
    record = payload["teacher"]
    assert record["backbone"] == "mobilenet_v2" and record["path"] == str(teacher_file)
    assert record["config"] == teacher_payload["config"] and set(record["val"]) >= {"mAP", "rank1"}
    assert student.config.img_size == 24 and teacher.config.img_size == 32
    # It was pulled toward the teacher: its embeddings of the training crops agree with its targets
    # (the teacher's less their centre, distill_centre) more than those of the same network before training.
    images = torch.from_numpy(load_array(prepared / "data" / "arrays" / "train.npy")[:16].copy())
    start = embed.untrained_twin(payload)
    centre = record["centre"]
    assert agreement(student, teacher, images, centre) > agreement(start, teacher, images, centre) + 0.05
    losses = [h["loss"] for h in payload["history"] if h["epoch"] >= 0]
    assert losses[-1] < losses[0]
    # Whom the teacher saw, the student saw: no score may count them as unseen.
    assert 999_999 in seen_identities(payload) and seen_identities(teacher_payload) <= seen_identities(payload)
    metrics = json.loads((out / "live" / "metrics.json").read_text())
    assert metrics["teacher"]["val"]["mAP"] == pytest.approx(record["val"]["mAP"])
    # distill_centre: the targets' centre is the mean of the teacher's
    # raw embeddings of every train crop, here against a plain forward pass of all of them.
    every = torch.from_numpy(load_array(prepared / "data" / "arrays" / "train.npy").copy())
    with torch.no_grad():
        mean = teacher(to_model_input(every, teacher.config.img_size, "cpu")).mean(0)
    assert torch.allclose(torch.tensor(record["centre"]), mean, atol=1e-5)


def test_distillation_without_the_centre_records_none(prepared, teacher_file):
    out = run_train(prepared, "uncentred", DISTILL | {"epochs": 1, "distill_centre": False},
                    args=("--teacher", str(teacher_file)))  # fmt: skip
    payload = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert payload["teacher"]["centre"] is None


def test_distillation_fails_clearly_without_a_teacher_it_can_use(prepared, teacher_file, tmp_path):
    with pytest.raises(SystemExit, match="needs --teacher"):
        run_train(prepared, "no_teacher", DISTILL)
    with pytest.raises(SystemExit, match="needs loss: distill"):
        run_train(prepared, "teacher_unused", {"epochs": 1}, args=("--teacher", str(teacher_file)))
    with pytest.raises(SystemExit, match="does not exist"):
        run_train(prepared, "missing", DISTILL, args=("--teacher", str(tmp_path / "none.pt")))
    with pytest.raises(SystemExit, match="embeds in 16 dimensions"):
        run_train(prepared, "wide", DISTILL | {"embedding_dim": 8}, args=("--teacher", str(teacher_file)))
    (tmp_path / "broken.pt").write_bytes(b"half a download")
    with pytest.raises(SystemExit, match=r"teacher .*broken\.pt is not a facesearch model file"):
        run_train(prepared, "broken", DISTILL, args=("--teacher", str(tmp_path / "broken.pt")))
    other = torch.load(teacher_file, map_location="cpu", weights_only=True)
    other["preprocessing"]["crop"]["size"] = 64  # a teacher of other crops would describe other pixels
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="crops cut otherwise"):
        run_train(prepared, "other_crops", DISTILL, args=("--teacher", str(tmp_path / "other.pt")))
    # A teacher trained on the student's validation people would make every validation score of
    # the student (kept epoch, recipe choice, "keeps X%") a score on people already learnt.
    leaky = torch.load(teacher_file, map_location="cpu", weights_only=True)
    val_ids = pd.read_parquet(prepared / "data" / "split" / "val.parquet")[M.IDENTITY]
    leaky["identities"]["train"] = [*leaky["identities"]["train"], int(val_ids.iloc[0])]
    torch.save(leaky, tmp_path / "leaky.pt")
    with pytest.raises(SystemExit, match="trained on 1 of the student's validation identities"):
        run_train(prepared, "leaky", DISTILL, args=("--teacher", str(tmp_path / "leaky.pt")))


def test_a_teacher_file_that_is_no_model_fails_in_one_line(prepared, tmp_path):
    models = bad_model_files(tmp_path / "models")
    for kind in BAD_MODELS:
        with pytest.raises(SystemExit) as exc:
            run_train(prepared, f"bad_{kind}", DISTILL, args=("--teacher", str(models[kind])))
        message = exc.value.code
        assert isinstance(message, str) and message.startswith("train: teacher") and "\n" not in message, kind
        assert str(models[kind]) in message, kind


def test_a_missing_data_folder_or_params_file_fails_in_one_line(tmp_path):
    params = write_params(tmp_path / "p.yaml", TINY_CROP | {f"train.mobilenet_v2.{k}": v for k, v in TINY.items()})
    gone = tmp_path / "gone"

    def failure(params_file) -> str:
        with pytest.raises(SystemExit) as exc:
            train.main(["--backbone", "mobilenet_v2", "--split", str(gone), "--arrays", str(gone),
                        "--out", str(tmp_path / "m.pt"), "--checkpoint", str(tmp_path / "ckpt"),
                        "--live", str(tmp_path / "live"), "--params", str(params_file)])  # fmt: skip
        return exc.value.code

    assert failure(params) == f"train: {gone / 'train.parquet'}: No such file or directory"
    assert failure(tmp_path / "none.yaml") == f"train: {tmp_path / 'none.yaml'}: No such file or directory"
