"""Scale bench: the built-in sample at CelebA size through every stage, and at a tenth of it.

    python bench/scale.py                              # 1,018 and 10,177 identities x 20 photos
    python bench/scale.py --skip-200k                  # the tenth only (~20k photos)
    python bench/scale.py --sizes 1018,10177:crop      # the CelebA size only up to the crop stage
    FACESEARCH_BENCH_LOCK=/work/scratch/cpu.lock python bench/scale.py   # take a lock per stage

For each size, a fresh project folder under ``--workdir`` gets a ``params.yaml``
(the repository's, with the sample resized and a small training budget: see
``BENCH_SETTINGS``; ``--set key=value`` changes any key) and every stage of
``dvc.yaml`` runs there in order, ``matrix`` stages once per backbone, with the
command line dvc.yaml gives it (``${...}`` filled in from that params.yaml), as
a subprocess of this script. Per stage it records:

- wall time and CPU time (user + system of the stage and its waited-for workers);
- peak RSS of the stage's process tree: the largest sum over the process and
  all its descendants (joblib workers), sampled every ``--poll`` seconds, and
  never below the kernel's max RSS of the largest single process (``wait4``),
  which catches a spike between samples. RSS counts the pages of memory-mapped
  files the stage touches (the packed arrays) and shared pages once per process;
- disk written: size and number of the files in the project folder that the
  stage created or changed.

It prints a Markdown table per size, the ratio of the largest size to the
smallest per stage, and a pass/fail line per target: every stage's peak RSS at
most ``--max-rss-gib`` (8 GiB) at each size, and no stage growing faster than
linearly (each ratio at most ``--linear-slack`` (1.2) times the ratio of photos:
12 for 10x; the time of a stage whose work is quadratic by definition, evaluate,
against the ratio of pairs: see ``WORK_POWER``); and the total stage time per size. The same goes to
``--report``.md and .json. Exit status 1 when a stage fails or a target does.

With ``FACESEARCH_BENCH_LOCK`` set to a lock file, each stage takes an exclusive
``flock`` on it while it runs (and while its outputs are counted), so short jobs
of others sharing the machine run between stages; do not also run the whole
script under ``flock`` on the same file, which would wait on itself.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
CELEBA_IDENTITIES = 10_177
IMAGES_PER_IDENTITY = 20  # CelebA: 202,599 photos of 10,177 people, ~20 each
LARGE_PHOTOS = 100_000  # --skip-200k drops the sizes above this many photos
GIB = 1024**3
MIB = 1024**2

# The bench's changes to params.yaml, dotted keys; "train.*" applies to every backbone.
# Small renders and crops keep the 200k run within an hour or so on 2 cores; one epoch
# of a few steps is enough to run every code path of training (validation included).
BENCH_SETTINGS = {
    "sample.images_per_identity": IMAGES_PER_IDENTITY,
    "sample.photo_width": [128, 192],  # Haar still finds ~88% of faces (220-340 px: ~89%)
    "crop.size": 48,
    "train.*.img_size": 32,
    "train.*.epochs": 1,
    "train.*.steps_per_epoch": 3,
    "train.*.warmup_steps": 1,
}


@dataclass
class Stage:
    name: str  # dvc.yaml's name, "train@resnet50" for a matrix stage
    cmd: list[str]


@dataclass
class Measure:
    stage: str
    rc: int | None = None  # None: not run
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss: int = 0  # bytes, process tree
    written_bytes: int = 0
    written_files: int = 0
    note: str = ""


@dataclass
class SizeResult:
    identities: int
    photos: int
    stages: list[Measure] = field(default_factory=list)
    params: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.photos:,} photos ({self.identities:,} identities)"

    @property
    def total_s(self) -> float:
        return sum(m.wall_s for m in self.stages if m.rc is not None)

    @property
    def ok(self) -> bool:
        return all(m.rc == 0 for m in self.stages)


# ---------------------------------------------------------------- params and dvc.yaml


def set_dotted(d: dict, key: str, value) -> None:
    """``d["a"]["b"] = value`` for key ``"a.b"``; ``*`` sets the key under every child."""
    head, _, rest = key.partition(".")
    if head == "*":
        for child in d.values():
            if isinstance(child, dict):
                set_dotted(child, rest, value)
        return
    if not rest:
        d[head] = value
        return
    set_dotted(d.setdefault(head, {}), rest, value)


def get_dotted(d, key: str):
    """``d``'s value at a dvc.yaml path: ``a.b``, with list indexes as ``a.0`` or ``a[0]``."""
    for part in re.sub(r"\[(\d+)\]", r".\1", key).split("."):
        d = d[int(part)] if isinstance(d, list) else d[part]
    return d


