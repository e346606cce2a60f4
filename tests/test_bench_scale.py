from __future__ import annotations

import sys
import textwrap

import pytest
import yaml

from bench.scale import (
    BENCH_SETTINGS,
    GIB,
    REPO,
    Measure,
    SizeResult,
    bench_params,
    markdown,
    parse_sizes,
    pipeline_stages,
    ratios,
    run_measured,
    snapshot,
    stage_prefix,
    targets,
    written,
)


@pytest.fixture(scope="module")
def repo_pipeline():
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    return base, dvc


def test_stages_are_dvc_yamls_with_the_matrix_expanded_and_params_filled_in(repo_pipeline):
    base, dvc = repo_pipeline
    params = bench_params(base, 7, {})
    stages = pipeline_stages(dvc, params)
    names = [s.name for s in stages]
    expected = []
    for name, spec in dvc["stages"].items():
        if "foreach" in spec:  # ${fusions}: one stage per key
            expected += [f"{name}@{key}" for key in params[spec["foreach"][2:-1]]]
        else:
            expected += [f"{name}@{b}" for b in params["backbones"]] if "matrix" in spec else [name]
    assert names == expected
    for s in stages:
        assert s.cmd[0] == sys.executable and not any("${" in part for part in s.cmd), s.cmd
    crop = next(s for s in stages if s.name == "crop")
    assert crop.cmd[crop.cmd.index("--data") + 1] == params["data"]["root"]
    for b in params["backbones"]:
        train = next(s for s in stages if s.name == f"train@{b}")
        assert train.cmd[train.cmd.index("--backbone") + 1] == b


def test_a_matrix_of_two_keys_runs_every_combination():
    dvc = {"stages": {"s": {"matrix": {"a": "${xs}", "b": [1, 2]}, "cmd": "python run.py ${item.a} ${item.b} ${k.v}"}}}
    stages = pipeline_stages(dvc, {"xs": ["p", "q"], "k": {"v": 9}}, python="py")
    assert [(s.name, s.cmd) for s in stages] == [
        ("s@p-1", ["py", "run.py", "p", "1", "9"]),
        ("s@p-2", ["py", "run.py", "p", "2", "9"]),
        ("s@q-1", ["py", "run.py", "q", "1", "9"]),
        ("s@q-2", ["py", "run.py", "q", "2", "9"]),
    ]


def test_bench_params_resize_the_sample_and_set_every_backbone(repo_pipeline):
    base, _ = repo_pipeline
    before = yaml.safe_dump(base)
    p = bench_params(base, 123, {"train.resnet50.epochs": 5, "crop.size": 40})
    assert yaml.safe_dump(base) == before  # the repository's params are not touched
    assert p["sample"]["identities"] == 123
    assert p["sample"]["images_per_identity"] == BENCH_SETTINGS["sample.images_per_identity"]
    assert p["crop"]["size"] == 40  # --set wins over BENCH_SETTINGS
    for name, block in p["train"].items():
        assert block["img_size"] == BENCH_SETTINGS["train.*.img_size"]
        assert block["epochs"] == (5 if name == "resnet50" else BENCH_SETTINGS["train.*.epochs"])


def test_stage_prefix_stops_after_the_named_stage_or_all_of_a_matrix(repo_pipeline):
    base, dvc = repo_pipeline
    stages = pipeline_stages(dvc, bench_params(base, 7, {}))
    assert [s.name for s in stage_prefix(stages, "crop")] == ["sample", "crop"]
    upto_train = [s.name for s in stage_prefix(stages, "train")]
    assert upto_train[-len(base["backbones"]) :] == [f"train@{b}" for b in base["backbones"]]
    assert stage_prefix(stages, None) == stages
    with pytest.raises(ValueError, match="no stage"):
        stage_prefix(stages, "nope")


def test_parse_sizes():
    assert parse_sizes("1018, 10177:crop", False, 20) == [(1018, None), (10177, "crop")]
    assert parse_sizes("1018,10177", True, 20) == [(1018, None)]  # 203,540 photos > 100k
    assert parse_sizes("10177", True, 2) == [(10177, None)]


def test_written_counts_new_and_changed_files_only(tmp_path):
    (tmp_path / "same.txt").write_text("x" * 10)
    (tmp_path / "grow.txt").write_text("y")
    before = snapshot(tmp_path)
    (tmp_path / "grow.txt").write_text("y" * 100)
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "new.bin").write_bytes(b"z" * 1000)
    assert written(before, snapshot(tmp_path)) == (1100, 2)
    assert written(snapshot(tmp_path), snapshot(tmp_path)) == (0, 0)


