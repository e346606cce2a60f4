from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_train, write_params

from facesearch.models import load_model
from facesearch.params import load_params
from stages import train


def test_outputs_curves_and_checkpoint(prepared):
    out = run_train(prepared, "basic")
    model, payload = load_model(out / "model.pt")
    assert model.config.backbone == "mobilenet_v2" and model.config.img_size == 32
    assert [h["epoch"] for h in payload["history"]] == [-1, 0, 1]  # untrained baseline, then each epoch
    metrics = json.loads((out / "live" / "metrics.json").read_text())
    assert metrics["step"] == 2 and "rank1" in metrics["val"]
    loss_curve = (out / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert len(loss_curve) == 1 + 2  # header + one row per epoch
    ckpt = torch.load(out / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["epoch"] == 1 and {"model", "optimizer", "scheduler", "digest"} <= set(ckpt)


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


def test_changed_params_do_not_resume(prepared, caplog):
    run_train(prepared, "changing", {"epochs": 1})
    caplog.set_level("INFO")
    run_train(prepared, "changing", {"epochs": 1, "lr": 0.01})
    assert "starting fresh" in caplog.text


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
    params = write_params(prepared / "ddp.yaml", {f"train.mobilenet_v2.{k}": v for k, v in TINY.items()})
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