def bench_params(base: dict, identities: int, overrides: dict) -> dict:
    """The repository's params with the sample resized, BENCH_SETTINGS and ``overrides`` applied."""
    p = copy.deepcopy(base)
    set_dotted(p, "sample.identities", identities)
    for key, value in {**BENCH_SETTINGS, **overrides}.items():
        set_dotted(p, key, value)
    return p


_VAR = re.compile(r"\$\{([^}]+)\}")


def interpolate(text: str, params: dict, item: dict | None = None):
    """dvc.yaml's ``${key}`` templating: ``${item.x}`` from the matrix or foreach, ``${key}`` a foreach
    dict's key (``item["key"]`` here), the rest from params.

    A string that is one ``${...}`` alone gives the value itself (a list, for ``matrix``).
    """

    def value(key: str):
        if key == "key" and item is not None and "key" in item:
            return item["key"]
        if key.startswith("item."):
            return get_dotted((item or {}).get("item", item or {}), key[5:])
        return get_dotted(params, key)

    whole = _VAR.fullmatch(text.strip())
    if whole:
        return value(whole.group(1))
    return _VAR.sub(lambda m: str(value(m.group(1))), text)


def pipeline_stages(dvc: dict, params: dict, python: str = sys.executable) -> list[Stage]:
    """dvc.yaml's stages in file order, matrix and foreach stages expanded, commands filled in."""
    out = []
    for name, spec in dvc["stages"].items():
        matrix = spec.get("matrix")
        if "foreach" in spec:
            over = interpolate(spec["foreach"], params) if isinstance(spec["foreach"], str) else spec["foreach"]
            pairs = over.items() if isinstance(over, dict) else ((v, v) for v in over)
            for key, value in pairs:
                cmd = shlex.split(interpolate(spec["do"]["cmd"], params, {"key": key, "item": value}))
                if cmd and cmd[0] == "python":
                    cmd[0] = python
                out.append(Stage(f"{name}@{key}", cmd))
            continue
        if matrix:
            keys = list(matrix)
            values = [interpolate(v, params) if isinstance(v, str) else v for v in matrix.values()]
            items = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]
        else:
            items = [None]
        for item in items:
            cmd = shlex.split(interpolate(spec["cmd"], params, item))
            if cmd and cmd[0] == "python":
                cmd[0] = python
            full = name if item is None else f"{name}@{'-'.join(str(v) for v in item.values())}"
            out.append(Stage(full, cmd))
    return out


def stage_prefix(stages: list[Stage], until: str | None) -> list[Stage]:
    """The stages up to and including ``until`` (a name, or a matrix stage's base name: all of it)."""
    if until is None:
        return stages
    hits = [i for i, s in enumerate(stages) if s.name == until or s.name.split("@")[0] == until]
    if not hits:
        raise ValueError(f"no stage {until!r} in dvc.yaml; stages: {[s.name for s in stages]}")
    return stages[: hits[-1] + 1]


# ---------------------------------------------------------------- measuring


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under ``root``."""
    found = {}
    todo = [os.fspath(root)]
    while todo:
        with os.scandir(todo.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    todo.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    found[e.path] = (st.st_size, st.st_mtime_ns)
    return found


def written(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(bytes, files) of the files that are new or changed in ``after``."""
    changed = [sig for path, sig in after.items() if before.get(path) != sig]
    return sum(size for size, _ in changed), len(changed)


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        with suppress(psutil.Error):  # exited between listing and reading
            total += p.memory_info().rss
    return total


