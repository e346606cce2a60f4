"""The training loop's machinery (facesearch/nets/training.py), each piece on its own, on CPU."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import threading

import numpy as np
import pandas as pd
import pytest
import torch

from facesearch.nets import training as T
from facesearch.nets.models import resolve_device


# ---------------------------------------------------------------- sampling ---
def test_identity_groups_keep_identities_with_enough_images():
    labels = np.array([5, 3, 5, 9, 3, 5])
    groups = T.identity_groups(labels)
    assert [g.tolist() for g in groups] == [[1, 4], [0, 2, 5]]  # identity 9 has one image
    assert [g.tolist() for g in T.identity_groups(labels, min_size=3)] == [[0, 2, 5]]


def test_pk_batch_is_p_identities_of_k_images():
    labels = np.repeat(np.arange(6), [5, 5, 5, 5, 5, 2])
    groups = T.identity_groups(labels)
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = T.pk_batch(groups, 3, 4, rng)
        ids, counts = np.unique(labels[idx], return_counts=True)
        assert len(ids) == 3 and (counts == 4).all()
        for i in ids:  # an identity repeats images only when it has fewer than K
            rows = idx[labels[idx] == i]
            assert (labels[rows] == i).all()
            if (labels == i).sum() >= 4:
                assert len(set(rows.tolist())) == 4
    assert len(T.pk_batch(groups, 10, 2, rng)) == 6 * 2  # P is capped by the identities there are


def test_epoch_steps_split_one_pass_among_the_processes():
    assert T.epoch_steps(100, 8) == 12
    assert T.epoch_steps(100, 8, world=2) == 6
    assert T.epoch_steps(100, 8, world=4) == 3
    assert T.epoch_steps(5, 8, world=2) == 1  # at least one step
    assert T.epoch_steps(100, 8, world=2, steps_per_epoch=7) == 7  # a fixed count is per process


def test_a_single_process_draws_what_the_rank_keyed_stream_drew():
    """The shared stream's key [seed, epoch] is the old rank-0 key [seed, epoch, 0]: same batches, same model."""
    rng, seeds = T.epoch_streams(3, 5, world=1)
    old = np.random.default_rng([3, 5, 0])
    assert seeds == [int(old.integers(2**62))]
    assert (rng.permutation(50) == old.permutation(50)).all()


def test_every_process_gets_its_own_augmentation_seed_and_the_same_stream():
    (r2, seeds2), (r4, seeds4) = T.epoch_streams(0, 1, world=2), T.epoch_streams(0, 1, world=4)
    assert len(set(seeds4)) == 4 and seeds4[:2] == seeds2
    assert (r2.permutation(50) == r4.permutation(50)).all()
    assert T.epoch_streams(0, 2)[1] != T.epoch_streams(0, 1)[1]  # a new epoch, new draws


def test_processes_deal_out_one_pk_sequence():
    """W processes together see the batches one process draws in W times the steps, in turn."""
    groups = T.identity_groups(np.repeat(np.arange(10), 4))
    single = list(T.pk_batches(groups, 3, 2, 6, T.epoch_streams(0, 0, 1)[0]))
    ranks = [list(T.pk_batches(groups, 3, 2, 3, T.epoch_streams(0, 0, 2)[0], rank, 2)) for rank in (0, 1)]
    dealt = [b for pair in zip(*ranks, strict=True) for b in pair]
    assert all((a == b).all() for a, b in zip(single, dealt, strict=True))
    assert any((a != b).any() for a, b in zip(*ranks, strict=True))


