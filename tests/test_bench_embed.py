"""bench/embed.py: the throughput of saved models, each against the first, read with their validation mAP."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, run_train


def test_embed_bench_reports_each_model_against_the_first(prepared):
    small = run_train(prepared, "bench_small", {"epochs": 1, "img_size": 24, "tta_jitters": 0}) / "model.pt"
    large = run_train(prepared, "bench_large", {"epochs": 1, "img_size": 32, "tta_jitters": 2}) / "model.pt"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "embed.py"),
        str(large),
        str(small),
        "--images",
        str(prepared / "data" / "arrays" / "val.npy"),
        "--n",
        "8",
        "--batch",
        "4",
        "--repeats",
        "1",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()  # fmt: skip
    assert out[0].startswith("8 images of 40 px")
    first, second = out[1], out[2]
    assert " 32 px   4 views" in first and " 1.00x the first" in first and "val mAP" in first
    assert " 24 px   2 views" in second and "x the first" in second