def run_measured(
    cmd: list[str], cwd: Path, env: dict, log_path: Path, poll_s: float = 0.2, timeout_s: float = 0.0
) -> dict:
    """Run ``cmd``; wall and CPU seconds, peak tree RSS (bytes) and exit status.

    The child is reaped with ``os.wait4`` (not ``Popen.wait``) to get its rusage:
    CPU time and max RSS of it and of the descendants it waited for.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        ps = psutil.Process(proc.pid)
        peak, status, usage, timed_out = 0, 0, None, False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, tree_rss(ps))
            if timeout_s and time.perf_counter() - start > timeout_s and not timed_out:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(poll_s)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        # ru_maxrss is in KiB on Linux: the largest single process, a floor for the tree's peak.
        "peak_rss": max(peak, usage.ru_maxrss * 1024),
        "rc": proc.returncode,
        "timed_out": timed_out,
    }


@contextmanager
def stage_lock(path: str | None):
    """An exclusive flock on ``path`` for the duration (none when ``path`` is empty)."""
    if not path:
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    return "\n".join(line for line in lines[-n:] if line.strip())


def reusable(previous: dict | None, identities: int, params: dict, stage_names: list[str]) -> list[Measure]:
    """The leading stages an earlier run (its ``--report`` JSON) finished for this size with these params."""
    if not previous:
        return []
    size = next((r for r in previous.get("sizes", []) if r["identities"] == identities), None)
    if size is None or size.get("params") != params:
        return []
    done = []
    for name, row in zip(stage_names, size["stages"], strict=False):
        if row["stage"] != name or row["rc"] != 0:
            break
        done.append(Measure(**{**row, "note": row["note"] or "from the resumed run"}))
    return done


def run_size(
    identities: int,
    until: str | None,
    base_params: dict,
    dvc: dict,
    overrides: dict,
    workdir: Path,
    args,
    previous: dict | None = None,
) -> SizeResult:
    """Every stage (up to ``until``) on a fresh project of ``identities`` people.

    With ``previous`` (``--resume``), the stages that run finished with the same
    params keep their measurements and outputs, and the rest run on top of them:
    a long run stopped after crop goes on from split.
    """
    params = bench_params(base_params, identities, overrides)
    photos = identities * int(params["sample"]["images_per_identity"])
    result = SizeResult(identities, photos, params=params)
    root = workdir / f"{identities}"
    project, logs = root / "project", root / "logs"
    all_stages = stage_prefix(pipeline_stages(dvc, params), until)
    done = reusable(previous, identities, params, [st.name for st in all_stages]) if project.is_dir() else []
    if not done:
        shutil.rmtree(root, ignore_errors=True)
        project.mkdir(parents=True)
    result.stages.extend(done)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    stages = all_stages[len(done) :]
    print(f"\n== {result.label}: {len(stages)} stages in {project}"
          + (f" (resumed after {done[-1].stage})" if done else ""), flush=True)  # fmt: skip
    failed = None
    for st in stages:
        m = Measure(st.name)
        result.stages.append(m)
        if failed:
            m.note = f"not run ({failed} failed)"
            continue
        with stage_lock(os.environ.get("FACESEARCH_BENCH_LOCK")):
            before = snapshot(project)
            r = run_measured(st.cmd, project, env, logs / f"{st.name}.log", args.poll, args.stage_timeout)
            m.written_bytes, m.written_files = written(before, snapshot(project))
        m.rc, m.wall_s, m.cpu_s, m.peak_rss = r["rc"], r["wall_s"], r["cpu_s"], r["peak_rss"]
        print(f"{st.name:24s} {m.wall_s:9.1f} s  cpu {m.cpu_s:9.1f} s  peak {m.peak_rss / MIB:8.0f} MiB  "
              f"wrote {m.written_bytes / MIB:9.1f} MiB in {m.written_files:,} files  rc {m.rc}",
              flush=True)  # fmt: skip
        if m.rc != 0:
            failed = st.name
            m.note = "timed out" if r["timed_out"] else f"exit {m.rc}"
            print(f"-- {st.name} failed; log {logs / (st.name + '.log')}:\n{tail(logs / (st.name + '.log'))}")
    if not args.keep:
        shutil.rmtree(project, ignore_errors=True)
    return result


# ---------------------------------------------------------------- tables and targets

RATIO_FIELDS = ("wall_s", "peak_rss", "written_bytes", "written_files")
# Stages whose *work* grows faster than the photos by definition, with the power: evaluate
# ranks every test query against every gallery photo and, for the leave-one-out metrics,
# every test photo against every other (test photos x test photos: 100x the pairs for 10x
# the photos). Their time is held to slack x growth**power; their memory and writes, like
# every other stage's, to slack x growth.
WORK_POWER = {"evaluate": 2}


def work_power(stage: str) -> int:
    return WORK_POWER.get(stage.split("@")[0], 1)


def ratios(small: SizeResult, large: SizeResult) -> dict[str, dict[str, float]]:
    """Per stage run fine at both sizes: large / small of each of RATIO_FIELDS (nan where small is 0)."""
    at_small = {m.stage: m for m in small.stages if m.rc == 0}
    out = {}
    for m in large.stages:
        s = at_small.get(m.stage)
        if m.rc != 0 or s is None:
            continue
        out[m.stage] = {f: getattr(m, f) / getattr(s, f) if getattr(s, f) else float("nan") for f in RATIO_FIELDS}
    return out


def targets(results: list[SizeResult], max_rss: float, slack: float) -> list[tuple[bool, str]]:
    """(passed, line) per target: stages ran, peak RSS per size, growth at most ``slack`` x linear."""
    lines = []
    for r in results:
        bad = [m.stage for m in r.stages if m.rc != 0]
        lines.append((not bad, f"every stage ran at {r.label}" + (f": not {', '.join(bad)}" if bad else "")))
        ran = [m for m in r.stages if m.rc is not None]
        if ran:
            worst = max(ran, key=lambda m: m.peak_rss)
            lines.append((worst.peak_rss <= max_rss,
                          f"peak RSS <= {max_rss / GIB:g} GiB at {r.label}: "
                          f"max {worst.peak_rss / GIB:.2f} GiB ({worst.stage})"))  # fmt: skip
    if len(results) >= 2:
        small, large = min(results, key=lambda r: r.photos), max(results, key=lambda r: r.photos)
        growth = large.photos / small.photos
        limit = slack * growth
        table = ratios(small, large)
        for f in RATIO_FIELDS:
            vals = {stage: v[f] for stage, v in table.items()
                    if v[f] == v[f] and (f != "wall_s" or work_power(stage) == 1)}  # fmt: skip
            if not vals:
                continue
            stage, worst = max(vals.items(), key=lambda kv: kv[1])
            lines.append((worst <= limit,
                          f"{f} grows at most linearly ({large.photos:,} / {small.photos:,} photos = {growth:.2f}x, "
                          f"limit {limit:.1f}): worst {worst:.2f} ({stage})"))  # fmt: skip
        for stage, v in table.items():
            if (power := work_power(stage)) > 1 and v["wall_s"] == v["wall_s"]:
                work = growth**power
                lines.append((v["wall_s"] <= slack * work,
                              f"wall_s of {stage} grows at most as its work (pairs: {growth:.2f}^{power} = "
                              f"{work:.0f}x, limit {slack * work:.0f}): {v['wall_s']:.2f}"))  # fmt: skip
    return lines


def markdown(results: list[SizeResult], checks: list[tuple[bool, str]]) -> str:
    out = []
    for r in results:
        out += [f"### {r.label}", "",
                "| stage | wall s | CPU s | peak RSS MiB | written MiB | files written | note |",
                "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
        for m in r.stages:
            if m.rc is None:
                out.append(f"| {m.stage} | | | | | | {m.note} |")
                continue
            out.append(f"| {m.stage} | {m.wall_s:.1f} | {m.cpu_s:.1f} | {m.peak_rss / MIB:.0f} | "
                       f"{m.written_bytes / MIB:.1f} | {m.written_files:,} | {m.note} |")  # fmt: skip
        out += [f"| **total** | **{r.total_s:.1f}** | {sum(m.cpu_s for m in r.stages):.1f} | | "
                f"{sum(m.written_bytes for m in r.stages) / MIB:.1f} | "
                f"{sum(m.written_files for m in r.stages):,} | |", ""]  # fmt: skip
    if len(results) >= 2:
        small, large = min(results, key=lambda r: r.photos), max(results, key=lambda r: r.photos)
        out += [f"### ratio {large.photos:,} / {small.photos:,} photos ({large.photos / small.photos:.2f}x)", "",
                "| stage | wall | peak RSS | written bytes | files written |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        for stage, v in ratios(small, large).items():
            out.append("| " + " | ".join([stage, *(f"{v[f]:.2f}" for f in RATIO_FIELDS)]) + " |")
        out.append("")
    out += ["### targets", ""]
    out += [f"- {'PASS' if ok else 'FAIL'} {line}" for ok, line in checks]
    out += [f"- total stage time at {r.label}: {r.total_s:.1f} s ({r.total_s / 60:.1f} min)" for r in results]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- main


def parse_sizes(text: str, skip_large: bool, per_identity: int) -> list[tuple[int, str | None]]:
    """``"1018,10177:crop"`` -> [(1018, None), (10177, "crop")]; ``skip_large`` drops > LARGE_PHOTOS photos."""
    sizes = []
    for part in text.split(","):
        ids, _, until = part.strip().partition(":")
        sizes.append((int(ids), until or None))
    if skip_large:
        sizes = [s for s in sizes if s[0] * per_identity <= LARGE_PHOTOS]
    return sizes


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def size_json(r: SizeResult) -> dict:
    return {"identities": r.identities, "photos": r.photos, "total_s": r.total_s, "params": r.params,
            "stages": [asdict(m) for m in r.stages]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=f"{round(CELEBA_IDENTITIES / 10)},{CELEBA_IDENTITIES}",
                        help="identities per size, comma-separated; IDS:STAGE stops that size after STAGE")  # fmt: skip
    parser.add_argument("--skip-200k", action="store_true", help=f"leave out sizes above {LARGE_PHOTOS:,} photos")
    parser.add_argument("--workdir", default="/tmp/facesearch-scale", help="scratch folder (outside the repo)")
    parser.add_argument("--keep", action="store_true", help="keep each size's project folder after it ran")
    parser.add_argument("--resume", metavar="REPORT_JSON",
                        help="go on from an earlier --keep run: reuse its finished stages (same params)")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="params.yaml change over BENCH_SETTINGS (YAML; train.*.x: each backbone)")  # fmt: skip
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="base params.yaml")
    parser.add_argument("--dvc", default=str(REPO / "dvc.yaml"), help="pipeline whose stages run")
    parser.add_argument("--report", default=str(REPO / "reports" / "scale"), help="writes REPORT.md and REPORT.json")
    parser.add_argument("--max-rss-gib", type=float, default=8.0, help="target: peak RSS of every stage, GiB")
    parser.add_argument("--linear-slack", type=float, default=1.2, help="target: ratio <= this x photo ratio")
    parser.add_argument("--poll", type=float, default=0.2, help="RSS sampling interval, s")
    parser.add_argument("--stage-timeout", type=float, default=0.0, help="kill a stage after this many s (0: never)")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir).resolve()
    if workdir == REPO or REPO in workdir.parents:
        raise SystemExit(f"--workdir {workdir} is inside the repository; pick a scratch folder")
    base = yaml.safe_load(Path(args.params).read_text())
    dvc = yaml.safe_load(Path(args.dvc).read_text())
    overrides = parse_set(args.set)
    per_identity = int({**BENCH_SETTINGS, **overrides}["sample.images_per_identity"])
    sizes = parse_sizes(args.sizes, args.skip_200k, per_identity)
    if not sizes:
        raise SystemExit("no sizes left to run")
    previous = json.loads(Path(args.resume).read_text()) if args.resume else None
    results = [run_size(ids, until, base, dvc, overrides, workdir, args, previous) for ids, until in sizes]
    checks = targets(results, args.max_rss_gib * GIB, args.linear_slack)
    text = markdown(results, checks)
    print("\n" + text)
    report = Path(args.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.with_suffix(".md").write_text(text)
    payload = {
        "command": " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "settings": {**BENCH_SETTINGS, **overrides},
        "sizes": [size_json(r) for r in results],
        "targets": [{"passed": ok, "target": line} for ok, line in checks],
    }
    report.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {report.with_suffix('.md')} and .json")
    return 0 if all(r.ok for r in results) and all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