GRANDCHILD = textwrap.dedent(
    """
    import subprocess, sys
    # The parent stays small; a grandchild it does not wait for holds 300 MB for a while:
    # only sampling the tree sees that (wait4's max RSS is the parent's alone).
    code = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"
    subprocess.Popen([sys.executable, "-c", code])
    import time; time.sleep(2.0)
    sys.exit(3)
    """
)


@pytest.mark.slow
def test_run_measured_sees_the_peak_of_the_process_tree_and_the_exit_status(tmp_path):
    r = run_measured([sys.executable, "-c", GRANDCHILD], tmp_path, {}, tmp_path / "log.txt", poll_s=0.05)
    assert r["rc"] == 3 and not r["timed_out"]
    assert r["peak_rss"] >= 300 * 2**20
    assert r["wall_s"] >= 2.0 and r["cpu_s"] > 0


def test_run_measured_kills_a_stage_past_its_timeout(tmp_path):
    r = run_measured([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path, {}, tmp_path / "l", 0.05, 0.5)
    assert r["timed_out"] and r["rc"] != 0 and r["wall_s"] < 10


def size(identities: int, photos: int, *stages: Measure) -> SizeResult:
    return SizeResult(identities, photos, list(stages))


def m(stage: str, wall: float, rss_gib: float = 1.0, rc: int | None = 0) -> Measure:
    return Measure(stage, rc, wall, wall, int(rss_gib * GIB), round(wall * 1000), round(wall * 10))


def test_ratios_and_targets_flag_worse_than_linear_growth_and_memory_over_the_limit():
    small = size(10, 100, m("a", 1), m("b", 1), m("c", 1), m("d", 0, rc=None))
    large = size(100, 1000, m("a", 9), m("b", 12.5, rss_gib=9), m("c", 2, rc=1), m("d", 0, rc=None))
    table = ratios(small, large)
    assert set(table) == {"a", "b"}  # c failed at the large size, d never ran
    assert table["a"]["wall_s"] == pytest.approx(9) and table["b"]["peak_rss"] == pytest.approx(9)
    checks = dict((line.split(":")[0], ok) for ok, line in targets([small, large], 8 * GIB, 1.2))
    assert checks["every stage ran at 100 photos (10 identities)"] is False  # d did not run
    assert checks["every stage ran at 1,000 photos (100 identities)"] is False
    assert checks["peak RSS <= 8 GiB at 100 photos (10 identities)"] is True
    assert checks["peak RSS <= 8 GiB at 1,000 photos (100 identities)"] is False  # b: 9 GiB
    growth = {k.split()[0]: ok for k, ok in checks.items() if "grows" in k}
    # Limit 1.2 x 10 = 12: b's wall (12.5), written bytes and files fail; its RSS ratio (9) passes.
    assert growth == {"wall_s": False, "peak_rss": True, "written_bytes": False, "written_files": False}
    text = markdown([small, large], targets([small, large], 8 * GIB, 1.2))
    assert "| a | 9.00 | 1.00 | 9.00 | 9.00 |" in text
    assert "- FAIL wall_s grows at most linearly" in text and "worst 12.50 (b)" in text
    assert "total stage time at 1,000 photos (100 identities): 23.5 s" in text


def test_linear_growth_passes_within_the_slack():
    small = size(10, 100, m("a", 1), m("b", 2))
    large = size(100, 1000, m("a", 11.9), m("b", 10))
    assert all(ok for ok, _ in targets([small, large], 8 * GIB, 1.2))
    assert not all(ok for ok, _ in targets([small, large], 8 * GIB, 1.1))  # a: 11.9 > 11


def test_evaluate_time_is_held_to_its_quadratic_work_and_its_memory_to_linear():
    # evaluate ranks every test photo against every other: 10x the photos is 100x the pairs.
    small = size(10, 100, m("a", 1), m("evaluate@x", 1))
    large = size(100, 1000, m("a", 9), m("evaluate@x", 50))
    checks = {line.split(" (")[0]: ok for ok, line in targets([small, large], 8 * GIB, 1.2)}
    assert checks["wall_s grows at most linearly"] is True  # a: 9; evaluate not held to linear time
    assert checks["wall_s of evaluate@x grows at most as its work"] is True  # 50 <= 120
    assert checks["written_bytes grows at most linearly"] is False  # its writes still are (50 > 12)
    over = size(100, 1000, m("a", 9), m("evaluate@x", 130))
    assert not dict((line.split(" (")[0], ok) for ok, line in targets([small, over], 8 * GIB, 1.2))[
        "wall_s of evaluate@x grows at most as its work"
    ]
