"""`dvc status` and a no-op `dvc repro` with CelebA's number of crop files, before vs after narrowing deps.

    python bench/dvc_status.py --files 200000

Builds a scratch git + DVC project in a temporary folder with the real
pipeline's stage graph (deps, outs, params, metrics and plots of dvc.yaml, and
the repository's params.yaml and code files, so every dep hashes as in a real
checkout), but each ``cmd`` replaced by a stub that writes tiny outputs; the
crop stage's stub writes ``--files`` distinct tiny crop files (CelebA keeps
~200k). Two dvc.yaml layouts run in the same project, in turns (``--rounds``):

- baseline: dvc.yaml as of ``--before`` (git ref; default the commit before
  the change, where split, pack and both evaluate stages depend on data/crops);
- ours: the working tree's dvc.yaml (only pack depends on data/crops).

After one setup ``dvc repro`` per layout, times ``dvc status`` and a no-op
``dvc repro`` (both must report nothing to do), best of ``--repeats``. Prints
seconds and the baseline/ours ratio. The setup repro, which hashes and caches
every crop once, is timed too but is not the comparison.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BASELINE_REF = "80572f2"  # main before issue 12's narrowed deps

# Writes each path it is given: a file when it has a suffix, else a folder with one file,
# data/crops with N files. Same bytes every run, so a repro after it has nothing to do.
STUB = """
import sys
from pathlib import Path

n_crops = int(sys.argv[1])
for arg in sys.argv[2:]:
    p = Path(arg)
    if p.as_posix() == "data/crops":
        p.mkdir(parents=True, exist_ok=True)
        for i in range(n_crops):
            (p / f"{i:06d}.jpg").write_bytes(i.to_bytes(4, "little"))
    elif p.suffix:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("step\\tvalue\\n0\\t1\\n" if p.suffix == ".tsv" else f"{p.as_posix()}\\n")
    else:
        p.mkdir(parents=True, exist_ok=True)
        (p / "part.tsv").write_text("step\\tvalue\\n0\\t1\\n")
"""


def out_paths(stage: dict) -> list[str]:
    """Every path a stage writes: outs, metrics and plots (strings or one-key dicts)."""
    paths = []
    for key in ("outs", "metrics", "plots"):
        for entry in stage.get(key) or []:
            paths.append(entry if isinstance(entry, str) else next(iter(entry)))
    return paths


def stubbed(dvc_yaml: str, n_files: int) -> str:
    """``dvc_yaml`` with every stage's command replaced by the stub writing its outputs."""
    doc = yaml.safe_load(dvc_yaml)
    for stage in doc["stages"].values():
        stage["cmd"] = " ".join(["python stub.py", str(n_files), *out_paths(stage)])
    return yaml.safe_dump(doc, sort_keys=False)


def run(cwd: Path, *args: str) -> tuple[float, str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    t0 = time.perf_counter()
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stdout}{out.stderr}")
    return seconds, out.stdout + out.stderr


def dvc(cwd: Path, *args: str) -> tuple[float, str]:
    return run(cwd, sys.executable, "-m", "dvc", *args)


def setup(work: Path) -> None:
    for rel in ("stages", "facesearch"):
        shutil.copytree(REPO / rel, work / rel, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    (work / "stub.py").write_text(STUB)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid"]
    run(work, "git", "init", "-q")
    dvc(work, "init", "-q")
    dvc(work, "config", "core.analytics", "false")
    run(work, *git, "add", "-A")
    run(work, *git, "commit", "-qm", "bench")


def measure(work: Path, layout: str, repeats: int) -> dict:
    (work / "dvc.yaml").write_text(layout)
    setup_s, _ = dvc(work, "repro", "-q")
    status, noop = [], []
    for _ in range(repeats):
        s, text = dvc(work, "status")
        assert "up to date" in text, text
        status.append(s)
        s, text = dvc(work, "repro")
        assert "Running stage" not in text, text
        noop.append(s)
    return {"setup": setup_s, "status": min(status), "repro": min(noop)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=200_000, help="crop files in data/crops")
    parser.add_argument("--before", default=BASELINE_REF, help="git ref of the baseline dvc.yaml")
    parser.add_argument("--rounds", type=int, default=2, help="turns of baseline then ours")
    parser.add_argument("--repeats", type=int, default=3, help="timings per turn (best kept)")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args()
    before = subprocess.run(["git", "show", f"{args.before}:dvc.yaml"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout  # fmt: skip
    layouts = {"baseline": stubbed(before, args.files), "ours": stubbed((REPO / "dvc.yaml").read_text(), args.files)}
    for name, text in layouts.items():
        deps = [s for s, st in yaml.safe_load(text)["stages"].items() if "data/crops" in st.get("deps", [])]
        print(f"{name}: stages depending on data/crops: {deps}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dvc-status-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        setup(work)
        best: dict[str, dict] = {}
        for r in range(args.rounds):
            for name, text in layouts.items():
                m = measure(work, text, args.repeats)
                print(f"round {r + 1} {name}: setup repro {m['setup']:.1f} s, dvc status {m['status']:.2f} s, "
                      f"no-op dvc repro {m['repro']:.2f} s", flush=True)  # fmt: skip
                best[name] = {k: min(v, best.get(name, {}).get(k, v)) for k, v in m.items()}
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.files} crop files, best of {args.rounds} x {args.repeats}:")
    for key, label in (("status", "dvc status"), ("repro", "no-op dvc repro")):
        b, o = best["baseline"][key], best["ours"][key]
        print(f"  {label:16s} baseline {b:6.2f} s   ours {o:6.2f} s   baseline/ours {b / o:.2f}x")


if __name__ == "__main__":
    main()
