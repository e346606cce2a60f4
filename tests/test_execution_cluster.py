"""The crop stage on a real cluster (dask.distributed, ray) writes the same manifest bytes as on loky.

Each test starts a cluster with two worker processes on this machine (dask's on loopback;
ray's head takes the host's address), points the stage at it as a user would (through
``execution.address``, or DASK_SCHEDULER_ADDRESS), and compares the Parquet bytes with a
loky run on the same input; the manifest holds every crop's sha256, so the crops compare too.
"""

from __future__ import annotations

import os

import pytest
from conftest import REPO, run_crop


def manifest_bytes(workdir) -> bytes:
    return (workdir / "data" / "manifest.parquet").read_bytes()


@pytest.fixture
def loky_run(small_sample, tmp_path):
    df, _ = run_crop(tmp_path / "loky", small_sample, {"execution.n_jobs": 2, "execution.backend": "loky"})
    assert (df["status"] == "kept").sum() > 0  # something was detected, so the crops are compared too
    return manifest_bytes(tmp_path / "loky")


@pytest.fixture
def importable_repo(monkeypatch):
    """Worker processes started from here import the project as a user's would: through PYTHONPATH."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


@pytest.mark.parametrize("told_by", ["params", "environment"])
def test_dask_cluster_same_manifest_bytes_as_loky(small_sample, tmp_path, loky_run, importable_repo, told_by):
    distributed = pytest.importorskip("distributed", reason="dask.distributed not installed (requirements-cluster.txt)")
    import dask

    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                 dashboard_address=None) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):  # fmt: skip
        overrides = {"execution.backend": "dask"}
        if told_by == "params":
            overrides["execution.address"] = cluster.scheduler_address
            run_crop(tmp_path / "dask", small_sample, overrides)
        else:  # what DASK_SCHEDULER_ADDRESS sets when dask is imported
            with dask.config.set({"scheduler-address": cluster.scheduler_address}):
                run_crop(tmp_path / "dask", small_sample, overrides)
        executed = client.run(lambda dask_worker: dask_worker.state.executed_count)
    assert len(executed) == 2 and all(n > 0 for n in executed.values())  # both worker processes did photos
    assert manifest_bytes(tmp_path / "dask") == loky_run


def test_dask_without_address_starts_and_stops_a_local_cluster(small_sample, tmp_path, loky_run, monkeypatch):
    pytest.importorskip("distributed", reason="dask.distributed not installed (requirements-cluster.txt)")
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    run_crop(tmp_path / "dask", small_sample, {"execution.backend": "dask", "execution.n_jobs": 2})
    assert manifest_bytes(tmp_path / "dask") == loky_run
    import distributed

    with pytest.raises(ValueError):  # the stage's client and cluster are gone with the run
        distributed.get_client()


@pytest.mark.slow  # a ray head (GCS, raylet) starts: about 6 s here
def test_ray_cluster_same_manifest_bytes_as_loky(small_sample, tmp_path, loky_run, importable_repo, capfd):
    pytest.importorskip("ray", reason="ray not installed (requirements-cluster.txt)")
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        overrides = {"execution.backend": "ray", "execution.n_jobs": 2, "execution.address": cluster.address}
        run_crop(tmp_path / "ray", small_sample, overrides)
        # The stage ran on this cluster (not on a local ray of its own), then disconnected ...
        assert f"Connecting to existing Ray cluster at address: {cluster.address}" in capfd.readouterr().err
        assert not ray.is_initialized()
        ray.init(address=cluster.address)
        assert ray.cluster_resources()["CPU"] == 2  # ... from the cluster it ran on, which is still up
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert manifest_bytes(tmp_path / "ray") == loky_run


def test_address_with_a_local_backend_fails_loudly(small_sample, tmp_path):
    with pytest.raises(ValueError, match=r"execution.address is for the dask / ray backends, not 'loky'"):
        run_crop(tmp_path / "w", small_sample, {"execution.backend": "loky", "execution.address": "tcp://127.0.0.1:1"})
