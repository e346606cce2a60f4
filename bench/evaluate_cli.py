"""Peak memory of ``python -m facesearch evaluate``: crops stacked in RAM (baseline) vs packed memory maps (ours).

    python bench/evaluate_cli.py --sizes 600,2400 --n-jobs 2

On a synthetic CelebA-layout folder of each size (``facesearch.data.synth``), runs the
command twice with the same untrained model (MobileNet-V2, 64 px input, crops of
218 px as the defaults cut them): once from the code at ``--before`` (git ref;
default the commit before the change), which decodes every kept crop at 218 px
into a list and ``np.stack``-s it (two copies of all of them), and once from the
working tree, which packs the crops at the model's 64 px into memory-mapped
arrays with ``--n-jobs`` worker processes and embeds a chunk at a time.

Prints, per size and code: wall seconds, the main process's peak RSS (VmHWM,
read by the process itself when the metrics start: the data path of crops,
arrays and embedding this change is about; and at exit: the whole run, the
metrics' own working memory included), the peak RSS of the whole process tree
(main + joblib workers, sampled every 50 ms), and the baseline/ours ratios; then
the growth per 1000 photos between the first and last size, and the main
process's peaks at 40,000 photos extrapolated linearly from it (labelled so).
Rank-1 and mAP are printed for both: close, not bit-identical (ours resizes
when packing, rounded to uint8; the baseline on the fly, in float).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BASELINE_REF = "80572f2"  # main before issue 12's packed CLI evaluate

# Runs the CLI in this process and prints its own peak RSS (kB, from /proc): when the metrics
# start (the data path: crop, decode/pack, embed; both versions call facesearch.tools.cli.evaluate
# first thing after embedding) and at exit (the whole run, metrics included).
WRAPPER = """
import sys
sys.path.insert(0, sys.argv[1])
import facesearch.tools.cli as cli

def hwm():
    status = open("/proc/self/status").read()
    return [line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")][0]

metrics = cli.evaluate
def timed(*args, **kwargs):
    print("data_VmHWM_kB", hwm())
    return metrics(*args, **kwargs)
cli.evaluate = timed
cli.main(sys.argv[2:])
print("VmHWM_kB", hwm())
"""


def make_model(path: Path) -> None:
    import torch

    from facesearch.faces.config import FaceConfig
    from facesearch.nets.contract import preprocessing_record
    from facesearch.nets.models import get_model, save_model

    torch.manual_seed(0)
    model = get_model("mobilenet_v2", weights="none", embedding_dim=64, img_size=64)
    save_model(path, model, extra={"preprocessing": preprocessing_record(FaceConfig(), 64)})


def run_cli(code: Path, model: Path, data: Path, out: Path, n_jobs: int) -> dict:
    """Wall seconds, main and tree peak RSS (MB) and the metrics of one CLI run."""
    args = [sys.executable, "-c", WRAPPER, str(code), "evaluate", "--model", str(model), "--data", str(data),
            "--out", str(out), "--n-jobs", str(n_jobs), "--device", "cpu"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=code, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    root, tree_peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            tree_peak = max(tree_peak, sum(p.memory_info().rss for p in procs))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    stdout = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"evaluate failed under {code}:\n{stdout}")
    kb = {line.split()[0]: int(line.split()[1]) for line in stdout.splitlines() if "VmHWM_kB" in line}
    metrics = json.loads(out.read_text())
    return {"s": seconds, "data_mb": kb["data_VmHWM_kB"] / 1024, "main_mb": kb["VmHWM_kB"] / 1024,
            "tree_mb": tree_peak / 2**20, "n": metrics["n_kept"], "rank1": metrics["rank1"],
            "mAP": metrics["mAP"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="600,2400", help="photos per folder, comma-separated (two or more)")
    parser.add_argument("--n-jobs", type=int, default=-1, help="the CLI's --n-jobs for both runs")
    parser.add_argument("--before", default=BASELINE_REF, help="git ref of the baseline code")
    args = parser.parse_args()
    from facesearch.data.synth import SampleSpec, generate_sample

    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="evaluate-cli-bench-"))
    try:
        old = work / "old"
        old.mkdir()
        archive = subprocess.run(["git", "archive", args.before, "facesearch"], cwd=REPO, capture_output=True,
                                 check=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        make_model(work / "model.pt")
        rows = []
        for n in sizes:
            data = work / f"data{n}"
            generate_sample(SampleSpec(identities=n // 12, images_per_identity=12, seed=5), data)
            res = {name: run_cli(code, work / "model.pt", data, work / f"{name}{n}.json", args.n_jobs)
                   for name, code in (("baseline", old), ("ours", REPO))}  # fmt: skip
            b, o = res["baseline"], res["ours"]
            for name, r in res.items():
                print(f"{n} photos ({r['n']} kept) {name:8s}: {r['s']:6.1f} s, main peak RSS: data path "
                      f"{r['data_mb']:6.0f} MB, whole run {r['main_mb']:6.0f} MB; tree peak RSS {r['tree_mb']:6.0f} MB;"
                      f" rank1 {r['rank1']:.3f}, mAP {r['mAP']:.3f}", flush=True)  # fmt: skip
            ratio = {k: b[k] / o[k] for k in ("data_mb", "main_mb", "tree_mb")}
            print(f"{n} photos baseline/ours: main data path {ratio['data_mb']:.2f}x, main whole run "
                  f"{ratio['main_mb']:.2f}x, tree {ratio['tree_mb']:.2f}x", flush=True)  # fmt: skip
            if abs(b["rank1"] - o["rank1"]) > 1e-3 or abs(b["mAP"] - o["mAP"]) > 1e-3:
                print(f"  note: metrics differ (rank1 {b['rank1']} vs {o['rank1']}, mAP {b['mAP']} vs {o['mAP']})")
            rows.append((n, res))
        (n1, r1), (n2, r2) = rows[0], rows[-1]
        print()
        for name in ("baseline", "ours"):
            for key, label in (("data_mb", "data path"), ("main_mb", "whole run")):
                slope = (r2[name][key] - r1[name][key]) / (n2 - n1) * 1000
                at40k = r2[name][key] + slope * (40_000 - n2) / 1000
                print(f"{name:8s} {label}: main peak grows {slope:6.1f} MB per 1000 photos; extrapolated to "
                      f"40,000 photos: {at40k / 1024:5.1f} GB")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
