from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY, TINY_CROP, run_train, write_params

from facesearch import manifest as M
from facesearch.contract import model_preprocessing, seen_identities
from facesearch.faces import FaceConfig
from facesearch.models import load_model
from facesearch.params import load_params
from facesearch.provenance import module_closure
from stages import embed, train


def test_outputs_curves_contract_and_no_leftover_checkpoint(prepared):
    out = run_train(prepared, "basic")
    model, payload = load_model(out / "model.pt")
    assert model.config.backbone == "mobilenet_v2" and model.config.img_size == 32
    assert [h["epoch"] for h in payload["history"]] == [-1, 0, 1]  # untrained baseline, then each epoch
    assert payload["best_epoch"] == train.best_epoch(payload["history"])
    metrics = json.loads((out / "live" / "metrics.json").read_text())
    assert metrics["step"] == 2 and "rank1" in metrics["val"]
    assert metrics["best"]["epoch"] == payload["best_epoch"] and "mAP" in metrics["best"]["val"]
    loss_curve = (out / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert len(loss_curve) == 1 + 2  # header + one row per epoch
    assert not (out / "ckpt" / "last.ckpt").exists()  # a finished run leaves no stale state
    # The model carries its contract: how its crops were cut, its input side, whom it has seen.
    face, size = model_preprocessing(payload)
    params = load_params(prepared / "basic.yaml")
    assert face == FaceConfig.from_params(params["crop"]) and face.size == TINY_CROP["crop.size"] and size == 32
    split = prepared / "data" / "split"
    train_ids = sorted(pd.read_parquet(split / "train.parquet")[M.IDENTITY].unique().tolist())
    val_ids = sorted(pd.read_parquet(split / "val.parquet")[M.IDENTITY].unique().tolist())
    assert payload["identities"] == {"train": train_ids, "val": val_ids} and val_ids
    assert seen_identities(payload) == set(train_ids) | set(val_ids)
    assert not seen_identities(payload) & set(pd.read_parquet(split / "query.parquet")[M.IDENTITY])


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


def test_best_epoch_rule():
    h = [{"epoch": -1, "val_mAP": 1.0}, {"epoch": 0, "val_mAP": 0.5}, {"epoch": 1, "val_mAP": 0.7},
         {"epoch": 2, "val_mAP": 0.7}]  # fmt: skip
    assert train.best_epoch(h) == -1  # no epoch beats the start: keep it (early stopping at zero)
    h[0]["val_mAP"] = 0.6
    assert train.best_epoch(h) == 1  # the earliest of equals
    assert train.best_epoch([{"epoch": 0, "val_mAP": float("nan")}, {"epoch": 1, "val_mAP": float("nan")}]) == 1
    h[0]["val_mAP"] = 1.0
    assert train.best_epoch(h, keep="last") == 2  # a fixed budget: the final epoch, whatever validation says
    with pytest.raises(ValueError, match="keep"):
        train.TrainConfig.from_params({"keep": "latest"})


def test_train_never_reads_the_test_identities(prepared):
    """Only train/val/triplets tables and train/val arrays exist here: query/gallery cannot be opened."""
    work = prepared / "no_test"
    for rel in ("data/split/train.parquet", "data/split/val.parquet", "data/split/triplets.parquet",
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
    losses = code / "facesearch" / "losses.py"
    edited = losses.read_text().replace("clamp_min(0)", "clamp_min(0.0)", 1)
    assert edited != losses.read_text()
    losses.write_text(edited)
    caplog.set_level("INFO")
    run_train(prepared, "coded", {"epochs": 2})
    assert "starting fresh" in caplog.text and "resuming" not in caplog.text


def test_killed_run_resumes_to_the_same_model(prepared, monkeypatch):
    reference, _ = load_model(run_train(prepared, "straight", {"epochs": 3}) / "model.pt")

    calls = {"n": 0}
    real = train.pk_batch

    def dies_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2 * TINY["steps_per_epoch"]:  # first batch of the third epoch
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "pk_batch", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        run_train(prepared, "resumed", {"epochs": 3})
    assert not (prepared / "resumed" / "model.pt").exists()
    assert torch.load(prepared / "resumed" / "ckpt" / "last.ckpt", weights_only=False)["epoch"] == 1
    monkeypatch.setattr(train, "pk_batch", real)
    resumed_dir = run_train(prepared, "resumed", {"epochs": 3})
    resumed, payload = load_model(resumed_dir / "model.pt")
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [h["epoch"] for h in payload["history"]] == [-1, 0, 1, 2]
    assert len((resumed_dir / "live/plots/metrics/train/loss.tsv").read_text().splitlines()) == 1 + 3
    assert not (resumed_dir / "ckpt" / "last.ckpt").exists()


def kill_after_first_epoch(prepared, name: str, overrides: dict, monkeypatch) -> None:
    """Run ``name`` and kill it in its second epoch: its checkpoint holds epoch 0."""
    real, calls = train.pk_batch, {"n": 0}

    def dies_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > TINY["steps_per_epoch"]:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(train, "pk_batch", dies_in_epoch_two)
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


def test_unknown_params_are_rejected(prepared):
    with pytest.raises(ValueError, match="unknown train params"):
        run_train(prepared, "typo", {"learning_rate": 0.1})


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(prepared):
    params = write_params(prepared / "ddp.yaml", TINY_CROP | {f"train.mobilenet_v2.{k}": v for k, v in TINY.items()})
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
    assert "on cpu x2" in done.stderr
    _, payload = load_model(prepared / "ddp" / "model.pt")
    assert len(payload["history"]) == 3


def test_curves_in_a_git_repo_without_commits(tmp_path, monkeypatch):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    live = train.open_live("live")
    train.log_record(live, {"epoch": 0, "loss": 0.5, "val_rank1": 0.25})
    live.end()
    assert json.loads((tmp_path / "live" / "metrics.json").read_text())["train"]["loss"] == 0.5


def test_train_params_read_exponent_floats_yaml_leaves_as_strings(tmp_path):
    (tmp_path / "p.yaml").write_text("train:\n  lr: 1e-5\n  margin: 0.1\n")
    assert train.TrainConfig.from_params(load_params(tmp_path / "p.yaml")["train"]).lr == 1e-5
    with pytest.raises(ValueError, match="lr: 'fast' is not a number"):
        train.TrainConfig.from_params({"lr": "fast"})