def test_triplet_batches_are_disjoint_across_processes_within_a_pass():
    triplets = np.arange(3 * 40).reshape(40, 3)  # rows 3i, 3i+1, 3i+2: anchor, positive, negative
    steps = T.epoch_steps(len(triplets), 4, world=2)
    seen = []
    for rank in (0, 1):
        for batch in T.triplet_batches(triplets, 4, steps, T.epoch_streams(0, 0, 2)[0], rank, 2):
            a, p, n = batch.reshape(3, 4)  # anchors, then positives, then negatives
            assert (p == a + 1).all() and (n == a + 2).all()
            seen += (a // 3).tolist()
    assert len(seen) == len(set(seen)) == 40  # every triplet once, on one process
    single = list(T.triplet_batches(triplets, 4, 2 * steps, T.epoch_streams(0, 0, 1)[0]))
    ranks = [list(T.triplet_batches(triplets, 4, steps, T.epoch_streams(0, 0, 2)[0], r, 2)) for r in (0, 1)]
    dealt = [b for pair in zip(*ranks, strict=True) for b in pair]
    assert all((a == b).all() for a, b in zip(single, dealt, strict=True))


def test_triplet_batches_wrap_around_past_the_pass():
    triplets = np.arange(3 * 5).reshape(5, 3)
    anchors = [b[:2] for b in T.triplet_batches(triplets, 2, 5, np.random.default_rng(0))]
    counts = np.bincount(np.concatenate(anchors) // 3, minlength=5)
    assert (counts == 2).all()  # 10 anchors from 5 triplets: two passes


def test_read_batch_returns_rows_in_order_with_repeats(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, size=(10, 4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", arr)
    images = np.load(tmp_path / "a.npy", mmap_mode="r")
    labels = np.arange(10) * 7
    idx = np.array([7, 2, 7, 0])
    batch, ids = T.read_batch(images, idx, labels)
    assert batch.dtype == torch.uint8 and torch.equal(batch, torch.from_numpy(arr[idx]))
    assert ids.tolist() == (labels[idx]).tolist()
    assert T.read_batch(images, idx)[1] is None


# -------------------------------------------------------------- prefetcher ---
def test_prefetcher_yields_every_item_in_order():
    with T.Prefetcher(range(50), lambda i: i * i, depth=3) as loader:
        assert list(loader) == [i * i for i in range(50)]
        assert next(loader, "done") == "done"  # exhausted stays exhausted


def test_prefetcher_reads_the_next_item_while_the_caller_holds_this_one():
    read_ahead = threading.Event()

    def read(i):
        if i == 1:
            read_ahead.set()
        return i

    with T.Prefetcher(range(3), read) as loader:
        assert next(loader) == 0
        # No next() call yet: item 1 can only have been read by the background thread.
        assert read_ahead.wait(timeout=10)


def test_prefetcher_reads_at_most_depth_ahead():
    done = []
    release = threading.Event()

    def read(i):
        done.append(i)
        if len(done) == 4:
            release.set()  # the thread got this far: one item handed over, depth queued, one in hand
        return i

    with T.Prefetcher(range(100), read, depth=2) as loader:
        assert next(loader) == 0
        assert release.wait(timeout=10)
        threading.Event().wait(0.2)  # let a runaway thread show itself
        assert len(done) <= 4


def test_prefetcher_raises_the_threads_exception_at_its_place():
    def items():
        yield from range(3)
        raise KeyboardInterrupt("killed")  # e.g. a test killing the sampler mid-epoch

    with T.Prefetcher(items(), lambda i: i) as loader:
        assert [next(loader) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(KeyboardInterrupt, match="killed"):
            next(loader)
        with pytest.raises(KeyboardInterrupt):
            next(loader)


def test_leaving_a_prefetcher_early_stops_its_thread():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    loader = T.Prefetcher(endless(), lambda i: i, depth=2)
    with loader:
        assert next(loader) == 0
    assert not loader._thread.is_alive()


# ---------------------------------------------------------------- schedule ---
def test_lr_factor_warms_up_linearly_then_decays_to_zero():
    assert [T.lr_factor(s, 100, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert T.lr_factor(4, 100, 4) == 1.0
    assert T.lr_factor(52, 100, 4) == pytest.approx(0.5)  # half way through the cosine
    assert T.lr_factor(100, 100, 4) == pytest.approx(0.0, abs=1e-12)
    assert T.lr_factor(150, 100, 4) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0
    factors = [T.lr_factor(s, 100, 4) for s in range(3, 101)]
    assert all(a >= b for a, b in itertools.pairwise(factors))


def test_validation_at_reads_one_epochs_val_scores():
    h = [{"epoch": -1, "val_mAP": 0.4}, {"epoch": 0, "loss": 1.2, "val_mAP": 0.5, "val_rank1": 0.6}]
    assert T.validation_at(h, 0) == {"val_mAP": 0.5, "val_rank1": 0.6}  # the loss is no validation score
    assert T.validation_at(h, 7) == {} and T.validation_at([], None) == {}


def test_best_epoch_rule():
    h = [{"epoch": -1, "val_mAP": 1.0}, {"epoch": 0, "val_mAP": 0.5}, {"epoch": 1, "val_mAP": 0.7},
         {"epoch": 2, "val_mAP": 0.7}]  # fmt: skip
    assert T.best_epoch(h) == -1  # no epoch beats the start: keep it (early stopping at zero)
    h[0]["val_mAP"] = 0.6
    assert T.best_epoch(h) == 1  # the earliest of equals
    assert T.best_epoch([{"epoch": 0, "val_mAP": math.nan}, {"epoch": 1, "val_mAP": math.nan}]) == 1
    h[0]["val_mAP"] = 1.0
    assert T.best_epoch(h, keep="last") == 2  # a fixed budget: the final epoch, whatever validation says
    assert T.best_epoch([]) == -1
    with pytest.raises(ValueError, match="keep"):
        T.best_epoch(h, keep="latest")


# ------------------------------------------------------------- step stats ---
def test_step_stats_means_equal_the_mean_of_the_steps_floats():
    """Exactly: the epoch record (saved in the model file) must not depend on where the values were kept."""
    rng = np.random.default_rng(0)
    losses = [torch.tensor(v, dtype=torch.float32) for v in rng.random(37)]
    active = rng.random(37).astype(np.float32).tolist()
    stats = T.StepStats(("loss", "active"), 40)
    for loss, a in zip(losses, active, strict=True):
        stats.add(loss=loss.requires_grad_(), active=a)
    means = stats.means()
    assert means["loss"] == float(np.mean([v.item() for v in losses]))
    assert means["active"] == float(np.mean(active))
    assert stats.running_mean("loss") == pytest.approx(means["loss"], rel=1e-6)
    assert math.isnan(T.StepStats(("loss",), 3).running_mean("loss"))


# ------------------------------------------------------- processes, state ---
def test_dist_from_torchruns_environment():
    assert T.Dist.from_env({}) == T.Dist(0, 1, 0) and T.Dist.from_env({}).main
    ctx = T.Dist.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert ctx == T.Dist(3, 4, 1) and not ctx.main


def test_the_one_device_resolver():
    assert resolve_device("cpu", index=1) == torch.device("cpu")  # a CPU ignores the GPU index
    if torch.cuda.is_available():
        assert resolve_device("auto", index=0) == torch.device("cuda", 0)
    else:
        assert resolve_device("auto", index=0) == torch.device("cpu")
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")


def test_run_digest_changes_with_each_part():
    base = ({"lr": 0.1}, {"train.npy": "1:2"}, {"stages/train.py": "ab"}, {"size": 40})
    digest = T.run_digest(*base)
    assert digest == T.run_digest(*base) and len(digest) == 16
    for i, changed in enumerate(({"lr": 0.2}, {"train.npy": "1:3"}, {"stages/train.py": "ac"}, {"size": 41})):
        parts = list(base)
        parts[i] = changed
        assert T.run_digest(*parts) != digest, i


def test_input_fingerprint_hashes_tables_and_stats_arrays(tmp_path):
    pd.DataFrame({"a": [1, 2]}).to_parquet(tmp_path / "t.parquet")
    np.save(tmp_path / "x.npy", np.zeros(3))
    first = T.input_fingerprint([tmp_path / "t.parquet", tmp_path / "x.npy"])
    assert len(first["t.parquet"]) == 64 and first["x.npy"].startswith(f"{(tmp_path / 'x.npy').stat().st_size}:")
    pd.DataFrame({"a": [1, 3]}).to_parquet(tmp_path / "t.parquet")
    assert T.input_fingerprint([tmp_path / "t.parquet"])["t.parquet"] != first["t.parquet"]


def test_checkpoint_round_trip_and_refusals(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    path = tmp_path / "c" / "last.ckpt"
    T.save_checkpoint(path, model, optimizer, scheduler, 4, "abc", [{"epoch": 4}], {"w": torch.ones(1)})
    payload = T.load_checkpoint(path, "abc")
    assert payload["epoch"] == 4 and payload["history"] == [{"epoch": 4}]
    assert torch.equal(payload["model"]["weight"], model.weight.detach())
    assert T.load_checkpoint(path, "other") is None  # other params, inputs or code
    assert T.load_checkpoint(tmp_path / "missing.ckpt", "abc") is None
    path.write_bytes(b"not a checkpoint")
    assert T.load_checkpoint(path, "abc") is None


# ------------------------------------------------------------------ curves ---
def test_curves_in_a_git_repo_without_commits(tmp_path, monkeypatch):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    live = T.open_live("live")
    T.log_record(live, {"epoch": 0, "loss": 0.5, "active": 0.25, "val_rank1": 0.25, "ignored": 1})
    live.end()
    metrics = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert metrics["train"] == {"loss": 0.5, "active_triplets": 0.25} and metrics["val"] == {"rank1": 0.25}
